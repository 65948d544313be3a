"""How many sweep trials run at once on a given cluster: the one implementation of that count.

A revmix trial is a small Tune driver plus the Ray Train workers it starts (the Train V2 pattern, see
docs/cluster.md). ``revmix sweep`` plans with it (:func:`revmix.sweeps.resources.plan_resources` passes the
result to ``TuneConfig(max_concurrent_trials=...)``), and the docs' "how many trials fit" table is computed
from it.

Ray accounts fractional resources in units of 1e-4, so the arithmetic below rounds at that grain: 0.1 CPU
times 10 is exactly one CPU here, as it is in Ray's scheduler (plain float division would give 9).
"""

from __future__ import annotations

import math

# Ray's resource granularity (src/ray/common/scheduling/fixed_point.h: 1 unit = 1e-4).
_RAY_UNITS_PER_RESOURCE = 10_000


def _units(value: float, name: str) -> int:
    """``value`` in Ray's fixed-point units; negative or non-finite values are errors that name ``name``."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return round(value * _RAY_UNITS_PER_RESOURCE)


def trial_footprint(
    driver_cpus: float, num_workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0
) -> tuple[float, float]:
    """``(cpus, gpus)`` one trial holds: its Tune driver plus ``num_workers`` Train workers.

    ``num_workers=0`` is the in-process fast path (the loop runs inside the driver), so only the driver
    counts. Ray rejects a trial driver with 0 CPU (``tune.with_resources``), hence ``driver_cpus > 0``.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if _units(driver_cpus, "driver_cpus") == 0:
        raise ValueError("driver_cpus must be > 0: Ray Tune rejects a trial with 0 CPU (use e.g. 0.1)")
    cpus = _units(driver_cpus, "driver_cpus") + num_workers * _units(cpus_per_worker, "cpus_per_worker")
    gpus = num_workers * _units(gpus_per_worker, "gpus_per_worker")
    return cpus / _RAY_UNITS_PER_RESOURCE, gpus / _RAY_UNITS_PER_RESOURCE


def plan_trials(cluster_cpus: float, cluster_gpus: float, trial_cpus: float, trial_gpus: float) -> int:
    """How many trials of ``(trial_cpus, trial_gpus)`` run concurrently on ``(cluster_cpus, cluster_gpus)``.

    ``min(floor(cluster_cpus / trial_cpus), floor(cluster_gpus / trial_gpus))`` over the resources the
    trial asks for. 0 when not even one trial fits (a GPU trial on a CPU-only cluster): callers should fail
    loudly, the sweep would wait forever. Aggregate totals are an upper bound: with large bundles, plan per
    node type (one node's resources, times the node count).
    """
    c_units, g_units = _units(cluster_cpus, "cluster_cpus"), _units(cluster_gpus, "cluster_gpus")
    tc_units, tg_units = _units(trial_cpus, "trial_cpus"), _units(trial_gpus, "trial_gpus")
    if tc_units == 0 and tg_units == 0:
        raise ValueError("a trial must ask for some CPU or GPU; (0, 0) would fit infinitely many times")
    limits = []
    if tc_units:
        limits.append(c_units // tc_units)
    if tg_units:
        limits.append(g_units // tg_units)
    return min(limits)
