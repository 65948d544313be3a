"""The report's objectives view from hand-written trial folders (no Ray, no training), and the shipped
objectives sweep."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest

from revmix.sweeps import results as res
from revmix.sweeps.intervals import t_quantile
from revmix.sweeps.plots import objective_stage
from revmix.sweeps.report import write_report
from revmix.sweeps.spec import load_sweep, parse_sweep
from tests.sweeps.helpers import ROOT, sweep_raw

BASE2 = {
    "name": "unit2",
    "seed": 0,
    "model": {"lora": {"enabled": True}},
    "data": {"n_items": 40},
    "stages": [
        {"name": "sft", "objective": {"name": "sft"}, "steps": 2, "batch_size": 4, "lora": False},
        {"name": "pref", "objective": {"name": "dpo"}, "steps": 3, "batch_size": 4, "lora": True},
    ],
    "eval": {"benchmarks": ["synthetic"], "limit": 4},
}
# Listed with IPO first: the table must still put plain dpo (the baseline) first.
GRID = [{"name": "dpo", "loss_type": "ipo"}, {"name": "dpo"}, {"name": "dpo", "label_smoothing": 0.1}]
LABELS = {"dpo(ipo)": 0, "dpo": 1, "dpo(label_smoothing=0.1)": 2}
ACC = {  # final accuracy per objective and seed; label smoothing's seed 2 fails
    "dpo": {0: 0.30, 1: 0.40, 2: 0.50},
    "dpo(ipo)": {0: 0.50, 1: 0.65, 2: 0.65},
    "dpo(label_smoothing=0.1)": {0: 0.35, 1: 0.55},
}
CHOSEN_DRIFT = {  # last − first logps/chosen/forward within the preference stage
    "dpo": {0: -2.0, 1: -4.0, 2: -6.0},
    "dpo(ipo)": {0: 1.0, 1: 1.5, 2: 2.0},
    "dpo(label_smoothing=0.1)": {0: -1.0, 1: -3.0},
}


def _t(p: float, df: int) -> float:
    """t quantiles in closed form: Cauchy for df 1; F(t) = 1/2 + t/(2√(2+t²)) for df 2."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    q = 2 * p - 1
    return q * math.sqrt(2 / (1 - q * q))


def _expected(values: list[float]) -> tuple[float, float, float]:
    m, n = statistics.fmean(values), len(values)
    half = _t(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return m, m - half, m + half


def _records(label: str, seed: int) -> list[dict]:
    recs = []
    for step in (1, 2):  # an SFT stage that (wrongly) logs a logps key: it must not count
        recs.append(
            {"stage": 0, "stage_name": "sft", "step": step, "loss": 3.0, "logps/chosen/forward": 99.0 * step}
        )
    drift = CHOSEN_DRIFT[label].get(seed, 50.0)  # the failed trial logged steps too: they must not count
    for step in (1, 2, 3):
        rec: dict = {"stage": 1, "stage_name": "pref", "step": step, "loss": 0.7}
        rec["logps/chosen/forward"] = -100.0 + drift * (step - 1) / 2
        rec["logps/rejected/forward"] = -120.0 - 3.0 * (step - 1)  # drift −6 for every trial
        rec["logps/chosen/reverse"] = -90.0 + 0.5 * (step - 1) * (seed + 1)  # drift (seed + 1)
        rec["logps/rejected/reverse"] = -95.0
        recs.append(rec)
    return recs


def _write_trial(out: Path, tid: str, point: dict, seed: int, final: dict | None, recs: list[dict]) -> None:
    tdir = out / "trials" / tid
    (tdir / "run").mkdir(parents=True)
    (tdir / "trial.json").write_text(json.dumps({"trial_id": tid, "point": point, "seed": seed}))
    (tdir / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if final is None:
        (tdir / "error.txt").write_text("Traceback ...\nRuntimeError: worker died\n")
    else:
        (tdir / "final.json").write_text(json.dumps(final))


def _make_sweep_dir(out: Path):
    raw = sweep_raw(space={"stages.1.objective": {"grid": GRID}}, seeds=[0, 1, 2])
    spec = parse_sweep(raw, out / "sweep.yaml", base_raw=BASE2)
    (out / "spec.json").write_text(json.dumps(spec.to_dict()))
    i = 0
    for obj, label in zip(GRID, LABELS):
        for seed in (0, 1, 2):
            tid, i = f"t_{i:05d}", i + 1
            acc = ACC[label].get(seed)
            final = None
            if acc is not None:
                final = {
                    "eval/accuracy/synthetic": acc,
                    "eval/accuracy/synthetic/forward": acc - 0.1,
                    "eval/accuracy/synthetic/reverse": acc + 0.1,
                    "eval/alp/forward/margin": 0.2 * (LABELS[label] + 1) + 0.01 * seed,
                    "eval/alp/reverse/margin": -0.1,
                    "train/tokens_per_s": 1.0,  # the whole run's mean: the stage's own value wins
                    "train/stage1/tokens_per_s": 1000.0 + 100.0 * seed,
                }
            _write_trial(out, tid, {"stages.1.objective": obj}, seed, final, _records(label, seed))
    return spec


def _row(md: str, label: str) -> list[str]:
    section = md.split("## Objectives")[1].split("\n## ")[0]
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _numbers(cell: str) -> list[float]:
    m = re.fullmatch(r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]( \(n=\d\))?", cell)
    assert m, cell
    return [float(x) for x in m.groups()[:3]]


def test_objectives_table_means_intervals_and_sentences(tmp_path: Path):
    spec = _make_sweep_dir(tmp_path)
    write_report(tmp_path)  # the table is rebuilt from the trial folders
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Objectives")[1].split("\n## ")[0]
    assert "Stage 1 (pref) under each objective configuration" in section
    header = section.split("\n| ", 1)[1].split(" |\n")[0].split(" | ")
    assert header == [
        "objective",
        "seeds",
        "accuracy",
        "accuracy (fwd)",
        "accuracy (rev)",
        "ALP margin (fwd)",
        "ALP margin (rev)",
        "Δ log p(y+) (fwd)",
        "Δ log p(y+) (rev)",
        "Δ log p(y−) (fwd)",
        "Δ log p(y−) (rev)",
        "tokens/s",
    ]
    labels = [ln.split(" | ")[0].removeprefix("| ") for ln in section.splitlines()[6:9]]
    assert labels == ["dpo", "dpo(ipo)", "dpo(label_smoothing=0.1)"]  # baseline first, then sweep order

    dpo = _row(md, "dpo")
    assert dpo[1] == "3"
    assert dpo[2] == "0.400 [0.152, 0.648]"  # 0.4 ± 4.3027 × 0.1/√3
    for cell, values in [
        (dpo[2], [0.3, 0.4, 0.5]),
        (dpo[3], [0.2, 0.3, 0.4]),
        (dpo[5], [0.4, 0.41, 0.42]),
        (dpo[7], [-2.0, -4.0, -6.0]),  # stage 0's logps records are ignored
        (dpo[8], [1.0, 2.0, 3.0]),
        (dpo[11], [1000.0, 1100.0, 1200.0]),  # the preference stage's tokens/s
    ]:
        places = len(cell.split(" ")[0].split(".")[1]) if "." in cell.split(" ")[0] else 0
        # equal to the shown precision: half a unit of the last printed digit
        assert _numbers(cell) == pytest.approx(list(_expected(values)), rel=1e-9, abs=0.5001 * 10**-places)
    assert dpo[6] == "-0.100 [-0.100, -0.100]" and dpo[9] == "-6.00 [-6.00, -6.00]"
    assert dpo[10] == "0.000 [0.000, 0.000]"  # no drift (three significant digits of 0)

    smooth = _row(md, "dpo(label_smoothing=0.1)")
    assert smooth[1] == "2"  # seed 2 failed
    # two seeds: 0.45 ± 12.706 × 0.1414/√2 = ±1.2706
    assert _numbers(smooth[2]) == pytest.approx([0.45, 0.45 - 1.2706205, 0.45 + 1.2706205], rel=1e-3)

    sentences = [ln[2:] for ln in section.splitlines() if ln.startswith("- ")]
    assert sentences[0] == (
        "accuracy: dpo(ipo) − dpo = +0.200 [+0.076, +0.324] (3 seeds, paired by seed): beyond noise; "
        "dpo(ipo) > dpo holds in 3/3 seeds"
    )
    # Welch: 0.05 ± t(df = 1.684) × √(0.02/2 + 0.01/3)
    se2 = 0.02 / 2 + 0.01 / 3  # sample variances 0.02 (two seeds) and 0.01 (three)
    half = t_quantile(0.975, se2**2 / ((0.02 / 2) ** 2 / 1 + (0.01 / 3) ** 2 / 2)) * math.sqrt(se2)
    assert half == pytest.approx(0.598, abs=1e-3)
    assert sentences[1].startswith(
        f"accuracy: dpo(label_smoothing=0.1) − dpo = +0.050 [−{half - 0.05:.3f}, +{0.05 + half:.3f}]"
    )
    assert sentences[1].endswith(
        "(2 vs 3 seeds, Welch): within seed-to-seed noise; dpo(label_smoothing=0.1) > dpo holds in 2/2 seeds"
    )
    assert len(sentences) == 2
    assert (tmp_path / "plots" / "objectives.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Objectives</h2>" in page and "<li>accuracy: dpo(ipo) − dpo = +0.200" in page

    table = res.rebuild_table(spec, tmp_path)
    assert set(table[res.OBJECTIVE_CONFIG]) == {"sft→dpo", "sft→dpo(ipo)", "sft→dpo(label_smoothing=0.1)"}


def test_objective_stage_from_differing_configs_without_a_swept_path():
    df = pd.DataFrame({res.OBJECTIVE_CONFIG: ["sft→dpo", "sft→simpo", "sft→dpo"]})
    assert objective_stage(df, []) == 1
    assert objective_stage(df.iloc[[0, 2]], []) is None  # the same objectives everywhere: no view
    assert objective_stage(df.iloc[[0]], ["stages.0.objective.alpha"]) == 0  # a swept objective path


def test_objectives_sweep_covers_every_preference_objective():
    spec = load_sweep(ROOT / "configs" / "sweeps" / "objectives.yaml")
    assert spec.seeds == [0, 1, 2] and list(spec.space) == ["stages.1.objective"]
    labels = [res.objective_label(spec.trial_config(p, 0).stages[1].objective) for p in _points(spec)]
    assert labels == [
        "dpo",
        "dpo(ipo)",
        "dpo(hinge)",
        "dpo(robust, label_smoothing=0.1)",
        "dpo(apo_zero)",
        "dpo(apo_down)",
        "dpo(rpo_alpha=1)",
        "dpo(dpop_lambda=50)",
        "simpo",
        "cpo",
        "orpo",
        "kto",
    ]
    cfg = spec.trial_config(_points(spec)[0], 0)
    assert cfg.stages[0].objective.name == "sft" and cfg.stages[0].mix.reverse_fraction == 0.5
    assert cfg.stages[1].mix.reverse_fraction == 0.5 and cfg.stages[1].reference == "auto"


def _points(spec) -> list[dict]:
    from revmix.sweeps.plan import points

    return points(spec)
