import json

import pandas as pd

from revmix.sweeps.paper import (
    CONDITIONS,
    by_model_section,
    findings,
    measured_by_model,
    measured_margins,
    paper_margins,
    paper_section,
    paper_sections,
)


def _run(tmp_path, name, recs):
    d = tmp_path / name / "run"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    return f"{name}/run"


def _recs(stage, fwd, rev):
    return [
        {"stage": stage, "step": i + 1, "alp/forward/margin": f, "alp/reverse/margin": r}
        for i, (f, r) in enumerate(zip(fwd, rev))
    ]


def test_measured_margins_map_trials_to_paper_conditions(tmp_path):
    rows = [
        {
            "status": "TERMINATED",
            "mix": "fixed_total",
            "reverse_fraction": 0.0,
            "run_dir": _run(tmp_path, "f", _recs(0, [0.1, 0.4], [-0.1, -0.3])),
        },
        {
            "status": "TERMINATED",
            "mix": "fixed_total",
            "reverse_fraction": 1.0,
            "run_dir": _run(tmp_path, "r", _recs(0, [-0.2, -0.5], [0.2, 0.6])),
        },
        {
            "status": "TERMINATED",
            "mix": "union",
            "reverse_fraction": 0.5,
            "run_dir": _run(tmp_path, "u", _recs(0, [0.02, 0.04], [0.0, 0.02]) + _recs(1, [0.1], [0.06])),
        },
        {"status": "ERROR", "mix": "fixed_total", "reverse_fraction": 0.0, "run_dir": None},
    ]
    m = measured_margins(pd.DataFrame(rows), tmp_path)
    assert m["forward → forward"] == [0.1, 0.4] and m["forward → reverse"] == [-0.1, -0.3]
    assert m["reverse → reverse"] == [0.2, 0.6] and m["reverse → forward"] == [-0.2, -0.5]
    assert m["mixed → mixed"] == [0.01, 0.03] and m["mixed, then DPO"] == [0.08]
    verdicts = {f.split(" ")[0]: h for f, _, h in findings(m)}
    assert verdicts == {"Same-direction": True, "Cross-direction": True, "Mixing": True, "DPO": True}
    section = paper_section(pd.DataFrame(rows), tmp_path)
    assert section.rows[0][:3] == ["forward → forward", "paper", "+0.323"]
    assert section.rows[1] == ["", "measured", "+0.100", "+0.400", "—", "—", "—", "—"]
    assert (
        "holds (1 seed)",
        "Same-direction margins are positive and grow with training",
    ) == section.findings[0][:2]
    assert section.findings[0][2].endswith("(1 seed: no interval)") and "1 seed: no interval" in section.intro


def test_findings_can_fail():
    m = {"forward → forward": [0.5, 0.4], "reverse → reverse": [0.3, 0.6], "mixed → mixed": [0.5]}
    verdicts = {f.split(" ")[0]: h for f, _, h in findings(m)}
    assert verdicts == {"Same-direction": False, "Mixing": False}


def test_paper_numbers_are_shipped():
    p = paper_margins()
    assert list(p) == list(CONDITIONS) and p["mixed → mixed"][-1] == 0.081


def test_findings_are_judged_per_seed_with_intervals(tmp_path):
    rows = []
    for seed in (0, 1, 2):
        dpo = 0.6 if seed == 2 else 0.08  # seed 2's DPO restores more than half the same-direction margin
        runs = {
            (0.0, "fixed_total"): _recs(0, [0.1 + 0.1 * seed, 0.4], [-0.1, -0.3]),
            (1.0, "fixed_total"): _recs(0, [-0.2, -0.5], [0.2, 0.6]),
            (0.5, "union"): _recs(0, [0.02, 0.04], [0.0, 0.02]) + _recs(1, [dpo], [dpo]),
        }
        for (r, mix), recs in runs.items():
            name = f"s{seed}_{mix}_{r}"
            rows.append(
                {
                    "status": "TERMINATED",
                    "seed": seed,
                    "mix": mix,
                    "reverse_fraction": r,
                    "run_dir": _run(tmp_path, name, recs),
                }
            )
    section = paper_section(pd.DataFrame(rows), tmp_path)
    # f→f epoch 1 over seeds: 0.1, 0.2, 0.3 → 0.2 ± t_{2,0.975}·0.1/√3 = 0.2 ± 0.248414
    assert section.rows[1][:4] == [
        "",
        "measured (3 seeds)",
        "+0.200 [-0.048, +0.448]",
        "+0.400 [+0.400, +0.400]",
    ]
    verdicts = {f.split(" ")[0]: v for v, f, _ in section.findings}
    assert verdicts["Same-direction"] == "holds in 3/3 seeds"
    # the mean DPO margin (0.08 + 0.08 + 0.6) / 3 = 0.253 is over half of 0.5: judged on the mean it would
    # not hold; judged per seed it holds in two of three
    assert verdicts["DPO"] == "holds in 2/3 seeds"
    dpo_measured = next(m for _, f, m in section.findings if f.startswith("DPO"))
    assert "after DPO +0.253" in dpo_measured and "means over 3 seeds" in dpo_measured
    assert "mean over 3 seeds with the 95% Student-t interval" in section.intro


def _model_rows(tmp_path, model, seeds, ff, rr, mixed):
    """Finished r = 0, r = 1 and union trials of ``model``: two epochs each, the first at ±0.1."""
    rows = []
    for seed in seeds:
        runs = {
            (0.0, "fixed_total"): _recs(0, [0.1, ff[seed]], [-0.1, -ff[seed]]),
            (1.0, "fixed_total"): _recs(0, [-0.1, -rr[seed]], [0.1, rr[seed]]),
            (0.5, "union"): _recs(0, [0.0, mixed], [0.0, mixed]),
        }
        for (r, mix), recs in runs.items():
            run = _run(tmp_path, f"{model}_{seed}_{mix}_{r}", recs)
            rows.append(
                {
                    "status": "TERMINATED",
                    "model": model,
                    "seed": seed,
                    "mix": mix,
                    "reverse_fraction": r,
                    "run_dir": run,
                }
            )
    return rows


def test_a_sweep_over_model_sizes_compares_each_size_and_tabulates_findings_by_size(tmp_path):
    small = _model_rows(tmp_path, "tiny-small", [0], {0: 0.8}, {0: 0.4}, 0.3)
    tiny = _model_rows(tmp_path, "tiny-tiny", [0, 1], {0: 0.4, 1: 0.6}, {0: 0.2, 1: 0.2}, 0.03)
    table = pd.DataFrame(small + tiny)  # the larger size first: the report orders by size
    measured = measured_by_model(table, tmp_path)
    sections = paper_sections(measured)
    assert [m for m, _ in sections] == ["tiny-tiny", "tiny-small"]
    assert "(model tiny-tiny, synthetic twins)" in sections[0][1].intro
    assert sections[1][1].rows[1][2:4] == ["+0.100", "+0.800"]  # small's f→f alone, not pooled with tiny
    by_model = by_model_section(measured)
    assert by_model.header == ["model", "f→f", "r→r", "f→r", "r→f", "mixed", "f→f − r→r", "mixed share"]
    # tiny f→f over seeds 0.4, 0.6: 0.5 ± t_{1,0.975}·0.1414/√2 = 0.5 ± 1.2706; mixed share per seed:
    # 0.03 / 0.3 = 10% and 0.03 / 0.4 = 7.5%: 8.75% ± 12.706·0.017678/√2 = ± 15.88 points
    assert by_model.rows[0][:2] == ["tiny-tiny", "+0.500 [-0.771, +1.771]"]
    # the gap per seed: 0.2 and 0.4 → 0.3 ± 1.2706
    assert by_model.rows[0][6:] == ["+0.300 [-0.971, +1.571]", "9% [-7%, 25%]"]
    # small, one seed: no interval; mixed 0.3 is half of (0.8 + 0.4) / 2: the collapse does not hold
    assert by_model.rows[1] == [
        "tiny-small",
        "+0.800",
        "+0.400",
        "-0.800",
        "-0.400",
        "+0.300",
        "+0.400",
        "50%",
    ]
    # the largest model minus the smallest, one sentence per column: small's f→f 0.8 − tiny's mean 0.5
    assert by_model.sentences[0].startswith("f→f at tiny-small − f→f at tiny-tiny = +0.3")
    assert len(by_model.sentences) == 7
    verdicts = {f: v for v, f, _ in by_model.findings}
    assert verdicts[
        "tiny-tiny: Mixing both directions collapses the margin below a quarter of the same-direction mean (paper: ≈0.08 vs ≈1.3, 6%)"
    ] == ("holds in 2/2 seeds")
    assert verdicts[
        "tiny-small: Mixing both directions collapses the margin below a quarter of the same-direction mean (paper: ≈0.08 vs ≈1.3, 6%)"
    ] == ("does not hold (1 seed)")


def test_a_sweep_of_one_model_has_one_comparison_and_no_size_table(tmp_path):
    table = pd.DataFrame(_model_rows(tmp_path, "tiny-tiny", [0], {0: 0.4}, {0: 0.2}, 0.03))
    measured = measured_by_model(table, tmp_path)
    assert [m for m, _ in paper_sections(measured)] == [""]
    assert "(model tiny-tiny, synthetic twins)" in paper_sections(measured)[0][1].intro
    assert by_model_section(measured) is None
