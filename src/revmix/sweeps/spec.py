"""Sweep files: parse, validate completely before Ray starts, expand into trials.

A sweep file names a base experiment and a space over dotted config paths — exactly the paths
``revmix train CONFIG a.b=c`` accepts (:class:`SweepSpec` describes every key)::

    base: ../runs/sft_tiny.yaml           # relative to this file
    overrides: {stages.0.steps: 40}       # fixed for every trial (mapping, or a list of "a.b=c")
    metric: eval/accuracy/synthetic
    mode: max
    search: grid                          # grid | random | {name: optuna, num_samples: 8, seed: 0}
    seeds: [0, 1]                         # every point runs once per seed (experiment `seed` only)
    space:                                # see revmix.sweeps.space
      stages.0.mix.reverse_fraction: {grid: [0.0, 0.5, 1.0], link: [stages.1.mix.reverse_fraction]}
      stages.0.lr: {loguniform: [1.0e-4, 1.0e-2]}

Conditions that differ in more than one path (a curriculum, a different stage list) can be named instead
of crossed: ``conditions`` maps a label to the config paths it sets, and the sweep runs a grid over the
labels as the swept path ``condition`` (crossed with any ``space`` entries), so the report groups and
labels trials by those names::

    conditions:
      mixed SFT: {stages: [...]}
      curriculum forward→reverse: {stages.0.mix.schedule: {kind: step, start: 0.0, end: 1.0}}
    compare: [[curriculum forward→reverse, mixed SFT]]   # A − B on the sweep metric and ALP margins

Then the cross-key rules run: every override and swept value (both ends of a range) goes through
``build_config``, so a typo fails before Ray starts exactly as ``revmix train`` reports it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Discriminator, Field, PrivateAttr, field_validator, model_validator

from revmix.config import ExperimentConfig, TrackingConfig, build_config
from revmix.objectives.base import DIRECTIONS
from revmix.sweeps.space import Distribution, parse_distribution, plain_value
from revmix.validation import (
    ConfigError,
    Strict,
    SweepError,
    did_you_mean,
    load_raw,
    parse_override,
    validate,
)

ALP_PARTS: tuple[str, ...] = ("chosen", "rejected", "margin")
CONDITION = "condition"  # the swept path whose values are the labels of ``conditions``


class GridSearch(Strict):
    name: Literal["grid"] = "grid"
    num_samples: ClassVar[int] = 1  # a grid runs every point once
    seed: ClassVar[int | None] = None


class SampledSearch(Strict):
    name: Literal["random", "optuna"]
    num_samples: int = Field(ge=1, description="how many points to sample")
    seed: int | None = Field(None, description="seed of the sampler (random search: default 0)")


class FifoScheduler(Strict):
    name: Literal["fifo"] = "fifo"


class AshaScheduler(Strict):
    name: Literal["asha"]
    grace_period: int = Field(1, ge=1, description="steps every trial runs before it may be stopped")
    max_t: int | None = Field(None, ge=1, description="the longest a trial runs (default: its total steps)")
    reduction_factor: float = Field(2.0, gt=1.0, description="1/fraction of trials kept at each rung")
    time_attr: Literal["training_iteration", "time_total_s"] = Field(
        "training_iteration", description="what max_t counts (one iteration = one step)"
    )

    @model_validator(mode="after")
    def _grace_within_max_t(self) -> AshaScheduler:
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period {self.grace_period} > max_t {self.max_t}")
        return self


SearchSpec = Annotated[GridSearch | SampledSearch, Discriminator("name")]
SchedulerSpec = Annotated[FifoScheduler | AshaScheduler, Discriminator("name")]


class PointGPU(Strict):
    """The GPU the points matching ``when`` get, for the dry run's memory check."""

    when: dict[str, Any] = Field(min_length=1, description="swept path -> value of the points this is for")
    gpu_memory_gb: float | None = Field(None, gt=0.0, description="memory of one GPU, GiB")
    accelerator_type: str | None = Field(None, description="GPU type (H100, L4, ...): its memory")


class ResourceSpec(Strict):
    """Override of the trial driver's resource bundle (default: derived from the experiment config)."""

    cpu: float | None = Field(None, gt=0.0, description="CPUs of the trial driver (Ray rejects 0)")
    gpu: float | None = Field(None, ge=0.0, description="GPUs of the trial driver")
    gpu_memory_gb: float | None = Field(None, gt=0.0, description="memory of one GPU (GiB), for --dry-run")
    accelerator_type: str | None = Field(
        None, description="GPU type (H100, L4, ...) whose memory --dry-run uses"
    )
    per_point: list[PointGPU] = Field([], description="GPU memory/type of the points matching `when` (first)")


class SweepSpec(Strict):
    """A validated sweep file; ``base_raw`` is the base experiment's raw YAML mapping."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = Field(description="sweep label and directory name (default: the file's stem)")
    description: str = Field("", description="one line for the report")
    base: Path = Field(description="the base experiment YAML, relative to the sweep file")
    overrides: dict[str, Any] = Field({}, description="config paths fixed for every trial")
    metric: str = Field(min_length=1, description="metric to optimise, e.g. eval/accuracy/synthetic or loss")
    mode: Literal["min", "max"] = Field(description="whether the metric is minimised or maximised")
    search: SearchSpec = Field(default_factory=GridSearch, description="grid, random or optuna")
    scheduler: SchedulerSpec = Field(default_factory=FifoScheduler, description="fifo or asha")
    seeds: list[int] = Field(min_length=1, description="every point runs once per seed")
    space: dict[str, Distribution] = Field(min_length=1, description="swept config paths")
    conditions: dict[str, dict[str, Any]] = Field(
        {}, description="named conditions: label -> the config paths it sets (swept as `condition`)"
    )
    compare: list[tuple[str, str]] = Field(
        [], description="pairs [A, B] of condition labels the report compares on every key metric (A − B)"
    )
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="the trial driver's bundle")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: the cluster's CPUs/GPUs")
    reuse_processes: bool = Field(
        True, description="a finished trial's process runs the next (no re-import); false: a fresh one each"
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="trackers of every trial: TensorBoard, MLflow, W&B"
    )
    eval: bool = Field(True, description="evaluate every trial at its end")

    _source: Path = PrivateAttr(Path("<sweep>"))
    _base_raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("search", "scheduler", mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        """``search: grid`` is ``{name: grid}``."""
        return {"name": value} if isinstance(value, str) else value

    @field_validator("overrides", mode="before")
    @classmethod
    def _override_list(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if bad := [v for v in value if not isinstance(v, str)]:
            raise ValueError(f"list items must be 'path=value' strings, got {bad[0]!r}")
        return dict(parse_override(v) for v in value)

    @field_validator("name")
    @classmethod
    def _usable_as_dir(cls, name: str) -> str:
        if not name or any(c in name for c in "/\\ "):
            raise ValueError(f"expected a non-empty string without '/', '\\' or spaces, got {name!r}")
        return name

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"duplicate seeds in {seeds}")
        return seeds

    @property
    def source(self) -> Path:
        return self._source

    @property
    def base_raw(self) -> dict[str, Any]:
        return self._base_raw

    @property
    def grid_paths(self) -> list[str]:
        return [p for p, d in self.space.items() if d.is_grid]

    @property
    def sampled_paths(self) -> list[str]:
        return [p for p, d in self.space.items() if not d.is_grid]

    def num_points(self) -> int:
        """Distinct points (before seeds): grid product × num_samples."""
        n = self.search.num_samples
        for d in self.space.values():
            n *= len(d.values) if d.is_grid else 1
        return n

    def num_trials(self) -> int:
        return self.num_points() * len(self.seeds)

    def assignments(self, point: dict[str, Any]) -> dict[str, Any]:
        """Config path → value for a point, linked paths included."""
        out: dict[str, Any] = {}
        for p, v in point.items():
            if p == CONDITION and self.conditions:  # a label stands for the paths its condition sets
                out.update(copy.deepcopy(self.conditions[plain_value(v)]))
                continue
            out[p] = v = plain_value(v)
            out.update({link: copy.deepcopy(v) for link in (self.space[p].links if p in self.space else ())})
        return out

    def trial_config(self, point: dict[str, Any], seed: int, name: str | None = None) -> ExperimentConfig:
        """The experiment config of one trial: base + fixed overrides + the point + its seed."""
        values: dict[str, Any] = {**self.overrides, **self.assignments(point), "seed": int(plain_value(seed))}
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
            if None in steps:
                return None
            totals.append(sum(s for s in steps if s is not None))
        return max(totals)

    def to_dict(self) -> dict[str, Any]:
        """Canonical plain form (stored in the sweep dir; ``--resume`` compares against it)."""
        d = self.model_dump(mode="json", exclude={"space"})
        d |= {"source": str(self.source), "base_raw": self.base_raw}
        named = bool(self.conditions)  # the `condition` grid is derived from `conditions` when read back
        d["space"] = {p: dist.to_dict() for p, dist in self.space.items() if not (named and p == CONDITION)}
        return json.loads(json.dumps(d, default=str))


def _resolve_base(base: Any, sweep: Path) -> Path:
    if not isinstance(base, str) or not base:
        raise SweepError(f"{sweep}: base: expected the path of an experiment YAML (relative to this file)")
    p = Path(base).expanduser()
    candidate = p if p.is_absolute() else (sweep.parent / p)
    if not candidate.exists():
        raise SweepError(
            f"{sweep}: base: {base!r} not found (looked at {candidate.resolve()}; "
            "paths are relative to the sweep file)"
        )
    return candidate.resolve()


def parse_sweep(raw: Any, source: str | Path = "<sweep>", base_raw: dict | None = None) -> SweepSpec:
    """Validate a raw sweep mapping completely; raise :class:`SweepError` naming the file and key.

    ``base_raw`` short-circuits reading ``base`` from disk (tests, resumed sweeps).
    """
    source = Path(source)
    where = str(source)
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping at the top level")
    base = Path(raw.get("base") or "") if base_raw is not None else _resolve_base(raw.get("base"), source)
    if base_raw is None:
        try:
            base_raw = load_raw(base)
        except ConfigError as e:
            raise SweepError(f"{where}: base: {e}") from None
    given = {k: v for k, v in raw.items() if v is not None}  # null: the default
    data = {"name": source.stem, "seeds": [int(base_raw.get("seed", 0) or 0)], **given, "base": base}
    if isinstance(data.get("space"), dict):
        data["space"] = {str(p): parse_distribution(str(p), v, where) for p, v in data["space"].items()}
    _add_condition_grid(data, where)
    try:
        spec: SweepSpec = validate(SweepSpec, data)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None
    spec._source, spec._base_raw = source, base_raw
    check_combinations(spec, where)
    check_compare(spec, where)
    check_paths(spec, where)
    check_metric(spec, where)
    return spec


def _add_condition_grid(data: dict[str, Any], where: str) -> None:
    """``conditions`` → the grid path ``condition`` over its labels (first in the space, so it leads the
    results table); each condition must be a non-empty mapping of config paths."""
    named = data.get("conditions")
    if named is None or named == {}:  # {}: a stored spec without named conditions
        return
    if not isinstance(named, dict):
        raise SweepError(f"{where}: conditions: expected a mapping of label -> {{config.path: value}}")
    for label, paths in named.items():
        if not isinstance(label, str) or not label.strip():
            raise SweepError(f"{where}: conditions: labels must be non-empty strings, got {label!r}")
        if not isinstance(paths, dict) or not paths:
            raise SweepError(
                f"{where}: conditions.{label}: expected a non-empty mapping of config paths to values, got {paths!r}"
            )
    space = data.get("space")
    space = dict(space) if isinstance(space, dict) else {}
    if CONDITION in space:
        raise SweepError(
            f"{where}: space.{CONDITION}: reserved for the labels of `conditions`; rename the path"
        )
    data["space"] = {CONDITION: Distribution("grid", tuple(named)), **space}


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML file."""
    try:
        raw = load_raw(path, "sweep")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    return parse_sweep(raw, path)


# Cross-key rules: what each search and scheduler can do, every override and probe value through the
# typed config, and the metric names a trial reports at its end (eval/*, final/*).


def check_combinations(spec: SweepSpec, where: str) -> None:
    """What each search algorithm can do; a path is fixed, swept or linked — once."""
    linked = [x for d in spec.space.values() for x in d.links]
    if clash := [
        x for x in linked if x in spec.space or linked.count(x) > 1 or x in spec.overrides or x == "seed"
    ]:
        raise SweepError(f"{where}: space: {clash[0]!r} is linked to a swept path and also set elsewhere")
    if "seed" in spec.space:
        raise SweepError(
            f"{where}: space.seed: seeds are not a search dimension; list them in the top-level "
            "`seeds: [0, 1, 2]` (every point runs once per seed)"
        )
    if fixed := [p for p in spec.space if p in spec.overrides]:
        raise SweepError(
            f"{where}: space.{fixed[0]}: also fixed in overrides; a path is either fixed or swept"
        )
    if "seed" in spec.overrides:
        raise SweepError(f"{where}: overrides.seed: use the top-level `seeds: [...]` list instead")
    # Overrides apply before a condition, which would silently replace them; space paths apply after it
    # (``condition`` leads the space) and so refine it, e.g. a learning rate swept over every condition.
    for label, paths in spec.conditions.items():
        if clash := [p for p in paths if any(_overlap(p, q) for q in [*spec.overrides, "seed"])]:
            raise SweepError(
                f"{where}: conditions.{label}.{clash[0]}: also set by overrides or seeds; a path is fixed "
                "or set by the conditions, not both"
            )
    for i, entry in enumerate(spec.resources.per_point):
        if bad := [p for p in entry.when if p not in spec.space]:
            raise SweepError(
                f"{where}: resources.per_point.{i}.when: {bad[0]!r} is not swept; swept: {', '.join(spec.space)}"
            )
    search, sampled, grid = spec.search.name, spec.sampled_paths, spec.grid_paths
    if search == "grid" and sampled:
        raise SweepError(
            f"{where}: space.{sampled[0]}: {spec.space[sampled[0]].kind} needs search random or optuna; "
            "search grid takes only {grid: [...]} entries"
        )
    if search == "optuna" and grid:
        raise SweepError(
            f"{where}: space.{grid[0]}: optuna cannot run a grid; use {{choice: [...]}} (optuna samples it) "
            "or search: grid"
        )
    scalar = (type(None), bool, int, float, str)
    if search == "optuna" and (
        bad := [p for p in sampled if not all(isinstance(v, scalar) for v in spec.space[p].values)]
    ):
        raise SweepError(
            f"{where}: space.{bad[0]}.choice: optuna needs scalar choices (numbers, strings, bools); "
            "sweep the inner keys instead, e.g. stages.1.objective.name"
        )
    if search == "random" and not sampled and spec.search.num_samples > 1:
        raise SweepError(
            f"{where}: search: random with num_samples {spec.search.num_samples} but nothing to sample "
            "(only grid entries): every sample would repeat the grid; use search: grid"
        )


def check_compare(spec: SweepSpec, where: str) -> None:
    """Every ``compare`` pair names two different labels of ``conditions``."""
    labels = list(spec.conditions)
    for i, (a, b) in enumerate(spec.compare):
        for label in (a, b):
            if label not in spec.conditions:
                valid = ", ".join(repr(x) for x in labels) or "(none: the sweep has no `conditions`)"
                raise SweepError(
                    f"{where}: compare.{i}: {label!r} is not a condition{did_you_mean(label, labels)}; valid: {valid}"
                )
        if a == b:
            raise SweepError(f"{where}: compare.{i}: compares {a!r} with itself")


def _overlap(a: str, b: str) -> bool:
    """Whether setting one dotted path changes the other (equal, or one inside the other)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def check_paths(spec: SweepSpec, where: str) -> None:
    """Push every override, seed and probe value through ``build_config`` (the typed schema)."""
    for s in spec.seeds:
        try:
            build_config(spec.base_raw, {**spec.overrides, "seed": s})
        except ConfigError as e:
            key = "seeds" if s != spec.seeds[0] else f"overrides (on base {spec.base})"
            raise SweepError(f"{where}: {key}: {e}") from None
    rep = {p: d.representative() for p, d in spec.space.items()}
    for path, dist in spec.space.items():
        for value in dist.probe_values():
            try:
                build_config(spec.base_raw, {**spec.overrides, **spec.assignments({**rep, path: value})})
            except ConfigError as e:
                prefix = "space" if str(e).startswith((path, *dist.links)) else f"space.{path} = {value!r}"
                raise SweepError(f"{where}: {prefix}: {e}") from None


def check_metric(spec: SweepSpec, where: str) -> None:
    """Metrics checked by name: the eval/* family a trial reports at its end; ASHA needs a step metric."""
    m, parts, at = spec.metric, spec.metric.split("/"), f"{where}: metric: {spec.metric!r}"
    if parts[0] == "eval" and not spec.eval:
        raise SweepError(f"{at} needs evaluation, but the sweep sets eval: false")
    if parts[:2] == ["eval", "accuracy"]:
        benches = set(spec.representative_config().eval.benchmarks)
        benches.update(
            *(v for v in spec.space["eval.benchmarks"].values) if "eval.benchmarks" in spec.space else ()
        )
        if len(parts) < 3 or parts[2] not in benches:
            raise SweepError(
                f"{at}: benchmark not evaluated; this sweep evaluates {', '.join(sorted(benches)) or '(none)'} "
                "(eval.benchmarks)"
            )
        if len(parts) > 4 or not set(parts[3:]) <= set(DIRECTIONS):
            raise SweepError(f"{at}: direction must be one of {', '.join(DIRECTIONS)}")
    elif parts[:2] == ["eval", "alp"]:
        if len(parts) != 4 or parts[2] not in DIRECTIONS or parts[3] not in ALP_PARTS:
            raise SweepError(f"{at}: expected eval/alp/<{'|'.join(DIRECTIONS)}>/<{'|'.join(ALP_PARTS)}>")
    elif parts[0] == "eval":
        raise SweepError(
            f"{at}: eval metrics are eval/accuracy/<benchmark>[/<direction>] "
            "or eval/alp/<direction>/<chosen|rejected|margin>"
        )
    if isinstance(spec.scheduler, AshaScheduler):
        if parts[0] in ("eval", "final"):
            raise SweepError(
                f"{where}: scheduler: asha stops trials on a metric reported every step (e.g. loss, "
                f"nll/forward); {m!r} is only known when a trial ends. Use scheduler: fifo"
            )
        steps = [st.steps for st in spec.representative_config().stages]
        if spec.scheduler.max_t is None and (
            None in steps or spec.scheduler.time_attr != "training_iteration"
        ):
            raise SweepError(
                f"{where}: scheduler.max_t: required when stages are sized by epochs or time_attr is not "
                "training_iteration (the default max_t is the total optimizer steps)"
            )
