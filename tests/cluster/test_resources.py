"""``plan_trials`` / ``trial_footprint``: hand-computed concurrency for the node types we ship."""

from __future__ import annotations

import math

import pytest

from revmix.cluster.resources import plan_trials, trial_footprint


@pytest.mark.parametrize(
    ("cluster", "trial", "expected"),
    [
        ((16, 0), (1, 0), 16),  # m7i.4xlarge, one-CPU trials
        ((16, 0), (1.1, 0), 14),  # driver 0.1 + 2 workers x 0.5: 14 x 1.1 = 15.4 <= 16 < 16.5
        ((8, 1), (1, 1), 1),  # g6.2xlarge: the single GPU is the limit, not the 8 CPUs
        ((192, 8), (8, 1), 8),  # p5.48xlarge, 1 GPU + 8 CPU per trial: both run out together
        ((208, 8), (30, 1), 6),  # a3-highgpu-8g, CPU-heavy trials: floor(208 / 30) = 6 < 8 GPUs
        ((64, 0), (0, 1), 0),  # a GPU trial on a CPU-only cluster never starts
        ((0.3, 0), (0.1, 0), 3),  # float 0.3 / 0.1 = 2.999...; Ray's 1e-4 fixed point gives 3
        ((2, 0), (0.1, 0), 20),  # the quickstart's 0.1-CPU in-process trials on 2 cores
        ((4, 2), (0, 0.5), 4),  # GPU-only demand, fractional GPUs
    ],
)
def test_plan_trials(cluster: tuple[float, float], trial: tuple[float, float], expected: int) -> None:
    assert plan_trials(*cluster, *trial) == expected


def test_plan_trials_rejects_empty_and_invalid_demands() -> None:
    with pytest.raises(ValueError, match="some CPU or GPU"):
        plan_trials(16, 1, 0, 0)
    with pytest.raises(ValueError, match="trial_cpus"):
        plan_trials(16, 1, -1, 0)
    with pytest.raises(ValueError, match="cluster_gpus"):
        plan_trials(16, math.nan, 1, 0)


def test_trial_footprint_counts_driver_plus_workers() -> None:
    assert trial_footprint(0.1, 2, 0.5) == (1.1, 0.0)
    assert trial_footprint(0.1, 2, 4, 1) == (8.1, 2.0)
    assert trial_footprint(0.1, 0, 4, 1) == (0.1, 0.0)  # in-process fast path: the driver only
    # composed: how many 2-worker GPU trials fit on an 8x H100 node with 192 CPUs
    assert plan_trials(192, 8, *trial_footprint(0.1, 2, 4, 1)) == 4


def test_trial_footprint_rejects_zero_cpu_driver() -> None:
    with pytest.raises(ValueError, match="driver_cpus must be > 0"):
        trial_footprint(0, 1, 1)
    with pytest.raises(ValueError, match="num_workers"):
        trial_footprint(0.1, -1, 1)
