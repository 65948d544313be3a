"""The report's likelihood view (does log π(y+) fall while the margin grows?) from hand-written trial
folders: no Ray, no training; the changes and their intervals computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from revmix.sweeps.mechanism import SKIPPED, likelihood_runs, mechanism_sentences, window_change
from revmix.sweeps.report import MECHANISM_TITLE, write_report
from revmix.sweeps.spec import parse_sweep
from tests.sweeps.helpers import sweep_raw

BASE = {
    "name": "mech",
    "seed": 0,
    "model": {"lora": {"enabled": True}},
    "data": {"n_items": 40},
    "stages": [
        {"name": "sft", "objective": {"name": "sft"}, "steps": 2, "batch_size": 4, "lora": False},
        {"name": "pref", "objective": {"name": "dpo"}, "steps": 10, "batch_size": 4, "lora": True},
    ],
    "eval": {"benchmarks": ["synthetic"], "limit": 4},
}
SEEDS = (0, 1, 2)
STEPS = 10  # WINDOW = 0.1 of 10 steps: the first and the last step are the ends
T_2 = 4.302652729911275  # t quantile 0.975 with 2 degrees of freedom
# Per direction and seed, the change over the preference stage of log π(y+) and log π(y−) (nats/token).
CHOSEN = {"forward": (-0.1, -0.2, -0.3), "reverse": (0.1, -0.05, -0.2)}
REJECTED = {"forward": (-0.8, -1.0, -1.2), "reverse": (-1.0, -1.0, -1.0)}
ENTROPY = (0.1, 0.2, 0.3)  # forward rows only


def _records(seed: int, per_token: bool = True) -> list[dict]:
    """Two SFT steps (no log-probs), then ten preference steps moving linearly from the start values."""
    recs: list[dict] = [{"stage": 0, "step": s, "loss": 3.0} for s in (1, 2)]
    for step in range(1, STEPS + 1):
        f = (step - 1) / (STEPS - 1)
        rec: dict = {"stage": 1, "step": step, "loss": 0.6}
        for d in ("forward", "reverse"):
            c, r = -1.0 + f * CHOSEN[d][seed], -1.5 + f * REJECTED[d][seed]
            rec |= {f"logps/chosen/{d}": 40 * c, f"logps/rejected/{d}": 40 * r}  # sums: 40 tokens
            if per_token:
                rec |= {f"logps/chosen_per_token/{d}": c, f"logps/rejected_per_token/{d}": r}
        rec["entropy/chosen/forward"] = 2.0 + f * ENTROPY[seed]
        recs.append(rec)
    return recs


def _write_sweep(out: Path, per_token: bool = True, objectives: tuple[str, ...] = ("dpo", "simpo")) -> None:
    raw = sweep_raw(space={"stages.1.objective.name": {"grid": list(objectives)}}, seeds=list(SEEDS))
    spec = parse_sweep(raw, out / "sweep.yaml", base_raw=BASE)
    (out / "spec.json").write_text(json.dumps(spec.to_dict()))
    i = 0
    for name in objectives:
        for seed in SEEDS:
            tdir = out / "trials" / f"t_{i:05d}"
            i += 1
            (tdir / "run").mkdir(parents=True)
            point = {"stages.1.objective.name": name}
            (tdir / "trial.json").write_text(
                json.dumps({"trial_id": tdir.name, "point": point, "seed": seed})
            )
            (tdir / "final.json").write_text(json.dumps({"eval/accuracy/synthetic": 0.3 + 0.1 * seed}))
            recs = _records(seed, per_token) if name != "sft" else [{"stage": 1, "step": 1, "loss": 2.0}]
            (tdir / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _interval(values: tuple[float, ...], places: int) -> str:
    """``+0.800 [+0.552, +1.048]`` by hand: the mean ± t_{2} · s / √3, typographic minus."""
    m = sum(values) / 3
    s = math.sqrt(sum((v - m) ** 2 for v in values) / 2)
    half = T_2 * s / math.sqrt(3)
    text = " [".join(f"{v:+.{places}f}" for v in (m, m - half)) + f", {m + half:+.{places}f}]"
    return text.replace("-", "\u2212")


def test_window_change_averages_each_end():
    steps = {s: float(s - 1) for s in range(1, 21)}  # 0 … 19: 10% of 20 steps is 2 at each end
    assert window_change(steps) == pytest.approx((18 + 19) / 2 - (0 + 1) / 2)
    assert window_change({1: 5.0, 2: 3.0}) == pytest.approx(-2.0)  # one step at each end
    assert window_change({7: 1.0}) is None  # one step: no change to speak of


def test_sentences_judge_each_seed_with_hand_computed_intervals(tmp_path: Path):
    _write_sweep(tmp_path, objectives=("dpo",))
    from revmix.sweeps import results as res
    from revmix.sweeps.report import load_spec_for_dir

    spec = load_spec_for_dir(tmp_path)
    table = res.load_table(spec, tmp_path)
    runs, per_token = likelihood_runs(table, list(spec.space), tmp_path)
    assert per_token and [g.seeds for g in runs] == [SEEDS]
    assert sorted(runs[0].series["chosen/forward"][0]) == list(range(3, 3 + STEPS))  # after the SFT steps
    [sentence] = mechanism_sentences(runs, per_token)
    margin_fwd = tuple(c - r for c, r in zip(CHOSEN["forward"], REJECTED["forward"]))  # 0.7, 0.8, 0.9
    margin_rev = tuple(c - r for c, r in zip(CHOSEN["reverse"], REJECTED["reverse"]))  # 1.1, 0.95, 0.8
    assert (
        "forward: log π(y+) fell while the margin grew in 3/3 seeds; "
        f"Δ log π(y+) {_interval(CHOSEN['forward'], 3)}, Δ margin {_interval(margin_fwd, 2)}, "
        f"Δ entropy(y+) {_interval(ENTROPY, 3)}; reverse" in sentence
    )
    # reverse: seed 0's log π(y+) rose, so 2 of 3 seeds
    assert (
        "reverse: log π(y+) fell while the margin grew in 2/3 seeds; "
        f"Δ log π(y+) {_interval(CHOSEN['reverse'], 3)}, Δ margin {_interval(margin_rev, 2)}" in sentence
    )
    assert sentence.endswith("(nats/token; 3 seeds, 95% t-interval)")
    assert _interval(CHOSEN["forward"], 3) == "\u22120.200 [\u22120.448, +0.048]"  # the formula itself


def test_report_section_plot_and_caption(tmp_path: Path):
    _write_sweep(tmp_path)
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    section = md.split(f"## {MECHANISM_TITLE}")[1].split("\n## ")[0]
    assert "each the mean of 3 seeds with its 95% Student-t interval over seeds" in section
    assert "- sft→dpo: forward: log π(y+) fell while the margin grew in 3/3 seeds" in section
    assert "- sft→simpo: forward: log π(y+) fell while the margin grew in 3/3 seeds" in section
    assert "](plots/likelihood_mechanism.png)" in section
    png = tmp_path / "plots" / "likelihood_mechanism.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_sums_where_a_run_predates_the_token_means(tmp_path: Path):
    _write_sweep(tmp_path, per_token=False, objectives=("dpo",))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "summed over the response, nats" in md
    # the summed changes are 40× the per-token ones: the verdicts do not change
    assert "forward: log π(y+) fell while the margin grew in 3/3 seeds; Δ log π(y+) \u22128.0 [" in md


def test_no_preference_objective_leaves_a_note(tmp_path: Path):
    _write_sweep(tmp_path, objectives=("sft", "unlikelihood"))
    # rewrite every trial as if nothing logged log-probs
    for f in (tmp_path / "trials").glob("*/run/metrics.jsonl"):
        f.write_text(json.dumps({"stage": 0, "step": 1, "loss": 2.0}) + "\n")
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert f"_{SKIPPED}_" in md
    assert not (tmp_path / "plots" / "likelihood_mechanism.png").exists()


def test_the_shipped_mechanism_sweep_logs_what_the_section_reads():
    from revmix.sweeps.plan import points
    from revmix.sweeps.spec import load_sweep
    from tests.sweeps.helpers import ROOT

    spec = load_sweep(ROOT / "configs" / "sweeps" / "mechanism.yaml")
    assert spec.seeds == [0, 1, 2]
    configs = [spec.trial_config(p, 0) for p in points(spec)]
    assert [c.stages[1].objective.name for c in configs] == ["dpo", "complementary_dpo", "unlikelihood"]
    assert all(c.stages[1].objective.entropy_metrics for c in configs)  # entropy/chosen per step
    assert all(c.stages[0].objective.name == "sft" for c in configs)
