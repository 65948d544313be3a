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
from revmix.sweeps.plots import alp_curve, alp_drift, mean_curve, objective_stage
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
CHOSEN_DRIFT = {  # held-out ALP(y+) forward: end of the preference stage − end of the SFT stage
    "dpo": {0: -0.2, 1: -0.4, 2: -0.6},
    "dpo(ipo)": {0: 0.1, 1: 0.15, 2: 0.2},
    "dpo(label_smoothing=0.1)": {0: -1.0, 1: -1.2},  # falls faster than ALP(y−): the margin shrinks
}
# The end of the SFT stage: ALP(y+), ALP(y−) per direction (the drift's starting point).
SFT_END = {"forward": (-1.0, -1.5), "reverse": (-1.2, -1.3)}


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


def _alp(fwd: tuple[float, float], rev: tuple[float, float]) -> dict[str, float]:
    """ALP records of one evaluation: (ALP(y+), ALP(y−)) per direction, and their margins."""
    out = {}
    for d, (c, r) in (("forward", fwd), ("reverse", rev)):
        out.update({f"alp/{d}/chosen": c, f"alp/{d}/rejected": r, f"alp/{d}/margin": c - r})
    return out


def _records(label: str, seed: int, alp: bool = True) -> list[dict]:
    """One step per epoch; ALP after every epoch (``eval.every_epoch``) unless ``alp`` is False. The
    training batches' summed log-probs swing by tens of nats: they must not reach the table."""
    recs = []
    for step in (1, 2):
        rec: dict = {"stage": 0, "stage_name": "sft", "step": step, "epoch": float(step), "loss": 3.0}
        rec["logps/chosen/forward"] = 99.0 * step
        # after epoch 1 ALP is far off; only the stage's last record (epoch 2) is its end
        rec |= _alp((-5.0, -5.0), (-5.0, -5.0)) if step == 1 else _alp(SFT_END["forward"], SFT_END["reverse"])
        recs.append(rec if alp else {k: v for k, v in rec.items() if not k.startswith("alp/")})
    drift = CHOSEN_DRIFT[label].get(seed, 5.0)  # the failed trial logged steps too: they must not count
    for step in (1, 2, 3):
        rec = {"stage": 1, "stage_name": "pref", "step": step, "epoch": float(step), "loss": 0.7}
        rec["logps/chosen/forward"] = -100.0 + 127.0 * (-1) ** step  # batch noise
        rec["logps/rejected/forward"] = -120.0 * step
        fwd = (-1.0 + drift * step / 3, -1.5 - 0.3 * step)  # ALP(y−) drift −0.9 for every trial
        rev = (-1.2 + 0.05 * (seed + 1) * step / 3, -1.3)  # ALP(y+) drift 0.05 (seed + 1); ALP(y−) 0
        rec |= _alp(fwd, rev) if alp else {}
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


def _make_sweep_dir(out: Path, no_alp: tuple[tuple[str, int], ...] = ()):
    """Nine trials (three objectives × three seeds); the (label, seed) pairs in ``no_alp`` ran with
    eval.every_epoch off: no ALP records."""
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
            recs = _records(label, seed, alp=(label, seed) not in no_alp)
            _write_trial(out, tid, {"stages.1.objective": obj}, seed, final, recs)
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
        "ΔALP(y+) fwd",
        "ΔALP(y+) rev",
        "ΔALP(y−) fwd",
        "ΔALP(y−) rev",
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
        (dpo[7], [-0.2, -0.4, -0.6]),  # ALP(y+) fwd: −1 + drift at the end minus −1 after the SFT stage
        (dpo[8], [0.05, 0.10, 0.15]),
        (dpo[11], [1000.0, 1100.0, 1200.0]),  # the preference stage's tokens/s
    ]:
        places = len(cell.split(" ")[0].split(".")[1]) if "." in cell.split(" ")[0] else 0
        # equal to the shown precision: half a unit of the last printed digit
        assert _numbers(cell) == pytest.approx(list(_expected(values)), rel=1e-9, abs=0.5001 * 10**-places)
    assert dpo[6] == "-0.100 [-0.100, -0.100]" and dpo[9] == "-0.900 [-0.900, -0.900]"
    assert dpo[10] == "0.000 [0.000, 0.000]"  # no drift (three significant digits of 0)
    assert "logps" not in section and "Δ log p" not in section  # training-batch log-probs stay out

    smooth = _row(md, "dpo(label_smoothing=0.1)")
    assert smooth[1] == "2"  # seed 2 failed
    # two seeds: 0.45 ± 12.706 × 0.1414/√2 = ±1.2706
    assert _numbers(smooth[2]) == pytest.approx([0.45, 0.45 - 1.2706205, 0.45 + 1.2706205], rel=1e-3)
    # the failed seed 2 logged a drift of 5.0: it must not count (cell printed to 2 decimals)
    assert smooth[7] == "-1.10 [-2.37, 0.17]"
    assert _numbers(smooth[7]) == pytest.approx([-1.1, -1.1 - 1.2706205, -1.1 + 1.2706205], abs=0.0051)

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
    # 3 seeds: t(0.975, 2) = 4.3027; ALP(y+) fwd −0.4 ± 4.3027 × 0.2/√3 = ±0.497, margin (ΔALP(y+) + 0.9)
    # 0.5 ± 0.497; reverse 0.1 ± 4.3027 × 0.05/√3 = ±0.124 for ALP(y+) and the margin alike
    assert _t(0.975, 2) * 0.2 / math.sqrt(3) == pytest.approx(0.4968, abs=1e-4)
    assert sentences[2] == (
        "held-out ALP over the stage, dpo — forward: ALP(y+) fell by 0.400 [−0.097, 0.897] while the margin "
        "grew by 0.500 [0.003, 0.997] (nats/token, 3 seeds); reverse: ALP(y+) rose by 0.100 [−0.024, 0.224] "
        "while the margin grew by 0.100 [−0.024, 0.224] (nats/token, 3 seeds)"
    )
    # 2 seeds: t(0.975, 1) = 12.706; ALP(y+) fwd −1.1 ± 12.706 × 0.1414/√2 = ±1.271, margin −0.2 ± 1.271;
    # reverse 0.075 ± 12.706 × 0.03536/√2 = ±0.318
    assert sentences[4] == (
        "held-out ALP over the stage, dpo(label_smoothing=0.1) — forward: ALP(y+) fell by 1.10 [−0.17, 2.37] "
        "while the margin shrank by 0.20 [−1.07, 1.47] (nats/token, 2 seeds); reverse: ALP(y+) rose by "
        "0.075 [−0.243, 0.393] while the margin grew by 0.075 [−0.243, 0.393] (nats/token, 2 seeds)"
    )
    assert sentences[3].startswith("held-out ALP over the stage, dpo(ipo) — forward: ALP(y+) rose by 0.150")
    assert len(sentences) == 5
    assert "ΔALP n/a" not in section  # every run has its records
    for png in ("objectives.png", "objectives_alp.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
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


def test_alp_drift_and_curve_from_stage_end_records():
    recs = _records("dpo", 1)
    # end of stage 1 (−1 − 0.4) minus end of stage 0 (−1); stage 0's first record (−5) is not its end
    assert alp_drift(recs, 1, "alp/forward/chosen") == pytest.approx(-0.4, rel=1e-9)
    assert alp_drift(recs, 1, "alp/forward/rejected") == pytest.approx(-0.9, rel=1e-9)
    assert alp_drift(recs, 0, "alp/forward/chosen") is None  # nothing before stage 0
    assert alp_drift(_records("dpo", 1, alp=False), 1, "alp/forward/chosen") is None
    curve = alp_curve(recs, 1, "alp/forward/chosen")  # epoch 0: the end of stage 0
    assert list(curve) == [0.0, 1.0, 2.0, 3.0]
    assert list(curve.values()) == pytest.approx([-1.0, -1.0 - 0.4 / 3, -1.0 - 0.8 / 3, -1.4], rel=1e-9)


def test_mean_curve_averages_the_seeds_that_recorded_each_epoch():
    runs = {0: {0.0: -1.0, 1.0: -2.0}, 1: {0.0: -3.0, 1.0: -4.0, 2.0: -5.0}}
    xs, means = mean_curve(runs)
    assert xs == [0.0, 1.0, 2.0] and means == pytest.approx([-2.0, -3.0, -5.0], rel=1e-9)


def test_missing_alp_records_give_na_and_a_note(tmp_path: Path):
    some, none = tmp_path / "some", tmp_path / "none"
    some.mkdir(), none.mkdir()
    _make_sweep_dir(some, no_alp=(("dpo(ipo)", 1),))
    write_report(some)
    md = (some / "report.md").read_text()
    ipo = _row(md, "dpo(ipo)")
    # seeds 0 and 2 only: 0.15 ± 12.706 × 0.0707/√2 = ±0.635
    assert ipo[7].endswith(" (n=2)")
    assert _numbers(ipo[7]) == pytest.approx([0.15, 0.15 - 0.6353, 0.15 + 0.6353], abs=0.0011)
    assert "_ΔALP n/a: 1 of 8 runs lack alp/<direction>/<chosen|rejected> records" in md

    every = tuple((label, seed) for label in LABELS for seed in (0, 1, 2))
    _make_sweep_dir(none, no_alp=every)
    write_report(none)
    md = (none / "report.md").read_text()
    assert _row(md, "dpo")[7:11] == ["n/a"] * 4
    assert "_ΔALP n/a: 8 of 8 runs lack" in md and "held-out ALP over the stage" not in md
    assert not (none / "plots" / "objectives_alp.png").exists()
