"""A sweep prepares its data once, before the trials; every trial then reuses the tokenised entry.

Counted for real: the cache's ``builds.log`` gets one line per entry built, and each trial's preparation
(the very call ``run_experiment`` makes) reports whether it built or reused.
"""

from __future__ import annotations

from revmix.platform.data.cache import builds
from revmix.platform.train import _prepare_inputs
from revmix.sweeps.runner import prepare_sweep_data
from revmix.sweeps.spec import parse_sweep
from tests.sweeps.helpers import BASE_RAW, sweep_raw


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
