"""What a sweep costs on top of its trials: K short trials through ``revmix sweep`` vs the same K runs of
``run_experiment`` called directly, one after another, measured in one run on the same machine.

Four timings:

- ``direct``: K × ``run_experiment`` in this process (seeds 0..K-1), the floor;
- ``sweep_serial``: the same K trials as a sweep with one trial at a time — the difference to ``direct``
  is Tune's bookkeeping, the trial process's start-up (one Python process importing torch and
  transformers, which then runs every trial: ``reuse_processes``), per-step ``tune.report`` and the
  end-of-sweep table and report;
- ``sweep_serial_fresh``: the same with ``reuse_processes: false``, a fresh process per trial (the
  baseline of the reuse);
- ``sweep_parallel``: the sweep with its default concurrency (on 2 cores: 2 trials × 1 thread).

``trial_train_s`` (the training loop inside each trial) against ``direct_train_loop_s`` separates a
slower loop (thread count, contention) from fixed costs; ``outside_trials_s`` is the sweep's wall minus
its trials' wall (divided by the concurrency): Tune scheduling, trial actor start-up, table, report.

Ray's own start-up is timed separately (``ray_init_s``) and excluded from both sweep timings. Timings
move with the machine's load; the differences are what matter.

    python benchmarks/sweep_overhead.py --trials 4 --steps 6 --out benchmarks/results/sweep_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "runs" / "sft_tiny.yaml"


def overrides(steps: int) -> dict:
    return {
        "stages.0.steps": steps,
        "stages.0.batch_size": 8,
        "stages.0.warmup_steps": 1,
        "stages.0.checkpoint_every": 0,
        "data.n_items": 80,
    }


def direct(k: int, steps: int, work: Path) -> tuple[list[float], list[float]]:
    """K sequential ``run_experiment`` calls (in-process loop): wall seconds and training-loop seconds."""
    from revmix.config import load_config
    from revmix.platform.train import run_experiment

    times, train = [], []
    for seed in range(k):
        cfg = load_config(BASE, {**overrides(steps), "seed": seed})
        t0 = time.perf_counter()
        summary = run_experiment(cfg, work / f"direct_{seed}", evaluate=False)
        times.append(time.perf_counter() - t0)
        train.append(sum(st["wall_s"] for st in summary["stages"]))
    return times, train


def sweep(k: int, steps: int, work: Path, name: str, max_concurrent: int | None, reuse: bool = True) -> dict:
    from revmix.sweeps.runner import run_sweep
    from revmix.sweeps.spec import load_sweep

    raw = {
        "name": name,
        "base": str(BASE),
        "overrides": overrides(steps),
        "metric": "final/loss",
        "mode": "min",
        "seeds": list(range(k)),
        "space": {"stages.0.mix.reverse_fraction": {"grid": [0.5]}},
        "eval": False,
        "tracking": {"tensorboard": False, "mlflow": False},
        "reuse_processes": reuse,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    out = run_sweep(load_sweep(path), work / name, max_concurrent=max_concurrent, verbose=0)
    wall = time.perf_counter() - t0
    assert (out.table["status"] == "TERMINATED").all(), out.table[["trial_id", "status", "error"]]
    trial_wall = [float(x) for x in out.table["wall_s"]]
    return {
        "wall_s": wall,
        # what the sweep adds around its trials: scheduling, actor start-up, table and report
        "outside_trials_s": wall - sum(trial_wall) / out.resources.concurrency,
        "concurrency": out.resources.concurrency,
        "torch_threads": out.resources.torch_threads,
        "trial_wall_s": trial_wall,
        "trial_train_s": [float(x) for x in out.table["train/wall_s"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep_overhead.json"))
    args = ap.parse_args()

    from revmix.platform.runtime import ensure_ray

    with tempfile.TemporaryDirectory(prefix="revmix_sweep_bench_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ensure_ray()  # first: a bare run_experiment must not auto-init Ray (it could join another cluster)
        ray_init = time.perf_counter() - t0
        d, d_train = direct(args.trials, args.steps, work)
        serial = sweep(args.trials, args.steps, work, "serial", max_concurrent=1)
        fresh = sweep(args.trials, args.steps, work, "serial_fresh", max_concurrent=1, reuse=False)
        parallel = sweep(args.trials, args.steps, work, "parallel", max_concurrent=None)

    k = args.trials
    result = {
        "benchmark": "sweep_overhead",
        "trials": k,
        "steps_per_trial": args.steps,
        "config": {"base": str(BASE.relative_to(ROOT)), "overrides": overrides(args.steps)},
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_1m_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "direct_s": sum(d),
        "direct_trial_s": d,
        "direct_train_loop_s": d_train,
        "ray_init_s": ray_init,
        "sweep_serial": serial,
        "sweep_serial_fresh": fresh,
        "sweep_parallel": parallel,
        "serial_overhead_s": serial["wall_s"] - sum(d),
        "serial_overhead_per_trial_s": (serial["wall_s"] - sum(d)) / k,
        "fresh_process_overhead_per_trial_s": (fresh["wall_s"] - sum(d)) / k,
        "parallel_speedup_vs_direct": sum(d) / parallel["wall_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"direct {sum(d):.1f}s | sweep serial {serial['wall_s']:.1f}s "
        f"({result['serial_overhead_per_trial_s']:+.1f}s/trial; a fresh process per trial: "
        f"{result['fresh_process_overhead_per_trial_s']:+.1f}s/trial) | sweep parallel ×{parallel['concurrency']} "
        f"{parallel['wall_s']:.1f}s (speed-up {result['parallel_speedup_vs_direct']:.2f}×) | ray init {ray_init:.1f}s"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
