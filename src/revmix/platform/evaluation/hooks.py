"""Evaluation inside training: ALP on the held-out slice every N steps / epoch, full eval at stage end.

The training loop calls :func:`evaluate_policy` on rank 0 with the live policy (no save/reload). The
run's own held-out split (split by item, so no fact leaks) is the ``synthetic`` benchmark when the data
is synthetic and ``heldout`` otherwise; named benchmarks (``math500``, ``gsm8k``, …) load from assets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from revmix.config import ExperimentConfig
from revmix.objectives.reference import eval_mode
from revmix.platform.evaluation.benchmarks import EvalItem, load_benchmark

SYNTHETIC_PREFIX = "synthetic/"


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


def evaluate_policy(
    cfg: ExperimentConfig, eval_rows: list[dict[str, Any]], policy: Any, tokenizer: Any, alp_only: bool
) -> dict[str, Any]:
    """ALP metrics (``alp_only``) or the full evaluation dict for the stage summary."""
    from revmix.platform.evaluation.alp import alp_table
    from revmix.platform.evaluation.runner import evaluate

    items = heldout_items(eval_rows)
    with eval_mode(policy):
        alp = alp_table(
            policy, _balanced(items, cfg.eval.alp_limit), cfg.eval.alp_tokens, tokenizer=tokenizer
        )
        if alp_only:
            return flatten_alp(alp)
        name = "synthetic" if cfg.data.source == "synthetic" else "heldout"
        per_dir = None if cfg.eval.limit is None else max(1, cfg.eval.limit // 2)
        benches: dict[str, Sequence[Any]] = {name: _balanced(items, per_dir)}
        for b in cfg.eval.benchmarks:
            if b not in ("synthetic", "heldout"):
                benches[b] = load_benchmark(b, limit=cfg.eval.limit)
        result = evaluate(
            policy,
            benches,
            max_new_tokens=cfg.eval.max_new_tokens,
            alp_tokens=cfg.eval.alp_tokens,
            tokenizer=tokenizer,
            progress=False,
            alp=False,  # ALP above, on its own (alp_limit) slice
        )
    return {**result, "alp": alp}
