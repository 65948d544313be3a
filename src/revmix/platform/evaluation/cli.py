"""``revmix eval (--model PATH | --run DIR) --benchmarks NAMES --out DIR``: accuracy and ALP of one model.

Examples::

    revmix eval --run runs/sft_tiny --benchmarks synthetic --out runs/sft_tiny/eval
    revmix eval --model tiny:tiny --benchmarks gsm8k,math500 --limit 50 --out out/eval
    revmix eval --generator openai --endpoint http://127.0.0.1:8000/v1 --benchmarks gsm8k --out out/eval

Writes ``DIR/eval.json`` (the ``evaluate`` result plus the settings used), ``DIR/eval.md`` (a short
summary) and ``DIR/predictions.jsonl`` (one line per item: completion, gold answer, correct). With
``--run``, the synthetic benchmark uses the run's own data settings (families, items, seed, test
fraction), so it is exactly the split that training held out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from revmix.platform.generation.protocol import KINDS as GENERATOR_KINDS
from revmix.platform.generation.protocol import SamplingParams

MAX_NEW_TOKENS = 32768


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--model", help="model dir, tiny:<scale>, or (with --generator openai) the served model name"
    )
    src.add_argument("--run", help="run directory from `revmix train --out DIR` (evaluates DIR/model)")
    add = parser.add_argument
    add(
        "--benchmarks",
        required=True,
        nargs="+",
        help="names, comma- or space-separated "
        "(math500, aime2024, aime2025, gsm8k, gpqa:<csv>, jsonl:<path>, synthetic)",
    )
    add("--limit", type=int, help="first N items of each benchmark")
    add("--generator", choices=GENERATOR_KINDS, default="hf", help="backend (default hf)")
    add("--endpoint", help="OpenAI-compatible base URL for --generator openai")
    add("--tokenizer", help="tokenizer dir for --generator openai (enables ALP)")
    add("--max-new-tokens", type=int, default=512, help=f"generation budget per item (1..{MAX_NEW_TOKENS})")
    add("--samples", type=int, default=1, help="completions sampled per item (accuracy: their mean)")
    add("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy; --samples > 1: > 0)")
    add("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    add("--pass-k", help="k of pass@k and maj@k, comma-separated, each <= --samples (default: 1,SAMPLES)")
    add(
        "--engine-kwargs",
        metavar="JSON",
        help='--generator vllm: engine arguments, e.g. \'{"tensor_parallel_size": 2, "max_model_len": '
        "8192}' (tensor_parallel_size, max_model_len, gpu_memory_utilization, max_num_seqs, dtype, "
        "enforce_eager)",
    )
    add("--alp-tokens", type=int, default=1000, help="ALP over the first N completion tokens")
    add("--no-alp", action="store_true", help="skip ALP scoring")
    add("--batch-size", type=int, default=16, help="prompts per batch (openai: concurrent requests)")
    add(
        "--seed", type=int, default=0, help="benchmark and sampling seed (GPQA choice order, synthetic split)"
    )
    add("--out", required=True, help="output directory (eval.json, eval.md, predictions.jsonl)")
    add("--quiet", action="store_true", help="no progress bars")


def benchmark_names(values: list[str]) -> list[str]:
    from revmix.platform.evaluation.benchmarks import benchmark_names as known

    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        raise ValueError("--benchmarks: no benchmark named")
    for n in names:
        if n.partition(":")[0] not in known():
            raise ValueError(
                f"--benchmarks: unknown benchmark {n!r}; valid: {', '.join(known())} (jsonl:<path>, gpqa:<csv>)"
            )
    return names


def sampling_from_args(args: argparse.Namespace) -> tuple[SamplingParams, list[int]]:
    """The sampling flags as ``SamplingParams`` and the k of pass@k / maj@k, checked (ValueError)."""
    n = args.samples
    if n < 1:
        raise ValueError(f"--samples must be >= 1, got {n}")
    if n > 1 and args.temperature == 0:
        raise ValueError(
            f"--samples {n} with --temperature 0 gives {n} identical greedy samples; set --temperature > 0"
        )
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS}, got {args.max_new_tokens}")
    try:
        ks = [int(k) for k in args.pass_k.split(",") if k.strip()] if args.pass_k else []
    except ValueError:
        raise ValueError(
            f"--pass-k: expected comma-separated integers such as 1,4, got {args.pass_k!r}"
        ) from None
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"--pass-k: {args.pass_k} has a k outside 1..--samples ({n})")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        n=n,
    )
    return params, sorted(set(ks or ([1, n] if n > 1 else [])))


def run_data_kwargs(run_dir: str, seed: int) -> dict[str, Any]:
    """``load_benchmark`` kwargs for ``synthetic`` from the run's ``config.yaml`` (empty if none)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    if data.get("source", "synthetic") != "synthetic":
        return {}
    kw: dict[str, Any] = {"seed": data.get("seed", seed)}
    for key, arg in (
        ("families", "synthetic_families"),
        ("n_items", "synthetic_n"),
        ("test_fraction", "synthetic_test_fraction"),
    ):
        if key in data:
            kw[arg] = data[key]
    return kw


def render_markdown(result: dict[str, Any], settings: dict[str, Any]) -> str:
    from revmix.platform.evaluation.alp import cross_direction_table, format_table

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"# Evaluation of `{settings['model']}`",
        "",
        f"generator `{settings['generator']}`, "
        f"max_new_tokens {settings['max_new_tokens']}, limit {settings['limit']}, {result['seconds']:.1f} s",
        "",
    ]
    lines += ["| benchmark | accuracy | n | forward | reverse |", "|---|---:|---:|---:|---:|"]
    for name, b in result["benchmarks"].items():
        by = b["by_direction"]
        cells = [
            pct(by[d]["accuracy"]) + f" ({by[d]['n']})" if d in by else "—" for d in ("forward", "reverse")
        ]
        lines.append(f"| {name} | {pct(b['accuracy'])} | {b['n']} | {cells[0]} | {cells[1]} |")
    lines += _sampled_table(result, settings)
    if result.get("alp"):
        lines += ["", f"## ALP (first {settings['alp_tokens']} tokens; nats/token)", ""]
        lines.append(format_table(cross_direction_table({"this model": result["alp"]})))
    return "\n".join(lines) + "\n"


def _with_engine_kwargs(model: Any, args: argparse.Namespace) -> Any:
    """``--engine-kwargs`` given: the model path as a vLLM generator built with them (else ``model``)."""
    if not args.engine_kwargs:
        return model
    from revmix.platform.generation.protocol import make_generator, resolve_kind
    from revmix.platform.generation.vllm_backend import engine_kwargs_from_json

    engine = engine_kwargs_from_json(args.engine_kwargs, "--engine-kwargs")
    if resolve_kind(args.generator) != "vllm":
        raise ValueError(f"--engine-kwargs needs --generator vllm (here: {resolve_kind(args.generator)})")
    return make_generator("vllm", model, engine_kwargs=engine)


def _sampled_table(result: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """pass@k and maj@k per benchmark and direction (none with one sample per item)."""
    ks = settings.get("pass_k") or []
    if not ks:
        return []
    names = [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks]
    lines = ["", f"## {settings['samples']} samples per item (temperature {settings['temperature']})", ""]
    lines += ["| benchmark | direction | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for name, b in result["benchmarks"].items():
        for d, part in [("all", b), *b["by_direction"].items()]:
            cells = ["—" if part.get(m) is None else f"{100 * part[m]:.1f}%" for m in names]
            lines.append(f"| {name} | {d} | " + " | ".join(cells) + " |")
    return lines


def _loadable(model: str | None, generator: str) -> contextlib.AbstractContextManager[str | None]:
    """``model`` as the backend reads it: vLLM needs a full model folder, so an adapter stage is merged
    into a temporary copy for it (removed at exit); hf loads adapter stages itself (base + adapters)."""
    from revmix.platform.generation.protocol import resolve_kind
    from revmix.platform.models import full_model_dir

    if model is None or resolve_kind(generator) != "vllm":
        return contextlib.nullcontext(model)
    return full_model_dir(model)


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        return _run(args, stack)


def _run(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    from revmix.platform.evaluation.runner import evaluate
    from revmix.platform.generation.protocol import resolve_model_dir

    try:
        names = benchmark_names(args.benchmarks)
        kwargs: dict[str, dict[str, Any]] = {n: {"seed": args.seed} for n in names}
        if args.generator == "openai":
            model = args.model  # the served name; None = the endpoint's first model
            if args.run:
                raise ValueError(
                    "--run with --generator openai: serve the run (`revmix serve DIR`) and pass --model NAME"
                )
            if not args.endpoint:
                raise ValueError("--generator openai needs --endpoint URL")
        elif args.run or args.model:
            model = resolve_model_dir(args.run or args.model)
            if args.run:
                kwargs["synthetic"] = {**kwargs.get("synthetic", {}), **run_data_kwargs(args.run, args.seed)}
        else:
            raise ValueError("one of --model PATH or --run DIR is required")
        sampling, ks = sampling_from_args(args)
        loadable = stack.enter_context(_loadable(model, args.generator))
        target = _with_engine_kwargs(loadable, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"revmix eval: {e}", file=sys.stderr)
        return 2
    result = evaluate(
        target,
        names,
        limit=args.limit,
        sampling=sampling,
        ks=ks,
        alp_tokens=args.alp_tokens,
        generator=args.generator,
        endpoint=args.endpoint,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        alp=not args.no_alp,
        benchmark_kwargs={n: kw for n, kw in kwargs.items() if n in names},
        progress=not args.quiet,
        return_predictions=True,
    )
    settings = {
        "model": model or args.endpoint,
        "run": args.run,
        "generator": args.generator,
        "endpoint": args.endpoint,
        "benchmarks": names,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "samples": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "pass_k": ks,
        "engine_kwargs": json.loads(args.engine_kwargs) if args.engine_kwargs else None,
        "alp_tokens": args.alp_tokens,
        "seed": args.seed,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predictions = result.pop("predictions")
    (out / "eval.json").write_text(json.dumps({**result, "settings": settings}, indent=2) + "\n")
    (out / "eval.md").write_text(render_markdown(result, settings))
    with open(out / "predictions.jsonl", "w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    print(
        json.dumps(
            {"out": os.path.abspath(out), **{n: b["accuracy"] for n, b in result["benchmarks"].items()}}
        )
    )
    return 0
