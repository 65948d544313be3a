"""Typed experiment configs: YAML in, dataclasses out, ``a.b.c=value`` overrides (DESIGN §4, §8).

Every field carries a one-line reason in its ``doc`` metadata (``revmix train --help-config`` prints them).
Unknown keys and paths are errors that name the full dotted path and list the valid keys, so a typo fails
before Ray starts. Overrides use exactly the dotted paths a sweep file uses; list items go by index
(``stages.1.objective.beta=0.2``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, always naming the dotted path (and file, when known)."""


def _f(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraConfig:
    enabled: bool = _f(True, "train a LoRA adapter (False: full fine-tuning)")
    r: int = _f(8, "adapter rank")
    alpha: int = _f(16, "adapter scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.0, "dropout on the adapter input")
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get an adapter",
    )


@dataclass
class ModelConfig:
    name_or_path: str | None = _f(None, "HF model name or local dir; null builds a tiny model from `scale`")
    scale: str = _f("tiny", "tiny-model size dial when name_or_path is null", ("tiny", "small", "base"))
    init_seed: int = _f(0, "seed of the tiny model's random initialisation")
    dtype: str = _f(
        "auto", "parameter dtype; auto = fp32 on CPU, bf16 on GPU", ("auto", "float32", "bfloat16")
    )
    lora: LoraConfig = _f(LoraConfig(), "LoRA adapter settings")


@dataclass
class DataConfig:
    source: str = _f("synthetic", "synthetic | path.jsonl | path.parquet | hf:NAME | r1k_sample | r1k:PATH")
    families: list[str] = _f(["affine_mod", "arith_chain", "string_ops"], "synthetic task families to mix")
    n_items: int = _f(600, "synthetic items (each gives a forward and a reverse row)")
    test_fraction: float = _f(0.2, "held-out fraction, split by item so no fact leaks")
    seed: int = _f(0, "seed of data generation and the train/test split")
    max_length: int = _f(256, "token cap of prompt + response; longer rows are truncated and counted")
    skip_invalid: bool = _f(False, "skip (and count) invalid rows instead of failing")
    cache_dir: str | None = _f(None, "tokenised Parquet cache dir (default $REVMIX_CACHE/tokenised)")
    stream_threshold_rows: int = _f(200_000, "above this many rows, stream from the Parquet cache")


@dataclass
class PhaseConfig:
    until: float = _f(1.0, "end of this phase as a fraction of the stage's examples, in (0, 1]")
    reverse_fraction: float = _f(0.5, "reverse fraction inside this phase")


@dataclass
class ScheduleConfig:
    kind: str = _f("constant", "how r changes over the stage", ("constant", "linear", "step", "phases"))
    start: float | None = _f(None, "linear/step: r at the start (default: mix.reverse_fraction)")
    end: float | None = _f(None, "linear/step: r at the end")
    boundary: float = _f(0.5, "step: fraction of the stage after which r switches from start to end")
    phases: list[PhaseConfig] = _f([], "phases: explicit list of (until, reverse_fraction)")


@dataclass
class MixConfig:
    reverse_fraction: float = _f(0.5, "fraction r of examples drawn from reverse rows")
    mode: str = _f(
        "fixed_total", "fixed_total: N examples/epoch; union: all rows of both", ("fixed_total", "union")
    )
    total: int | None = _f(None, "fixed_total: examples per epoch (default: number of train items)")
    schedule: ScheduleConfig = _f(ScheduleConfig(), "constant r or a curriculum")


@dataclass
class EvalConfig:
    benchmarks: list[str] = _f(["synthetic"], "benchmarks for accuracy at evaluation points")
    limit: int | None = _f(96, "items per benchmark (null: all)")
    max_new_tokens: int = _f(96, "generation budget per item")
    alp_tokens: int = _f(1000, "ALP over the first N completion tokens (paper: 1000)")
    alp_limit: int | None = _f(96, "held-out rows per direction for ALP (null: all)")
    at_stage_end: bool = _f(True, "evaluate after each stage")
    every_steps: int = _f(0, "ALP on the held-out slice every N steps (0: off)")
    every_epoch: bool = _f(False, "ALP on the held-out slice after every epoch")


@dataclass
class StageConfig:
    name: str = _f("sft", "stage label in metrics and summaries")
    objective: dict = _f({"name": "sft"}, "objective name and hyper-parameters (registry)")
    mix: MixConfig = _f(MixConfig(), "direction mix and curriculum")
    epochs: float | None = _f(None, "stage length in passes over the mixed stream")
    steps: int | None = _f(None, "stage length in optimizer steps (overrides epochs)")
    batch_size: int = _f(16, "examples per optimizer step, across all workers")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(3e-3, "peak learning rate (AdamW)")
    warmup_steps: int = _f(10, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = _f(0.1, "cosine floor as a fraction of lr")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    lora: bool | None = _f(None, "train this stage with a LoRA adapter; null: model.lora.enabled")
    reference: str = _f(
        "auto",
        "DPO/PPO reference: adapter-disabled, disk cache, frozen copy",
        ("auto", "adapter", "cache", "copy"),
    )
    checkpoint_every: int = _f(0, "report a checkpoint every N steps (0: at stage end only)")
    grad_cosine_every: int = _f(0, "log cos(forward grad, reverse grad) every N steps (0: off)")
    log_every: int = _f(1, "write metrics every N steps")


@dataclass
class RuntimeConfig:
    num_workers: int = _f(0, "Ray Train workers; 0 runs the loop in-process (fast path)")
    cpus_per_worker: float = _f(0.5, "CPUs per worker (0.5 on 2 cores leaves room for Ray Data)")
    use_gpu: bool | None = _f(None, "null: use a GPU when one is visible")
    precision: str = _f("auto", "auto = bf16 autocast on GPU, fp32 on CPU", ("auto", "fp32", "bf16"))
    torch_threads: int = _f(0, "torch intra-op threads per worker (0: torch default)")
    length_buckets: int = _f(2, "forward each batch in up to N groups of similar length (less padding)")
    max_failures: int = _f(1, "worker-group restarts from the last checkpoint (FailureConfig)")
    storage_path: str | None = _f(None, "Ray storage (local path, s3://, gs://); default: the run dir")


@dataclass
class ExperimentConfig:
    name: str = _f("experiment", "experiment label")
    seed: int = _f(0, "seed of the mixer, data order and dropout")
    model: ModelConfig = _f(ModelConfig(), "policy model")
    data: DataConfig = _f(DataConfig(), "training and held-out data")
    stages: list[StageConfig] = _f(
        [StageConfig()], "stages run in order; each stage's policy is the next's reference"
    )
    runtime: RuntimeConfig = _f(RuntimeConfig(), "Ray Train resources")
    eval: EvalConfig = _f(EvalConfig(), "evaluation during and after training")


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------------------


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: unexpected null")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}.{i}") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported type {tp}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types name the dotted path."""
    where = path or "<root>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"{path + '.' if path else ''}{k}: unknown key{_suggest(k, list(fields))}; "
            f"valid keys at {where}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        v = _coerce(value, hints[name], sub)
        choices = fields[name].metadata.get("choices")
        if choices and v is not None and v not in choices:
            raise ConfigError(f"{sub}: {v!r} is not one of {', '.join(choices)}")
        kwargs[name] = v
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (what ``config.yaml`` of a run holds)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


# --------------------------------------------------------------------------------------------------
# Overrides and loading
# --------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=1"`` → ``("a.b", 1)``; the value is parsed as YAML (numbers, lists, null, …)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected PATH=VALUE, e.g. stages.0.lr=0.001")
    path, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; users mean a number
        try:
            value = float(value)
        except ValueError:
            pass
    return path.strip(), value


def set_path(raw: dict, path: str, value: Any, *, cls: type = ExperimentConfig) -> None:
    """Set a dotted ``path`` inside the raw config dict, checking each step against the schema."""
    parts = path.split(".")
    node: Any = raw
    tp: Any = cls
    walked: list[str] = []
    for i, key in enumerate(parts):
        last = i == len(parts) - 1
        tp = _strip_optional(tp)
        where = ".".join(walked) or "<root>"
        if dataclasses.is_dataclass(tp):
            fields = {f.name: f for f in dataclasses.fields(tp)}
            if key not in fields:
                raise ConfigError(
                    f"{path}: unknown key {key!r} at {where}{_suggest(key, list(fields))}; "
                    f"valid keys: {', '.join(fields)}"
                )
            child_tp = typing.get_type_hints(tp)[key]
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {where} is not a mapping")
            if last:
                node[key] = value
                return
            if node.get(key) is None:
                default = _default_of(fields[key])
                node[key] = to_dict(default) if default is not None else {}
            node, tp = node[key], child_tp
        elif typing.get_origin(tp) is list:
            if not key.lstrip("-").isdigit():
                raise ConfigError(f"{path}: {where} is a list; expected an index, got {key!r}")
            idx = int(key)
            if not isinstance(node, list) or not -len(node) <= idx < len(node):
                n = len(node) if isinstance(node, list) else 0
                raise ConfigError(f"{path}: index {idx} out of range; {where} has {n} item(s)")
            if last:
                node[idx] = value
                return
            node, tp = node[idx], typing.get_args(tp)[0]
        elif tp is dict or typing.get_origin(tp) is dict:
            # Free-form mapping (objective hyper-parameters): validated later by its registry.
            if last:
                node[key] = value
                return
            node = node.setdefault(key, {})
        else:
            raise ConfigError(f"{path}: {where} is a value, not a mapping")
        walked.append(key)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field checks the types cannot express (objective registry, ranges)."""
    from revmix.objectives.base import build_objective

    if not cfg.stages:
        raise ConfigError("stages: at least one stage is required")
    for i, st in enumerate(cfg.stages):
        p = f"stages.{i}"
        try:
            build_objective(st.objective, path=f"{p}.objective")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0.0 <= st.mix.reverse_fraction <= 1.0:
            raise ConfigError(
                f"{p}.mix.reverse_fraction: expected a value in [0, 1], got {st.mix.reverse_fraction}"
            )
        if st.steps is None and st.epochs is None:
            raise ConfigError(f"{p}: set either steps or epochs")
        if st.batch_size < 1 or st.grad_accum < 1:
            raise ConfigError(f"{p}: batch_size and grad_accum must be >= 1")
        workers = max(cfg.runtime.num_workers, 1)
        if st.batch_size % (workers * st.grad_accum):
            raise ConfigError(
                f"{p}.batch_size: {st.batch_size} is not divisible by num_workers × grad_accum = "
                f"{workers * st.grad_accum}"
            )
        for j, ph in enumerate(st.mix.schedule.phases):
            if not 0.0 < ph.until <= 1.0 or not 0.0 <= ph.reverse_fraction <= 1.0:
                raise ConfigError(
                    f"{p}.mix.schedule.phases.{j}: until in (0, 1] and reverse_fraction in [0, 1]"
                )
        if st.mix.schedule.kind == "phases" and not st.mix.schedule.phases:
            raise ConfigError(f"{p}.mix.schedule.phases: kind 'phases' needs at least one phase")
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction: expected a value in (0, 1), got {cfg.data.test_fraction}")
    if cfg.runtime.length_buckets < 1:
        raise ConfigError(
            f"runtime.length_buckets: expected an integer >= 1 (1: one padded pass), got {cfg.runtime.length_buckets}"
        )
    return cfg


def load_raw(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def build_config(raw: dict, overrides: list[str] | dict[str, Any] = (), source: str = "") -> ExperimentConfig:
    """Apply overrides to a raw dict, then type-check and validate it (errors prefixed by ``source``)."""
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    try:
        for p, v in items:
            set_path(raw, p, v)
        return validate(from_dict(ExperimentConfig, raw))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> ExperimentConfig:
    """Load an experiment YAML and apply ``a.b.c=value`` overrides."""
    return build_config(load_raw(path), overrides, source=str(path))


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per config path with its default and reason (for ``--help-config``)."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = _strip_optional(typing.get_type_hints(cls)[f.name])
        p = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.append(f"{p}: {f.metadata.get('doc', '')}")
            lines.extend(describe(tp, p + "."))
        else:
            lines.append(f"{p} = {_default_of(f)!r}  # {f.metadata.get('doc', '')}")
    return lines
