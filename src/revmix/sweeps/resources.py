"""Per-trial resources and sweep concurrency, derived from the experiment configs and the cluster."""

from __future__ import annotations

from dataclasses import dataclass

from revmix.cluster.resources import plan_trials, trial_footprint
from revmix.sweeps.spec import SweepSpec


@dataclass(frozen=True)
class TrialResources:
    """What one trial takes: its driver's Tune bundle, plus Ray Train workers outside the bundle."""

    bundle: dict[str, float]
    cpu_footprint: float
    gpu_footprint: float
    concurrency: int
    torch_threads: int
    note: str


def plan_resources(
    spec: SweepSpec,
    cluster: dict[str, float],
    *,
    max_concurrent: int | None = None,
    node_cpus: float | None = None,
) -> TrialResources:
    """Per-trial resources and concurrency from the experiment configs and the cluster.

    With ``runtime.num_workers = 0`` the trial itself trains: it takes ``cluster CPUs / parallel
    trials`` CPUs (at least 1, at most one node) and as many torch threads — 2 trials on 2 cores get 1 CPU
    and 1 thread each. With workers the trial is only a driver (0.1 CPU) and its Train workers are
    scheduled outside Tune's bundle, so concurrency is capped by ``0.1 + workers × cpus_per_worker``.
    The footprint and the count use :mod:`revmix.cluster.resources` (Ray's fixed-point arithmetic).
    """
    cfgs = spec.probe_configs("runtime.")
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    workers = max(c.runtime.num_workers for c in cfgs)
    cpw = max(c.runtime.cpus_per_worker for c in cfgs)
    wants_gpu = any(c.runtime.use_gpu is True or (c.runtime.use_gpu is None and gpus > 0) for c in cfgs)
    n_trials = spec.num_trials()
    caps = [n_trials] + [c for c in (spec.max_concurrent_trials, max_concurrent) if c]
    if workers == 0:  # the trial trains in its own process: its bundle is all it takes
        if spec.resources.cpu is not None:
            cpu = float(spec.resources.cpu)
        elif cpus >= 1:
            parallel = max(1, min([int(cpus)] + caps))
            cpu = float(max(1, int(cpus // parallel)))
            if node_cpus:
                cpu = min(cpu, max(1.0, float(int(node_cpus))))
        else:
            cpu = 1.0
        gpu = spec.resources.gpu if spec.resources.gpu is not None else (1.0 if wants_gpu else 0.0)
        threads = max(1, int(cpu))
    else:  # a thin driver; its Train workers are scheduled outside Tune's bundle
        cpu = float(spec.resources.cpu) if spec.resources.cpu is not None else 0.1
        gpu = float(spec.resources.gpu or 0.0)
        threads = max(1, int(cpw))
    cpu_fp, worker_gpus = trial_footprint(cpu, workers, cpw, 1.0 if wants_gpu else 0.0)
    gpu_fp = gpu + worker_gpus
    # Each resource caps concurrency on its own; an empty (autoscaling) cluster caps nothing yet.
    limits = list(caps)
    if cpus > 0:
        limits.append(max(1, plan_trials(cpus, 0.0, cpu_fp, 0.0)))
    if gpu_fp > 0 and gpus > 0:
        limits.append(max(1, plan_trials(0.0, gpus, 0.0, gpu_fp)))
    concurrency = max(1, min(limits))
    bundle = {"CPU": cpu} | ({"GPU": gpu} if gpu else {})
    what = "in-process training" if workers == 0 else f"driver + {workers} worker(s) × {cpw:g} CPU"
    note = (
        f"resources: {bundle} per trial ({what}); cluster {cpus:g} CPU / {gpus:g} GPU → "
        f"{concurrency} concurrent trial(s), {threads} torch thread(s) each"
    )
    if cpus == 0:
        note += " (no CPUs yet: an autoscaling cluster adds nodes as trials queue)"
    return TrialResources(bundle, cpu_fp, gpu_fp, concurrency, threads, note)
