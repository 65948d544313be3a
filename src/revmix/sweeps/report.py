"""Turn a sweep directory into ``report.md`` and a self-contained ``report.html``.

Intervals: every number over trials is the mean over seeds with its 95% Student-t interval over seeds
(:mod:`revmix.sweeps.intervals`; a band or bars in a plot), and one seed says "1 seed: no interval". The
report opens with the conditions (every swept value except the seed: mean, interval and n seeds per
metric) and the differences of the sweep metric between conditions, each in words: beyond noise, or
within seed-to-seed noise when its interval contains 0, and in how many seeds the order holds
(:mod:`revmix.sweeps.conditions`); then the sweep's ``compare`` pairs on every key metric, and the
forward/reverse gradient cosine per quarter of training where trials logged it
(:mod:`revmix.sweeps.cosine`).

Plots (matplotlib, Agg; PNGs under ``DIR/plots/``, embedded as base64 in the HTML):

- accuracy against reverse fraction, one line per model scale × objective (× any other swept value),
  mean and 95% t interval over seeds, one figure per benchmark with overall / forward / reverse panels;
- ALP margin over training, one panel per test direction, one line per training condition — from each
  trial's ``run/metrics.jsonl`` (``alp/<direction>/margin`` records);
- the paper's cross-direction table: train forward-only (r = 0) / reverse-only (r = 1) × test
  direction × ALP(y+), ALP(y−), margin, with a margin heat map;
- the objectives view, when the sweep varies a stage's objective: per objective configuration, final
  accuracy and ALP margins, the drift of ALP(y+) and ALP(y−) on the fixed held-out rows over that stage
  (end of the stage minus end of the stage before, from the ``alp/<direction>/<chosen|rejected>``
  records) and its tokens/s, each the mean with a 95% Student-t interval over seeds
  (:mod:`revmix.sweeps.intervals`); a plot of those intervals and one of ALP(y+) / ALP(y−) after each
  epoch of the stage; a sentence per objective saying whether its accuracy differs from the baseline's
  (plain dpo when present, else the first listed) beyond seed-to-seed noise, and one saying how far
  ALP(y+) moved while the margin grew or shrank;
- the sweep metric against each swept path, and training-loss curves.

Every plot is skipped, with a line saying why, when the sweep lacks what it needs (no reverse-fraction
axis, no evaluation, no ALP records), so a learning-rate sweep still gets a sensible report.

The report is built once as data (:class:`Report`) and rendered twice by Jinja2 templates shipped in
``revmix/assets/templates/``: ``report.md.j2`` and ``report.html.j2``.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from revmix.atomic import atomic_write
from revmix.sweeps import results as res
from revmix.sweeps.conditions import (
    BOOTSTRAP_TEXT,
    COMPARE_TEXT,
    DIFFERENCE_TEXT,
    INTERVAL_TEXT,
    STAGES_TEXT,
    bootstrap_columns,
    condition_rows,
    difference_sentences,
    group_conditions,
    metric_columns,
    named_comparisons,
    one_seed_note,
    stage_change_sentences,
)
from revmix.sweeps.cosine import TEXT as COSINE_TEXT
from revmix.sweeps.cosine import WINDOWS, cosine_conditions, cosine_rows, cosine_sentences
from revmix.sweeps.intervals import (
    MINUS,
    NO_INTERVAL,
    Interval,
    compare_text,
    decimals,
    format_interval,
    mean_interval,
)
from revmix.sweeps.mechanism import mechanism_view
from revmix.sweeps.paper import PaperComparison, by_model_section, measured_by_model, paper_sections
from revmix.sweeps.plots import (
    DIRS,
    DRIFT_KEYS,
    OBJECTIVE_COLUMNS,
    ObjectiveGroup,
    alp_cross_table,
    condition_columns,
    objective_groups,
    objective_stage,
    plot_accuracy_vs_r,
    plot_alp_cross,
    plot_alp_curves,
    plot_alp_over_stage,
    plot_loss_curves,
    plot_metric_vs_paths,
    plot_objectives,
    read_metrics,
    trials_per_value,
)
from revmix.sweeps.spec import ALP_PARTS, SweepSpec, parse_sweep

__all__ = ["read_metrics", "alp_cross_table", "write_report", "load_spec_for_dir"]

CROSS_TEXT = (
    "ALP in nats/token over held-out rows: mean over seeds with the 95% Student-t interval over seeds "
    "in brackets; margin = ALP(y+) − ALP(y−); n = seeds."
)
CROSS_SKIPPED = "skipped (needs finished trials at r=0 and r=1 with ALP evaluation)"
OBJECTIVES_TEXT = (
    "Stage {stage} ({name}) under each objective configuration. Every number is the mean over seeds with "
    "its 95% Student-t interval in brackets (none with one seed; (n=k) where fewer seeds reported it). "
    "Accuracy ({bench}) and ALP margins (nats/token) are the final evaluation's; ΔALP(y+) and ΔALP(y−) "
    "are the change of the mean per-token log-prob (nats/token) of the chosen and rejected responses on "
    "the same held-out rows, from the last ALP record of the stage before to the last of this stage "
    "(eval.every_epoch), so batch make-up adds no noise; tokens/s is the stage's throughput."
)
NO_DRIFT = "ΔALP n/a: "
PLOT_TEXT = (
    "Mean of {seeds} per condition and its 95% Student-t interval over seeds ({shape}); a condition with "
    "one seed has none."
)
BY_VALUE_TEXT = (
    "Each dot is a trial; per swept value, the {bars}, drawn as bars. A category (a mix mapping, an "
    "objective, a model name) is a point of its own, not joined to the next: their order means nothing."
)
TRIALS_CUT = 40  # characters of a trials-table cell; longer values end in "…" (results.csv has them whole)
MECHANISM_TITLE = "Likelihood of y+ and y− during training: does log π(y+) fall while the margin grows?"


@dataclass(frozen=True)
class Table:
    """A table whose cells are already text (``results.format_cell``)."""

    header: list[str]
    rows: list[list[str]]

    @classmethod
    def of(cls, header: list[str], rows: list[list[Any]]) -> Table:
        return cls(list(header), [[res.format_cell(v) for v in r] for r in rows])


@dataclass
class Section:
    """One ``##`` section: an optional paragraph, table and list of findings, then figures and notes."""

    title: str
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    text: str = ""
    table: Table | None = None
    findings: list[tuple[str, str, str]] = field(default_factory=list)  # (verdict, finding, measured)
    sentences: list[str] = field(default_factory=list)  # comparisons, one per line below the table


@dataclass
class Report:
    """Everything both templates show."""

    name: str
    base: str
    description: str
    trial_count: str
    metric: str
    mode: str
    search: str
    scheduler: str
    seeds: str
    swept: list[tuple[str, str]]
    sections: list[Section]
    trials: Table
    errors: list[tuple[str, str]]


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("revmix.assets", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["md_cell"] = lambda v: str(v).replace("|", "\\|")
    env.filters["png_base64"] = lambda p: base64.b64encode(Path(p).read_bytes()).decode()
    return env


def write_report(out_dir: str | Path, spec: SweepSpec | None = None, table: Any = None) -> Path:
    """Write ``report.md``, ``report.html`` (each atomically) and ``plots/*.png`` into a sweep directory;
    return the html. Without ``table``, the table is rebuilt from the trial folders."""
    out_dir = Path(out_dir)
    spec = spec if spec is not None else load_spec_for_dir(out_dir)
    if table is None:
        table = res.load_table(spec, out_dir)
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    report = _report(spec, table, _sections(spec, table, out_dir, plots))
    env = _templates()
    atomic_write(out_dir / "report.md", env.get_template("report.md.j2").render(r=report))
    return atomic_write(out_dir / "report.html", env.get_template("report.html.j2").render(r=report))


def _sections(spec: SweepSpec, table: Any, out_dir: Path, plots: Path) -> list[Section]:
    """The plot sections, in report order; each skipped plot leaves a note saying why."""
    paths = list(spec.space)
    ok = table[table["status"] == res.STATUS_OK] if "status" in table.columns else table
    seeds = seeds_per_condition(ok, paths)
    sections = [
        *_condition_sections(spec, ok, out_dir),
        _captioned(
            "Accuracy vs reverse fraction", plot_accuracy_vs_r(ok, paths, plots), seeds, "bars and band"
        ),
        _captioned(
            "ALP margin over training", plot_alp_curves(table, paths, out_dir, plots), seeds, "band, per step"
        ),
        _cross_section(alp_cross_table(ok), plots),
    ]
    objectives = _objectives_section(spec, ok, out_dir, plots)
    sections += [objectives] if objectives else []
    text, figures, sentences, notes = mechanism_view(ok, paths, out_dir, plots)
    sections.append(Section(MECHANISM_TITLE, figures, notes=notes, text=text, sentences=sentences))
    sections += _paper_sections(table, out_dir)
    figures, notes = plot_metric_vs_paths(ok, spec, plots)
    swept = [p for p in spec.space if p in ok.columns and ok[p].astype(str).nunique() > 1][:4]
    text = BY_VALUE_TEXT.format(bars=trials_per_value(ok, swept)) if figures else ""
    sections.append(Section(f"{spec.metric} by swept value", figures, notes, text=text))
    sections.append(
        _captioned("Training loss", plot_loss_curves(table, paths, out_dir, plots), seeds, "band, per step")
    )
    return sections


def _paper_sections(table: Any, out_dir: Path) -> list[Section]:
    """The paper's ALP figure beside each model's trials, then (several models) the findings by model."""

    def section(title: str, c: PaperComparison) -> Section:
        table_ = Table(c.header, c.rows)
        return Section(title, text=c.intro, table=table_, findings=c.findings, sentences=c.sentences)

    measured = measured_by_model(table, out_dir)
    title = "The paper's ALP figure beside this sweep"
    out = [section(f"{title} ({model})" if model else title, c) for model, c in paper_sections(measured)]
    by_model = by_model_section(measured)
    return out + ([section("The paper's findings by model size", by_model)] if by_model else [])


def seeds_per_condition(ok: Any, paths: list[str]) -> str:
    """``3 seeds`` (every condition) or ``2–3 seeds`` (they differ): the finished trials per condition."""
    if not len(ok):
        return "0 seeds"
    cols = condition_columns(ok, paths)
    counts = ok[cols].astype(str).value_counts().tolist() if cols else [len(ok)]
    lo, hi = min(counts), max(counts)
    n = str(hi) if lo == hi else f"{lo}–{hi}"
    return f"{n} seed{'s' if hi > 1 else ''}"


def _captioned(title: str, plotted: tuple[list[Path], list[str]], seeds: str, shape: str) -> Section:
    """A plot section whose text says how many seeds each mean is over and which interval is drawn."""
    figures, notes = plotted
    text = PLOT_TEXT.format(seeds=seeds, shape=shape) if figures else ""
    return Section(title, figures, notes, text=text)


def _condition_sections(spec: SweepSpec, ok: Any, out_dir: Path) -> list[Section]:
    """The conditions table (mean and 95% t interval over seeds per metric) and the differences of the
    sweep metric between conditions, in words (:mod:`revmix.sweeps.conditions`)."""
    title = "Conditions: mean and 95% interval over seeds"
    columns = metric_columns(ok, spec.metric)
    conditions = group_conditions(ok, list(spec.space), columns, out_dir)
    if not conditions:
        return [Section(title, notes=["conditions: no finished trials"])]
    boot = [f"eval/accuracy/{b} (bootstrap)" for b in bootstrap_columns(conditions)]
    table = Table(["condition", "seeds", *columns, *boot], condition_rows(conditions, columns))
    text = INTERVAL_TEXT + (BOOTSTRAP_TEXT if boot else "")
    out = [Section(title, text=text, table=table, notes=one_seed_note(conditions))]
    metric = res.metric_column(spec.metric, list(ok.columns))
    sentences, which = difference_sentences(conditions, metric, spec.mode)
    if sentences:
        text = DIFFERENCE_TEXT.format(metric=metric, which=which)
        out.append(Section("Differences between conditions", text=text, sentences=sentences))
    changes = stage_change_sentences(conditions, columns)
    if changes:
        out.append(Section("Accuracy from one evaluation to the next", text=STAGES_TEXT, sentences=changes))
    if spec.compare:
        named = named_comparisons(conditions, spec.compare, columns)
        out.append(Section("Named comparisons", text=COMPARE_TEXT, sentences=named))
    cosines = cosine_conditions(conditions, out_dir)
    if cosines:
        quarters = [f"quarter {k + 1}" for k in range(WINDOWS)]
        table = Table(["condition", "seeds", *quarters, "last − first"], cosine_rows(cosines))
        sentences = cosine_sentences(cosines, spec.compare)
        out.append(
            Section("Gradient cosine over training", text=COSINE_TEXT, table=table, sentences=sentences)
        )
    return out


def _cross_section(rows: list[dict[str, Any]], plots: Path) -> Section:
    """The train × test direction ALP table and its heat map (a condition column only when one varies)."""
    title = "Cross-direction ALP (train × test direction)"
    if not rows:
        return Section(title, notes=[CROSS_SKIPPED])
    header = ["condition", "train", "n"] + [f"{d}/{p}" for d in DIRS for p in ALP_PARTS]
    cells = [[_cross_cell(r, h) for h in header] for r in rows]
    if not any(r["condition"] for r in rows):
        header, cells = header[1:], [c[1:] for c in cells]
    png = plot_alp_cross(rows, plots)
    notes = [f"{NO_INTERVAL}: some rows come from one seed"] if any(r["n"] < 2 for r in rows) else []
    return Section(title, [png] if png else [], text=CROSS_TEXT, table=Table(header, cells), notes=notes)


def _cross_cell(row: dict[str, Any], key: str) -> str:
    """A cross-table cell as text: an ALP column's mean [95% t interval], else the value itself."""
    iv = row["intervals"].get(key)
    return format_interval(iv) if iv is not None else res.format_cell(row.get(key))


def _objectives_section(spec: SweepSpec, ok: Any, out_dir: Path, plots: Path) -> Section | None:
    """The objectives view (see the module docstring); None when no stage's objective varies."""
    paths = list(spec.space)
    stage = objective_stage(ok, paths)
    if stage is None:
        return None
    title = "Objectives"
    benches = sorted(c.split("/")[2] for c in ok.columns if re.fullmatch(r"eval/accuracy/[^/]+", c))
    metric = spec.metric.split("/")  # the sweep metric's benchmark when it names one, else the first
    bench = metric[2] if metric[:2] == ["eval", "accuracy"] and metric[2] in benches else "".join(benches[:1])
    groups = objective_groups(ok, paths, out_dir, stage, bench)
    if not groups:
        return Section(title, notes=["objectives: no finished trials to compare"])
    have = {k for g in groups for k in g.values} | (set(DRIFT_KEYS) if stage > 0 else set())
    columns = [(k, head) for k, head, _, _ in OBJECTIVE_COLUMNS if k in have]
    header = (["condition"] if any(g.condition for g in groups) else []) + ["objective", "seeds"]
    rows = [
        ([g.condition] if header[0] == "condition" else [])
        + [g.objective, str(len(g.seeds))]
        + [_interval_cell(g, k) for k, _ in columns]
        for g in groups
    ]
    notes = _drift_notes(groups, stage)
    figures = [
        png for png in (plot_objectives(groups, plots), plot_alp_over_stage(groups, stage, plots)) if png
    ]
    name = spec.representative_config().stages[stage].name
    return Section(
        title,
        figures,
        notes=notes,
        text=OBJECTIVES_TEXT.format(stage=stage, name=name, bench=bench or "none evaluated"),
        table=Table(header + [h for _, h in columns], rows),
        sentences=_objective_sentences(groups) + _drift_sentences(groups),
    )


def _drift_notes(groups: list[ObjectiveGroup], stage: int) -> list[str]:
    """One line when some trials lack the ALP records the drift needs (or no stage precedes)."""
    if stage == 0:
        return [NO_DRIFT + "stage 0 has no stage before it to measure the drift from"]
    runs = sum(len(g.seeds) for g in groups)
    lacking = sum(1 for g in groups for s in g.seeds if any(s not in g.values.get(k, {}) for k in DRIFT_KEYS))
    if not lacking:
        return []
    return [
        NO_DRIFT + f"{lacking} of {runs} runs lack alp/<direction>/<chosen|rejected> records at the end of "
        f"stage {stage - 1} or of stage {stage} in metrics.jsonl (set eval.every_epoch: true)"
    ]


def _interval_cell(g: ObjectiveGroup, key: str) -> str:
    """``mean [low, high]`` over the group's seeds, ``(n=k)`` when some seeds lack the value."""
    vals = g.values.get(key)
    if not vals:
        return "n/a" if key in DRIFT_KEYS else res.MISSING
    return format_interval(mean_interval(list(vals.values())), show_n=len(vals) < len(g.seeds))


def _objective_sentences(groups: list[ObjectiveGroup]) -> list[str]:
    """Accuracy of every objective against its condition's first (baseline) objective, in words."""
    out: list[str] = []
    baseline: dict[str, ObjectiveGroup] = {}
    for g in groups:
        base = baseline.setdefault(g.condition, g)
        if base is g or not g.values.get("accuracy") or not base.values.get("accuracy"):
            continue
        where = f"{g.condition}, " if g.condition else ""
        words = compare_text(g.objective, base.objective, g.values["accuracy"], base.values["accuracy"])
        out.append(f"{where}accuracy: {words}")
    return out


def _change(iv: Interval, up: str, down: str) -> str:
    """``fell by 0.400 [−0.097, 0.897]``: the size of a change and its interval, signed so that the
    verb carries the direction (no brackets with one seed)."""
    sign = -1.0 if iv.mean < 0 else 1.0
    size, low, high = sign * iv.mean, min(sign * iv.low, sign * iv.high), max(sign * iv.low, sign * iv.high)
    places = decimals(size, low, high)
    text = f"{down if sign < 0 else up} by {size:.{places}f}"
    if iv.n > 1:
        text += f" [{low:.{places}f}, {high:.{places}f}]".replace("-", MINUS)
    return text


def _drift_sentences(groups: list[ObjectiveGroup]) -> list[str]:
    """Per objective and direction, from the table's ΔALP columns: how ALP(y+) moved and how the margin
    ALP(y+) − ALP(y−) moved with it, Δmargin_s = ΔALP(y+)_s − ΔALP(y−)_s for each seed s that has both."""
    out: list[str] = []
    for g in groups:
        parts = []
        for d in DIRS:
            chosen, rejected = g.values.get(f"drift/chosen/{d}", {}), g.values.get(f"drift/rejected/{d}", {})
            seeds = sorted(chosen.keys() & rejected.keys())
            if not seeds:
                continue
            up = _change(mean_interval([chosen[s] for s in seeds]), "rose", "fell")
            margin = _change(mean_interval([chosen[s] - rejected[s] for s in seeds]), "grew", "shrank")
            n = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
            parts.append(f"{d}: ALP(y+) {up} while the margin {margin} (nats/token, {n})")
        if parts:
            where = f"{g.condition}, " if g.condition else ""
            out.append(f"held-out ALP over the stage, {where}{g.objective} — " + "; ".join(parts))
    return out


def _report(spec: SweepSpec, table: Any, sections: list[Section]) -> Report:
    """The header facts, the best trials and the errors around ``sections``."""
    has_status = "status" in table.columns
    counts = table["status"].value_counts().to_dict() if has_status else {}
    errors = table[table["status"] == res.STATUS_ERROR] if has_status else table.iloc[0:0]
    return Report(
        name=spec.name,
        base=str(spec.base),
        description=spec.description,
        trial_count=f"{len(table)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        metric=spec.metric,
        mode=spec.mode,
        search=spec.search.name,
        scheduler=spec.scheduler.name,
        seeds=_seeds_text(spec.seeds),
        swept=[(p, d.describe()) for p, d in spec.space.items()],
        sections=sections,
        trials=_best_trials(spec, table),
        errors=[(str(r.trial_id), str(r.error)) for r in errors.itertuples()],
    )


def _seeds_text(seeds: list[int]) -> str:
    """The header's seeds, with what they allow: an interval over seeds, or none with one."""
    if len(seeds) < 2:
        return f"{seeds} ({NO_INTERVAL})"
    return f"{seeds} ({len(seeds)} per condition; intervals: 95% Student-t over seeds)"


def _best_trials(spec: SweepSpec, table: Any, limit: int = 15) -> Table:
    """The best ``limit`` trials: swept values, seed, the metric and a few key metrics."""
    best = res.best_rows(table, spec.metric, spec.mode).head(limit)
    cols = ["trial_id", "status", *[p for p in spec.space if p in best.columns], "seed"]
    cols += [c for c in (spec.metric,) if c in best.columns]
    cols += [c for c in best.columns if c.startswith("eval/accuracy/") and c not in cols][:6]
    key = ("eval/alp/forward/margin", "eval/alp/reverse/margin", "final/loss", "wall_s")
    cols += [c for c in key if c in best]
    table = Table.of(cols, [[r[c] for c in cols] for _, r in best.iterrows()])
    return Table(table.header, [[abbreviate(cell) for cell in row] for row in table.rows])


def abbreviate(text: str, limit: int = TRIALS_CUT) -> str:
    """``text`` cut to ``limit`` characters, the last one "…", so a config value (a mix mapping, an
    objective's settings) cannot widen the trials table past the page."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_spec_for_dir(out_dir: str | Path) -> SweepSpec:
    """The spec stored in a sweep dir (for ``revmix report`` without the original file)."""
    out_dir = Path(out_dir)
    stored = json.loads((out_dir / "spec.json").read_text())
    raw = {
        "name": stored["name"],
        "description": stored.get("description", ""),
        "base": stored["base"],
        "overrides": stored["overrides"],
        "metric": stored["metric"],
        "mode": stored["mode"],
        "search": {k: v for k, v in stored["search"].items() if v is not None}
        if stored["search"]["name"] != "grid"
        else "grid",
        "scheduler": "fifo",  # only the space, metric and configs matter for a report
        "seeds": stored["seeds"],
        "conditions": stored.get("conditions") or None,
        "compare": stored.get("compare") or None,
        "space": stored["space"],
        "eval": stored["eval"],
    }
    return parse_sweep(raw, out_dir / "sweep.yaml", base_raw=stored["base_raw"])
