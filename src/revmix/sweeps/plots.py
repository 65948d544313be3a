"""Plots and tables of a sweep report (matplotlib, Agg): what ``report.py`` assembles.

Each ``plot_*`` returns the PNGs it wrote and notes saying why a plot was skipped when the sweep lacks
what it needs; see :mod:`revmix.sweeps.report` for the list.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from revmix.sweeps import results as res
from revmix.sweeps.spec import ALP_PARTS, SweepSpec

DIRS = ("forward", "reverse")
_COND_SKIP = ("seed",)


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
    """
    text = df.astype(str) if len(df) else df
    cols = [c for c in res.DESCRIPTORS if c in df.columns and text[c].nunique() > 1]
    for p in spec_paths:
        if p not in df.columns or p in _COND_SKIP or text[p].nunique() < 2:
            continue
        # A swept path the chosen columns already determine (``stages.0.mix`` given mix + r) adds nothing.
        if cols and len(text[[*cols, p]].drop_duplicates()) == len(text[cols].drop_duplicates()):
            continue
        cols.append(p)
    return cols


def _label(row: Any, cols: list[str]) -> str:
    parts = []
    for c in cols:
        v = row[c]
        name = "r" if c == "reverse_fraction" else c.split(".")[-1] if "." in c else c
        parts.append(
            f"{name}={v:g}" if isinstance(v, float) else (str(v) if c in res.DESCRIPTORS else f"{name}={v}")
        )
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
    for bench in benches:
        panels = [(f"eval/accuracy/{bench}", "all items")] + [
            (f"eval/accuracy/{bench}/{d}", f"{d} questions")
            for d in DIRS
            if f"eval/accuracy/{bench}/{d}" in df
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), sharey=True, squeeze=False)
        for ax, (col, title) in zip(axes[0], panels):
            groups = df.groupby(group_cols, dropna=False) if group_cols else [((), df)]
            for _key, g in groups:
                stats = g.groupby("reverse_fraction")[col].agg(["mean", "std", "count"]).reset_index()
                stats = stats.dropna(subset=["mean"])
                if stats.empty:
                    continue
                lab = _label(g.iloc[0], group_cols)
                line = ax.plot(stats["reverse_fraction"], 100 * stats["mean"], marker="o", label=lab)[0]
                sd = stats["std"].fillna(0.0)
                if (stats["count"] > 1).any():
                    ax.fill_between(
                        stats["reverse_fraction"],
                        100 * (stats["mean"] - sd),
                        100 * (stats["mean"] + sd),
                        color=line.get_color(),
                        alpha=0.18,
                    )
            ax.set_title(title)
            ax.set_xlabel("reverse fraction r of training data")
            ax.set_xlim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (%)")
        n_seeds = int(df.groupby(["reverse_fraction", *group_cols], dropna=False).size().max())
        fig.suptitle(f"{bench}: accuracy vs reverse fraction (mean ± sd over {n_seeds} seed(s))")
        handles, labels = axes[0][0].get_legend_handles_labels()
        if len(labels) > 1 or group_cols:
            axes[0][-1].legend(handles, labels, fontsize=8, loc="best")
        out.append(_save(fig, plots / f"accuracy_vs_r_{_slug(bench)}.png"))
    return out, []


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
            key = (float(row["reverse_fraction"]) if by_r else None, _label(row, rest) if rest else "")
            series.setdefault(key, []).append(s)
    return series


_LINESTYLES = ("-", "--", ":", "-.")


def _plot_mean_curves(ax, series: dict[tuple, list[dict[int, float]]]) -> None:
    """Mean ± sd over seeds; colour = training reverse fraction (blue forward … red reverse), line
    style = the other condition (objective, model…); without an r axis, colour = condition."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.ticker import MaxNLocator

    rs = sorted({k[0] for k in series if k[0] is not None})
    others = sorted({k[1] for k in series})
    cmap = LinearSegmentedColormap.from_list("fwd_rev", ["#2166ac", "#7b3294", "#b2182b"])  # no pale middle
    for i, ((r, other), runs) in enumerate(sorted(series.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1]))):
        steps = sorted(set().union(*runs))
        vals = [[run[s] for run in runs if s in run] for s in steps]
        mean = np.array([np.mean(v) for v in vals])
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
            sd = np.array([np.std(v) for v in vals])
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
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
    fig.suptitle("ALP margin over training, by training condition (mean ± sd over seeds)")
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
    ax.set_title("Training loss by condition (mean ± sd over seeds)")
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
        xs = df[p] if numeric else df[p].astype(str)
        ax.scatter(xs, df[m], alpha=0.7)
        stats = df.assign(_x=xs).groupby("_x")[m].mean()
        ax.plot(stats.index, stats.values, color="black", lw=1, label="mean over seeds")
        if numeric and spec.space[p].kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.grid(alpha=0.3)
        if not numeric:
            ax.tick_params(axis="x", rotation=20)
    axes[0][0].set_ylabel(m)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{m} ({spec.mode}) by swept value, each dot a trial")
    return [_save(fig, plots / "metric_by_path.png")], []


def alp_cross_table(df) -> list[dict[str, Any]]:
    """Rows of the cross-direction ALP table: one per (condition, train r) with r in {0, 1} first,
    then any mixed fractions; columns ``<test dir>/<chosen|rejected|margin>`` (mean over seeds)."""
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
            row: dict[str, Any] = {"condition": _label(sub.iloc[0], group_cols) if group_cols else ""}
            row["train"] = "union D_m (all rows)" if is_union else _r_label(float(r))
            row["n"] = len(sub)
            for c in need:
                if c in sub.columns:
                    row[c.removeprefix("eval/alp/")] = float(sub[c].mean())
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
                ax.text(
                    j,
                    i,
                    f"{mat[i, j]:.3f}",
                    ha="center",
                    va="center",
                    fontsize=11,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(len(DIRS)), [f"test {d}" for d in DIRS])
        ax.set_yticks(range(len(mine)), [r["train"] for r in mine])
        ax.set_title(cond or "all trials")
        fig.colorbar(im, ax=ax, fraction=0.046).set_label("ALP margin (nats/token)")
    fig.suptitle("Cross-direction ALP margin: training data × test direction")
    return _save(fig, plots / "alp_cross_direction.png")


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)
