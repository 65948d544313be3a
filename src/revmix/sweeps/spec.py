"""Sweep files: parse, validate completely before Ray starts, expand into trials (DESIGN §8).

A sweep file names a base experiment and a space over dotted config paths — exactly the paths
``revmix train CONFIG a.b=c`` accepts::

    base: ../runs/sft_tiny.yaml           # relative to this file
    overrides: {stages.0.steps: 40}       # fixed for every trial (mapping, or a list of "a.b=c")
    metric: eval/accuracy/synthetic
    mode: max
    search: grid                          # grid | random | {name: optuna, num_samples: 8, seed: 0}
    scheduler: fifo                       # fifo | {name: asha, grace_period: 5, max_t: 40}
    seeds: [0, 1]                         # every point runs once per seed (experiment `seed` only)
    space:
      stages.0.mix.reverse_fraction: {grid: [0.0, 0.5, 1.0], link: [stages.1.mix.reverse_fraction]}
      stages.0.lr: {loguniform: [1.0e-4, 1.0e-2]}
    resources: {cpu: 1}                   # optional: the trial driver's bundle
    max_concurrent_trials: 2              # optional: default from the cluster's CPUs/GPUs
    tracking: {tensorboard: true, mlflow: false}
    eval: true

Why validate everything up front: a typo found after Ray has started (or, worse, after the first trial
has trained for an hour) wastes the sweep. Every swept path is pushed through ``build_config`` with each
of its grid/choice values and both ends of its range, so the error names the path and suggests close
matches exactly as ``revmix train`` would.

Seeds: a trial's seed goes to the experiment's ``seed`` (mixer, data order, dropout) and nothing else;
``data.seed`` stays fixed so all trials see the same data split and held-out set.

``randint: [a, b]`` includes both ends (Tune's own ``randint`` excludes the upper one). ``link: [paths]``
gives other paths the same value as the swept one (SFT and DPO stages at the same reverse fraction);
the results table has one column per swept path, not per link.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from revmix.config import ConfigError, ExperimentConfig, build_config, load_raw, parse_override

TOP_LEVEL_KEYS: tuple[str, ...] = (
    "name",
    "description",
    "base",
    "overrides",
    "metric",
    "mode",
    "search",
    "scheduler",
    "seeds",
    "space",
    "resources",
    "max_concurrent_trials",
    "tracking",
    "eval",
)
DISTRIBUTIONS: tuple[str, ...] = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCHES: tuple[str, ...] = ("grid", "random", "optuna")
SCHEDULERS: tuple[str, ...] = ("fifo", "asha")
ASHA_TIME_ATTRS: tuple[str, ...] = ("training_iteration", "time_total_s")  # one iteration = one step
ALP_PARTS: tuple[str, ...] = ("chosen", "rejected", "margin")


class SweepError(ConfigError):
    """A sweep-file problem; the message names the file and the offending key or path."""


def _suggest(key: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------------
# The pieces of a sweep
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """One swept path: ``grid``/``choice`` hold values; the others a ``(low, high)`` range."""

    kind: str
    values: tuple[Any, ...]
    links: tuple[str, ...] = ()  # more paths that take the same value (r of every stage, say)

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def probe_values(self) -> list[Any]:
        """Values pushed through ``build_config`` at validation: every discrete value, both range ends."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        return [self.values[0], self.values[1]]

    def representative(self) -> Any:
        return self.values[0]

    def to_tune(self) -> Any:
        """The Ray Tune search-space object (imported lazily: validation must not need Ray)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)  # ours is inclusive, Tune's upper bound is exclusive

    def describe(self) -> str:
        if self.kind in ("grid", "choice"):
            text = f"{self.kind} " + json.dumps(list(self.values))
        else:
            text = f"{self.kind}[{self.values[0]}, {self.values[1]}]"
        return text + (f" (also {', '.join(self.links)})" if self.links else "")


@dataclass(frozen=True)
class SearchSpec:
    name: str = "grid"
    num_samples: int = 1
    seed: int | None = None


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "fifo"
    grace_period: int = 1
    max_t: int | None = None
    reduction_factor: float = 2.0
    time_attr: str = "training_iteration"


@dataclass(frozen=True)
class TrackingSpec:
    tensorboard: bool = True
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str | None = None


@dataclass(frozen=True)
class ResourceSpec:
    """Override of the trial driver's resource bundle (default: derived from the experiment config)."""

    cpu: float | None = None
    gpu: float | None = None


@dataclass
class SweepSpec:
    """A validated sweep file; ``base_raw`` is the base experiment's raw YAML mapping."""

    source: Path
    name: str
    description: str
    base: Path
    base_raw: dict
    overrides: dict[str, Any]
    metric: str
    mode: str
    search: SearchSpec
    scheduler: SchedulerSpec
    seeds: list[int]
    space: dict[str, Distribution]
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    max_concurrent_trials: int | None = None
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    eval: bool = True

    @property
    def grid_paths(self) -> list[str]:
        return [p for p, d in self.space.items() if d.is_grid]

    @property
    def sampled_paths(self) -> list[str]:
        return [p for p, d in self.space.items() if not d.is_grid]

    def num_points(self) -> int:
        """Distinct points (before seeds): grid product × num_samples."""
        n = 1
        for d in self.space.values():
            if d.is_grid:
                n *= len(d.values)
        return n * self.search.num_samples

    def num_trials(self) -> int:
        return self.num_points() * len(self.seeds)

    def assignments(self, point: dict[str, Any]) -> dict[str, Any]:
        """Config path → value for a point, linked paths included."""
        out: dict[str, Any] = {}
        for p, v in point.items():
            v = _plain(v)
            out[p] = v
            for link in self.space[p].links if p in self.space else ():
                out[link] = copy.deepcopy(v)
        return out

    def trial_config(self, point: dict[str, Any], seed: int, name: str | None = None) -> ExperimentConfig:
        """The experiment config of one trial: base + fixed overrides + the point + its seed."""
        values: dict[str, Any] = {**self.overrides, **self.assignments(point)}
        values["seed"] = int(_plain(seed))
        if name is not None:
            values["name"] = name
        return build_config(self.base_raw, values, source=str(self.base))

    def representative_config(self) -> ExperimentConfig:
        return self.trial_config({p: d.representative() for p, d in self.space.items()}, self.seeds[0])

    def probe_configs(self, prefix: str = "") -> list[ExperimentConfig]:
        """The representative config plus one per probe value of every swept path starting with
        ``prefix`` — enough to bound what trials need (workers, GPUs, steps) without expanding the grid."""
        rep = {p: d.representative() for p, d in self.space.items()}
        out = [self.trial_config(rep, self.seeds[0])]
        for p, d in self.space.items():
            if p.startswith(prefix):
                out.extend(self.trial_config({**rep, p: v}, self.seeds[0]) for v in d.probe_values()[1:])
        return out

    def default_max_t(self) -> int | None:
        """ASHA's default ``max_t``: the most optimizer steps any trial runs (None: sized by epochs)."""
        totals = []
        for cfg in self.probe_configs():
            steps = [st.steps for st in cfg.stages]
            if any(s is None for s in steps):
                return None
            totals.append(sum(steps))
        return max(totals)

    def to_dict(self) -> dict[str, Any]:
        """Canonical plain form (stored in the sweep dir; ``--resume`` compares against it)."""
        d = dataclasses.asdict(self)
        d["source"] = str(self.source)
        d["base"] = str(self.base)
        d["space"] = {
            p: {dist.kind: list(dist.values), **({"link": list(dist.links)} if dist.links else {})}
            for p, dist in self.space.items()
        }
        return json.loads(json.dumps(d, default=str))


def _plain(v: Any) -> Any:
    """numpy scalars (Tune samples them) → Python scalars, which the typed config accepts."""
    if hasattr(v, "item") and callable(v.item) and not isinstance(v, (list, dict, str)):
        try:
            return v.item()
        except (TypeError, ValueError):
            return v
    return v


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def parse_distribution(path: str, value: Any, where: str) -> Distribution:
    """``{grid: [...]}`` etc. → :class:`Distribution`; malformed ones raise naming ``where.path``."""
    at = f"{where}: space.{path}"
    links: Any = ()
    if isinstance(value, dict) and "link" in value:
        value = dict(value)
        links = value.pop("link")
        if isinstance(links, str):
            links = [links]
        if not isinstance(links, list) or not links or not all(isinstance(x, str) and x for x in links):
            raise SweepError(f"{at}.link: expected a list of config paths that take the same value")
        if path in links or len(set(links)) != len(links):
            raise SweepError(f"{at}.link: repeats a path")
    if not isinstance(value, dict) or len(value) != 1:
        raise SweepError(
            f"{at}: expected a mapping with exactly one of {', '.join(DISTRIBUTIONS)} (and optionally "
            f"link: [paths]), e.g. {{grid: [0.0, 0.5, 1.0]}}; got {value!r}"
        )
    (kind, args), *_ = value.items()
    if kind not in DISTRIBUTIONS:
        raise SweepError(
            f"{at}: unknown distribution {kind!r}{_suggest(str(kind), DISTRIBUTIONS)}; "
            f"valid: {', '.join(DISTRIBUTIONS)}"
        )
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise SweepError(f"{at}.{kind}: expected a non-empty list of values, got {args!r}")
        keys = [json.dumps(a, sort_keys=True, default=str) for a in args]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise SweepError(f"{at}.{kind}: duplicate value(s) {', '.join(dup)}")
        return Distribution(kind, tuple(args), tuple(links))
    if not isinstance(args, list) or len(args) != 2 or not all(_is_number(a) for a in args):
        raise SweepError(f"{at}.{kind}: expected [low, high] (two numbers), got {args!r}")
    low, high = args
    if kind == "randint":
        if not all(isinstance(a, int) or float(a).is_integer() for a in args):
            raise SweepError(f"{at}.randint: expected two integers [low, high], got {args!r}")
        low, high = int(low), int(high)
        if low > high:
            raise SweepError(f"{at}.randint: low {low} > high {high}")
        return Distribution(kind, (low, high), tuple(links))
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SweepError(f"{at}.{kind}: bounds must be finite, got {args!r}")
    if low >= high:
        raise SweepError(f"{at}.{kind}: low {low:g} must be < high {high:g}")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{at}.loguniform: bounds must be > 0 (log scale), got low {low:g}")
    return Distribution(kind, (low, high), tuple(links))


def _parse_search(value: Any, where: str) -> SearchSpec:
    if value is None:
        return SearchSpec()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise SweepError(f"{where}: search: expected one of {', '.join(SEARCHES)} or {{name: ..., ...}}")
    name = value["name"]
    if name not in SEARCHES:
        raise SweepError(
            f"{where}: search.name: {name!r} is not one of {', '.join(SEARCHES)}{_suggest(str(name), SEARCHES)}"
        )
    allowed = ("name",) if name == "grid" else ("name", "num_samples", "seed")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise SweepError(
            f"{where}: search.{unknown[0]}: unknown key for search {name!r}; valid keys: {', '.join(allowed)}"
        )
    num = value.get("num_samples", 1)
    if name != "grid" and "num_samples" not in value:
        raise SweepError(f"{where}: search.num_samples: required for {name!r} (how many points to sample)")
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise SweepError(f"{where}: search.num_samples: expected an integer >= 1, got {num!r}")
    seed = value.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise SweepError(f"{where}: search.seed: expected an integer, got {seed!r}")
    return SearchSpec(name=name, num_samples=num, seed=seed)


def _parse_scheduler(value: Any, where: str) -> SchedulerSpec:
    if value is None:
        return SchedulerSpec()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise SweepError(f"{where}: scheduler: expected fifo, asha or {{name: asha, ...}}")
    name = value["name"]
    if name not in SCHEDULERS:
        raise SweepError(
            f"{where}: scheduler.name: {name!r} is not one of {', '.join(SCHEDULERS)}"
            f"{_suggest(str(name), SCHEDULERS)}"
        )
    fields_ = [f.name for f in dataclasses.fields(SchedulerSpec)]
    allowed = ["name"] if name == "fifo" else fields_
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise SweepError(
            f"{where}: scheduler.{unknown[0]}: unknown key for scheduler {name!r}"
            f"{_suggest(unknown[0], allowed)}; valid keys: {', '.join(allowed)}"
        )
    spec = SchedulerSpec(**value)
    for key in ("grace_period", "max_t"):
        v = getattr(spec, key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise SweepError(f"{where}: scheduler.{key}: expected an integer >= 1, got {v!r}")
    if not _is_number(spec.reduction_factor) or spec.reduction_factor <= 1:
        raise SweepError(
            f"{where}: scheduler.reduction_factor: expected a number > 1, got {spec.reduction_factor!r}"
        )
    if spec.time_attr not in ASHA_TIME_ATTRS:
        raise SweepError(
            f"{where}: scheduler.time_attr: {spec.time_attr!r} is not one of {', '.join(ASHA_TIME_ATTRS)}"
        )
    if spec.max_t is not None and spec.grace_period > spec.max_t:
        raise SweepError(f"{where}: scheduler: grace_period {spec.grace_period} > max_t {spec.max_t}")
    return spec


def _parse_tracking(value: Any, where: str) -> TrackingSpec:
    if value is None:
        return TrackingSpec()
    if not isinstance(value, dict):
        raise SweepError(
            f"{where}: tracking: expected {{tensorboard: bool, mlflow: bool | {{tracking_uri}}}}"
        )
    unknown = [k for k in value if k not in ("tensorboard", "mlflow")]
    if unknown:
        raise SweepError(
            f"{where}: tracking.{unknown[0]}: unknown key{_suggest(unknown[0], ('tensorboard', 'mlflow'))}; "
            "valid keys: tensorboard, mlflow"
        )
    tb = value.get("tensorboard", True)
    if not isinstance(tb, bool):
        raise SweepError(f"{where}: tracking.tensorboard: expected true/false, got {tb!r}")
    ml = value.get("mlflow", False)
    uri = exp = None
    if isinstance(ml, dict):
        unknown = [k for k in ml if k not in ("tracking_uri", "experiment_name")]
        if unknown:
            raise SweepError(
                f"{where}: tracking.mlflow.{unknown[0]}: unknown key; valid keys: tracking_uri, experiment_name"
            )
        uri, exp = ml.get("tracking_uri"), ml.get("experiment_name")
        for k, v in (("tracking_uri", uri), ("experiment_name", exp)):
            if v is not None and not isinstance(v, str):
                raise SweepError(f"{where}: tracking.mlflow.{k}: expected a string, got {v!r}")
        ml = True
    elif not isinstance(ml, bool):
        raise SweepError(
            f"{where}: tracking.mlflow: expected true/false or {{tracking_uri: ...}}, got {ml!r}"
        )
    return TrackingSpec(tensorboard=tb, mlflow=ml, mlflow_tracking_uri=uri, mlflow_experiment=exp)


def _parse_resources(value: Any, where: str) -> ResourceSpec:
    if value is None:
        return ResourceSpec()
    if not isinstance(value, dict):
        raise SweepError(f"{where}: resources: expected {{cpu: N, gpu: N}}, got {value!r}")
    unknown = [k for k in value if k not in ("cpu", "gpu")]
    if unknown:
        raise SweepError(
            f"{where}: resources.{unknown[0]}: unknown key{_suggest(unknown[0].lower(), ('cpu', 'gpu'))}; "
            "valid keys: cpu, gpu (the trial driver's bundle)"
        )
    cpu, gpu = value.get("cpu"), value.get("gpu")
    if cpu is not None and (not _is_number(cpu) or cpu <= 0):
        raise SweepError(f"{where}: resources.cpu: expected a number > 0 (Ray rejects 0), got {cpu!r}")
    if gpu is not None and (not _is_number(gpu) or gpu < 0):
        raise SweepError(f"{where}: resources.gpu: expected a number >= 0, got {gpu!r}")
    return ResourceSpec(cpu=cpu, gpu=gpu)


def _parse_overrides(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, list):
        out = {}
        for item in value:
            if not isinstance(item, str):
                raise SweepError(f"{where}: overrides: list items must be 'path=value' strings, got {item!r}")
            try:
                p, v = parse_override(item)
            except ConfigError as e:
                raise SweepError(f"{where}: overrides: {e}") from None
            out[p] = v
        return out
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    raise SweepError(f"{where}: overrides: expected a mapping {{path: value}} or a list of 'path=value'")


def _resolve_base(base: Any, sweep_file: Path) -> Path:
    if not isinstance(base, str) or not base:
        raise SweepError(
            f"{sweep_file}: base: expected the path of an experiment YAML (relative to this file)"
        )
    p = Path(base).expanduser()
    candidate = p if p.is_absolute() else (sweep_file.parent / p)
    if not candidate.exists():
        raise SweepError(
            f"{sweep_file}: base: {base!r} not found (looked at {candidate.resolve()}; "
            "paths are relative to the sweep file)"
        )
    return candidate.resolve()


def parse_sweep(raw: dict, source: str | Path = "<sweep>", base_raw: dict | None = None) -> SweepSpec:
    """Validate a raw sweep mapping completely; raise :class:`SweepError` at the first problem.

    ``base_raw`` short-circuits reading ``base`` from disk (tests, resumed sweeps).
    """
    source = Path(source)
    where = str(source)
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping at the top level")
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        k = str(unknown[0])
        raise SweepError(
            f"{where}: {k}: unknown top-level key{_suggest(k, TOP_LEVEL_KEYS)}; valid keys: {', '.join(TOP_LEVEL_KEYS)}"
        )
    for req in ("base", "metric", "mode", "space"):
        if req not in raw:
            raise SweepError(f"{where}: {req}: required key missing")
    if base_raw is None:
        base = _resolve_base(raw["base"], source)
        try:
            base_raw = load_raw(base)
        except ConfigError as e:
            raise SweepError(f"{where}: base: {e}") from None
    else:
        base = Path(raw["base"])
    name = raw.get("name", source.stem)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise SweepError(
            f"{where}: name: expected a non-empty string without '/', '\\' or spaces, got {name!r}"
        )

    metric, mode = raw["metric"], raw["mode"]
    if not isinstance(metric, str) or not metric:
        raise SweepError(f"{where}: metric: expected a metric name, e.g. eval/accuracy/synthetic or loss")
    if mode not in ("min", "max"):
        raise SweepError(f"{where}: mode: expected min or max, got {mode!r}")

    search = _parse_search(raw.get("search"), where)
    scheduler = _parse_scheduler(raw.get("scheduler"), where)
    tracking = _parse_tracking(raw.get("tracking"), where)
    resources = _parse_resources(raw.get("resources"), where)
    overrides = _parse_overrides(raw.get("overrides"), where)

    evaluate = raw.get("eval", True)
    if not isinstance(evaluate, bool):
        raise SweepError(f"{where}: eval: expected true/false, got {evaluate!r}")
    mct = raw.get("max_concurrent_trials")
    if mct is not None and (not isinstance(mct, int) or isinstance(mct, bool) or mct < 1):
        raise SweepError(f"{where}: max_concurrent_trials: expected an integer >= 1, got {mct!r}")

    seeds = raw.get("seeds")
    if seeds is None:
        seeds = [int(base_raw.get("seed", 0) or 0)]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise SweepError(f"{where}: seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}: seeds: duplicate seeds in {seeds}")

    space_raw = raw["space"]
    if not isinstance(space_raw, dict) or not space_raw:
        raise SweepError(f"{where}: space: expected a non-empty mapping {{dotted.path: {{grid: [...]}}}}")
    space = {str(p): parse_distribution(str(p), v, where) for p, v in space_raw.items()}

    spec = SweepSpec(
        source=source,
        name=name,
        description=str(raw.get("description", "") or ""),
        base=base,
        base_raw=base_raw,
        overrides=overrides,
        metric=metric,
        mode=mode,
        search=search,
        scheduler=scheduler,
        seeds=list(seeds),
        space=space,
        resources=resources,
        max_concurrent_trials=mct,
        tracking=tracking,
        eval=evaluate,
    )
    from revmix.sweeps.checks import check_combinations, check_metric, check_paths

    check_combinations(spec, where)
    check_paths(spec, where)
    check_metric(spec, where)
    return spec


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: invalid YAML: {e}") from None
    return parse_sweep(raw, path)
