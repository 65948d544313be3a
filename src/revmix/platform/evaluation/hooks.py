"""Evaluation inside training: ALP on the held-out slice every N steps / epoch, full eval at stage end.

The training loop calls :func:`evaluate_policy` on rank 0 with the live policy (no save/reload). With
``eval.generator: vllm`` rank 0 computes only ALP there; the driver then samples the benchmarks from the
saved stage model in one Ray Data LLM job (:func:`complete_stage_eval`), once the stage's workers have
released their GPUs — inside rank 0 the engine would wait for the GPU its own worker holds. The
run's own held-out split (split by item, so no fact leaks) is the ``synthetic`` benchmark when the data
is synthetic and ``heldout`` otherwise; named benchmarks (``math500``, ``gsm8k``, …) load from assets.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from revmix.config import ExperimentConfig
from revmix.objectives.reference import eval_mode
from revmix.platform.evaluation.benchmarks import EvalItem, load_benchmark
from revmix.platform.generation.protocol import SamplingParams
from revmix.validation import ConfigError

SYNTHETIC_PREFIX = "synthetic/"
PENDING = "pending"  # in a stage's eval dict: generation left to the driver (its backend)


def heldout_items(rows: list[dict[str, Any]]) -> list[EvalItem]:
    """Canonical held-out rows as evaluation items (both directions, y+ and y− kept for ALP)."""
    return [
        EvalItem(
            id=f"{r['item_id']}/{r['direction']}",
            prompt=r["prompt"],
            answer=str(r.get("answer") or ""),
            kind="exact" if str(r.get("task", "")).startswith(SYNTHETIC_PREFIX) else "math",
            direction=r["direction"],
            task=r.get("task") or "heldout",
            response=r.get("response"),
            other_response=r.get("other_response"),
        )
        for r in rows
    ]


def _balanced(items: list[EvalItem], per_direction: int | None) -> list[EvalItem]:
    if per_direction is None:
        return items
    out, seen = [], {"forward": 0, "reverse": 0}
    for it in items:
        if seen.get(it.direction or "", 0) < per_direction:
            out.append(it)
            seen[it.direction or ""] = seen.get(it.direction or "", 0) + 1
    return out


def flatten_alp(table: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"forward": {"margin": m, ...}}`` → ``{"alp/forward/margin": m, ...}`` (numbers only)."""
    return {
        f"alp/{d}/{k}": float(v)
        for d, row in table.items()
        for k, v in row.items()
        if k in ("chosen", "rejected", "margin") and v is not None
    }


def eval_sampling(cfg: ExperimentConfig) -> SamplingParams:
    """The stage-end evaluation's sampling: ``eval.samples`` completions per item at ``eval.temperature``."""
    e = cfg.eval
    return SamplingParams(
        max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, seed=e.seed, n=e.samples
    )


def eval_benchmarks(cfg: ExperimentConfig, items: list[EvalItem]) -> dict[str, Sequence[Any]]:
    """The run's held-out split (``synthetic`` or ``heldout``, balanced by direction) and named benchmarks."""
    name = "synthetic" if cfg.data.source == "synthetic" else "heldout"
    per_dir = None if cfg.eval.limit is None else max(1, cfg.eval.limit // 2)
    benches: dict[str, Sequence[Any]] = {name: _balanced(items, per_dir)}
    for b in cfg.eval.benchmarks:
        if b not in ("synthetic", "heldout"):
            benches[b] = load_benchmark(b, limit=cfg.eval.limit)
    return benches


def evaluate_policy(
    cfg: ExperimentConfig, eval_rows: list[dict[str, Any]], policy: Any, tokenizer: Any, alp_only: bool
) -> dict[str, Any]:
    """ALP metrics (``alp_only``) or the full evaluation dict for the stage summary.

    With ``eval.generator: vllm`` the stage-end generation is left to the driver (:func:`complete_stage_eval`
    over the saved stage model): the dict then holds the ALP table and ``"pending": "vllm"``.
    """
    from revmix.platform.evaluation.alp import alp_table
    from revmix.platform.evaluation.runner import evaluate

    items = heldout_items(eval_rows)
    with eval_mode(policy):
        alp = alp_table(
            policy, _balanced(items, cfg.eval.alp_limit), cfg.eval.alp_tokens, tokenizer=tokenizer
        )
        if alp_only:
            return flatten_alp(alp)
        if cfg.eval.generator == "vllm":
            return {"alp": alp, PENDING: "vllm"}
        result = evaluate(
            policy,
            eval_benchmarks(cfg, items),
            sampling=eval_sampling(cfg),
            ks=cfg.eval.ks(),
            alp_tokens=cfg.eval.alp_tokens,
            tokenizer=tokenizer,
            progress=False,
            alp=False,  # ALP above, on its own (alp_limit) slice
            return_predictions=True,
            batch_size=cfg.eval.batch_size,
        )
    return {**with_item_scores(result), "alp": alp}


def evaluate_start(cfg: ExperimentConfig, model_path: str, eval_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The starting model's evaluation (``eval.at_start``), the baseline each stage's is read against:
    the stage-end evaluation's items, sampling and ALP slice, on the driver (its GPU when it has one; the
    workers' may be elsewhere) with transformers generate."""
    import torch

    from revmix.platform.models import load_model, load_tokenizer

    policy = load_model(model_path, device="cuda" if torch.cuda.is_available() else "cpu")
    hf = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"generator": "hf"})})
    return evaluate_policy(hf, eval_rows, policy, load_tokenizer(model_path), alp_only=False)


def with_item_scores(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with its predictions folded into each benchmark as ``items: {"ids", "correct"}`` —
    per item, the fraction of its samples scored correct — so a sweep report can bootstrap accuracy over
    items and seeds (:func:`revmix.sweeps.intervals.bootstrap_accuracy`); completions are not kept."""
    out = {**result, "benchmarks": {k: dict(v) for k, v in result["benchmarks"].items()}}
    for p in out.pop("predictions", []):
        flags = p.get("samples_correct") or [p["correct"]]
        items = out["benchmarks"][p["benchmark"]].setdefault("items", {"ids": [], "correct": []})
        items["ids"].append(p["id"])
        items["correct"].append(sum(bool(f) for f in flags) / len(flags))
    return out


def resolve_generator(cfg: ExperimentConfig, use_gpu: bool) -> ExperimentConfig:
    """``cfg`` with ``eval.generator`` made concrete, said in one line: ``auto`` is vllm when the run
    trains on GPUs and vLLM is importable, else hf (on CPU, an engine's start-up costs more than it
    saves). An explicit ``vllm`` without vLLM installed fails here, before training."""
    choice = cfg.eval.generator
    has_vllm = importlib.util.find_spec("vllm") is not None
    if choice == "vllm" and not has_vllm:
        raise ConfigError(
            "eval.generator: 'vllm' but vllm is not importable in this environment; install vLLM "
            "(docs/vllm_cpu.md for CPU) or set eval.generator=hf (valid: auto, hf, vllm)"
        )
    if choice == "auto":
        choice = "vllm" if use_gpu and has_vllm else "hf"
    why = {"hf": "transformers generate on rank 0", "vllm": "a Ray Data LLM job on the saved model"}
    print(
        f"revmix: stage-end evaluation with {choice} ({why[choice]}, eval.generator={cfg.eval.generator})",
        flush=True,
    )
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"generator": choice})})


def eval_pending(result: dict[str, Any]) -> bool:
    """Whether rank 0 left the stage's generation to the driver (``eval.generator: vllm``)."""
    return (result.get("eval") or {}).get(PENDING) == "vllm"


def complete_stage_eval(
    cfg: ExperimentConfig, result: dict[str, Any], model_dir: str, eval_rows: list[dict], use_gpu: bool
) -> dict[str, Any]:
    """The stage ``result`` with its pending vLLM generation done (unchanged when none is pending).

    Runs on the driver after the stage's workers are gone, so the engines get the GPUs training held;
    ALP stays the one rank 0 computed with the live policy.
    """
    if not eval_pending(result):
        return result
    ev = result["eval"]
    from revmix.platform.evaluation.runner import evaluate
    from revmix.platform.generation.vllm_backend import RayDataLLMGenerator

    gen = RayDataLLMGenerator(model_dir, engine_kwargs=cfg.eval.engine_kwargs.kwargs(), on_gpu=use_gpu)
    found = evaluate(
        gen,
        eval_benchmarks(cfg, heldout_items(eval_rows)),
        sampling=eval_sampling(cfg),
        ks=cfg.eval.ks(),
        one_call=True,
        progress=False,
        alp=False,
        return_predictions=True,
    )
    found = with_item_scores(found)
    return {**result, "eval": {**found, "alp": ev.get("alp", {}), "generator": "vllm"}}
