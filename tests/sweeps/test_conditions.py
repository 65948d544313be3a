"""Conditions, their intervals over seeds and differences in words, from hand-made results tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revmix.sweeps import results as res
from revmix.sweeps.conditions import (
    bootstrap_columns,
    condition_rows,
    difference_sentences,
    group_conditions,
    metric_columns,
    one_seed_note,
    stage_change_sentences,
)
from revmix.sweeps.report import write_report
from revmix.sweeps.spec import parse_sweep
from tests.sweeps.helpers import BASE_RAW, sweep_raw

ACC = "eval/accuracy/synthetic"
# r = 0: 0.40, 0.50, 0.60 → mean 0.5, s = 0.1, t_{2, 0.975} = 4.302653: half width 0.248414
# r = 1: 0.45, 0.70, 0.62 → paired differences 0.05, 0.20, 0.02: mean 0.09, s = sqrt(0.0093),
#        half width 4.302653 · 0.096437 / sqrt(3) = 0.239565 → [−0.150, +0.330]: within noise
ACCURACY = {0.0: (0.40, 0.50, 0.60), 1.0: (0.45, 0.70, 0.62)}


def _table(tmp_path: Path, seeds: tuple[int, ...]):
    spec = parse_sweep(
        sweep_raw(seeds=list(seeds), space={"stages.0.mix.reverse_fraction": {"grid": [0.0, 1.0]}}),
        tmp_path / "sweep.yaml",
        base_raw=BASE_RAW,
    )
    rows = []
    for r, accs in ACCURACY.items():
        for seed in seeds:
            final = {ACC: accs[seed], "final/loss": 1.0 + r}
            if seed != 2:
                final["eval/alp/forward/margin"] = 0.1 * seed - r
            rows.append(
                res.make_row(
                    spec,
                    f"t{len(rows)}",
                    {"stages.0.mix.reverse_fraction": r},
                    seed,
                    final=final,
                    status=res.STATUS_OK,
                    error=None,
                    wall_s=1.0,
                    run_dir=None,
                )
            )
    return spec, res.build_table(rows, list(spec.space))


def test_conditions_table_has_hand_computed_intervals(tmp_path):
    spec, table = _table(tmp_path, (0, 1, 2))
    cols = metric_columns(table, spec.metric)
    assert cols == [ACC, "eval/alp/forward/margin", "final/loss"]
    conds = group_conditions(table, list(spec.space), cols)
    assert [(c.label, c.seeds) for c in conds] == [("r=0", (0, 1, 2)), ("r=1", (0, 1, 2))]
    rows = condition_rows(conds, cols)
    # the margin: seeds 0 and 1 only → (n=2); t_{1, 0.975} = 12.7062, s = 0.0707107: half 0.635310
    assert rows[0] == [
        "r=0",
        "3",
        "0.500 [0.252, 0.748]",
        "0.050 [-0.585, 0.685] (n=2)",
        "1.00 [1.00, 1.00]",
    ]
    assert one_seed_note(conds) == []


def test_differences_say_within_noise_and_count_seeds(tmp_path):
    spec, table = _table(tmp_path, (0, 1, 2))
    conds = group_conditions(table, list(spec.space), [ACC])
    sentences, which = difference_sentences(conds, ACC, "max")
    assert which == "All pairs of conditions."
    assert sentences == [
        "r=1 − r=0 = +0.090 [−0.150, +0.330] (3 seeds, paired by seed): within seed-to-seed noise; "
        "r=1 > r=0 holds in 3/3 seeds"
    ]
    # mode min: the lower mean is the better one and comes first
    assert difference_sentences(conds, ACC, "min")[0][0].startswith("r=0 − r=1 = −0.090")


def test_report_states_intervals_and_one_seed(tmp_path):
    spec, table = _table(tmp_path, (0, 1, 2))
    write_report(tmp_path, spec=spec, table=table)
    md = (tmp_path / "report.md").read_text()
    assert "## Conditions: mean and 95% interval over seeds" in md
    assert "| r=0 | 3 | 0.500 [0.252, 0.748] |" in md
    assert "## Differences between conditions" in md and "within seed-to-seed noise" in md
    assert "95% Student-t interval over seeds" in md
    one = tmp_path / "one"
    one.mkdir()
    spec, table = _table(one, (1,))
    write_report(one, spec=spec, table=table)
    md = (one / "report.md").read_text()
    assert "| r=0 | 1 | 0.500 |" in md
    assert "_1 seed: no interval (every condition)" in md
    assert "r=1 − r=0 = +0.200 (1 seed, paired by seed): 1 seed: no interval" in md


@pytest.mark.parametrize("mode", ["max", "min"])
def test_many_conditions_compare_against_the_best(tmp_path, mode):
    from revmix.sweeps.conditions import Condition

    conds = [Condition(f"c{i}", (0, 1), {ACC: {0: 0.1 * i, 1: 0.1 * i + 0.01 * (i % 2)}}) for i in range(6)]
    sentences, which = difference_sentences(conds, ACC, mode)
    best = "c5" if mode == "max" else "c0"
    assert which.startswith(f"Each condition against the best by mean ({best}") and len(sentences) == 5
    assert all(s.startswith(best) or f"− {best} =" in s for s in sentences)


def test_bootstrap_column_from_the_trials_item_scores(tmp_path):
    spec, table = _table(tmp_path, (0, 1))
    table = table.copy()
    table["run_dir"] = [f"trials/{t}/run" for t in table["trial_id"]]
    for tid, r, seed in zip(table["trial_id"], table["reverse_fraction"], table["seed"]):
        run = tmp_path / "trials" / tid / "run"
        run.mkdir(parents=True)
        if r == 0.0:  # one item per seed, right in seed 0 only: resampled means 1, 0.5, 0 (p = ¼, ½, ¼)
            items = {"ids": ["a"], "correct": [1.0 - seed]}
            bench = {"accuracy": 1.0 - seed, "n": 1, "items": items}
            (run / "summary.json").write_text(json.dumps({"eval": {"benchmarks": {"synthetic": bench}}}))
    conds = group_conditions(table, list(spec.space), [ACC], tmp_path)
    assert conds[0].items == {"synthetic": {0: [1.0], 1: [0.0]}} and conds[1].items == {}
    assert bootstrap_columns(conds) == ["synthetic"]
    rows = condition_rows(conds, [ACC])
    assert rows[0][-1] == "0.50 [0.00, 1.00]" and rows[1][-1] == "—"  # r=1 kept no item scores
    write_report(tmp_path, spec=spec, table=table)
    md = (tmp_path / "report.md").read_text()
    assert "| eval/accuracy/synthetic (bootstrap) |" in md and "percentile bootstrap over seeds" in md


def test_accuracy_moves_from_the_start_through_each_stage_paired_by_seed(tmp_path):
    """start → after stage 0 → end of run, per condition: later − earlier paired by seed (hand-computed
    with the numbers at the top: 0.05, 0.20, 0.02 → +0.090 [−0.150, +0.330]; a constant −0.1 has no spread)."""
    spec = parse_sweep(sweep_raw(seeds=[0, 1, 2]), tmp_path / "sweep.yaml", base_raw=BASE_RAW)
    evaluations = {
        "start/" + ACC: (0.50, 0.60, 0.70),
        "stage0/" + ACC: (0.40, 0.50, 0.60),
        ACC: ACCURACY[1.0],
    }
    rows = [
        res.make_row(
            spec,
            f"t{seed}",
            {"stages.0.mix.reverse_fraction": 0.5},
            seed,
            final={col: accs[seed] for col, accs in evaluations.items()},
            status=res.STATUS_OK,
            error=None,
            wall_s=1.0,
            run_dir=None,
        )
        for seed in (0, 1, 2)
    ]
    table = res.build_table(rows, list(spec.space))
    cols = metric_columns(table, spec.metric)
    assert cols == [ACC, "stage0/" + ACC, "start/" + ACC]  # end of run, earlier stages, the starting model
    (cond,) = group_conditions(table, list(spec.space), cols)
    assert stage_change_sentences([cond], cols) == [
        f"{cond.label}, synthetic: after stage 0 − starting model = −0.100 [−0.100, −0.100] (3 seeds, paired "
        "by seed): the same in every seed, so the seeds give no spread to judge noise by; after stage 0 < "
        "starting model holds in 3/3 seeds",
        f"{cond.label}, synthetic: end of run − after stage 0 = +0.090 [−0.150, +0.330] (3 seeds, paired by "
        "seed): within seed-to-seed noise; end of run > after stage 0 holds in 3/3 seeds",
    ]
