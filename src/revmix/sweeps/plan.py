"""What a sweep will run: its points (grid product, seeded random draws) × seeds, and the ``--dry-run`` text."""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from revmix.sweeps.memory import fit_line, gpu_memory_gib
from revmix.sweeps.space import Distribution
from revmix.sweeps.spec import SweepSpec


@dataclass(frozen=True)
class PlannedTrial:
    index: int
    point: dict[str, Any]  # concrete values; under optuna, sampled paths hold their Distribution
    seed: int
    sample: int  # which of num_samples (0 for grid search)


def _sample(d: Distribution, rng: Any) -> Any:
    if d.kind == "choice":
        return copy.deepcopy(d.values[int(rng.integers(len(d.values)))])
    low, high = d.values
    if d.kind == "uniform":
        return float(rng.uniform(low, high))
    if d.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(low, high + 1))  # randint, inclusive


def points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The distinct points of a grid or random search (before seeds), in run order.

    Random search draws ``num_samples`` values of every sampled path (numpy, seeded by ``search.seed``,
    default 0) and crosses each draw with the full grid, so grid values are compared on the same draw.
    Under optuna the sampled paths keep their :class:`Distribution` (optuna picks values at run time).
    """
    import numpy as np

    grid = spec.grid_paths
    combos = list(itertools.product(*(spec.space[p].values for p in grid))) or [()]
    rng = np.random.default_rng(spec.search.seed if spec.search.seed is not None else 0)
    out: list[dict[str, Any]] = []
    for _ in range(spec.search.num_samples):
        draw = {
            p: (d if spec.search.name == "optuna" else _sample(d, rng))
            for p, d in spec.space.items()
            if not d.is_grid
        }
        for combo in combos:
            point = {
                p: copy.deepcopy(combo[grid.index(p)]) if d.is_grid else draw[p]
                for p, d in spec.space.items()
            }
            out.append(point)
    return out


def expand(spec: SweepSpec) -> list[PlannedTrial]:
    """Every trial the sweep will run: points × seeds (seeds innermost)."""
    out: list[PlannedTrial] = []
    n_combos = max(1, spec.num_points() // spec.search.num_samples)
    for i, point in enumerate(points(spec)):
        for seed in spec.seeds:
            out.append(PlannedTrial(len(out), copy.deepcopy(point), seed, i // n_combos))
    return out


def format_value(v: Any) -> str:
    """Short human form of a config value (objective dicts become ``dpo(beta=0.1)``)."""
    if isinstance(v, Distribution):
        return "~" + v.describe()
    if isinstance(v, dict) and "name" in v:
        rest = ", ".join(f"{k}={format_value(x)}" for k, x in v.items() if k != "name")
        return f"{v['name']}({rest})" if rest else str(v["name"])
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return str(v)


def describe_plan(spec: SweepSpec, concurrency_note: str = "") -> str:
    """The ``--dry-run`` text: header, then one line per trial."""
    lines = [
        f"sweep {spec.name}: base {spec.base}",
        f"  metric {spec.metric} ({spec.mode}); search {spec.search.name}"
        + (f" num_samples={spec.search.num_samples}" if spec.search.name != "grid" else "")
        + (f" seed={spec.search.seed}" if spec.search.seed is not None else "")
        + f"; scheduler {spec.scheduler.name}; eval {'on' if spec.eval else 'off'}",
    ]
    if spec.overrides:
        lines.append("  fixed: " + " ".join(f"{p}={format_value(v)}" for p, v in spec.overrides.items()))
    for p, d in spec.space.items():
        lines.append(f"  space {p}: {d.describe()}")
    lines.append(f"  seeds {spec.seeds}")
    if concurrency_note:
        lines.append("  " + concurrency_note)
    trials = expand(spec)
    lines.append(f"{len(trials)} trial(s):")
    paths = list(spec.space)
    for t in trials:
        vals = " ".join(f"{p}={format_value(t.point[p])}" for p in paths)
        lines.append(f"  [{t.index:3d}] {vals} seed={t.seed}")
    lines.append("GPU memory per point (one worker; revmix.sweeps.memory):")
    for i, point in enumerate(points(spec)):
        vals = " ".join(f"{p}={format_value(point[p])}" for p in paths)
        lines.append(f"  point {i}: {vals}\n    {memory_line(spec, point)}")
    return "\n".join(lines)


def point_gpu(spec: SweepSpec, point: dict[str, Any]) -> tuple[float | None, str]:
    """The GPU memory (GiB) and type a point is checked against: the first ``resources.per_point`` entry
    whose ``when`` matches the point, else the sweep's ``resources``."""
    res: Any = spec.resources
    for entry in spec.resources.per_point:
        if all(point.get(p) == v for p, v in entry.when.items()):
            res = entry
            break
    return gpu_memory_gib(res.gpu_memory_gb, res.accelerator_type), res.accelerator_type or ""


def memory_line(spec: SweepSpec, point: dict[str, Any]) -> str:
    """The point's memory estimate and verdict; sampled values (optuna) are estimated at their first value."""
    concrete = {p: v.representative() if isinstance(v, Distribution) else v for p, v in point.items()}
    cfg = spec.trial_config(concrete, spec.seeds[0])
    try:
        gib, kind = point_gpu(spec, point)
    except ValueError as e:
        return f"memory: {e}"
    return fit_line(cfg, gib, kind)
