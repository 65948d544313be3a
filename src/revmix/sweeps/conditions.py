"""Trials grouped by condition — every config point except the seed — with means, 95% intervals over
seeds and the differences between conditions, in words.

A condition is one value of the columns that distinguish training conditions
(:func:`revmix.sweeps.plots.condition_columns`: the descriptors and swept paths that vary, never the
seed); its trials are its seeds. Every number is the mean over seeds with the Student-t interval over
seeds (:mod:`revmix.sweeps.intervals`): a trial's final metric is one value per seed, so the seeds are
the replicates. Differences are paired by seed when both conditions ran the same seeds, else Welch's.
Accuracy also gets a "(bootstrap)" column when every trial of a condition kept its per-item scores
(``summary.json``: ``eval.benchmarks.<bench>.items``): the percentile bootstrap over seeds × items,
which counts the evaluation items' sampling noise as well and so has an interval with one seed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revmix.sweeps import results as res
from revmix.sweeps.intervals import (
    NO_INTERVAL,
    bootstrap_accuracy,
    compare_text,
    decimals,
    format_interval,
    mean_interval,
)
from revmix.sweeps.plots import condition_columns, condition_label

# Key metrics shown per condition after the sweep metric (those the trials reported).
KEY_METRICS = ("eval/alp/forward/margin", "eval/alp/reverse/margin", "final/loss")
ALL_PAIRS_UP_TO = 5  # conditions; beyond that each is compared with the best only
INTERVAL_TEXT = (
    "Per condition (every swept value except the seed): the mean over seeds and, in brackets, the 95% "
    "Student-t interval over seeds (one final value per seed; t quantile with n − 1 degrees of "
    "freedom); n = the seeds that finished, (n=k) where fewer reported a metric."
)
BOOTSTRAP_TEXT = (
    ' The "(bootstrap)" accuracy columns: percentile bootstrap over seeds and, within each drawn seed, '
    "its evaluation items (2000 resamples, seeded): item-sampling noise included, so one seed has one too."
)
DIFFERENCE_TEXT = (
    "Differences of {metric} between conditions: mean difference and its 95% t interval, paired by seed "
    'when both conditions ran the same seeds (else Welch\'s interval). "Within seed-to-seed noise" '
    "means the interval contains 0: the seeds cannot tell the two conditions apart. {which}"
)


@dataclass(frozen=True)
class Condition:
    """The finished trials of one condition: per metric column, seed → value."""

    label: str
    seeds: tuple[int, ...]
    values: dict[str, dict[int, float]]
    items: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # bench → seed → item scores
    run_dirs: dict[int, str] = field(default_factory=dict)  # seed → its run folder, relative to the sweep


def metric_columns(df: Any, metric: str) -> list[str]:
    """The sweep metric, each benchmark's accuracy (overall, forward, reverse: at the end of the run, then
    after each earlier stage, then of the starting model), then KEY_METRICS — only columns some trial
    reported."""
    columns = list(df.columns)
    accuracy = [
        c
        for prefix, _ in res.evaluations(columns)
        for c in sorted(columns)
        if re.fullmatch(rf"{prefix}eval/accuracy/[^/]+(/forward|/reverse)?", c)
    ]
    cols = [res.metric_column(metric, columns), *accuracy, *KEY_METRICS]
    return [c for c in dict.fromkeys(cols) if c in df.columns and df[c].notna().any()]


STAGES_TEXT = (
    "How each condition's accuracy moved from one evaluation to the next: the starting model "
    "(eval.at_start), the end of each earlier stage, the end of the run. The later minus the earlier, with "
    "its 95% t interval over seeds, paired by seed (the same trial evaluated twice); within seed-to-seed "
    "noise when the interval contains 0."
)


def stage_change_sentences(conditions: list[Condition], columns: list[str]) -> list[str]:
    """Per condition and benchmark, one sentence per consecutive pair of its evaluations (start → stage 0 →
    … → end of run): ``later − earlier`` via :func:`revmix.sweeps.intervals.compare_text`."""
    oldest_first = res.evaluations(columns)[::-1]
    benches = dict.fromkeys(m.group(1) for c in columns if (m := re.fullmatch(r"eval/accuracy/([^/]+)", c)))
    out = []
    for bench, cond in ((b, c) for b in benches for c in conditions):
        have = [
            (f"{p}eval/accuracy/{bench}", w)
            for p, w in oldest_first
            if cond.values.get(f"{p}eval/accuracy/{bench}")
        ]
        for (earlier, was), (later, now) in zip(have, have[1:]):
            text = compare_text(now, was, cond.values[later], cond.values[earlier])
            out.append(f"{cond.label}, {bench}: {text}")
    return out


def item_scores(out_dir: Path, run_dir: Any) -> dict[str, list[float]]:
    """bench → per-item scores of one trial's final evaluation ({} when its summary kept none)."""
    path = out_dir / str(run_dir) / "summary.json" if isinstance(run_dir, str) else None
    if path is None or not path.exists():
        return {}
    benches = ((json.loads(path.read_text()).get("eval") or {}).get("benchmarks")) or {}
    return {
        name: [float(c) for c in b["items"]["correct"]]
        for name, b in benches.items()
        if isinstance(b, dict) and isinstance(b.get("items"), dict) and b["items"].get("correct")
    }


def group_conditions(
    ok: Any, spec_paths: list[str], columns: list[str], out_dir: Path | None = None
) -> list[Condition]:
    """Finished trials grouped by condition, in order of first appearance (the table's trial order);
    with ``out_dir``, each trial's per-item scores too (benchmarks every trial of the condition kept)."""
    cols = condition_columns(ok, spec_paths)
    found: dict[str, list[Any]] = {}
    for _, row in ok.iterrows():
        found.setdefault(condition_label(row, cols) if cols else "all trials", []).append(row)
    out = []
    for label, rows in found.items():
        values = {c: {int(r["seed"]): float(r[c]) for r in rows if _finite(r.get(c))} for c in columns}
        scores = [item_scores(out_dir, r.get("run_dir")) for r in rows] if out_dir is not None else []
        common = set.intersection(*(set(s) for s in scores)) if scores else set()
        items = {b: {int(r["seed"]): s[b] for r, s in zip(rows, scores)} for b in sorted(common)}
        run_dirs = {int(r["seed"]): r["run_dir"] for r in rows if isinstance(r.get("run_dir"), str)}
        out.append(Condition(label, tuple(sorted(int(r["seed"]) for r in rows)), values, items, run_dirs))
    return out


def bootstrap_columns(conditions: list[Condition]) -> list[str]:
    """The benchmarks with per-item scores in at least one condition (a "(bootstrap)" column each)."""
    return sorted({b for c in conditions for b in c.items})


def bootstrap_cell(c: Condition, bench: str) -> str:
    """``0.500 [0.402, 0.598]``: mean accuracy and its bootstrap interval over seeds × items."""
    seeds = c.items.get(bench)
    if not seeds:
        return res.MISSING
    iv = bootstrap_accuracy(seeds)
    places = decimals(iv.mean, iv.low, iv.high)
    return f"{iv.mean:.{places}f} [{iv.low:.{places}f}, {iv.high:.{places}f}]"


def condition_rows(conditions: list[Condition], columns: list[str]) -> list[list[str]]:
    """One table row per condition: label, seeds, ``mean [low, high]`` per column (t over seeds), then
    one bootstrap cell per :func:`bootstrap_columns` benchmark."""
    rows = []
    for c in conditions:
        cells = []
        for col in columns:
            vals = c.values.get(col) or {}
            if not vals:
                cells.append(res.MISSING)
                continue
            cells.append(format_interval(mean_interval(list(vals.values())), show_n=len(vals) < len(c.seeds)))
        cells += [bootstrap_cell(c, b) for b in bootstrap_columns(conditions)]
        rows.append([c.label, str(len(c.seeds)), *cells])
    return rows


def one_seed_note(conditions: list[Condition]) -> list[str]:
    """The line a table with single-seed conditions carries (their cells show the mean only)."""
    single = [c.label for c in conditions if len(c.seeds) == 1]
    if not single:
        return []
    which = "every condition" if len(single) == len(conditions) else ", ".join(single)
    return [f"{NO_INTERVAL} ({which}): the cell is the one seed's value; run more seeds for an interval"]


def difference_sentences(conditions: list[Condition], column: str, mode: str) -> tuple[list[str], str]:
    """A sentence per compared pair (all pairs up to ALL_PAIRS_UP_TO conditions, else each against the
    best by mean) and the line saying which pairs were compared."""
    have = [c for c in conditions if c.values.get(column)]
    if len(have) < 2:
        return [], ""
    sign = 1.0 if mode == "max" else -1.0
    mean = {c.label: sign * math.fsum(c.values[column].values()) / len(c.values[column]) for c in have}
    if len(have) <= ALL_PAIRS_UP_TO:
        pairs = [(a, b) for i, a in enumerate(have) for b in have[i + 1 :]]
        which = "All pairs of conditions."
    else:
        best = max(have, key=lambda c: mean[c.label])
        pairs = [(best, c) for c in have if c is not best]
        which = f"Each condition against the best by mean ({best.label}, {mode} {column})."
    sentences = []
    for a, b in pairs:
        a, b = (a, b) if mean[a.label] >= mean[b.label] else (b, a)  # the better first: a positive gap
        sentences.append(compare_text(a.label, b.label, a.values[column], b.values[column]))
    return sentences, which


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


COMPARE_TEXT = (
    "The sweep's `compare` pairs: for each pair A, B and each key metric, A − B with its 95% t interval, "
    "paired by seed when both ran the same seeds (else Welch's); within seed-to-seed noise when the "
    "interval contains 0."
)


def named_comparisons(
    conditions: list[Condition], pairs: list[tuple[str, str]], columns: list[str]
) -> list[str]:
    """One sentence per pair and column both conditions reported: ``column: A − B = … [low, high] …``
    (:func:`revmix.sweeps.intervals.compare_text`), in the pairs' order; a pair with a condition that has
    no finished trials gets one sentence saying so."""
    by_label = {c.label: c for c in conditions}
    out = []
    for a_label, b_label in pairs:
        a, b = by_label.get(a_label), by_label.get(b_label)
        if a is None or b is None:
            missing = a_label if a is None else b_label
            out.append(f"{a_label} vs {b_label}: no finished trials of {missing}")
            continue
        for col in columns:
            if a.values.get(col) and b.values.get(col):
                out.append(f"{col}: " + compare_text(a_label, b_label, a.values[col], b.values[col]))
    return out
