"""Named conditions (a sweep's ``conditions`` and ``compare``) and the gradient cosine over training:
parsing, the errors that name the key, and the report's tables with hand-computed intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revmix.sweeps import results as res
from revmix.sweeps.conditions import group_conditions, named_comparisons
from revmix.sweeps.cosine import cosine_conditions, cosine_rows, cosine_sentences, window_means
from revmix.sweeps.report import load_spec_for_dir, write_report
from revmix.sweeps.spec import CONDITION, parse_sweep
from revmix.validation import SweepError
from tests.sweeps.helpers import BASE_RAW, sweep_raw

ACC = "eval/accuracy/synthetic"
SFT = {"name": "sft", "objective": {"name": "sft"}, "steps": 8, "batch_size": 4}
DPO = {"name": "dpo", "objective": {"name": "dpo"}, "steps": 2, "batch_size": 4}
CONDITIONS = {
    "mixed": {"stages": [SFT]},
    "curriculum": {"stages.0.mix.schedule": {"kind": "step", "start": 0.0, "end": 1.0}},
    "sft then dpo": {"stages": [SFT, DPO], "data.n_items": 60},
}


def _spec(tmp_path: Path, **changes):
    raw = sweep_raw(**{"space": None, "conditions": CONDITIONS, "seeds": [0, 1, 2], **changes})
    return parse_sweep(raw, tmp_path / "sweep.yaml", base_raw=BASE_RAW)


def test_conditions_are_a_grid_over_their_labels(tmp_path):
    spec = _spec(tmp_path, space={"stages.0.lr": {"grid": [1e-3, 2e-3]}})
    assert list(spec.space) == [CONDITION, "stages.0.lr"]
    assert spec.space[CONDITION].values == ("mixed", "curriculum", "sft then dpo")
    assert spec.num_trials() == 3 * 2 * 3
    two = spec.trial_config({CONDITION: "sft then dpo", "stages.0.lr": 2e-3}, seed=1)
    assert [s.name for s in two.stages] == ["sft", "dpo"] and two.data.n_items == 60 and two.seed == 1
    assert two.stages[0].lr == 2e-3  # the space applies on top of the condition's stage list
    cur = spec.trial_config({CONDITION: "curriculum", "stages.0.lr": 1e-3}, seed=0)
    assert cur.stages[0].mix.schedule.kind == "step" and cur.stages[0].steps == 3  # BASE_RAW's stage
    assert CONDITION not in spec.assignments({CONDITION: "mixed", "stages.0.lr": 1e-3})


def test_named_spec_round_trips_through_spec_json(tmp_path):
    spec = _spec(tmp_path, compare=[["curriculum", "mixed"]])
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    back = load_spec_for_dir(tmp_path)
    assert back.conditions == spec.conditions and back.compare == [("curriculum", "mixed")]
    assert back.space[CONDITION].values == spec.space[CONDITION].values


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"compare": [["curriculm", "mixed"]]},
            "compare.0: 'curriculm' is not a condition (did you mean 'curriculum'?); valid: 'mixed', "
            "'curriculum', 'sft then dpo'",
        ),
        ({"compare": [["mixed", "mixed"]]}, "compare.0: compares 'mixed' with itself"),
        (
            {"overrides": {"stages.0.lr": 1e-3}},
            "conditions.mixed.stages: also set by overrides or seeds",
        ),
        (
            {"space": {CONDITION: {"grid": [1, 2]}}},
            "space.condition: reserved for the labels of `conditions`",
        ),
    ],
)
def test_named_condition_errors_name_the_key(tmp_path, changes, message):
    with pytest.raises(SweepError) as e:
        _spec(tmp_path, **changes)
    assert message in str(e.value)


def test_empty_condition_is_refused(tmp_path):
    raw = sweep_raw(space=None, conditions={"mixed": {}})
    with pytest.raises(SweepError, match=r"conditions\.mixed: expected a non-empty mapping"):
        parse_sweep(raw, tmp_path / "sweep.yaml", base_raw=BASE_RAW)


def test_compare_without_conditions_is_refused(tmp_path):
    with pytest.raises(SweepError, match=r"compare\.0: 'a' is not a condition; valid: \(none"):
        parse_sweep(sweep_raw(compare=[["a", "b"]]), tmp_path / "sweep.yaml", base_raw=BASE_RAW)


# Accuracy per seed 0, 1, 2: mixed 0.40, 0.50, 0.60; curriculum 0.45, 0.70, 0.62. Paired differences
# curriculum − mixed: 0.05, 0.20, 0.02: mean 0.09, s = sqrt(0.0093) = 0.096437, t_{2, 0.975} = 4.302653,
# half width 4.302653 · 0.096437 / sqrt(3) = 0.239565 → [−0.150, +0.330]: within noise, holds in 3/3.
ACCURACY = {"mixed": (0.40, 0.50, 0.60), "curriculum": (0.45, 0.70, 0.62), "sft then dpo": (0.1, 0.1, 0.1)}
# Gradient cosine windows per seed (quarters of an 8-step stage, one record per step: each quarter is the
# mean of two steps); mixed only.
COSINES = {0: (0.1, 0.2, 0.3, 0.4), 1: (0.2, 0.2, 0.2, 0.2), 2: (0.3, 0.2, 0.1, 0.0)}


def _sweep_dir(tmp_path: Path):
    spec = _spec(tmp_path, compare=[["curriculum", "mixed"], ["sft then dpo", "mixed"]])
    rows = []
    for label, accs in ACCURACY.items():
        for seed, acc in enumerate(accs):
            tid = f"t{len(rows)}"
            run = tmp_path / "trials" / tid / "run"
            run.mkdir(parents=True)
            recs = [{"stage": 0, "step": s, "loss": 1.0} for s in range(1, 9)]
            if label == "mixed":  # steps 2k−1 and 2k carry quarter k's value (± 0.05: mean unchanged)
                for k, v in enumerate(COSINES[seed]):
                    recs[2 * k]["grad_cosine/forward_reverse"] = v - 0.05
                    recs[2 * k + 1]["grad_cosine/forward_reverse"] = v + 0.05
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
            rows.append(
                res.make_row(
                    spec,
                    tid,
                    {CONDITION: label},
                    seed,
                    final={ACC: acc},
                    status=res.STATUS_OK,
                    error=None,
                    wall_s=1.0,
                    run_dir=f"trials/{tid}/run",
                )
            )
    return spec, res.build_table(rows, list(spec.space))


def test_window_means_are_quarters_of_the_logging_stage():
    recs = [{"stage": 0, "step": s, "c": float(s)} for s in range(1, 9)] + [
        {"stage": 1, "step": 1, "c": 99.0}
    ]
    assert window_means(recs, "c") == [1.5, 3.5, 5.5, 7.5]  # stage 1's record is another stage
    gaps = [{"stage": 0, "step": s, **({"c": 1.0} if s > 4 else {})} for s in range(1, 9)]
    assert window_means(gaps, "c") == [None, None, 1.0, 1.0]  # one direction per batch: no cosine
    assert window_means([{"stage": 0, "step": 1}], "c") == [None] * 4


def test_named_report_has_labels_comparisons_and_cosine_table(tmp_path):
    spec, table = _sweep_dir(tmp_path)
    conds = group_conditions(table, list(spec.space), [ACC], tmp_path)
    assert [c.label for c in conds] == ["mixed", "curriculum", "sft then dpo"]  # labels alone
    sentences = named_comparisons(conds, spec.compare, [ACC])
    assert sentences[0] == (
        f"{ACC}: curriculum − mixed = +0.090 [−0.150, +0.330] (3 seeds, paired by seed): within "
        "seed-to-seed noise; curriculum > mixed holds in 3/3 seeds"
    )
    assert sentences[1].startswith(f"{ACC}: sft then dpo − mixed = −0.400 [")
    cos = cosine_conditions(conds, tmp_path)
    assert list(cos) == ["mixed"]
    # quarter 1: 0.1, 0.2, 0.3 → mean 0.2, s 0.1, half 4.302653 · 0.1 / sqrt(3) = 0.248414;
    # quarter 2: 0.2 in every seed; last − first: 0.3, 0.0, −0.3 → mean 0, s 0.3, half 0.745241
    row = cosine_rows(cos)[0]
    assert row[:4] == ["mixed", "3", "0.200 [-0.048, 0.448]", "0.200 [0.200, 0.200]"]
    assert row[-1] == "0.000 [-0.745, 0.745]"
    assert cosine_sentences(cos, spec.compare) == []  # no pair where both logged the cosine
    write_report(tmp_path, spec=spec, table=table)
    md = (tmp_path / "report.md").read_text()
    assert "## Named comparisons" in md and "curriculum − mixed = +0.090 [−0.150, +0.330]" in md
    assert "## Gradient cosine over training" in md
    assert "| mixed | 3 | 0.200 [-0.048, 0.448] | 0.200 [0.200, 0.200] |" in md


def test_missing_condition_in_a_comparison_says_so(tmp_path):
    spec, table = _sweep_dir(tmp_path)
    conds = group_conditions(table[table[CONDITION] != "mixed"], list(spec.space), [ACC], tmp_path)
    assert named_comparisons(conds, [("curriculum", "mixed")], [ACC]) == [
        "curriculum vs mixed: no finished trials of mixed"
    ]
