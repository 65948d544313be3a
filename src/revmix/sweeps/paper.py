"""The paper's ALP figure beside the measured one, and which of its qualitative findings hold here.

Conditions (train → test): a trial trained on forward-only data (r = 0) gives ``forward → forward`` (its
ALP margin on forward held-out rows) and ``forward → reverse``; r = 1 gives the reverse pair; the union
mix gives ``mixed → mixed`` (mean of both directions' margins) and, from its DPO stage, ``mixed, then DPO``.
Margins come from the per-epoch ALP records in each trial's ``metrics.jsonl`` (``eval.every_epoch``).

With several seeds the table shows, per epoch, the mean over seeds and the 95% Student-t interval over
seeds, and every finding is judged on each seed alone ("holds in 2/3 seeds"): one run cannot carry a
conclusion at this scale (the DPO finding flipped between machines and batchings on one seed).

A sweep over models (``model.scale`` or ``model.name_or_path``: the results table's ``model`` column) gets
one comparison per model (:func:`paper_sections`) and a table of the last epoch's margins by model with
every finding judged per model and seed (:func:`by_model_section`): the paper's scale axis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from revmix.assets import asset_path
from revmix.config import ModelConfig
from revmix.sweeps.intervals import NO_INTERVAL, compare_text, mean_interval
from revmix.sweeps.plots import read_metrics
from revmix.sweeps.results import MISSING

CONDITIONS = (
    "forward → forward",
    "reverse → reverse",
    "forward → reverse",
    "reverse → forward",
    "mixed → mixed",
    "mixed, then DPO",
)
INTRO = (
    "ALP margin (nats/token, ALP(y+) − ALP(y−)) after each epoch: the paper's figure (model size not "
    "stated, probably 7B, real reasoning traces) beside this sweep (model {model}, synthetic twins). Absolute "
    "values are not comparable across scales; the question is which qualitative findings carry over."
)
BY_MODEL_INTRO = (
    "The last epoch's ALP margin (nats/token) of each condition by model, mean over seeds with the 95% "
    "Student-t interval over seeds, and each finding judged per model on every seed alone. 'mixed share' is "
    "mixed → mixed over the same-direction mean (f→f + r→r) / 2 (the paper: about 6%). Below the table, the "
    "largest model minus the smallest, paired by seed."
)
SFT_CONDITIONS = CONDITIONS[:5]  # every condition but the DPO stage's: the by-model table's columns


@dataclass(frozen=True)
class PaperComparison:
    """The paper's margins beside the measured ones, and a verdict per qualitative finding."""

    intro: str
    header: list[str]
    rows: list[list[str]]
    findings: list[tuple[str, str, str]]  # (verdict per seed, e.g. "holds in 2/3 seeds"; finding; measured)
    sentences: list[str] = field(default_factory=list)  # comparisons between models, one per line


def paper_margins() -> dict[str, list[float]]:
    return json.loads(asset_path("paper_alp_figure.json").read_text())["margins"]


def _epoch_margins(records: list[dict], stage: int, key: str) -> list[float]:
    out = []
    for r in records:
        if int(r.get("stage", 0)) != stage:
            continue
        if key == "mean":
            f, v = r.get("alp/forward/margin"), r.get("alp/reverse/margin")
            if f is not None and v is not None:
                out.append((f + v) / 2)
        elif r.get(key) is not None:
            out.append(r[key])
    return out


def measured_by_seed(table: Any, out_dir: Path) -> dict[int, dict[str, list[float]]]:
    """Per seed and condition, the margin after each epoch (mean over that seed's trials of the condition
    when another swept value repeats it; a table without a seed column is one seed, 0)."""
    series: dict[int, dict[str, list[list[float]]]] = {}
    for _, row in table.iterrows():
        if row.get("status") != "TERMINATED" or not row.get("run_dir"):
            continue
        recs = read_metrics(Path(out_dir) / str(row["run_dir"]) / "metrics.jsonl")
        mine = series.setdefault(int(row.get("seed", 0)), {c: [] for c in CONDITIONS})
        union, r = row.get("mix") == "union", row.get("reverse_fraction")
        if union:
            mine["mixed → mixed"].append(_epoch_margins(recs, 0, "mean"))
            mine["mixed, then DPO"].append(_epoch_margins(recs, 1, "mean"))
        elif r == 0.0:
            mine["forward → forward"].append(_epoch_margins(recs, 0, "alp/forward/margin"))
            mine["forward → reverse"].append(_epoch_margins(recs, 0, "alp/reverse/margin"))
        elif r == 1.0:
            mine["reverse → reverse"].append(_epoch_margins(recs, 0, "alp/reverse/margin"))
            mine["reverse → forward"].append(_epoch_margins(recs, 0, "alp/forward/margin"))
    out = {seed: {c: _mean_runs(runs) for c, runs in by_cond.items()} for seed, by_cond in series.items()}
    return {seed: {c: v for c, v in m.items() if v} for seed, m in sorted(out.items()) if any(m.values())}


def _mean_runs(runs: list[list[float]]) -> list[float]:
    """Epoch by epoch, the mean of the runs, over the epochs all of them reached ([] without runs)."""
    runs = [s for s in runs if s]
    if not runs:
        return []
    n = min(len(s) for s in runs)
    return [sum(s[i] for s in runs) / len(runs) for i in range(n)]


def measured_margins(table: Any, out_dir: Path) -> dict[str, list[float]]:
    """Per condition, the margin after each epoch: the mean over seeds of :func:`measured_by_seed`."""
    by_seed = measured_by_seed(table, out_dir)
    conds = [c for c in CONDITIONS if any(c in m for m in by_seed.values())]
    return {c: _mean_runs([m[c] for m in by_seed.values() if c in m]) for c in conds}


def findings(m: dict[str, list[float]]) -> list[tuple[str, str, bool | None]]:
    """(finding, what was measured, holds?) — None when the sweep lacks the conditions to judge."""

    def last(c: str) -> float | None:
        return m[c][-1] if m.get(c) else None

    out: list[tuple[str, str, bool | None]] = []
    ff, rr, fr, rf = (last(c) for c in CONDITIONS[:4])
    mixed, dpo = last("mixed → mixed"), last("mixed, then DPO")
    if ff is not None and rr is not None:
        grows = all(len(m[c]) > 1 and m[c][-1] > m[c][0] for c in CONDITIONS[:2])
        finding = "Same-direction margins are positive and grow with training"
        measured = f"f→f {ff:+.3f}, r→r {rr:+.3f} after the last epoch; growing: {grows}"
        out.append((finding, measured, ff > 0 and rr > 0 and grows))
    if fr is not None and rf is not None:
        finding = "Cross-direction margins are negative (a one-direction model prefers its own direction's solution)"
        out.append((finding, f"f→r {fr:+.3f}, r→f {rf:+.3f}", fr < 0 and rf < 0))
    same = (ff + rr) / 2 if ff is not None and rr is not None else None  # same-direction mean
    if mixed is not None and same is not None:
        finding = "Mixing both directions collapses the margin below a quarter of the same-direction mean (paper: ≈0.08 vs ≈1.3, 6%)"
        share = f" vs same-direction mean {same:+.3f} ({100 * mixed / same:.0f}%)" if same else ""
        measured = f"mixed {mixed:+.3f}{share}"
        out.append((finding, measured, bool(same > 0 and abs(mixed) < 0.25 * same)))
    if dpo is not None and mixed is not None:
        same_text = f" (same-direction {same:+.3f})" if same else ""
        measured = f"mixed {mixed:+.3f} → after DPO {dpo:+.3f}{same_text}"
        partial = dpo > mixed and (same is None or dpo < 0.5 * same)
        out.append(("DPO after mixed SFT restores the margin only partly", measured, partial))
    return out


def _cell(values: list[float]) -> str:
    """One epoch's measured margin: ``+0.123`` for one seed, ``+0.123 [+0.050, +0.196]`` over seeds."""
    iv = mean_interval(values)
    if iv.n == 1:
        return f"{iv.mean:+.3f}"
    return f"{iv.mean:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"


def _table_rows(by_seed: dict[int, dict[str, list[float]]]) -> tuple[list[str], list[list[str]]]:
    paper = paper_margins()
    n = max([6] + [len(v) for m in by_seed.values() for v in m.values()])
    header = ["train → test", "source"] + [f"ep{i + 1}" for i in range(n)]
    rows = []
    for c in CONDITIONS:
        rows.append([c, "paper"] + [f"{v:+.3f}" for v in paper[c]] + [""] * (n - 6))
        runs = [m[c] for m in by_seed.values() if c in m]
        epochs = min((len(r) for r in runs), default=0)
        got = [_cell([r[i] for r in runs]) for i in range(epochs)]
        source = "measured" if len(runs) < 2 else f"measured ({len(runs)} seeds)"
        rows.append(["", source] + got + [MISSING] * (n - len(got)))
    return header, rows


def seed_verdicts(by_seed: dict[int, dict[str, list[float]]]) -> list[tuple[str, str, str]]:
    """(verdict, finding, measured) per finding, judged on each seed alone: ``holds in 2/3 seeds``; with
    one seed ``holds (1 seed)`` / ``does not hold (1 seed)``. ``measured`` gives the means over seeds."""
    per_seed = [{f: h for f, _, h in findings(m)} for m in by_seed.values()]
    mean = {c: _mean_runs([m[c] for m in by_seed.values() if c in m]) for c in CONDITIONS}
    out = []
    for finding, measured, _ in findings({c: v for c, v in mean.items() if v}):
        judged = [v[finding] for v in per_seed if v.get(finding) is not None]
        k, n = sum(bool(h) for h in judged), len(judged)
        if n == 0:  # the conditions exist, but no one seed ran all of them
            verdict, how = "not judged", "no seed ran every condition the finding needs"
        elif n == 1:
            verdict, how = ("holds" if k else "does not hold") + " (1 seed)", NO_INTERVAL
        else:
            verdict, how = f"holds in {k}/{n} seeds", f"means over {n} seeds, each seed judged alone"
        out.append((verdict, finding, f"{measured} ({how})"))
    return out


def paper_section(table: Any, out_dir: Path) -> PaperComparison | None:
    """The comparison of all of ``table``'s trials as data for the report's templates, or None when no paper
    condition was measured."""
    return comparison(measured_by_seed(table, out_dir), ", ".join(models_of(table)))


def comparison(by_seed: dict[int, dict[str, list[float]]], model: str) -> PaperComparison | None:
    """The paper's figure beside ``by_seed`` (:func:`measured_by_seed` of one model's trials), or None."""
    if not by_seed:
        return None
    header, rows = _table_rows(by_seed)
    n = len(by_seed)
    spread = (
        f" Measured: mean over {n} seeds with the 95% Student-t interval over seeds in brackets."
        if n > 1
        else f" Measured: {NO_INTERVAL}."
    )
    intro = INTRO.format(model=model or "tiny model")
    return PaperComparison(intro + spread, header, rows, seed_verdicts(by_seed))


def models_of(table: Any) -> list[str]:
    """The finished trials' models, smallest locally built size first (``tiny-tiny``, ``tiny-small``,
    ``tiny-base``), then any other model in the order met."""
    if "model" not in table.columns:
        return []
    done = table[table["status"] == "TERMINATED"] if "status" in table.columns else table
    names = list(dict.fromkeys(str(m) for m in done["model"].dropna()))
    sizes = [f"tiny-{s}" for s in get_args(ModelConfig.model_fields["scale"].annotation)]
    return sorted(names, key=lambda m: (sizes.index(m) if m in sizes else len(sizes), names.index(m)))


def measured_by_model(table: Any, out_dir: Path) -> dict[str, dict[int, dict[str, list[float]]]]:
    """model → :func:`measured_by_seed` of its trials, smallest first (each trial's metrics read once);
    a sweep of one model (or a table without a ``model`` column) is one entry."""
    models = models_of(table)
    if len(models) < 2:
        return {", ".join(models): measured_by_seed(table, out_dir)}
    return {m: measured_by_seed(table[table["model"].astype(str) == m], out_dir) for m in models}


def paper_sections(
    by_model: dict[str, dict[int, dict[str, list[float]]]],
) -> list[tuple[str, PaperComparison]]:
    """(model, comparison) for each model of :func:`measured_by_model` with a paper condition measured;
    the model is ``""`` when the sweep has one."""
    out = []
    for model, by_seed in by_model.items():
        section = comparison(by_seed, model)
        out += [("" if len(by_model) < 2 else model, section)] if section else []
    return out


def by_model_section(by_model: dict[str, dict[int, dict[str, list[float]]]]) -> PaperComparison | None:
    """The last epoch's margins by model (one row per model), every finding judged per model and seed, and
    the largest model minus the smallest for each column; None for a sweep of one model."""
    measured = {m: last_epoch(b) for m, b in by_model.items() if b}
    if len(measured) < 2:
        return None
    header = ["model", *next(iter(measured.values()))]
    rows = [[m, *(_last_cell(k, list(v.values())) for k, v in q.items())] for m, q in measured.items()]
    verdicts = [(v, f"{m}: {f}", text) for m, b in by_model.items() if b for v, f, text in seed_verdicts(b)]
    (small, low), (large, high) = list(measured.items())[0], list(measured.items())[-1]
    name = lambda k: f"({k})" if " " in k else k  # noqa: E731 (the gap's label is itself a difference)
    sentences = [
        compare_text(f"{name(k)} at {large}", f"{name(k)} at {small}", high[k], low[k])
        for k in high
        if high[k] and low[k]
    ]
    return PaperComparison(BY_MODEL_INTRO, header, rows, verdicts, sentences)


SHARE = "mixed share"
GAP = "f→f − r→r"


def last_epoch(by_seed: dict[int, dict[str, list[float]]]) -> dict[str, dict[int, float]]:
    """Column → seed → value after the last epoch: each SFT condition's margin (``f→f``, …, ``mixed``), the
    forward-over-reverse gap ``f→f − r→r`` and the mixed share."""
    out = {_short(c): {s: m[c][-1] for s, m in by_seed.items() if m.get(c)} for c in SFT_CONDITIONS}
    out[GAP] = {s: out["f→f"][s] - out["r→r"][s] for s in sorted(out["f→f"].keys() & out["r→r"].keys())}
    out[SHARE] = {s: v for s, m in by_seed.items() if (v := _mixed_share(m)) is not None}
    return out


def _short(condition: str) -> str:
    """``forward → reverse`` → ``f→r``; ``mixed → mixed`` → ``mixed``."""
    a, b = condition.split(" → ")
    return "mixed" if a == "mixed" else f"{a[0]}→{b[0]}"


def _mixed_share(m: dict[str, list[float]]) -> float | None:
    """One seed's last-epoch mixed margin over its same-direction mean, or None without all three."""
    ff, rr, mixed = (m.get(c) for c in ("forward → forward", "reverse → reverse", "mixed → mixed"))
    if not (ff and rr and mixed) or ff[-1] + rr[-1] == 0:
        return None
    return mixed[-1] / ((ff[-1] + rr[-1]) / 2)


def _last_cell(column: str, values: list[float]) -> str:
    if not values:
        return MISSING
    return _percent_cell(values) if column == SHARE else _cell(values)


def _percent_cell(values: list[float]) -> str:
    iv = mean_interval(values)
    if iv.n == 1:
        return f"{100 * iv.mean:.0f}%"
    return f"{100 * iv.mean:.0f}% [{100 * iv.low:.0f}%, {100 * iv.high:.0f}%]"
