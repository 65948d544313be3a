"""Typed experiment configs: YAML in, pydantic models out, ``a.b.c=value`` overrides (list items by index).

Every field has a range and a one-line reason (``--help-config``); a bad key or value fails before Ray
starts, naming its dotted path, the valid keys or choices and close matches (:mod:`revmix.validation`). A
stage's ``objective`` is any registered objective, chosen by ``name`` and typed in its own module.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from revmix.objectives import AnyObjective, Objective
from revmix.objectives.sft import SFT
from revmix.validation import (
    ConfigError,
    Strict,
    describe_fields,
    did_you_mean,
    load_raw,
    parse_override,
    set_path,
    validate,
)

if typing.TYPE_CHECKING:
    ObjectiveSpec = Objective
else:  # any objective (registered, installed or pkg.module:Class), looked up by its `name` when read
    ObjectiveSpec = AnyObjective


def _f(default: Any, doc: str, **limits: Any) -> Any:
    """A field: its default (a model class: a fresh instance each time), limits and one-line reason."""
    factory = {"default_factory": default} if isinstance(default, type) else {"default": default}
    return Field(**factory, description=doc, **limits)


class LoraConfig(Strict):
    enabled: bool = _f(True, "train a LoRA adapter (False: full fine-tuning)")
    r: int = _f(8, "adapter rank", ge=1)
    alpha: int = _f(16, "adapter scaling numerator (scale = alpha / r)", ge=1)
    dropout: float = _f(0.0, "dropout on the adapter input", ge=0.0, lt=1.0)
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get an adapter",
        min_length=1,
    )


class ModelConfig(Strict):
    name_or_path: str | None = _f(None, "HF model name or local dir; null builds a tiny model from `scale`")
    scale: Literal["tiny", "small", "base"] = _f("tiny", "tiny-model size dial when name_or_path is null")
    init_seed: int = _f(0, "seed of the tiny model's random initialisation")
    base: Literal["random", "pretrained"] = _f(
        "random",
        "tiny model: seeded random weights, or pretrained on generated task text (built once, cached)",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "parameter dtype; auto: fp32 on CPU, bf16 on GPU"
    )
    lora: LoraConfig = _f(LoraConfig, "LoRA adapter settings")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = _f(
        "auto", "attention kernel; auto: flash_attention_2 on GPU when flash_attn imports, else sdpa"
    )


class DataConfig(Strict):
    source: str = _f("synthetic", "synthetic | path.jsonl | path.parquet | hf:NAME | r1k_sample | r1k:PATH")
    format: Literal["canonical", "s1k", "r1k"] = _f(
        "canonical", "layout of a file / hf: source: canonical rows, s1K traces (forward), r1k pairs"
    )
    columns: dict[str, str] = _f({}, "layout field -> source column, for columns named differently")
    split: str = _f("train", "split of an hf: source", min_length=1)
    config_name: str | None = _f(None, "configuration (subset) of an hf: source")
    families: list[str] = _f(["affine_mod", "arith_chain", "string_ops"], "synthetic task families to mix")
    n_items: int = _f(600, "synthetic items (each gives a forward and a reverse row)", ge=1)
    test_fraction: float = _f(0.2, "held-out fraction, split by item so no fact leaks", gt=0.0, lt=1.0)
    seed: int = _f(0, "seed of data generation, the train/test split and the pairing split")
    pairing: Literal["twins", "independent"] = _f(
        "twins",
        "twins: both directions' rows of every training item; independent: forward and reverse rows from "
        "disjoint halves of the items, no shared facts (the paper's control)",
    )
    max_length: int = _f(256, "token cap of prompt + response; longer rows follow `truncation`", ge=1)
    truncation: Literal["truncate", "drop", "error"] = _f(
        "truncate", "rows over max_length: cut the response, leave the row out, or fail naming it (counted)"
    )
    skip_invalid: bool = _f(False, "skip (and count) invalid rows instead of failing")
    cache_dir: str | None = _f(None, "tokenised Parquet cache dir (default $REVMIX_CACHE/tokenised)")
    stream_threshold_rows: int = _f(200_000, "above this many rows, stream from the Parquet cache", ge=0)

    @model_validator(mode="after")
    def _columns_of_the_layout(self) -> DataConfig:
        from revmix.platform.data.formats import check_columns  # the layouts live with their converters

        check_columns(self.format, self.columns)
        return self


class PhaseConfig(Strict):
    until: float = _f(1.0, "end of this phase as a fraction of the stage's examples", gt=0.0, le=1.0)
    reverse_fraction: float = _f(0.5, "reverse fraction inside this phase", ge=0.0, le=1.0)


class ScheduleConfig(Strict):
    kind: Literal["constant", "linear", "step", "phases"] = _f("constant", "how r changes over the stage")
    start: float | None = _f(None, "linear/step: r at the start (default: mix.reverse_fraction)", ge=0, le=1)
    end: float | None = _f(None, "linear/step: r at the end", ge=0.0, le=1.0)
    boundary: float = _f(0.5, "step: fraction of the stage after which r is `end`", ge=0.0, le=1.0)
    phases: list[PhaseConfig] = _f([], "phases: list of (until, reverse_fraction)", validate_default=True)

    @field_validator("phases")
    @classmethod
    def _phases_for_kind_phases(cls, phases: list[PhaseConfig], info: ValidationInfo) -> list[PhaseConfig]:
        if info.data.get("kind") == "phases" and not phases:
            raise ValueError("kind 'phases' needs at least one phase")
        return phases


class MixConfig(Strict):
    reverse_fraction: float = _f(0.5, "fraction r of examples drawn from reverse rows", ge=0.0, le=1.0)
    mode: Literal["fixed_total", "union"] = _f(
        "fixed_total", "fixed_total: N examples/epoch; union: all rows"
    )
    total: int | None = _f(None, "fixed_total: examples per epoch (default: number of train items)", ge=1)
    schedule: ScheduleConfig = _f(ScheduleConfig, "constant r or a curriculum")


class EngineConfig(Strict):
    """vLLM engine arguments revmix passes through (others are refused, naming these)."""

    tensor_parallel_size: int | None = _f(None, "GPUs one engine shards the model over", ge=1)
    max_model_len: int | None = _f(
        None, "context length the KV cache is sized for (prompt + completion)", ge=1
    )
    gpu_memory_utilization: float | None = _f(
        None, "fraction of each GPU's memory vLLM may take", gt=0.0, le=1.0
    )
    max_num_seqs: int | None = _f(None, "sequences decoded together per engine step", ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = _f(
        None, "engine dtype (default: bf16 on GPU, float32 on CPU)"
    )
    enforce_eager: bool | None = _f(None, "no CUDA graph capture (less memory, slower)")

    def kwargs(self) -> dict[str, Any]:
        """The arguments set, as ``vllm.LLM`` / Ray LLM ``engine_kwargs`` take them."""
        return self.model_dump(exclude_none=True)


class EvalConfig(Strict):
    benchmarks: list[str] = _f(["synthetic"], "benchmarks for accuracy at evaluation points")
    limit: int | None = _f(96, "items per benchmark (null: all)", ge=1)
    generator: Literal["auto", "hf", "vllm"] = _f(
        "auto", "stage-end generation: hf on rank 0, or a Ray Data LLM (vLLM) job; auto: vllm on GPU runs"
    )
    samples: int = _f(1, "completions sampled per item (accuracy is their mean)", ge=1, le=1024)
    temperature: float = _f(0.0, "sampling temperature (0: greedy; samples > 1 need > 0)", ge=0.0)
    top_p: float = _f(1.0, "nucleus sampling mass", gt=0.0, le=1.0)
    seed: int = _f(0, "sampling seed (same seed, same completions for a backend)")
    pass_k: list[int] | None = _f(
        None, "k of pass@k and maj@k, each <= samples (null: [1, samples]; none when samples is 1)"
    )
    max_new_tokens: int = _f(96, "generation budget per item", ge=1, le=32768)
    batch_size: int = _f(
        16,
        "items per transformers generate call: larger is faster on small models, costs KV-cache memory",
        ge=1,
    )
    engine_kwargs: EngineConfig = _f(EngineConfig, "vLLM engine arguments (generator vllm)")
    alp_tokens: int = _f(1000, "ALP over the first N completion tokens (paper: 1000)", ge=1)
    alp_limit: int | None = _f(96, "held-out rows per direction for ALP (null: all)", ge=1)
    at_stage_end: bool = _f(True, "evaluate after each stage")
    at_start: bool = _f(False, "evaluate the starting model before the first stage: every stage's baseline")
    every_steps: int = _f(0, "ALP on the held-out slice every N steps (0: off)", ge=0)
    every_epoch: bool = _f(False, "ALP on the held-out slice after every epoch")

    @model_validator(mode="after")
    def _sampling_is_consistent(self) -> EvalConfig:
        if self.samples > 1 and self.temperature == 0.0:
            raise ValueError(
                f"eval.samples is {self.samples} but eval.temperature is 0 (greedy: every sample would be "
                "the same); set eval.temperature > 0 (e.g. 0.7) or eval.samples=1"
            )
        bad = [k for k in self.pass_k or [] if not 1 <= k <= self.samples]
        if bad:
            raise ValueError(f"eval.pass_k: {bad} outside 1..eval.samples ({self.samples})")
        return self

    def ks(self) -> list[int]:
        """The k values of pass@k / maj@k: ``pass_k``, else 1 and ``samples`` (none with one sample)."""
        if self.pass_k:
            return sorted(set(self.pass_k))
        return [1, self.samples] if self.samples > 1 else []


class StageConfig(Strict):
    name: str = _f("sft", "stage label in metrics and summaries")
    objective: ObjectiveSpec = _f(SFT, "objective name and hyper-parameters (built-in or plug-in)")
    mix: MixConfig = _f(MixConfig, "direction mix and curriculum")
    epochs: float | None = _f(None, "stage length in passes over the mixed stream", gt=0.0)
    steps: int | None = _f(None, "stage length in optimizer steps (overrides epochs)", ge=1)
    batch_size: int = _f(16, "examples per optimizer step, across all workers", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", ge=1)
    lr: float = _f(3e-3, "peak learning rate (AdamW)", gt=0.0)
    warmup_steps: int = _f(10, "linear warm-up steps before the cosine decay", ge=0)
    min_lr_ratio: float = _f(0.1, "cosine floor as a fraction of lr", ge=0.0, le=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)", ge=0.0)
    lora: bool | None = _f(None, "train this stage with a LoRA adapter; null: model.lora.enabled")
    reference: Literal["auto", "adapter", "cache", "copy"] = _f(
        "auto", "DPO/PPO reference: adapter-disabled, disk cache, frozen copy"
    )
    checkpoint_every: int = _f(0, "report a checkpoint every N steps (0: at stage end only)", ge=0)
    grad_cosine_every: int = _f(0, "log cos(forward grad, reverse grad) every N steps (0: off)", ge=0)
    log_every: int = _f(1, "write metrics every N steps", ge=1)


class RuntimeConfig(Strict):
    num_workers: int = _f(0, "Ray Train workers; 0 runs the loop in-process (fast path)", ge=0)
    cpus_per_worker: float = _f(0.5, "CPUs per worker (0.5 on 2 cores leaves room for Ray Data)", gt=0.0)
    use_gpu: bool | None = _f(None, "null: use a GPU when one is visible")
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", "auto = bf16 autocast on GPU, fp32 on CPU")
    torch_threads: int = _f(0, "torch intra-op threads per worker (0: torch default)", ge=0)
    length_buckets: int = _f(2, "forward each batch in up to N groups of similar length (1: one pass)", ge=1)
    packing: bool = _f(
        False, "sft/unlikelihood: several rows per sequence, no padding (sdpa, eager, flash_attention_2)"
    )
    activation_checkpointing: Literal["auto", "on", "off"] = _f(
        "auto", "recompute activations in backward (~30% more compute, far less memory); auto: on on GPU"
    )
    release_host_memory: Literal["auto", "on", "off"] = _f(
        "auto",
        "return freed tensors >= 128 KiB to the OS at once (CPU peak memory ~ live tensors; costs page "
        "faults); auto: on with activation checkpointing on CPU",
    )
    strategy: Literal["ddp", "fsdp"] = _f(
        "ddp", "ddp: a full model replica per worker; fsdp: FSDP2-sharded weights, grads, optimizer state"
    )
    logp_kernel: Literal["auto", "chunked", "cce"] = _f(
        "auto",
        "response log-probs: chunked over the logits, or cce (Cut Cross-Entropy fused with lm_head, no "
        "[B, T, V] logits; the gpu extra); auto: cce on CUDA when cut_cross_entropy imports, else chunked",
    )
    max_failures: int = _f(1, "worker-group restarts from the last checkpoint (-1: no limit)", ge=-1)
    on_nonfinite: Literal["stop", "skip_step"] = _f(
        "stop", "non-finite loss or grad norm: stop (keeping the last good checkpoint) or skip that step"
    )
    storage_path: str | None = _f(None, "Ray storage (local path, s3://, gs://); default: the run dir")
    trace: bool = _f(
        False, "write each worker's pid and per-step row ids to stages/<i>/trace/ (tests, debugging)"
    )

    @model_validator(mode="after")
    def _fsdp_has_workers(self) -> RuntimeConfig:
        if self.strategy == "fsdp" and self.num_workers == 0:
            raise ValueError(
                "runtime.strategy=fsdp shards the model over Ray Train workers: set runtime.num_workers >= 1 "
                "(0 trains in-process, unsharded), or runtime.strategy=ddp"
            )
        return self

    @model_validator(mode="after")
    def _fused_logps_read_the_whole_head(self) -> RuntimeConfig:
        if self.strategy == "fsdp" and self.logp_kernel == "cce":
            raise ValueError(
                "runtime.logp_kernel=cce reads the whole lm_head weight, which runtime.strategy=fsdp shards over "
                "the workers; set runtime.logp_kernel=chunked (or auto, which picks chunked under fsdp), or "
                "runtime.strategy=ddp"
            )
        return self

    @field_validator("activation_checkpointing", "release_host_memory", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        """YAML reads a bare ``on`` / ``off`` as a boolean: take it as the word written."""
        return ("on" if value else "off") if isinstance(value, bool) else value


class CheckpointConfig(Strict):
    keep_last: int | None = _f(None, "keep the N newest checkpoints of each stage (null: keep all)", ge=1)


class SaveConfig(Strict):
    merged: bool = _f(
        False,
        "LoRA stages also save the merged full model in stages/<i>/model (else the adapter alone; full "
        "fine-tuning always saves the full model)",
    )


TRACKERS = ("tensorboard", "mlflow", "wandb")


def _options_on(value: Any) -> Any:
    """``true`` / ``false`` switch a tracker; a mapping of its options switches it on unless it says
    ``enabled: false``."""
    if isinstance(value, bool):
        return {"enabled": value}
    if isinstance(value, dict) and "enabled" not in value:
        return {**value, "enabled": True}
    return value


class MlflowConfig(Strict):
    enabled: bool = _f(False, "log to MLflow (one run per `revmix train` run / sweep trial)")
    tracking_uri: str | None = _f(None, "MLflow server or store URI (default: SQLite in the run/sweep dir)")
    experiment_name: str | None = _f(None, "MLflow experiment (default: the run's name / the sweep's name)")


class WandbConfig(Strict):
    enabled: bool = _f(False, "log to Weights & Biases (one run per `revmix train` run / sweep trial)")
    project: str = _f("revmix", "W&B project", min_length=1)
    mode: Literal["offline", "online", "disabled"] = _f(
        "offline", "offline: files only, no network (upload later with `wandb sync DIR`)"
    )
    dir: str | None = _f(None, "where W&B writes its wandb/ folder (default: <run>/tracking, <sweep dir>)")


class TrackingConfig(Strict):
    """Experiment trackers; ``[tensorboard, wandb]`` (a list of names) switches exactly those on."""

    tensorboard: bool = _f(True, "TensorBoard event files (<run>/tracking/tensorboard, one dir per trial)")
    mlflow: MlflowConfig = _f(MlflowConfig, "MLflow (true, or its options)")
    wandb: WandbConfig = _f(WandbConfig, "Weights & Biases (true, or its options)")

    @model_validator(mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        """A list of tracker names (or one name) is the mapping with exactly those on (``[]``: none)."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return value
        for name in value:
            if name not in TRACKERS:
                raise ValueError(
                    f"unknown tracker {name!r}; valid: {', '.join(TRACKERS)}{did_you_mean(name, TRACKERS)}"
                )
        return {name: name in value for name in TRACKERS}

    @field_validator("mlflow", "wandb", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        return _options_on(value)

    @property
    def enabled(self) -> list[str]:
        """Names of the trackers switched on, in :data:`TRACKERS` order."""
        on = {"tensorboard": self.tensorboard, "mlflow": self.mlflow.enabled, "wandb": self.wandb.enabled}
        return [name for name in TRACKERS if on[name]]


class ExperimentConfig(Strict):
    name: str = _f("experiment", "experiment label")
    seed: int = _f(0, "seed of the mixer, data order and dropout")
    model: ModelConfig = _f(ModelConfig, "policy model")
    data: DataConfig = _f(DataConfig, "training and held-out data")
    stages: list[StageConfig] = _f(
        [StageConfig()], "stages in order; each one's policy is the next's reference", min_length=1
    )
    runtime: RuntimeConfig = _f(RuntimeConfig, "Ray Train resources")
    checkpoint: CheckpointConfig = _f(CheckpointConfig, "what checkpoints are kept")
    save: SaveConfig = _f(SaveConfig, "what each stage saves: its LoRA adapter, or a merged model too")
    eval: EvalConfig = _f(EvalConfig, "evaluation during and after training")
    tracking: TrackingConfig = _f(TrackingConfig, "experiment trackers of `revmix train` (list or mapping)")

    @model_validator(mode="after")
    def _stages_can_run(self) -> ExperimentConfig:
        workers = max(self.runtime.num_workers, 1)
        for i, st in enumerate(self.stages):
            if st.steps is None and st.epochs is None:
                raise ValueError(f"stages.{i}: set either steps or epochs")
            if st.batch_size % (workers * st.grad_accum):
                raise ValueError(
                    f"stages.{i}.batch_size: {st.batch_size} is not divisible by num_workers × grad_accum = "
                    f"{workers * st.grad_accum}"
                )
        return self

    @model_validator(mode="after")
    def _pretrained_base_is_disjoint(self) -> ExperimentConfig:
        """A pretrained tiny base never saw this run's synthetic items (revmix.platform.pretrain)."""
        if self.model.base != "pretrained":
            return self
        if self.model.name_or_path is not None and not self.model.name_or_path.startswith("tiny:"):
            raise ValueError(
                f"model.base=pretrained builds a tiny model; model.name_or_path={self.model.name_or_path!r} "
                "names another (set model.base=random, or model.name_or_path=null / tiny:<scale>)"
            )
        if self.data.source != "synthetic":
            return self
        from revmix.platform.pretrain import check_disjoint

        check_disjoint(self.data.families, self.data.n_items, self.data.seed)
        return self

    @model_validator(mode="after")
    def _fsdp_covers_stages(self) -> ExperimentConfig:
        """What ``runtime.strategy: fsdp`` does not cover, refused before anything runs."""
        if self.runtime.strategy != "fsdp":
            return self
        from revmix.objectives.multitask import MultiTask

        for i, st in enumerate(self.stages):
            obj = st.objective
            if obj.needs_rollouts:
                raise ValueError(
                    f"stages.{i}.objective {obj.name!r} samples with the live weights, which "
                    "runtime.strategy=fsdp does not cover; use runtime.strategy=ddp"
                )
            if (isinstance(obj, MultiTask) and obj.gradient_surgery == "pcgrad") or st.grad_cosine_every:
                raise ValueError(
                    f"stages.{i}: gradient_surgery pcgrad and grad_cosine_every compute per-direction "
                    "gradients outside runtime.strategy=fsdp's sharded reduction; use runtime.strategy=ddp, "
                    f"or set stages.{i}.objective.gradient_surgery=none and stages.{i}.grad_cosine_every=0"
                )
        return self

    def stage_lora(self, i: int) -> bool:
        """Whether stage ``i`` trains a LoRA adapter (its own ``lora``, else ``model.lora.enabled``)."""
        own = self.stages[i].lora
        return self.model.lora.enabled if own is None else own

    def saves_full_model(self, i: int) -> bool:
        """Whether stage ``i`` writes ``stages/<i>/model``: full fine-tuning always, LoRA with
        ``save.merged``."""
        return not self.stage_lora(i) or self.save.merged


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (what ``config.yaml`` of a run holds)."""
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj


def build_config(
    raw: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = (), source: str = ""
) -> ExperimentConfig:
    """Apply overrides to a raw dict, then type-check and validate it (errors prefixed by ``source``)."""
    data = copy.deepcopy(dict(raw))
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    try:
        for p, v in items:
            set_path(data, p, v, ExperimentConfig)
        return validate(ExperimentConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def load_config(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> ExperimentConfig:
    """Load an experiment YAML and apply ``a.b.c=value`` overrides."""
    return build_config(load_raw(path), overrides, source=str(path))


def describe() -> list[str]:
    """One line per config path with its default and reason (``revmix train --help-config``)."""
    return describe_fields(ExperimentConfig)
