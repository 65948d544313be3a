"""Average log-probability (ALP): how strongly a model prefers this direction's solution over its twin's.

arXiv 2509.13079 (§4) measures direction awareness with the mean token log-probability of a completion y
given a prompt x over its first N tokens (N = 1000)::

    ALP(y | x) = (1 / min(N, |y|)) · Σ_{t=1..min(N,|y|)} log p(y_t | x, y_<t)

with x rendered through the model's chat template. For every row (one question in one direction) the
chosen completion is y+ = the row's own solution (``response``) and the rejected one y− = its twin's
(``other_response``: the same fact, solved in the other direction), so

    margin = ALP(y+ | x) − ALP(y− | x)

A direction-aware model has a large positive margin (≈ 1.2–1.4 nats/token in the paper after
single-direction SFT); naive forward+reverse mixing collapses it to ≈ 0.06–0.08.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from revmix.platform.data.schema import DIRECTIONS
from revmix.platform.generation.protocol import as_generator, prepare_prompts

N_TOKENS = 1000  # the paper's N


def alp(logps: Sequence[float], n_tokens: int = N_TOKENS) -> float | None:
    """Mean of the first ``n_tokens`` log-probs; None for an empty completion (ALP undefined)."""
    if n_tokens < 1:
        raise ValueError(f"ALP n_tokens must be >= 1, got {n_tokens}")
    head = list(logps[:n_tokens])
    return math.fsum(head) / len(head) if head else None


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _item_id(item: Any, index: int) -> str:
    for name in ("id", "item_id"):
        value = _field(item, name)
        if value is not None:
            return str(value)
    return str(index)


def score_items(generator: Any, items: Iterable[Any], n_tokens: int = N_TOKENS) -> list[dict[str, Any]]:
    """Per-item ALP(y+), ALP(y−) and margin for the items that have both solutions.

    ``items`` are ``EvalItem``s, canonical ``Row``s or dicts with ``prompt``, ``response``,
    ``other_response`` and ``direction``. One batched ``generator.score`` call covers y+ and y− of every
    item; items lacking ``other_response`` or with an empty solution are left out (the caller's ``n``
    counts only scored items).
    """
    usable = [
        (i, it)
        for i, it in enumerate(items)
        if _field(it, "response") and _field(it, "other_response") and _field(it, "prompt") is not None
    ]
    if not usable:
        return []
    prompts = prepare_prompts(generator, [_field(it, "prompt") for _, it in usable])
    completions = [_field(it, "response") for _, it in usable] + [
        _field(it, "other_response") for _, it in usable
    ]
    logps = generator.score(prompts + prompts, completions, max_tokens=n_tokens)
    records = []
    for k, (i, it) in enumerate(usable):
        chosen, rejected = alp(logps[k], n_tokens), alp(logps[k + len(usable)], n_tokens)
        if chosen is None or rejected is None:
            continue
        direction = _field(it, "direction")
        records.append(
            {
                "id": _item_id(it, i),
                "direction": getattr(direction, "label", direction),
                "chosen": chosen,
                "rejected": rejected,
                "margin": chosen - rejected,
            }
        )
    return records


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-direction means of chosen / rejected / margin; ``forward`` and ``reverse`` are always present
    (None values and n = 0 when a direction has no items)."""
    names = list(DIRECTIONS) + sorted({str(r["direction"]) for r in records} - set(DIRECTIONS) - {"None"})
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        group = [r for r in records if str(r["direction"]) == name]
        n = len(group)
        cell: dict[str, Any] = {
            key: math.fsum(r[key] for r in group) / n if n else None
            for key in ("chosen", "rejected", "margin")
        }
        table[name] = {**cell, "n": n}
    return table


def alp_table(
    generator_or_model: Any,
    items: Iterable[Any],
    n_tokens: int = N_TOKENS,
    tokenizer: Any = None,
    batch_size: int = 16,
) -> dict[str, dict[str, Any]]:
    """``{"forward": {"chosen", "rejected", "margin", "n"}, "reverse": {...}}`` for a generator, an
    in-memory model (pass ``tokenizer``; the training loop's live policy) or a model path."""
    generator = as_generator(generator_or_model, tokenizer=tokenizer, batch_size=batch_size)
    return summarize(score_items(generator, items, n_tokens))


def cross_direction_table(tables: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows ``{"train", "test", "chosen", "rejected", "margin", "n"}``: each trained model (key of
    ``tables``, e.g. ``"forward"``/``"reverse"``) against each test direction — the paper's 2×2 figure."""
    rows = []
    for train, table in tables.items():
        for test in [d for d in DIRECTIONS if d in table] + [d for d in table if d not in DIRECTIONS]:
            cell = table[test]
            rows.append(
                {
                    "train": train,
                    "test": test,
                    **{k: cell.get(k) for k in ("chosen", "rejected", "margin", "n")},
                }
            )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of ``cross_direction_table`` rows (or of one ``alp_table`` via a single key)."""

    def num(v: Any) -> str:
        return "—" if v is None else f"{v:.4f}"

    lines = ["| train | test | ALP(y+) | ALP(y−) | margin | n |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['train']} | {r['test']} | {num(r['chosen'])} | {num(r['rejected'])} | {num(r['margin'])} | {r['n']} |"
        )
    return "\n".join(lines)
