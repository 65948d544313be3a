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
import json
import os
import sys
from pathlib import Path
from typing import Any

from revmix.platform.generation.protocol import KINDS as GENERATOR_KINDS


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
    add("--max-new-tokens", type=int, default=512, help="generation budget per item")
    add("--alp-tokens", type=int, default=1000, help="ALP over the first N completion tokens")
    add("--no-alp", action="store_true", help="skip ALP scoring")
    add("--batch-size", type=int, default=16, help="prompts per batch (openai: concurrent requests)")
    add("--seed", type=int, default=0, help="benchmark seed (GPQA choice order, synthetic split)")
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
    if result.get("alp"):
        lines += ["", f"## ALP (first {settings['alp_tokens']} tokens; nats/token)", ""]
        lines.append(format_table(cross_direction_table({"this model": result["alp"]})))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
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
    except (ValueError, FileNotFoundError) as e:
        print(f"revmix eval: {e}", file=sys.stderr)
        return 2
    result = evaluate(
        model,
        names,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
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
