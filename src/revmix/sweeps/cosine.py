"""The forward/reverse gradient cosine over training, per condition: the report's "Gradient cosine" table.

A stage with ``grad_cosine_every: N`` logs ``grad_cosine/forward_reverse`` — cos(∇L(forward rows),
∇L(reverse rows)) of the stage's objective on the step's batch — every N steps into ``metrics.jsonl``.
Negative values mean the two directions pull the weights apart (the paper's interference explanation of
the mixing penalty); PCGrad projects exactly these conflicts away. Each run's records are cut into
:data:`WINDOWS` equal parts of the logging stage's steps and averaged within each; a condition's cell is
the mean over seeds of those per-seed averages with the 95% Student-t interval over seeds, and its last
column is the per-seed change from the first part to the last, so "does the conflict grow" is read with
an interval. Batches holding a single direction (a step curriculum's halves) have no cosine and leave
their part empty.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from revmix.sweeps.conditions import Condition
from revmix.sweeps.intervals import compare_text, format_interval, mean_interval
from revmix.sweeps.plots import read_metrics

KEY = "grad_cosine/forward_reverse"
WINDOWS = 4
TEXT = (
    "cos(∇L forward rows, ∇L reverse rows) of the training objective on the step's batch, logged every "
    "`grad_cosine_every` steps: each run's records averaged within each quarter of its stage's steps, "
    "then the mean over seeds with the 95% Student-t interval over seeds; last − first is the per-seed "
    "change from the first quarter to the last (— where a quarter logged no cosine: a batch holding one "
    "direction has none)."
)


def window_means(records: list[dict[str, Any]], key: str = KEY, windows: int = WINDOWS) -> list[float | None]:
    """The mean of ``key`` in each of ``windows`` equal parts of the steps of the stage that logged it
    (its first such stage; steps 1..S, part k holds steps with (k−1)·S/w < step ≤ k·S/w); None for a part
    without a record, all None when no record has ``key``."""
    logged = [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not logged:
        return [None] * windows
    stage = logged[0].get("stage", 0)
    last = max(int(r.get("step", 0)) for r in records if r.get("stage", 0) == stage)
    parts: list[list[float]] = [[] for _ in range(windows)]
    for r in logged:
        if r.get("stage", 0) == stage:
            k = min(windows - 1, max(0, math.ceil(int(r["step"]) * windows / last) - 1))
            parts[k].append(float(r[key]))
    return [math.fsum(p) / len(p) if p else None for p in parts]


def run_windows(out_dir: Path, run_dir: Any) -> list[float | None]:
    """:func:`window_means` of one trial's ``metrics.jsonl`` (all None when it has none)."""
    if not isinstance(run_dir, str):
        return [None] * WINDOWS
    return window_means(read_metrics(out_dir / run_dir / "metrics.jsonl"))


def cosine_conditions(conditions: list[Condition], out_dir: Path) -> dict[str, dict[int, list[float | None]]]:
    """condition label → seed → its windows, for the conditions where some seed logged a cosine."""
    out: dict[str, dict[int, list[float | None]]] = {}
    for c in conditions:
        found = {seed: run_windows(out_dir, c.run_dirs.get(seed)) for seed in c.seeds}
        if any(v is not None for w in found.values() for v in w):
            out[c.label] = found
    return out


def cosine_rows(by_condition: dict[str, dict[int, list[float | None]]]) -> list[list[str]]:
    """One row per condition: label, seeds, one ``mean [low, high]`` cell per window, then last − first."""
    rows = []
    for label, seeds in by_condition.items():
        cells = [label, str(len(seeds))]
        for k in range(WINDOWS):
            vals = [v for w in seeds.values() if (v := w[k]) is not None]
            cells.append(format_interval(mean_interval(vals), show_n=len(vals) < len(seeds)) if vals else "—")
        change = [b - a for w in seeds.values() if (a := w[0]) is not None and (b := w[-1]) is not None]
        cells.append(
            format_interval(mean_interval(change), show_n=len(change) < len(seeds)) if change else "—"
        )
        rows.append(cells)
    return rows


def cosine_sentences(
    by_condition: dict[str, dict[int, list[float | None]]], pairs: list[tuple[str, str]]
) -> list[str]:
    """For each ``pairs`` entry where both conditions logged the cosine: the difference of their mean
    cosine over the whole stage (each seed's mean of its quarters), in words."""
    whole = {
        label: {s: math.fsum(v) / len(v) for s, w in seeds.items() if (v := [x for x in w if x is not None])}
        for label, seeds in by_condition.items()
    }
    return [
        "mean cosine over the stage: " + compare_text(a, b, whole[a], whole[b])
        for a, b in pairs
        if whole.get(a) and whole.get(b)
    ]
