"""Runner pieces that need no running Ray: resources, the Tune param space, the sweep dir rules, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revmix.sweeps.resources import plan_resources
from revmix.sweeps.runner import SweepExistsError, _prepare_dir, param_space, trial_seed
from revmix.sweeps.spec import load_sweep, parse_sweep
from tests.sweeps.helpers import BASE_RAW, sweep_raw, write_sweep


def spec_of(base: dict | None = None, **changes):
    return parse_sweep(sweep_raw(**changes), "s.yaml", base_raw=base or BASE_RAW)


def test_in_process_trials_get_one_cpu_and_one_thread_each_on_two_cores():
    plan = plan_resources(spec_of(), {"CPU": 2.0})  # 6 trials
    assert plan.bundle == {"CPU": 1.0} and plan.concurrency == 2 and plan.torch_threads == 1


def test_a_single_trial_gets_the_whole_machine_up_to_one_node():
    spec = spec_of(space={"stages.0.mix.reverse_fraction": {"grid": [0.5]}}, seeds=[0])
    plan = plan_resources(spec, {"CPU": 8.0})
    assert plan.bundle == {"CPU": 8.0} and plan.concurrency == 1 and plan.torch_threads == 8
    plan = plan_resources(spec, {"CPU": 8.0}, node_cpus=4.0)  # two 4-core nodes
    assert plan.bundle == {"CPU": 4.0} and plan.torch_threads == 4


def test_max_concurrent_caps_and_widens_per_trial_cpus():
    plan = plan_resources(spec_of(max_concurrent_trials=2), {"CPU": 16.0})
    assert plan.concurrency == 2 and plan.bundle == {"CPU": 8.0}
    plan = plan_resources(spec_of(), {"CPU": 16.0}, max_concurrent=3)
    assert plan.concurrency == 3 and plan.bundle == {"CPU": 5.0}


def test_workers_make_the_trial_a_thin_driver():
    base = {**BASE_RAW, "runtime": {"num_workers": 2, "cpus_per_worker": 0.5}}
    plan = plan_resources(spec_of(base), {"CPU": 2.0})
    assert plan.bundle == {"CPU": 0.1} and plan.cpu_footprint == pytest.approx(1.1)
    assert plan.concurrency == 1 and plan.torch_threads == 1
    plan = plan_resources(spec_of(base), {"CPU": 16.0})
    assert plan.concurrency == 6  # 6 trials, floor(16 / 1.1) = 14


def test_swept_worker_counts_plan_for_the_largest():
    spec = spec_of(space={"runtime.num_workers": {"grid": [0, 4]}}, seeds=[0])
    plan = plan_resources(spec, {"CPU": 8.0})
    assert plan.cpu_footprint == pytest.approx(0.1 + 4 * 0.5) and plan.concurrency == 2


def test_gpus_bound_concurrency_and_resources_override():
    spec = spec_of(resources={"cpu": 2, "gpu": 1})
    plan = plan_resources(spec, {"CPU": 16.0, "GPU": 4.0})
    assert plan.bundle == {"CPU": 2.0, "GPU": 1} and plan.concurrency == 4
    auto = plan_resources(spec_of(), {"CPU": 16.0, "GPU": 2.0})  # use_gpu null + GPUs → one each
    assert auto.bundle["GPU"] == 1.0 and auto.concurrency == 2


def test_empty_autoscaling_cluster_still_plans():
    plan = plan_resources(spec_of(), {"CPU": 0.0})
    assert plan.bundle == {"CPU": 1.0} and plan.concurrency == 6 and "autoscaling" in plan.note


def test_param_space_is_a_grid_of_points_times_seeds():
    spec = spec_of()
    ps = param_space(spec)
    assert ps["point"] == {"grid_search": [{"stages.0.mix.reverse_fraction": r} for r in (0.0, 0.5, 1.0)]}
    assert ps["seed"] == {"grid_search": [0, 1]}
    assert trial_seed(spec, {"seed": 1}) == 1 and trial_seed(spec, {"__trial_index__": 1}) == 1


def test_optuna_param_space_uses_tune_domains():
    from ray.tune.search.sample import Categorical, Float

    spec = spec_of(
        search={"name": "optuna", "num_samples": 3, "seed": 0},
        space={
            "stages.0.lr": {"loguniform": [1e-4, 1e-2]},
            "stages.0.mix.reverse_fraction": {"choice": [0.0, 1.0]},
        },
    )
    ps = param_space(spec)
    assert set(ps) == {"point"}  # seeds come from the Repeater index, not a search dimension
    assert isinstance(ps["point"]["stages.0.lr"], Float) and isinstance(
        ps["point"]["stages.0.mix.reverse_fraction"], Categorical
    )


def test_sweep_dir_rules(tmp_path: Path):
    spec = load_sweep(write_sweep(tmp_path, sweep_raw()))
    out = tmp_path / "out"
    with pytest.raises(SweepExistsError, match="holds no sweep to resume"):
        _prepare_dir(spec, out, resume=True)
    _prepare_dir(spec, out, resume=False)
    assert (out / "sweep.yaml").read_text() == (tmp_path / "sweep.yaml").read_text()
    assert json.loads((out / "spec.json").read_text())["space"] == {
        "stages.0.mix.reverse_fraction": {"grid": [0.0, 0.5, 1.0]}
    }
    with pytest.raises(SweepExistsError, match="already exists and is not empty; pass --resume"):
        _prepare_dir(spec, out, resume=False)
    (out / "tune").mkdir()
    _prepare_dir(spec, out, resume=True)  # same spec: fine
    changed = load_sweep(write_sweep(tmp_path, sweep_raw(seeds=[0, 1, 2])))
    with pytest.raises(SweepExistsError, match=r"differs from the sweep stored .* \(keys: seeds\)"):
        _prepare_dir(changed, out, resume=True)
    # A sweep stored before a field existed resumes while the file leaves that field at its default.
    stored = json.loads((out / "spec.json").read_text())
    del stored["compare"], stored["max_concurrent_trials"]
    (out / "spec.json").write_text(json.dumps(stored))
    _prepare_dir(spec, out, resume=True)
    capped = load_sweep(write_sweep(tmp_path, sweep_raw(max_concurrent_trials=1)))
    with pytest.raises(SweepExistsError, match=r"\(keys: max_concurrent_trials\)"):
        _prepare_dir(capped, out, resume=True)


def test_cli_dry_run_and_errors(tmp_path: Path, capsys):
    from revmix.cli import main

    path = write_sweep(tmp_path, sweep_raw())
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 trial(s):" in out and "concurrent trial(s)" in out
    (tmp_path / "bad").mkdir()
    bad = write_sweep(tmp_path / "bad", sweep_raw(space={"stages.0.mix.reverse_fracton": {"grid": [0.0]}}))
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "did you mean 'reverse_fraction'" in capsys.readouterr().err
    assert main(["sweep", str(path)]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["sweep", str(path), "--out", str(tmp_path / "new"), "--retry-errored"]) == 2
    assert "--retry-errored continues a sweep: pass --resume too" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main(["sweep", str(path), "--out", str(tmp_path / "taken")]) == 2  # refused before Ray starts
    assert "already exists" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err
