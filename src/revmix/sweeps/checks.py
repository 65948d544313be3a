"""Cross-key rules of a sweep file, checked before Ray starts (called by :func:`spec.parse_sweep`).

What each search and scheduler can do, every override and probe value pushed through the typed config,
and the metric names we can check (the ``eval/*`` family a trial reports at its end).
"""

from __future__ import annotations

from revmix.config import ConfigError, build_config
from revmix.sweeps.spec import ALP_PARTS, SweepError, SweepSpec


def check_combinations(spec: SweepSpec, where: str) -> None:
    """Cross-key rules: what each search algorithm and scheduler can do."""
    linked = [x for d in spec.space.values() for x in d.links]
    for x in linked:
        if x in spec.space or linked.count(x) > 1 or x in spec.overrides or x == "seed":
            raise SweepError(f"{where}: space: {x!r} is linked to a swept path and also set elsewhere")
    for p in spec.space:
        if p in ("seed",):
            raise SweepError(
                f"{where}: space.seed: seeds are not a search dimension; list them in the top-level "
                "`seeds: [0, 1, 2]` (every point runs once per seed)"
            )
        if p in spec.overrides:
            raise SweepError(f"{where}: space.{p}: also fixed in overrides; a path is either fixed or swept")
    if "seed" in spec.overrides:
        raise SweepError(f"{where}: overrides.seed: use the top-level `seeds: [...]` list instead")
    if spec.search.name == "grid":
        bad = spec.sampled_paths
        if bad:
            d = spec.space[bad[0]]
            raise SweepError(
                f"{where}: space.{bad[0]}: {d.kind} needs search random or optuna; search grid takes "
                "only {grid: [...]} entries"
            )
    if spec.search.name == "optuna":
        if spec.grid_paths:
            raise SweepError(
                f"{where}: space.{spec.grid_paths[0]}: optuna cannot run a grid; use {{choice: [...]}} "
                "(optuna samples it) or search: grid"
            )
        for p, d in spec.space.items():
            if d.kind == "choice" and not all(
                v is None or isinstance(v, (bool, int, float, str)) for v in d.values
            ):
                raise SweepError(
                    f"{where}: space.{p}.choice: optuna needs scalar choices (numbers, strings, bools); "
                    "sweep the inner keys instead, e.g. stages.1.objective.name"
                )
    if spec.search.name == "random" and not spec.sampled_paths and spec.search.num_samples > 1:
        raise SweepError(
            f"{where}: search: random with num_samples {spec.search.num_samples} but nothing to sample "
            "(only grid entries): every sample would repeat the grid; use search: grid"
        )


def check_paths(spec: SweepSpec, where: str) -> None:
    """Push every override and every probe value through ``build_config`` (the typed schema)."""
    rep = {p: d.representative() for p, d in spec.space.items()}
    try:
        build_config(spec.base_raw, {**spec.overrides, "seed": spec.seeds[0]})
    except ConfigError as e:
        raise SweepError(f"{where}: overrides (on base {spec.base}): {e}") from None
    for s in spec.seeds[1:]:
        try:
            build_config(spec.base_raw, {**spec.overrides, "seed": s})
        except ConfigError as e:
            raise SweepError(f"{where}: seeds: {e}") from None
    for path, dist in spec.space.items():
        for value in dist.probe_values():
            try:
                build_config(spec.base_raw, {**spec.overrides, **spec.assignments({**rep, path: value})})
            except ConfigError as e:
                msg = str(e)
                prefix = "space" if msg.startswith((path, *dist.links)) else f"space.{path} = {value!r}"
                raise SweepError(f"{where}: {prefix}: {msg}") from None


def check_metric(spec: SweepSpec, where: str) -> None:
    """Metrics we can check by name: the eval/* and final/* families the trial reports at its end."""
    from revmix.platform.data.schema import DIRECTIONS

    m = spec.metric
    parts = m.split("/")
    end_only = parts[0] in ("eval", "final")
    if parts[0] == "eval":
        if not spec.eval:
            raise SweepError(f"{where}: metric: {m!r} needs evaluation, but the sweep sets eval: false")
        if len(parts) >= 2 and parts[1] not in ("accuracy", "alp"):
            raise SweepError(
                f"{where}: metric: {m!r}: eval metrics are eval/accuracy/<benchmark>[/<direction>] "
                "or eval/alp/<direction>/<chosen|rejected|margin>"
            )
        if parts[1:2] == ["accuracy"]:
            benches = _benchmarks(spec)
            if len(parts) < 3 or parts[2] not in benches:
                raise SweepError(
                    f"{where}: metric: {m!r}: benchmark not evaluated; this sweep evaluates "
                    f"{', '.join(sorted(benches)) or '(none)'} (eval.benchmarks)"
                )
            if (len(parts) == 4 and parts[3] not in DIRECTIONS) or len(parts) > 4:
                raise SweepError(f"{where}: metric: {m!r}: direction must be one of {', '.join(DIRECTIONS)}")
        if parts[1:2] == ["alp"] and (
            len(parts) != 4 or parts[2] not in DIRECTIONS or parts[3] not in ALP_PARTS
        ):
            raise SweepError(
                f"{where}: metric: {m!r}: expected eval/alp/<{'|'.join(DIRECTIONS)}>/<{'|'.join(ALP_PARTS)}>"
            )
    if spec.scheduler.name == "asha" and end_only:
        raise SweepError(
            f"{where}: scheduler: asha stops trials on a metric reported every step (e.g. loss, "
            f"nll/forward); {m!r} is only known when a trial ends. Use scheduler: fifo"
        )
    if spec.scheduler.name == "asha" and spec.scheduler.max_t is None:
        steps = [st.steps for st in spec.representative_config().stages]
        if any(s is None for s in steps) and spec.scheduler.time_attr in (
            "training_iteration",
            "global_step",
        ):
            raise SweepError(
                f"{where}: scheduler.max_t: required when stages are sized by epochs or time_attr is not "
                "training_iteration (the default max_t is the total optimizer steps)"
            )


def _benchmarks(spec: SweepSpec) -> set[str]:
    names = set(spec.representative_config().eval.benchmarks)
    for p, d in spec.space.items():
        if p == "eval.benchmarks":
            for v in d.values:
                names.update(v if isinstance(v, list) else [])
    return names
