r"""The paper's third mechanism, measured on the training batches: does the chosen response's likelihood
fall while the margin grows?

"When Inverse Data Outperforms" (arXiv 2509.13079) names three ways a preference objective can open the
margin log π(y+) − log π(y−): push y− down, pull y+ up, or push both down, the probability mass leaving
both for other continuations. Every preference objective (and unlikelihood) logs, per optimizer step and
direction (:mod:`revmix.objectives.preference`): ``logps/chosen_per_token`` and
``logps/rejected_per_token`` (token means of log π(y+) and log π(y−) over the step's rows) and
``entropy/chosen`` (the mean entropy of the next-token distribution on y+ positions: it rises as mass
spreads away from y+). This module reads them from each trial's ``metrics.jsonl`` — the summed
``logps/chosen`` / ``logps/rejected`` where a run predates the token means — and gives, per condition:

* a plot: per step, the mean over seeds of log π(y+) and log π(y−) (and the entropy on y+), with the 95%
  Student-t band over seeds, a panel per direction;
* a sentence per direction judged per seed: the change of log π(y+) and of the margin from the first to
  the last :data:`WINDOW` of the steps that logged them (window means, since each step's value moves with
  the rows its batch holds), and in how many seeds log π(y+) fell while the margin grew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from revmix.sweeps.intervals import NO_INTERVAL, Interval, decimals, mean_interval, signed
from revmix.sweeps.plots import DIRS, _mpl, _save, bounds, condition_columns, condition_label, read_metrics

WINDOW = 0.1
"""The fraction of a run's logged steps (at least one step) averaged at each end for a change."""

PER_TOKEN = {"chosen": "logps/chosen_per_token", "rejected": "logps/rejected_per_token"}
SUMMED = {"chosen": "logps/chosen", "rejected": "logps/rejected"}
ENTROPY = "entropy/chosen"
_COLOURS = {"chosen": "#1b7837", "rejected": "#762a83", "entropy": "#444444"}
SKIPPED = (
    "likelihood of y+ and y−: skipped (no trial logged logps/chosen/<direction>: no preference or "
    "unlikelihood objective ran)"
)
TEXT = (
    "Training batches of every condition that ran a preference or unlikelihood objective: per optimizer "
    "step, log π(y+) and log π(y−) ({unit}) and the entropy of the next-token distribution on y+ positions "
    "(entropy/chosen, nats/token), each the mean of {seeds} with its 95% Student-t interval over seeds "
    "(band; none with one seed). Below, per condition and direction: the change from the mean of the first "
    "{window:.0%} of the logged steps to the mean of the last {window:.0%} (the 95% t-interval over seeds in "
    "brackets) and in how many seeds log π(y+) fell while the margin log π(y+) − log π(y−) grew. A step's "
    "values move with the rows its batch holds; the Objectives section's held-out ALP does not."
)


@dataclass(frozen=True)
class LikelihoodRuns:
    """One condition's per-step likelihood series: ``series[part/direction][seed][global step]`` for the
    parts ``chosen``, ``rejected``, ``margin`` (chosen − rejected) and, where logged, ``entropy``."""

    condition: str
    seeds: tuple[int, ...]
    series: dict[str, dict[int, dict[int, float]]]


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def run_series(records: list[dict], keys: dict[str, str]) -> dict[str, dict[int, float]]:
    """``{part/direction: {global step: value}}`` of one run's records (:func:`read_metrics`); ``keys``
    maps ``chosen`` / ``rejected`` to the metric names read; the margin is computed where both are."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        step = int(r["global_step"])
        for d in DIRS:
            vals = {part: _finite(r.get(f"{key}/{d}")) for part, key in keys.items()}
            vals["entropy"] = _finite(r.get(f"{ENTROPY}/{d}"))
            if vals["chosen"] is not None and vals["rejected"] is not None:
                vals["margin"] = vals["chosen"] - vals["rejected"]
            for part, v in vals.items():
                if v is not None:
                    out.setdefault(f"{part}/{d}", {})[step] = v
    return out


def likelihood_runs(df: Any, spec_paths: list[str], out_dir: Path) -> tuple[list[LikelihoodRuns], bool]:
    """Per condition (:func:`~revmix.sweeps.plots.condition_columns`, never the seed) the series of its
    trials that logged ``logps/chosen/<direction>``, and whether they are token means (every such run
    logged ``logps/chosen_per_token``) or sums (some run predates the token means)."""
    cols = condition_columns(df, spec_paths)
    found: list[tuple[str, int, list[dict]]] = []
    for _, row in df.iterrows():
        if not isinstance(row.get("run_dir"), str):
            continue
        recs = read_metrics(out_dir / row["run_dir"] / "metrics.jsonl")
        if any(f"logps/chosen/{d}" in r for r in recs for d in DIRS):
            found.append((condition_label(row, cols) if cols else "", int(row["seed"]), recs))
    per_token = bool(found) and all(
        any(f"{PER_TOKEN['chosen']}/{d}" in r for r in recs for d in DIRS) for _, _, recs in found
    )
    keys = PER_TOKEN if per_token else SUMMED
    by_condition: dict[str, dict[str, dict[int, dict[int, float]]]] = {}
    seeds: dict[str, list[int]] = {}
    for cond, seed, recs in found:
        seeds.setdefault(cond, []).append(seed)
        for key, steps in run_series(recs, keys).items():
            by_condition.setdefault(cond, {}).setdefault(key, {})[seed] = steps
    runs = [LikelihoodRuns(c, tuple(sorted(seeds[c])), by_condition.get(c, {})) for c in seeds]
    return runs, per_token


def window_change(steps: dict[int, float], window: float = WINDOW) -> float | None:
    """Mean of the last ``window`` fraction of the steps (by step, at least one) minus the mean of the
    first; None with fewer than two steps."""
    if len(steps) < 2:
        return None
    values = [steps[s] for s in sorted(steps)]
    k = max(1, round(window * len(values)))
    k = min(k, len(values) // 2)
    return sum(values[-k:]) / k - sum(values[:k]) / k


def _interval_text(iv: Interval) -> str:
    places = decimals(iv.mean, iv.low, iv.high)
    text = signed(iv.mean, places)
    if iv.n > 1:
        text += f" [{signed(iv.low, places)}, {signed(iv.high, places)}]"
    return text


def mechanism_sentences(runs: list[LikelihoodRuns], per_token: bool) -> list[str]:
    """Per condition and direction: does log π(y+) fall while the margin grows, judged per seed (module
    docstring), with the mean changes and their 95% t-intervals over seeds."""
    unit = "nats/token" if per_token else "nats, summed over the response"
    out = []
    for g in runs:
        parts = []
        for d in DIRS:
            changes: dict[str, dict[int, float]] = {}
            for part in ("chosen", "margin", "entropy"):
                for seed, steps in g.series.get(f"{part}/{d}", {}).items():
                    if (c := window_change(steps)) is not None:
                        changes.setdefault(part, {})[seed] = c
            seeds = sorted(changes.get("chosen", {}).keys() & changes.get("margin", {}).keys())
            if not seeds:
                continue
            chosen = [changes["chosen"][s] for s in seeds]
            margin = [changes["margin"][s] for s in seeds]
            k = sum(1 for c, m in zip(chosen, margin) if c < 0 < m)
            text = (
                f"{d}: log π(y+) fell while the margin grew in {k}/{len(seeds)} seeds; "
                f"Δ log π(y+) {_interval_text(mean_interval(chosen))}, "
                f"Δ margin {_interval_text(mean_interval(margin))}"
            )
            if ent := changes.get("entropy"):
                text += f", Δ entropy(y+) {_interval_text(mean_interval(list(ent.values())))}"
                text += "" if per_token else " nats/token"
            parts.append(text)
        if parts:
            n = len(g.seeds)
            ivs = NO_INTERVAL if n < 2 else "95% t-interval"
            head = f"{g.condition}: " if g.condition else ""
            out.append(f"{head}" + "; ".join(parts) + f" ({unit}; {n} seed{'s' if n > 1 else ''}, {ivs})")
    return out


def _band(ax: Any, runs: dict[int, dict[int, float]], colour: str, style: str, label: str) -> None:
    """Mean over seeds per step and its 95% t band (the seeds that logged the step)."""
    steps = sorted(set().union(*runs.values()))
    band = [bounds([run[s] for run in runs.values() if s in run]) for s in steps]
    ax.plot(steps, [b[0] for b in band], ls=style, color=colour, label=label)
    if len(runs) > 1:
        ax.fill_between(steps, [b[1] for b in band], [b[2] for b in band], color=colour, alpha=0.15)


def plot_likelihoods(runs: list[LikelihoodRuns], per_token: bool, plots: Path) -> Path | None:
    """A row per condition: log π(y+) and log π(y−) per direction and, when logged, the entropy on y+
    positions per direction; None when no condition has a series."""
    from matplotlib.ticker import MaxNLocator

    runs = [g for g in runs if g.series]
    if not runs:
        return None
    panels = [("logps", d) for d in DIRS] + [
        ("entropy", d) for d in DIRS if any(_has_entropy(g) for g in runs)
    ]
    plt = _mpl()
    fig, axes = plt.subplots(
        len(runs), len(panels), figsize=(4.2 * len(panels), 2.8 * len(runs) + 0.8), squeeze=False
    )
    unit = "nats/token" if per_token else "nats (sum)"
    for g, row in zip(runs, axes):
        for ax, (what, d) in zip(row, panels):
            if what == "logps":
                for part, style in (("chosen", "-"), ("rejected", "--")):
                    if seeds := g.series.get(f"{part}/{d}"):
                        sign = "+" if part == "chosen" else "−"
                        _band(ax, seeds, _COLOURS[part], style, f"log π(y{sign})")
                ax.set_ylabel(f"log π ({unit})", fontsize=9)
            else:
                if seeds := g.series.get(f"entropy/{d}"):
                    _band(ax, seeds, _COLOURS["entropy"], "-", "entropy on y+")
                ax.set_ylabel("entropy on y+ (nats/token)", fontsize=9)
            where = f"{g.condition} · " if g.condition else ""
            ax.set_title(f"{where}{d} rows (n={len(g.seeds)})", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        if row[0].get_legend_handles_labels()[0]:  # a condition whose first direction logged nothing has none
            row[0].legend(fontsize=8, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step (all stages)")
    n = max(len(g.seeds) for g in runs)
    caption = NO_INTERVAL if n < 2 else f"mean of up to {n} seeds, 95% t-interval band"
    fig.suptitle(f"Training batches: log π(y+), log π(y−) and entropy on y+ per step ({caption})", y=1.0)
    return _save(fig, plots / "likelihood_mechanism.png")


def _has_entropy(g: LikelihoodRuns) -> bool:
    return any(g.series.get(f"entropy/{d}") for d in DIRS)


def mechanism_view(
    df: Any, spec_paths: list[str], out_dir: Path, plots: Path
) -> tuple[str, list[Path], list[str], list[str]]:
    """The report section's (text, figures, sentences, notes); text and figures empty and a note saying
    why when no trial logged the likelihoods."""
    runs, per_token = likelihood_runs(df, spec_paths, out_dir)
    if not runs:
        return "", [], [], [SKIPPED]
    counts = sorted({len(g.seeds) for g in runs})
    seeds = (
        f"{counts[0]} seed{'s' if counts[0] > 1 else ''}"
        if len(counts) == 1
        else f"{counts[0]}–{counts[-1]} seeds"
    )
    unit = "nats/token" if per_token else "summed over the response, nats: some runs predate the token means"
    png = plot_likelihoods(runs, per_token, plots)
    text = TEXT.format(unit=unit, seeds=seeds, window=WINDOW)
    return text, [png] if png else [], mechanism_sentences(runs, per_token), []
