"""The paper's ALP figure beside the measured one, and which of its qualitative findings hold here.

Conditions (train → test): a trial trained on forward-only data (r = 0) gives ``forward → forward`` (its
ALP margin on forward held-out rows) and ``forward → reverse``; r = 1 gives the reverse pair; the union
mix gives ``mixed → mixed`` (mean of both directions' margins) and, from its DPO stage, ``mixed, then DPO``.
Margins come from the per-epoch ALP records in each trial's ``metrics.jsonl`` (``eval.every_epoch``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from revmix.assets import asset_path
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
    "stated, probably 7B, real reasoning traces) beside this sweep (tiny model, synthetic twins). Absolute "
    "values are not comparable across scales; the question is which qualitative findings carry over."
)


@dataclass(frozen=True)
class PaperComparison:
    """The paper's margins beside the measured ones, and a verdict per qualitative finding."""

    intro: str
    header: list[str]
    rows: list[list[str]]
    findings: list[tuple[str, str, str]]  # (holds | does not hold | not measured, finding, what was measured)


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


def measured_margins(table: Any, out_dir: Path) -> dict[str, list[float]]:
    """Per condition, the margin after each epoch (mean over the trials — seeds — of that condition)."""
    series: dict[str, list[list[float]]] = {c: [] for c in CONDITIONS}
    for _, row in table.iterrows():
        if row.get("status") != "TERMINATED" or not row.get("run_dir"):
            continue
        recs = read_metrics(Path(out_dir) / str(row["run_dir"]) / "metrics.jsonl")
        union, r = row.get("mix") == "union", row.get("reverse_fraction")
        if union:
            series["mixed → mixed"].append(_epoch_margins(recs, 0, "mean"))
            series["mixed, then DPO"].append(_epoch_margins(recs, 1, "mean"))
        elif r == 0.0:
            series["forward → forward"].append(_epoch_margins(recs, 0, "alp/forward/margin"))
            series["forward → reverse"].append(_epoch_margins(recs, 0, "alp/reverse/margin"))
        elif r == 1.0:
            series["reverse → reverse"].append(_epoch_margins(recs, 0, "alp/reverse/margin"))
            series["reverse → forward"].append(_epoch_margins(recs, 0, "alp/forward/margin"))
    out = {}
    for c, runs in series.items():
        runs = [s for s in runs if s]
        if runs:
            n = min(len(s) for s in runs)
            out[c] = [sum(s[i] for s in runs) / len(runs) for i in range(n)]
    return out


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
        finding = "Mixing both directions collapses the margin (paper: ≈0.08 vs ≈1.3, under 10%)"
        share = f" vs same-direction mean {same:+.3f} ({100 * mixed / same:.0f}%)" if same else ""
        measured = f"mixed {mixed:+.3f}{share}"
        out.append((finding, measured, bool(same > 0 and abs(mixed) < 0.25 * same)))
    if dpo is not None and mixed is not None:
        same_text = f" (same-direction {same:+.3f})" if same else ""
        measured = f"mixed {mixed:+.3f} → after DPO {dpo:+.3f}{same_text}"
        partial = dpo > mixed and (same is None or dpo < 0.5 * same)
        out.append(("DPO after mixed SFT restores the margin only partly", measured, partial))
    return out


def _table_rows(measured: dict[str, list[float]]) -> tuple[list[str], list[list[str]]]:
    paper = paper_margins()
    n = max([6] + [len(v) for v in measured.values()])
    header = ["train → test", "source"] + [f"ep{i + 1}" for i in range(n)]
    rows = []
    for c in CONDITIONS:
        rows.append([c, "paper"] + [f"{v:+.3f}" for v in paper[c]] + [""] * (n - 6))
        got = measured.get(c, [])
        rows.append(["", "measured"] + [f"{v:+.3f}" for v in got] + [MISSING] * (n - len(got)))
    return header, rows


def paper_section(table: Any, out_dir: Path) -> PaperComparison | None:
    """The comparison as data for the report's templates, or None when no paper condition was measured."""
    measured = measured_margins(table, out_dir)
    if not measured:
        return None
    header, rows = _table_rows(measured)
    word = {True: "holds", False: "does not hold", None: "not measured"}
    verdicts = [(word[h], f, w) for f, w, h in findings(measured)]
    return PaperComparison(INTRO, header, rows, verdicts)
