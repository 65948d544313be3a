"""Turn a sweep directory into ``report.md`` and a self-contained ``report.html`` (DESIGN §8).

Plots (matplotlib, Agg; PNGs under ``DIR/plots/``, embedded as base64 in the HTML):

- accuracy against reverse fraction, one line per model scale × objective (× any other swept value),
  mean ± standard deviation over seeds, one figure per benchmark with overall / forward / reverse panels;
- ALP margin over training, one panel per test direction, one line per training condition — from each
  trial's ``run/metrics.jsonl`` (``alp/<direction>/margin`` records);
- the paper's cross-direction table: train forward-only (r = 0) / reverse-only (r = 1) × test
  direction × ALP(y+), ALP(y−), margin, with a margin heat map;
- the sweep metric against each swept path, and training-loss curves.

Every plot is skipped, with a line saying why, when the sweep lacks what it needs (no reverse-fraction
axis, no evaluation, no ALP records), so a learning-rate sweep still gets a sensible report.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from revmix.sweeps import results as res
from revmix.sweeps.plots import (
    DIRS,
    alp_cross_table,
    plot_accuracy_vs_r,
    plot_alp_cross,
    plot_alp_curves,
    plot_loss_curves,
    plot_metric_vs_paths,
    read_metrics,
)
from revmix.sweeps.spec import ALP_PARTS, SweepSpec

__all__ = ["read_metrics", "alp_cross_table", "write_report"]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    esc = [h.replace("|", "\\|") for h in header]
    lines = ["| " + " | ".join(esc) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def write_report(out_dir: str | Path, spec: SweepSpec | None = None, table: Any = None) -> Path:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into a sweep directory; return the html."""
    out_dir = Path(out_dir)
    if spec is None:
        from revmix.sweeps.runner import load_spec_for_dir

        spec = load_spec_for_dir(out_dir)
    if table is None:
        try:
            table = res.read_table(out_dir)
        except FileNotFoundError:
            table = res.build_table(res.rows_from_trial_dirs(spec, out_dir), list(spec.space))
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    paths = list(spec.space)
    ok = table[table["status"] == res.STATUS_OK] if "status" in table.columns else table

    sections: list[tuple[str, list[Path], list[str], str]] = []  # title, pngs, notes, text

    figs, notes = plot_accuracy_vs_r(ok, paths, plots)
    sections.append(("Accuracy vs reverse fraction", figs, notes, ""))
    figs, notes = plot_alp_curves(table, paths, out_dir, plots)
    sections.append(("ALP margin over training", figs, notes, ""))
    rows = alp_cross_table(ok)
    cross_png = plot_alp_cross(rows, plots) if rows else None
    sections.append(
        (
            "Cross-direction ALP (train × test direction)",
            [cross_png] if cross_png else [],
            [] if rows else ["skipped (needs finished trials at r=0 and r=1 with ALP evaluation)"],
            "cross",
        )
    )
    from revmix.sweeps.paper import paper_section

    paper = paper_section(table, out_dir)
    if paper:
        sections.append(("The paper's ALP figure beside this sweep", [], [], "paper"))
    figs, notes = plot_metric_vs_paths(ok, spec, plots)
    sections.append((f"{spec.metric} by swept value", figs, notes, ""))
    figs, notes = plot_loss_curves(table, paths, out_dir, plots)
    sections.append(("Training loss", figs, notes, ""))

    # The best trials.
    best = res.best_rows(table, spec.metric, spec.mode).head(15)
    cols = ["trial_id", "status", *[p for p in paths if p in best.columns], "seed"]
    cols += [c for c in (spec.metric,) if c in best.columns]
    cols += [c for c in best.columns if c.startswith("eval/accuracy/") and c not in cols][:6]
    cols += [
        c for c in ("eval/alp/forward/margin", "eval/alp/reverse/margin", "final/loss", "wall_s") if c in best
    ]
    trial_rows = [[r[c] for c in cols] for _, r in best.iterrows()]
    cross_header = ["condition", "train", "n"] + [f"{d}/{p}" for d in DIRS for p in ALP_PARTS]
    cross_rows = [[r.get(h) for h in cross_header] for r in rows]
    if rows and not any(r["condition"] for r in rows):
        cross_header, cross_rows = cross_header[1:], [r[1:] for r in cross_rows]
    counts = table["status"].value_counts().to_dict() if "status" in table.columns else {}
    errors = table[table["status"] == res.STATUS_ERROR] if "status" in table.columns else table.iloc[0:0]

    head = [
        f"Sweep **{spec.name}** — base `{spec.base}`",
        f"{len(table)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        f"metric `{spec.metric}` ({spec.mode}); search {spec.search.name}; scheduler {spec.scheduler.name}; "
        f"seeds {spec.seeds}",
        "swept: " + ", ".join(f"`{p}` {d.describe()}" for p, d in spec.space.items()),
    ]
    if spec.description:
        head.insert(1, spec.description)

    # Markdown
    md = [f"# Sweep report: {spec.name}", "", *[h + "  " for h in head], ""]
    for title, figs, notes, kind in sections:
        md += [f"## {title}", ""]
        if kind == "cross" and rows:
            md += ["ALP in nats/token over held-out rows (mean over seeds); margin = ALP(y+) − ALP(y−).", ""]
            md += [_md_table(cross_header, cross_rows), ""]
        if kind == "paper" and paper:
            md += [paper[0], ""]
        md += [f"![{title}](plots/{f.name})" for f in figs] + [f"_{n}_" for n in notes] + [""]
    md += ["## Trials (best first)", "", _md_table(cols, trial_rows), ""]
    if len(errors):
        md += ["## Errors", ""] + [f"- `{r.trial_id}`: {r.error}" for r in errors.itertuples()] + [""]
    md += ["Full table: `results.csv` / `results.parquet`.", ""]
    (out_dir / "report.md").write_text("\n".join(md))

    # HTML (self-contained: images inline)
    def img(p: Path) -> str:
        data = base64.b64encode(p.read_bytes()).decode()
        return f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'

    body = [f"<h1>Sweep report: {html.escape(spec.name)}</h1>"]
    body += [f"<p>{_inline_md(h)}</p>" for h in head]
    for title, figs, notes, kind in sections:
        body.append(f"<h2>{html.escape(title)}</h2>")
        if kind == "cross" and rows:
            body.append("<p>ALP in nats/token (mean over seeds); margin = ALP(y+) − ALP(y−).</p>")
            body.append(_html_table(cross_header, cross_rows))
        if kind == "paper" and paper:
            body.append(paper[1])
        body += [img(f) for f in figs] + [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    body += ["<h2>Trials (best first)</h2>", _html_table(cols, trial_rows)]
    if len(errors):
        body.append("<h2>Errors</h2><ul>")
        body += [
            f"<li><code>{html.escape(str(r.trial_id))}</code>: {html.escape(str(r.error))}</li>"
            for r in errors.itertuples()
        ]
        body.append("</ul>")
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}"
        ".note{color:#777;font-style:italic}code{background:#f3f3f3;padding:0 3px}"
    )
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(spec.name)} sweep report</title>'
        f"<style>{css}</style></head><body>{''.join(body)}</body></html>"
    )
    (out_dir / "report.html").write_text(page)
    return out_dir / "report.html"


def _inline_md(text: str) -> str:
    """The few inline markdown bits the header uses (**bold**, `code`) as HTML."""
    out, parts = [], html.escape(text).split("`")
    for i, p in enumerate(parts):
        if i % 2:
            out.append(f"<code>{p}</code>")
        else:
            bits = p.split("**")
            out.append("".join(f"<b>{b}</b>" if j % 2 else b for j, b in enumerate(bits)))
    return "".join(out)
