"""A sweep prepares its data once, before the trials; every trial then reuses the tokenised entry.

Counted for real: the cache's ``builds.log`` gets one line per entry built, and each trial's preparation
(the very call ``run_experiment`` makes) reports whether it built or reused.
"""

from __future__ import annotations

import os

import pytest
import yaml

from revmix.platform.data.cache import builds
from revmix.platform.train import _prepare_inputs
from revmix.sweeps.runner import prepare_sweep_data, run_sweep
from revmix.sweeps.spec import load_sweep, parse_sweep
from tests.sweeps.helpers import BASE_RAW, SFT_TINY, sweep_raw


def test_a_sweep_tokenises_each_distinct_data_once_and_trials_reuse_it(tmp_path, capsys):
    cache = tmp_path / "cache"
    space = {
        "stages.0.mix.reverse_fraction": {"grid": [0.0, 0.5, 1.0]},
        "data.max_length": {"grid": [128, 256]},  # two data keys
    }
    spec = parse_sweep(
        sweep_raw(space=space, overrides={"data.cache_dir": str(cache)}), "s.yaml", base_raw=BASE_RAW
    )
    keys = prepare_sweep_data(spec)
    assert len(keys) == 2 and sorted(b["key"] for b in builds(cache)) == sorted(keys)
    assert "2 distinct tokenised data key(s) for 12 trial(s)" in capsys.readouterr().out
    from revmix.sweeps.plan import points

    for point in points(spec):
        for seed in spec.seeds:
            data = _prepare_inputs(spec.trial_config(point, seed), evaluate=False).data
            assert data.meta["cache"] == "reused" and data.key in keys
    assert len(builds(cache)) == 2  # 12 trials, no more builds


@pytest.mark.integration  # a real two-trial Tune sweep of 2 steps each: about 22 s
def test_a_real_sweep_builds_its_data_in_the_driver_only(ray_local, tmp_path):
    cache = tmp_path / "cache"
    fast = {"stages.0.steps": 2, "stages.0.batch_size": 4, "data.n_items": 40, "data.cache_dir": str(cache)}
    raw = {
        "base": str(SFT_TINY),
        "overrides": fast,
        "metric": "final/loss",
        "mode": "min",
        "seeds": [0],
        "space": {"stages.0.mix.reverse_fraction": {"grid": [0.0, 1.0]}},
        "eval": False,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = run_sweep(load_sweep(path), tmp_path / "out", write_report=False)
    assert list(out.table["status"]) == ["TERMINATED", "TERMINATED"]
    # one entry, built by this process (the sweep's driver); both trials found it and reused it
    assert [b["pid"] for b in builds(cache)] == [os.getpid()]
