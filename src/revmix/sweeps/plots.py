"""Plots and tables of a sweep report (matplotlib, Agg): what ``report.py`` assembles.

Each ``plot_*`` returns the PNGs it wrote and notes saying why a plot was skipped when the sweep lacks
what it needs; see :mod:`revmix.sweeps.report` for the list.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revmix.sweeps import results as res
from revmix.sweeps.intervals import NO_INTERVAL, mean_interval
from revmix.sweeps.spec import ALP_PARTS, CONDITION, SweepSpec

DIRS = ("forward", "reverse")
_COND_SKIP = ("seed",)
OBJECTIVE_PATH = re.compile(r"^stages\.(\d+)\.objective(\.|$)")  # a swept path that changes an objective


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _mpl().close(fig)
    return path


def bounds(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t interval over seeds; low = high = mean with one value (no band)."""
    iv = mean_interval(values)
    return (iv.mean, iv.low, iv.high) if iv.n > 1 else (iv.mean, iv.mean, iv.mean)


def seeds_caption(n_max: int) -> str:
    """What a plot's bands are, for its title: the interval over seeds, or that one seed gives none."""
    return NO_INTERVAL if n_max < 2 else f"mean and 95% t interval over up to {n_max} seeds"


# --------------------------------------------------------------------------------------------------
# Reading trials
# --------------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """Step records of one run, de-duplicated by (stage, step) — a resumed run re-logs a few steps —
    with ``global_step`` counting across stages."""
    if not path.exists():
        return []
    recs: dict[tuple[int, int], dict] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a blank line, or one cut by a kill -9
            continue
        recs[(int(r.get("stage", 0)), int(r.get("step", 0)))] = r
    last_step = {st: sp for st, sp in sorted(recs)}  # sorted: each stage's last step wins
    # A stage's steps start after all earlier stages' last steps.
    offsets = dict(zip(last_step, itertools.accumulate([0, *last_step.values()])))
    return [{**r, "global_step": offsets[st] + sp} for (st, sp), r in sorted(recs.items())]


def condition_columns(df, spec_paths: list[str]) -> list[str]:
    """Columns that distinguish training conditions here: descriptors and swept paths that vary.

    A swept path that only restates a descriptor (``stages.0.objective.name`` vs ``objective``) is dropped.
    Named conditions (a sweep's ``conditions``) name themselves: their label replaces the descriptors.
    """
    text = df.astype(str) if len(df) else df
    named = CONDITION in spec_paths and CONDITION in df.columns
    cols = [] if named else [c for c in res.DESCRIPTORS if c in df.columns and text[c].nunique() > 1]
    for p in spec_paths:
        if OBJECTIVE_PATH.match(p) and res.OBJECTIVE_CONFIG in df.columns:  # "dpo(ipo)", not the dict
            p = res.OBJECTIVE_CONFIG
        if p not in df.columns or p in _COND_SKIP or p in cols or text[p].nunique() < 2:
            continue
        # A swept path the chosen columns already determine (``stages.0.mix`` given mix + r) adds nothing.
        if cols and len(text[[*cols, p]].drop_duplicates()) == len(text[cols].drop_duplicates()):
            continue
        cols.append(p)
    return cols


def condition_label(row: Any, cols: list[str]) -> str:
    parts = []
    for c in cols:
        v = row[c]
        name = "r" if c == "reverse_fraction" else c.split(".")[-1] if "." in c else c
        bare = c in (*res.DESCRIPTORS, res.OBJECTIVE_CONFIG, CONDITION)  # values that name themselves
        parts.append(f"{name}={v:g}" if isinstance(v, float) else (str(v) if bare else f"{name}={v}"))
    return " · ".join(parts) or "all trials"


def _r_label(r: float) -> str:
    if r == 0:
        return "forward-only (r=0)"
    if r == 1:
        return "reverse-only (r=1)"
    return f"mixed (r={r:g})"


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def plot_accuracy_vs_r(df, spec_paths: list[str], plots: Path) -> tuple[list[Path], list[str]]:
    if "reverse_fraction" not in df.columns or df["reverse_fraction"].nunique() < 2:
        return [], ["accuracy vs reverse fraction: skipped (the trials do not vary the reverse fraction)"]
    benches = sorted({c.split("/")[2] for c in df.columns if c.startswith("eval/accuracy/")})
    if not benches:
        return [], ["accuracy vs reverse fraction: skipped (no evaluation results; was eval off?)"]
    plt = _mpl()
    group_cols = [c for c in condition_columns(df, spec_paths) if c != "reverse_fraction"]
    out = []
    for (prefix, when), bench in itertools.product(res.evaluations(list(df.columns)), benches):
        acc = f"{prefix}eval/accuracy/{bench}"
        if acc not in df or not df[acc].notna().any():
            continue
        panels = [(acc, "all items")] + [(f"{acc}/{d}", f"{d} questions") for d in DIRS if f"{acc}/{d}" in df]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), sharey=True, squeeze=False)
        for ax, (col, title) in zip(axes[0], panels):
            groups = df.groupby(group_cols, dropna=False) if group_cols else [((), df)]
            for _key, g in groups:
                _accuracy_line(ax, g, col, condition_label(g.iloc[0], group_cols))
            ax.set_title(title)
            ax.set_xlabel("reverse fraction r of training data")
            ax.set_xlim(-0.05, 1.05)
            # Accuracy lives in [0, 100]; a few-seed t interval runs past it and is cut at the frame.
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (%)")
        n_seeds = int(df.groupby(["reverse_fraction", *group_cols], dropna=False).size().max())
        fig.suptitle(f"{bench}, {when}: accuracy vs reverse fraction ({seeds_caption(n_seeds)})")
        handles, labels = axes[0][0].get_legend_handles_labels()
        if len(labels) > 1 or group_cols:
            axes[0][-1].legend(handles, labels, fontsize=8, loc="best")
        out.append(_save(fig, plots / f"accuracy_vs_r_{_slug(prefix)}{_slug(bench)}.png"))
    return out, []


def _accuracy_line(ax: Any, g: Any, col: str, label: str) -> None:
    """One condition's accuracy (%) against r: mean per r with its 95% t interval as bars and band."""
    pts = [
        (float(r), bounds([float(v) for v in sub[col].dropna()]))
        for r, sub in g.groupby("reverse_fraction")
        if sub[col].notna().any()
    ]
    if not pts:
        return
    xs = [x for x, _ in pts]
    mean, low, high = ([100 * b[i] for _, b in pts] for i in range(3))
    bars = [[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]]
    line = ax.errorbar(xs, mean, yerr=bars, marker="o", capsize=3, label=label)[0]
    if len(xs) > 1 and high != low:
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)


def _series_by_condition(df, out_dir: Path, key_fn, cols: list[str]) -> dict[tuple, list[dict[int, float]]]:
    """{(reverse fraction or None, other condition label): [per-trial {global_step: value}]}."""
    by_r = "reverse_fraction" in cols
    rest = [c for c in cols if c != "reverse_fraction"]
    series: dict[tuple, list[dict[int, float]]] = {}
    for _, row in df.iterrows():
        if not isinstance(row.get("run_dir"), str):
            continue
        recs = read_metrics(out_dir / row["run_dir"] / "metrics.jsonl")
        s = {r["global_step"]: v for r in recs if (v := key_fn(r)) is not None}
        if s:
            key = (
                float(row["reverse_fraction"]) if by_r else None,
                condition_label(row, rest) if rest else "",
            )
            series.setdefault(key, []).append(s)
    return series


_LINESTYLES = ("-", "--", ":", "-.")


def _plot_mean_curves(ax, series: dict[tuple, list[dict[int, float]]]) -> None:
    """Mean and 95% t interval over seeds per step (a band); colour = training reverse fraction (blue forward … red reverse), line
    style = the other condition (objective, model…); without an r axis, colour = condition."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.ticker import MaxNLocator

    rs = sorted({k[0] for k in series if k[0] is not None})
    others = sorted({k[1] for k in series})
    cmap = LinearSegmentedColormap.from_list("fwd_rev", ["#2166ac", "#7b3294", "#b2182b"])  # no pale middle
    for i, ((r, other), runs) in enumerate(sorted(series.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1]))):
        steps = sorted(set().union(*runs))
        band = np.array([bounds([run[s] for run in runs if s in run]) for s in steps])
        mean = band[:, 0]
        if r is not None:
            color = cmap(rs.index(r) / max(1, len(rs) - 1)) if len(rs) > 1 else "C0"
            style = _LINESTYLES[others.index(other) % len(_LINESTYLES)]
            label = " · ".join(x for x in (_r_label(r), other) if x)
        else:
            color, style, label = f"C{i % 10}", "-", other or "all trials"
        line = ax.plot(
            steps,
            mean,
            ls=style,
            color=color,
            marker="." if len(steps) < 30 else None,
            label=f"{label} (n={len(runs)})",
        )[0]
        if len(runs) > 1:
            ax.fill_between(steps, band[:, 1], band[:, 2], color=line.get_color(), alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(fig, ax) -> None:
    """In the axes when short; to the right of the figure when long."""
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) <= 4:
        ax.legend(handles, labels, fontsize=8, loc="best")
    else:
        fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))


def plot_alp_curves(df, spec_paths: list[str], out_dir: Path, plots: Path) -> tuple[list[Path], list[str]]:
    cols = condition_columns(df, spec_paths) or [c for c in ("reverse_fraction",) if c in df.columns]
    panels = {
        d: _series_by_condition(df, out_dir, lambda r, d=d: _finite(r.get(f"alp/{d}/margin")), cols)
        for d in DIRS
    }
    if not any(panels.values()):
        return [], [
            "ALP margin over training: skipped (no alp/<direction>/margin records in the runs' metrics.jsonl; "
            "set eval.every_epoch: true or eval.every_steps: N)"
        ]
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9), sharey=True)
    for ax, d in zip(axes, DIRS):
        _plot_mean_curves(ax, panels[d])
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"held-out {d} questions")
        ax.set_xlabel("optimizer step (all stages)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ALP margin  ALP(y+) − ALP(y−)  (nats/token)")
    _legend(fig, axes[1])
    n = max((len(runs) for p in panels.values() for runs in p.values()), default=1)
    fig.suptitle(f"ALP margin over training, by training condition ({seeds_caption(n)})")
    return [_save(fig, plots / "alp_margin_curves.png")], []


def plot_loss_curves(df, spec_paths: list[str], out_dir: Path, plots: Path) -> tuple[list[Path], list[str]]:
    cols = condition_columns(df, spec_paths)
    series = _series_by_condition(df, out_dir, lambda r: _finite(r.get("loss")), cols)
    if not series:
        return [], ["training loss: skipped (no metrics.jsonl found under trials/*/run)"]
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 4))
    _plot_mean_curves(ax, series)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("training loss")
    n = max(len(runs) for runs in series.values())
    ax.set_title(f"Training loss by condition ({seeds_caption(n)})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return [_save(fig, plots / "loss_curves.png")], []


def plot_metric_vs_paths(df, spec: SweepSpec, plots: Path) -> tuple[list[Path], list[str]]:
    m = res.metric_column(spec.metric, list(df.columns))
    if m not in df.columns or df[m].dropna().empty:
        return [], [f"{m} by swept value: skipped (no trial reported {m})"]
    paths = [p for p in spec.space if p in df.columns and df[p].astype(str).nunique() > 1][:4]
    if not paths:
        return [], []
    plt = _mpl()
    fig, axes = plt.subplots(1, len(paths), figsize=(4.2 * len(paths), 3.6), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], paths):
        numeric = df[p].map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all()
        draw_metric_by_value(ax, df, p, m, bool(numeric))
        if numeric and spec.space[p].kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(m)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"{m} ({spec.mode}) by swept value: each dot a trial; {trials_per_value(df, paths)}", fontsize=10
    )
    return [_save(fig, plots / "metric_by_path.png")], []


def trials_per_value(df: Any, paths: list[str]) -> str:
    """What the bars of the metric-by-value plot are, with how many trials (seeds × the other swept
    values) each value pools: ``mean and 95% t interval over the 4–6 trials at each value``."""
    counts = [int(n) for p in paths for n in df[p].astype(str).value_counts()]
    lo, hi = min(counts), max(counts)
    if hi < 2:
        return "1 trial per value: no interval"
    n = str(hi) if lo == hi else f"{lo}–{hi}"
    return f"mean and 95% t interval over the {n} trials at each value (seeds × the other swept values)"


def draw_metric_by_value(ax: Any, df: Any, path: str, metric: str, numeric: bool) -> None:
    """The trials (dots) and, per value of ``path``, the mean with its 95% t interval over the trials
    at that value: joined by a line on a numeric axis; a category (a mix mapping, an objective) gets
    points with bars, no lines — the order of categories means nothing."""
    keys = df[path] if numeric else df[path].astype(str)
    values = sorted(keys.unique(), key=lambda v: v) if numeric else list(dict.fromkeys(keys))
    pos = {v: (v if numeric else i) for i, v in enumerate(values)}
    ax.scatter([pos[k] for k in keys], df[metric], alpha=0.5, s=14, color="grey", label="trial")
    pts = [(pos[v], bounds(list(df.loc[keys == v, metric].dropna()))) for v in values]
    pts = [(x, b) for x, b in pts if not math.isnan(b[0])]
    xs, mean = [x for x, _ in pts], [b[0] for _, b in pts]
    bars = [[b[0] - b[1] for _, b in pts], [b[2] - b[0] for _, b in pts]]
    ax.errorbar(
        xs,
        mean,
        yerr=bars,
        fmt="o-" if numeric else "o",
        capsize=4,
        color="black",
        label="mean, 95% t interval",
    )
    if not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(values) - 0.4)


def alp_cross_table(df) -> list[dict[str, Any]]:
    """Rows of the cross-direction ALP table: one per (condition, train r) with r in {0, 1} first,
    then any mixed fractions; columns ``<test dir>/<chosen|rejected|margin>`` (mean over seeds) and
    ``intervals``: the same keys → their 95% t interval over seeds."""
    need = [f"eval/alp/{d}/{p}" for d in DIRS for p in ALP_PARTS]
    if "reverse_fraction" not in df.columns or not any(c in df.columns for c in need):
        return []
    have = df[df["reverse_fraction"].isin([0.0, 1.0])]
    if have["reverse_fraction"].nunique() < 2:
        return []
    group_cols = [c for c in ("model", "objective", "schedule") if c in df.columns and df[c].nunique() > 1]
    rows = []
    groups = df.groupby(group_cols, dropna=False) if group_cols else [((), df)]
    for _, g in groups:
        mix = g["mix"] if "mix" in g.columns else None
        union = (mix == "union") if mix is not None else g["reverse_fraction"] != g["reverse_fraction"]
        keys = [
            (False, r)
            for r in sorted(
                g.loc[~union, "reverse_fraction"].dropna().unique(), key=lambda x: (x not in (0.0, 1.0), x)
            )
        ]
        keys += [(True, 0.5)] if bool(union.any()) else []
        for is_union, r in keys:
            sub = g[union] if is_union else g[~union & (g["reverse_fraction"] == r)]
            row: dict[str, Any] = {
                "condition": condition_label(sub.iloc[0], group_cols) if group_cols else ""
            }
            row["train"] = "union D_m (all rows)" if is_union else _r_label(float(r))
            row["n"] = len(sub)
            row["intervals"] = {}
            for c in need:
                if c in sub.columns and sub[c].notna().any():
                    iv = mean_interval([float(v) for v in sub[c].dropna()])
                    row[c.removeprefix("eval/alp/")] = iv.mean
                    row["intervals"][c.removeprefix("eval/alp/")] = iv
            rows.append(row)
    return rows


def plot_alp_cross(rows: list[dict[str, Any]], plots: Path) -> Path | None:
    import numpy as np

    core = [r for r in rows if r["train"].startswith(("forward-only", "reverse-only"))]
    conds = list(dict.fromkeys(r["condition"] for r in core))
    if not core or not all(f"{d}/margin" in core[0] for d in DIRS):
        return None
    plt = _mpl()
    fig, axes = plt.subplots(1, len(conds), figsize=(4.4 * len(conds), 3.6), squeeze=False)
    for ax, cond in zip(axes[0], conds):
        mine = [r for r in core if r["condition"] == cond]
        mat = np.array([[r.get(f"{d}/margin", np.nan) for d in DIRS] for r in mine])
        lim = max(1e-6, float(np.nanmax(np.abs(mat))))
        im = ax.imshow(mat, cmap="RdBu", vmin=-lim, vmax=lim)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                dark = abs(mat[i, j]) > 0.6 * lim
                iv = mine[i]["intervals"].get(f"{DIRS[j]}/margin")
                text = f"{mat[i, j]:.3f}" + (f"\n[{iv.low:.2f}, {iv.high:.2f}]" if iv and iv.n > 1 else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
        ax.set_xticks(range(len(DIRS)), [f"test {d}" for d in DIRS])
        ax.set_yticks(range(len(mine)), [r["train"] for r in mine])
        ax.set_title(cond or "all trials")
        fig.colorbar(im, ax=ax, fraction=0.046).set_label("ALP margin (nats/token)")
    n = max(r["n"] for r in core)
    fig.suptitle(f"Cross-direction ALP margin: training data × test direction ({seeds_caption(n)})")
    return _save(fig, plots / "alp_cross_direction.png")


# --------------------------------------------------------------------------------------------------
# The objectives view
# --------------------------------------------------------------------------------------------------

# (key, table header, plot panel, series) of the objectives view; each key holds one value per trial.
OBJECTIVE_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("accuracy", "accuracy", "accuracy", "all"),
    ("accuracy/forward", "accuracy (fwd)", "accuracy", "forward"),
    ("accuracy/reverse", "accuracy (rev)", "accuracy", "reverse"),
    ("alp/forward", "ALP margin (fwd)", "ALP margin (nats/token)", "forward"),
    ("alp/reverse", "ALP margin (rev)", "ALP margin (nats/token)", "reverse"),
    ("drift/chosen/forward", "ΔALP(y+) fwd", "ΔALP(y+) over the stage (nats/token)", "forward"),
    ("drift/chosen/reverse", "ΔALP(y+) rev", "ΔALP(y+) over the stage (nats/token)", "reverse"),
    ("drift/rejected/forward", "ΔALP(y−) fwd", "ΔALP(y−) over the stage (nats/token)", "forward"),
    ("drift/rejected/reverse", "ΔALP(y−) rev", "ΔALP(y−) over the stage (nats/token)", "reverse"),
    ("tokens/s", "tokens/s", "", ""),  # table only
)
# The held-out ALP drift keys: shown as "n/a" rather than dropped when a run lacks the records.
DRIFT_KEYS = tuple(k for k, *_ in OBJECTIVE_COLUMNS if k.startswith("drift/"))
BASELINE_OBJECTIVE = "dpo"  # listed first and compared against when present
_SERIES_COLOURS = {"all": "black", "forward": "#2166ac", "reverse": "#b2182b"}


@dataclass(frozen=True)
class ObjectiveGroup:
    """The finished trials of one objective configuration under one condition."""

    condition: str  # the other varying conditions ("r=0.5 · tiny-small"), "" when none vary
    objective: str  # the stage's objective label, e.g. "dpo(ipo)"
    seeds: tuple[int, ...]
    values: dict[str, dict[int, float]]  # OBJECTIVE_COLUMNS key → seed → value
    # "<chosen|rejected>/<direction>" → seed → {epoch within the stage: ALP}; epoch 0 is the end of the
    # stage before (the drift's starting point)
    curves: dict[str, dict[int, dict[float, float]]] = field(default_factory=dict)


def objective_stage(df, spec_paths: list[str]) -> int | None:
    """The stage whose objective the sweep varies: a swept ``stages.<i>.objective[.<field>]`` path, else
    the first stage whose objective configuration differs between trials; None when none varies."""
    for p in spec_paths:
        if m := OBJECTIVE_PATH.match(p):
            return int(m.group(1))
    if res.OBJECTIVE_CONFIG not in df.columns:
        return None
    chains = [str(v).split("→") for v in df[res.OBJECTIVE_CONFIG].dropna()]
    for i in range(min((len(c) for c in chains), default=0)):
        if len({c[i] for c in chains}) > 1:
            return i
    return None


def stage_end(records: list[dict], stage: int, key: str) -> float | None:
    """The last logged value of ``key`` within ``stage`` (records in step order); None without one."""
    vals = [v for r in records if int(r.get("stage", 0)) == stage and (v := _finite(r.get(key))) is not None]
    return vals[-1] if vals else None


def alp_drift(records: list[dict], stage: int, key: str) -> float | None:
    r"""Change of a held-out ALP over ``stage``: its last record in ``stage`` minus its last record in
    ``stage − 1``.

    ALP(y) = (1/T) Σ_t log p(y_t | x, y_<t) (nats/token, first T tokens) on the run's fixed held-out rows
    (``alp/<direction>/<chosen|rejected>`` records, written at each epoch end with ``eval.every_epoch``),
    so unlike a per-batch summed log-prob it does not move with which rows a batch happened to hold.
    None for stage 0 (nothing before it) or when either stage lacks the record.
    """
    if stage < 1:
        return None
    end, start = stage_end(records, stage, key), stage_end(records, stage - 1, key)
    return None if end is None or start is None else end - start


def alp_curve(records: list[dict], stage: int, key: str) -> dict[float, float]:
    """``{epoch within the stage: value}`` of ``key`` in ``stage``, with the end of ``stage − 1`` at
    epoch 0 when it was recorded (records without an epoch are left out)."""
    start = stage_end(records, stage - 1, key) if stage > 0 else None
    curve = {0.0: start} if start is not None else {}
    for r in records:
        v, epoch = _finite(r.get(key)), _finite(r.get("epoch"))
        if int(r.get("stage", 0)) == stage and v is not None and epoch is not None:
            curve[epoch] = v
    return curve


def _objective_values(
    row: Any, out_dir: Path, stage: int, bench: str
) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """One trial's values under the OBJECTIVE_COLUMNS keys (missing ones left out) and its ALP curves.
    The training batches' ``logps/*`` are not used: they move with the rows in each batch."""
    acc = f"eval/accuracy/{bench}"
    tokens = _finite(row.get(f"train/stage{stage}/tokens_per_s"))  # older tables: the whole run's
    found: dict[str, Any] = {
        "accuracy": row.get(acc),
        "tokens/s": row.get("train/tokens_per_s") if tokens is None else tokens,
    }
    for d in DIRS:
        found[f"accuracy/{d}"] = row.get(f"{acc}/{d}")
        found[f"alp/{d}"] = row.get(f"eval/alp/{d}/margin")
    curves: dict[str, dict[float, float]] = {}
    if isinstance(row.get("run_dir"), str):
        recs = read_metrics(out_dir / row["run_dir"] / "metrics.jsonl")
        for part in ("chosen", "rejected"):
            for d in DIRS:
                found[f"drift/{part}/{d}"] = alp_drift(recs, stage, f"alp/{d}/{part}")
                if curve := alp_curve(recs, stage, f"alp/{d}/{part}"):
                    curves[f"{part}/{d}"] = curve
    return {k: f for k, v in found.items() if (f := _finite(v)) is not None}, curves


def _stage_objective(row: Any, stage: int, spec_paths: list[str]) -> str:
    """The label of ``stage``'s objective in one row (``objective_config``, else the swept value)."""
    chain = row.get(res.OBJECTIVE_CONFIG)
    if isinstance(chain, str) and len(labels := chain.split("→")) > stage:
        return labels[stage]
    swept = [str(row.get(p)) for p in spec_paths if OBJECTIVE_PATH.match(p)]
    return " · ".join(swept) or str(row.get("objective"))


def objective_groups(
    df, spec_paths: list[str], out_dir: Path, stage: int, bench: str
) -> list[ObjectiveGroup]:
    """Finished trials grouped by (other conditions, objective of ``stage``): objectives in sweep order
    with the baseline (plain dpo when present) first; ``bench`` names the accuracy columns."""
    objective_cols = {"objective", res.OBJECTIVE_CONFIG}
    cond_cols = [
        c
        for c in condition_columns(df, spec_paths)
        if c not in objective_cols and not OBJECTIVE_PATH.match(c)
    ]
    found: dict[str, dict[str, list[tuple[int, Any]]]] = {}
    order: list[str] = []
    for _, row in df.iterrows():
        label = _stage_objective(row, stage, spec_paths)
        order += [label] if label not in order else []
        trial = (int(row["seed"]), _objective_values(row, out_dir, stage, bench))
        found.setdefault(condition_label(row, cond_cols) if cond_cols else "", {}).setdefault(
            label, []
        ).append(trial)
    if BASELINE_OBJECTIVE in order:
        order.insert(0, order.pop(order.index(BASELINE_OBJECTIVE)))
    groups = []
    for cond, by_label in found.items():
        for label in (x for x in order if x in by_label):
            trials = by_label[label]
            keys = dict.fromkeys(k for _, (v, _) in trials for k in v)
            values = {k: {seed: v[k] for seed, (v, _) in trials if k in v} for k in keys}
            names = dict.fromkeys(k for _, (_, c) in trials for k in c)
            curves = {k: {seed: c[k] for seed, (_, c) in trials if k in c} for k in names}
            groups.append(ObjectiveGroup(cond, label, tuple(sorted(s for s, _ in trials)), values, curves))
    return groups


def _objective_panel(
    ax: Any, mine: dict[str, ObjectiveGroup], labels: list[str], series: list[tuple[str, str]]
):
    """One measure under one condition: per series (direction), the objectives' means with interval bars."""
    for j, (key, name) in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * 0.18  # side by side within a category
        pts = [
            (i + offset, mean_interval(list(mine[lab].values[key].values())))
            for i, lab in enumerate(labels)
            if lab in mine and mine[lab].values.get(key)
        ]
        if pts:
            ivs = [iv for _, iv in pts]
            bars = [
                [iv.mean - iv.low if iv.n > 1 else 0.0 for iv in ivs],
                [iv.high - iv.mean if iv.n > 1 else 0.0 for iv in ivs],
            ]
            ax.errorbar(
                [x for x, _ in pts],
                [iv.mean for iv in ivs],
                yerr=bars,
                fmt="o",
                ls="none",  # categories: no lines between them
                capsize=3,
                color=_SERIES_COLOURS[name],
                label=f"{name} questions",
            )
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def plot_objectives(groups: list[ObjectiveGroup], plots: Path) -> Path | None:
    """Mean and 95% t interval over seeds per objective: a row per measure (accuracy, ALP margin,
    held-out ALP drifts), a column per condition, a series per direction; categorical x axis."""
    have = {k for g in groups for k in g.values}
    panels = list(dict.fromkeys(p for k, _, p, _ in OBJECTIVE_COLUMNS if p and k in have))
    if not panels:
        return None
    conds = list(dict.fromkeys(g.condition for g in groups))
    labels = list(dict.fromkeys(g.objective for g in groups))
    plt = _mpl()
    width = max(4.5, 0.55 * len(labels) + 1.5)
    fig, axes = plt.subplots(
        len(panels),
        len(conds),
        figsize=(width * len(conds), 2.9 * len(panels) + 1.0),
        squeeze=False,
        sharex=True,
    )
    for c, cond in enumerate(conds):
        mine = {g.objective: g for g in groups if g.condition == cond}
        for r, panel in enumerate(panels):
            ax = axes[r][c]
            _objective_panel(
                ax, mine, labels, [(k, s) for k, _, p, s in OBJECTIVE_COLUMNS if p == panel and k in have]
            )
            if panel != "accuracy":
                ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{panel} · {cond}" if cond else panel, fontsize=10)
        axes[-1][c].set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}
    fig.legend(
        list(handles.values()), list(handles), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5)
    )
    fig.suptitle(f"Objectives ({seeds_caption(max(len(g.seeds) for g in groups))})")
    return _save(fig, plots / "objectives.png")


def mean_curve(runs: dict[int, dict[float, float]]) -> tuple[list[float], list[float]]:
    """Per epoch, the mean over the seeds that recorded it.

    Args:
        runs: seed → {epoch: value}.

    Returns:
        (epochs ascending, means), each of length = the number of distinct epochs.
    """
    xs = sorted(set().union(*runs.values()))
    return xs, [statistics.fmean(run[x] for run in runs.values() if x in run) for x in xs]


def plot_alp_over_stage(groups: list[ObjectiveGroup], stage: int, plots: Path) -> Path | None:
    """Does the chosen response's likelihood fall while the margin grows? Mean over seeds of ALP(y+)
    (solid) and ALP(y−) (dashed) on the held-out rows after each epoch of ``stage``, one colour per
    objective, a panel per test direction and a row per condition; None without ALP records."""
    from matplotlib.lines import Line2D

    if not any(g.curves for g in groups):
        return None
    conds = list(dict.fromkeys(g.condition for g in groups))
    labels = list(dict.fromkeys(g.objective for g in groups))
    plt = _mpl()
    fig, axes = plt.subplots(
        len(conds), len(DIRS), figsize=(10, 3.6 * len(conds) + 0.6), squeeze=False, sharex=True
    )
    start = f" (0: end of stage {stage - 1})" if stage > 0 else ""
    for row, cond in enumerate(conds):
        for ax, d in zip(axes[row], DIRS):
            for g in (g for g in groups if g.condition == cond):
                colour = f"C{labels.index(g.objective) % 10}"
                for part, style in (("chosen", "-"), ("rejected", "--")):
                    if runs := g.curves.get(f"{part}/{d}"):
                        xs, _ = mean_curve(runs)
                        band = [bounds([run[x] for run in runs.values() if x in run]) for x in xs]
                        ax.plot(xs, [b[0] for b in band], ls=style, color=colour, marker=".")
                        if len(runs) > 1:
                            lows, highs = [b[1] for b in band], [b[2] for b in band]
                            ax.fill_between(xs, lows, highs, color=colour, alpha=0.12)
            ax.set_title(f"held-out {d} questions" + (f" · {cond}" if cond else ""), fontsize=10)
            ax.set_xlabel(f"epoch within stage {stage}{start}")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("ALP (nats/token)")
    handles = [Line2D([], [], color=f"C{i % 10}", label=lab) for i, lab in enumerate(labels)]
    handles += [
        Line2D([], [], color="black", ls=ls, label=name) for ls, name in (("-", "ALP(y+)"), ("--", "ALP(y−)"))
    ]
    fig.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(
        f"Held-out ALP of chosen (y+) and rejected (y−) responses over stage {stage} "
        f"({seeds_caption(max(len(g.seeds) for g in groups))})"
    )
    return _save(fig, plots / "objectives_alp.png")


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)
