"""The stage recipe: one training stage on one Ray Train worker, read top to bottom.

``TorchTrainer`` runs :func:`train_loop_per_worker` on every worker with the driver's :class:`StageJob`;
it applies the stage's host-memory setting (``runtime.release_host_memory``,
:mod:`revmix.platform.host_memory`; undone when the stage ends), builds a :class:`StageRecipe` and calls
its steps in order:

1. :meth:`~StageRecipe.setup` — runtime (threads, device, seed), model (policy + tokenizer, LoRA),
   objective and reference, the model forward passes go through (length groups, DDP or FSDP), optimizer and LR
   schedule, data (Mixer, per-direction streams, reference cache), and the step function (supervised, or
   PPO's with a rollout engine);
2. :meth:`~StageRecipe.resume` — from Ray's checkpoint after a worker-group restart, or from the run's own
   checkpoint (``revmix train --resume``);
3. :meth:`~StageRecipe.train` — Mixer → rows → step → LR scheduler, every step's record to
   ``metrics.jsonl``, Ray and the job's ``on_report``; evaluation and checkpoints on schedule. A
   non-finite loss or gradient norm stops the stage (``runtime.on_nonfinite: stop``): rank 0 writes
   ``stages/<i>/stopped.json`` naming the step, the driver raises, and the last good checkpoint stays;
4. :meth:`~StageRecipe.cleanup` — frees the rollout engine (a vLLM engine's memory) before what follows;
5. :meth:`~StageRecipe.finish` — evaluate, detach training-only heads, save the stage's artifact: a LoRA
   stage its adapter and adapter chain (the merged model too with ``save.merged``), full fine-tuning the
   full model.

A checkpoint (:mod:`revmix.platform.checkpoint`) holds the trainable weights, optimizer, scheduler, the
Mixer's state and the last metrics record, written by rank 0 (with ``runtime.strategy: fsdp`` every
worker writes its shards of the weights and optimizer; at the stage's end the model is gathered whole to
rank 0, which evaluates and saves it).

A run on a bucket (:mod:`revmix.platform.storage`): each worker works in a local staging folder (the
stage's start model, the checkpoint to resume from and ``metrics.jsonl`` are downloaded into it first);
rank 0 uploads what it writes — each checkpoint (marker last) with ``metrics.jsonl``, the stop record,
and at the end the stage's adapter or model, then ``result.json`` last, which the driver reads from the
bucket. A stage starting from an adapter stage downloads its chain's run folders (adapters, base).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from revmix.atomic import atomic_write
from revmix.config import ExperimentConfig, RuntimeConfig, StageConfig
from revmix.objectives.base import LogpKernel, Objective, PolicyForward, Reference
from revmix.objectives.reference import ReferenceLogpCache
from revmix.objectives.surgery import trainable_parameters
from revmix.platform.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    publish_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    stage_checkpoints,
)
from revmix.platform.console import format_eta, quiet_libraries
from revmix.platform.data.mixer import Mixer, Schedule
from revmix.platform.data.schema import DIRECTIONS
from revmix.platform.data.streams import (
    DirectionStream,
    ExampleStream,
    open_direction_stream,
    row_id,
    worker_slice,
)
from revmix.platform.data.tokenize import collate
from revmix.platform.host_memory import release_wanted, released_host_memory
from revmix.platform.rollout.engines import RolloutEngine, build_rollout_engine
from revmix.platform.rollout.objective import RolloutObjective, check_rollout_objective
from revmix.platform.run_dir import truncate_metrics
from revmix.platform.step import (
    SKIPPED,
    NonFiniteStep,
    StepContext,
    mean_over_workers,
    nonfinite,
    supervised_step,
)
from revmix.platform.storage import Store, local_copy, staging_dir

if TYPE_CHECKING:
    from revmix.platform.artifacts import AdapterChain

STOPPED = "stopped.json"  # in stages/<i>/: why the stage stopped early (read by the driver)


class StageStopped(RuntimeError):
    """The stage stops early; the message names the stage, the step and what to change."""


@dataclass
class StageJob:
    """One stage for the workers, built by :func:`revmix.platform.train.run_experiment`."""

    cfg: ExperimentConfig
    stage_index: int
    init_path: str  # the model the stage starts from (the previous stage's, or the run's base model)
    steps: int
    steps_per_epoch: int
    schedule: Schedule  # the Mixer's reverse fraction over the stage
    out_dir: Path  # the local folder rank 0 writes into: the run's, or a worker's staging folder
    use_gpu: bool
    store: Store | None = None  # the run's store when it is not ``out_dir`` itself (a bucket)
    resume_from: str | Path | None = None  # a checkpoint of this stage (``--resume``): a path or URI
    inline_data: dict[str, list[dict]] | None = None  # rows by direction when num_workers is 0
    stream_dirs: dict[str, str] | None = None  # direction -> tokenised Parquet folder, for streamed data
    eval_rows: list[dict] | None = None  # held-out rows; None: no evaluation
    on_report: Callable[[dict], None] | None = None  # every step's record, rank 0, in-process runs only
    chain: AdapterChain | None = None  # ``init_path`` as base + adapters, run-relative (None: init_path)

    @property
    def stage(self) -> StageConfig:
        return self.cfg.stages[self.stage_index]


def train_loop_per_worker(config: dict[str, StageJob]) -> None:
    """What ``TorchTrainer`` runs on each worker: ``config["job"]`` is the stage (see the module docstring).

    Rank 0 writes the stage's result to ``stages/<i>/result.json`` on the run's store, where the driver
    reads it."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    with contextlib.ExitStack() as local:
        job = _staged(config["job"], rank, local)
        local.enter_context(
            released_host_memory(host_memory_release(job.cfg.runtime, job.use_gpu, rank == 0))
        )
        recipe = StageRecipe(job, rank, context.get_world_size())
        recipe.setup()
        try:
            recipe.resume()
            recipe.train()
        except StageStopped as stop:  # returned, not raised: Ray would restart the workers into the same step
            recipe.record_stop(str(stop))
            return
        finally:
            recipe.cleanup()
        recipe.finish()


def host_memory_release(runtime: RuntimeConfig, use_gpu: bool, log: bool = False) -> bool:
    """Whether a stage's worker gives freed host memory straight back (``runtime.release_host_memory``,
    :mod:`revmix.platform.host_memory`); ``log``: one line when it does."""
    from revmix.platform.models import checkpointing_wanted

    device = _device(use_gpu).type
    on = release_wanted(
        runtime.release_host_memory, device, checkpointing_wanted(runtime.activation_checkpointing, device)
    )
    if on and log:
        print(
            "host memory: freed blocks of 128 KiB or more go back to the OS (runtime.release_host_memory)",
            flush=True,
        )
    return on


def _remote(job: StageJob) -> Store | None:
    """The run's store when it is off this machine's disk (files then go through a staging folder)."""
    return job.store if job.store is not None and not job.store.is_local else None


def _staged(job: StageJob, rank: int, local: contextlib.ExitStack) -> StageJob:
    """The job with local paths: for a run on a bucket, a staging folder (removed when ``local`` closes)
    holding the stage's start model, the checkpoint to resume from and (rank 0) the run's metrics."""
    store = _remote(job)
    if store is None:
        return job
    work = staging_dir(f"stage{job.stage_index}-rank{rank}")
    local.callback(shutil.rmtree, work, ignore_errors=True)
    if rank == 0 and store.is_file("metrics.jsonl"):
        store.download("metrics.jsonl", work / "metrics.jsonl")
    return dataclasses.replace(
        job,
        out_dir=work,
        init_path=str(local.enter_context(_fetch(store, job.init_path))),
        resume_from=local.enter_context(_fetch(store, job.resume_from)) if job.resume_from else None,
    )


@contextlib.contextmanager
def _fetch(store: Store, location: str | Path) -> Any:
    """A local copy of ``location``: through the run's store when it lies there (an adapter stage with the
    run folders its chain names), else by its own URI."""
    from revmix.platform.artifacts import fetch_local

    prefix = store.url() + "/"
    if not str(location).startswith(prefix):
        with local_copy(location) as path:
            yield path
        return
    with fetch_local(store, str(location)[len(prefix) :]) as path:
        yield path


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    return f


class StageRecipe:
    """One stage on one worker: :meth:`setup`, :meth:`resume`, :meth:`train`, :meth:`cleanup`, :meth:`finish`."""

    def __init__(self, job: StageJob, rank: int, world: int) -> None:
        self.job, self.cfg, self.stage = job, job.cfg, job.stage
        self.rank, self.world = rank, world
        self.start_step = 0
        self.tokens_total = 0
        # Steps skipped on a non-finite loss or gradient norm (runtime.on_nonfinite: skip_step).
        self.skipped_steps = 0
        self.last: dict[str, Any] = {}  # the latest value of every key, also of those absent from a step
        self.t_start = time.perf_counter()
        self.seconds_before = 0.0  # training seconds of earlier attempts (from the checkpoint resumed)
        self.engine: RolloutEngine | None = None  # the rollout engine of an objective that samples

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        self._setup_runtime()
        self._setup_model()
        self._setup_objective()
        self._setup_forward()
        self._setup_optimizer()
        self._setup_data()
        self._setup_step()
        self._setup_trace()

    def _setup_runtime(self) -> None:
        quiet_libraries()  # a Ray worker's console: the driver's --verbose reaches it via REVMIX_VERBOSE
        if self.cfg.runtime.torch_threads:
            torch.set_num_threads(self.cfg.runtime.torch_threads)
        self.device = _device(self.job.use_gpu)
        torch.manual_seed(self.cfg.seed + 1000 * self.job.stage_index + self.rank)

    def _setup_model(self) -> None:
        self.lora = self.cfg.model.lora.enabled if self.stage.lora is None else self.stage.lora
        self.policy, self.tokenizer = _build_policy(
            self.cfg, self.job.init_path, self.device, self.lora, log=self.rank == 0
        )

    def _setup_objective(self) -> None:
        path = f"stages.{self.job.stage_index}.objective"
        self.objective: Objective = self.stage.objective  # typed and validated with the config
        self.rollout_objective: RolloutObjective | None = None  # the objective, as the rollout step sees it
        if self.objective.needs_rollouts:
            self.rollout_objective = check_rollout_objective(self.objective, path)
        self.ref: Reference | None = None
        if self.objective.needs_reference:
            groups = self.cfg.runtime.length_buckets
            self.ref = _make_reference(self.stage.reference, self.policy, self.lora, groups)

    def _setup_forward(self) -> None:
        """The model forward passes go through, and what objectives may ask of it (decided here, once)."""
        self.objective.prepare_policy(self.policy)  # e.g. PPO's value head: before DDP and the optimizer
        groups = self.cfg.runtime.length_buckets
        self.train_model: torch.nn.Module = self.policy
        if groups > 1 and not self.objective.needs_rollouts:  # PPO's passes read the value head's input
            from revmix.objectives.buckets import LengthBucketedLM

            self.train_model = LengthBucketedLM(self.policy, groups)
        self.sharded = self.cfg.runtime.strategy == "fsdp"
        if self.sharded:  # FSDP2 shards the policy in place; the bucketed wrapper calls it as before
            self._shard_policy()
        elif self.world > 1:  # DDP wraps the bucketed model: still one forward per backward
            import ray.train.torch as rtt

            self.train_model = rtt.prepare_model(self.train_model, move_to_device=False)
        from revmix.platform.models import LOGP_KERNEL_SCOPE, choose_logp_kernel

        kernel, why = choose_logp_kernel(
            self.cfg.runtime.logp_kernel, self.device, self.cfg.runtime.strategy, self.policy
        )
        if self.rank == 0:
            scope = f"; {LOGP_KERNEL_SCOPE}" if kernel == "cce" else ""
            print(f"log-probs: {kernel} ({why}){scope}", flush=True)
        self.policy_forward = policy_forward(
            self.policy, groups, self.world, self.cfg.runtime.packing, logp_kernel=kernel
        )

    def _shard_policy(self) -> None:
        """``runtime.strategy: fsdp`` (:mod:`revmix.platform.fsdp`; the config refuses the objectives it does
        not cover)."""
        from revmix.platform import fsdp

        if _remote(self.job) is not None:
            raise ValueError(
                "runtime.strategy=fsdp writes sharded checkpoints into one folder every worker sees; "
                "a run on a bucket is not supported yet: use a local or shared run folder, or ddp"
            )
        fsdp.shard_policy(self.policy, self.device, bf16=self._bf16())

    def _bf16(self) -> bool:
        """bf16 compute: ``runtime.precision`` bf16, or auto on a GPU."""
        precision = self.cfg.runtime.precision
        return precision == "bf16" or (precision == "auto" and self.device.type == "cuda")

    def _setup_optimizer(self) -> None:
        self.trainable = trainable_parameters(self.policy)
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=self.stage.lr, weight_decay=self.stage.weight_decay
        )
        schedule = lr_lambda(self.stage.warmup_steps, self.job.steps, self.stage.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _setup_data(self) -> None:
        """The Mixer and one stream per direction, all over the *global* batch and the same on every worker
        (seeds without the rank; each worker reads every row), so a step's rows do not depend on the number
        of workers: each worker keeps its slice of them (:meth:`_optimizer_step`)."""
        seed = self.cfg.seed
        self.mixer = Mixer(self.stage.batch_size, self.job.steps, self.job.schedule, seed=seed * 7919)
        if self.job.stream_dirs is not None:  # large data: read a window at a time, never held whole
            sources: dict[str, Any] = dict(self.job.stream_dirs)
        elif self.job.inline_data is not None:
            sources = dict(self.job.inline_data)
        else:
            import ray.train

            sources = {d: ray.train.get_dataset_shard(d) for d in DIRECTIONS}  # unsplit: all rows
        self.streams = {d: open_direction_stream(d, seed * 104729, sources[d]) for d in DIRECTIONS}
        self.ref_cache: ReferenceLogpCache | None = None
        if self.ref is not None and self.stage.reference == "cache":  # small data only (train.check_streamed)
            rows: dict[str, list[dict]] = {d: _held(self.streams[d]) for d in DIRECTIONS}
            self.ref_cache = _reference_cache(self.ref, rows, self.tokenizer, self.job.init_path, self.device)

    def _setup_step(self) -> None:
        self.ctx = StepContext(
            policy=self.policy,
            train_model=self.train_model,
            ref=self.ref,
            objective=self.objective,
            optimizer=self.optimizer,
            trainable=self.trainable,
            tokenizer=self.tokenizer,
            device=self.device,
            stage=self.stage,
            world=self.world,
            autocast=self._bf16(),
            micro=self.stage.batch_size // self.world // self.stage.grad_accum,
            with_other="other_response" in self.objective.requires,
            seed=self.cfg.seed * 31,
            rank=self.rank,
            on_nonfinite=self.cfg.runtime.on_nonfinite,
            ref_cache=self.ref_cache,
            policy_forward=self.policy_forward,
        )
        self.step_fn: Callable[[StepContext, list[dict], int], tuple[dict[str, float], int]] = supervised_step
        if self.rollout_objective is not None:  # one engine per stage; it gets the live weights every step
            from revmix.platform.rollout.step import ppo_step

            self.engine = build_rollout_engine(  # every request is seeded: the engine's seed is the run's
                self.rollout_objective,
                self.policy,
                self.tokenizer,
                self.job.init_path,
                self.cfg.seed,
                hf_batch_size=self.ctx.micro,  # one sampling call per micro-batch of the global batch
            )
            self.step_fn = functools.partial(ppo_step, engine=self.engine)

    def _setup_trace(self) -> None:
        """With ``runtime.trace``: this worker's pid (for tests that kill it) and an empty row log."""
        self.trace_dir: Path | None = None
        if self.cfg.runtime.trace:
            self.trace_dir = self.job.out_dir / "stages" / str(self.job.stage_index) / "trace"
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.trace_dir / f"rank{self.rank}.pid", str(os.getpid()))

    def _trace_rows(self, step: int, rows: list[dict]) -> None:
        """Append the row ids this worker trained on at ``step`` (a replayed step appends again: the last
        record of a step is the one that counts)."""
        if self.trace_dir is None:
            return
        record = {"step": step + 1, "rank": self.rank, "world": self.world, "rows": [row_id(r) for r in rows]}
        with open(self.trace_dir / f"rows.rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ resume

    def resume(self) -> None:
        """Restore a checkpoint (a restart's from Ray, else the job's) and skip the rows it consumed.

        Rank 0 also cuts ``metrics.jsonl`` back to the checkpoint's step: the steps after it run again.
        """
        import ray.train

        ckpt = ray.train.get_checkpoint()
        state = None
        if ckpt is not None:
            with _own_copy(ckpt, self.rank) as restart_dir:
                state = load_checkpoint(restart_dir, self.policy, self.optimizer, self.scheduler)
        elif self.job.resume_from is not None:
            state = load_checkpoint(Path(self.job.resume_from), self.policy, self.optimizer, self.scheduler)
        drawn_by = self.mixer
        if state is not None:
            drawn_by = self._mixer_of(state["mixer"])
            self.start_step = drawn_by.check_state(state["mixer"])
            self.tokens_total = int(state.get("tokens", 0))
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.seconds_before = float(state.get("train_s", 0.0))
            self.last = dict(state.get("last", {}))
        for d, n in zip(DIRECTIONS, drawn_by.consumed(self.start_step)):
            self.streams[d].skip(n)
        if self.rank == 0:
            truncate_metrics(self.job.out_dir / "metrics.jsonl", self.job.stage_index, self.start_step)

    def _mixer_of(self, state: dict[str, Any]) -> Mixer:
        """The Mixer that drew the checkpoint's rows: this one, or, when the stage has since grown
        (``--allow-change stages.<i>.steps``), one over the checkpoint's own number of steps."""
        total = int(state.get("total_steps", self.job.steps))
        if total == self.job.steps:
            return self.mixer
        return Mixer(self.mixer.batch_size, total, self.job.schedule, seed=self.mixer.seed)

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        """Every remaining step; its record goes to ``metrics.jsonl``, Ray and the job's ``on_report``."""
        import ray.train

        self.t_start = time.perf_counter()
        for step in range(self.start_step, self.job.steps):
            try:
                record = self._record(step, self._optimizer_step(step))
            except NonFiniteStep as bad:
                raise StageStopped(self._stop_message(step, bad)) from None
            self.skipped_steps += int(record.get(SKIPPED, 0))
            if self._evaluation_due(step):
                record.update(self._evaluate(alp_only=True))
            self._log(step, record)
            self.last = {**self.last, **record}  # before the checkpoint, which stores it
            ray.train.report(record, checkpoint=self._save_checkpoint_if_due(step))
            if self.rank == 0 and self.job.on_report is not None:
                self.job.on_report(record)

    def _stop_message(self, step: int, bad: NonFiniteStep) -> str:
        i = self.job.stage_index
        kept = latest_checkpoint(self.job.out_dir, i)
        return (
            f"stage {i} ({self.stage.name}), step {step + 1}/{self.job.steps}: non-finite {bad}; the run "
            f"stopped (runtime.on_nonfinite=stop). Last good checkpoint: {kept or 'none (no step saved yet)'}. "
            f"Lower stages.{i}.lr, check the data, or set runtime.on_nonfinite=skip_step to skip such steps"
        )

    def record_stop(self, message: str) -> None:
        """Rank 0 leaves the reason in ``stages/<i>/stopped.json``, where the driver reads it."""
        if self.rank == 0:
            stage_dir = self.job.out_dir / "stages" / str(self.job.stage_index)
            stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(stage_dir / STOPPED, json.dumps({"message": message}))
            self._publish("metrics.jsonl", f"stages/{self.job.stage_index}/{STOPPED}")

    def _optimizer_step(self, step: int) -> dict[str, float]:
        """One step on this worker's slice of the Mixer's global rows for ``step``; its metrics averaged
        over the workers. Every worker draws the whole global batch, so every stream stays at the same
        position on every worker (and a resume skips ``Mixer.consumed`` on each)."""
        t0 = time.perf_counter()
        dirs = self.mixer.directions(step)
        rows = worker_slice([next(self.streams[DIRECTIONS[d]]) for d in dirs], self.rank, self.world)
        self._trace_rows(step, rows)
        metrics, n_tokens = self.step_fn(self.ctx, rows, step)
        bad = nonfinite(metrics)
        if bad and not metrics.get(SKIPPED):  # a step function that applied its update before the check
            raise NonFiniteStep(bad)
        self.scheduler.step()
        dt = time.perf_counter() - t0
        self.tokens_total += n_tokens
        n_rev = sum(dirs)
        metrics.update(
            {
                "lr": float(self.scheduler.get_last_lr()[0]),
                "tokens_per_s": n_tokens / dt if dt > 0 else 0.0,
                "mix/reverse_fraction": n_rev / len(dirs),
                "mix/n_reverse": float(n_rev),
                "mix/n_forward": float(len(dirs) - n_rev),
            }
        )
        if self.stage.grad_cosine_every and (step + 1) % self.stage.grad_cosine_every == 0:
            cos = self._gradient_cosine(rows)
            if cos is not None:
                metrics["grad_cosine/forward_reverse"] = cos
        return mean_over_workers(metrics)

    def _gradient_cosine(self, rows: list[dict]) -> float | None:
        from revmix.objectives.surgery import direction_gradient_cosine

        batch = collate(rows, self.tokenizer.pad_token_id, with_other=self.ctx.with_other)
        batch.policy_forward = self.policy_forward
        return direction_gradient_cosine(self.policy, self.objective, batch.to(self.device), self.ref)

    def _record(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "stage": self.job.stage_index,
            "stage_name": self.stage.name,
            "step": step + 1,
            "epoch": round((step + 1) / self.job.steps_per_epoch, 4),
            **metrics,
        }

    def _evaluation_due(self, step: int) -> bool:
        """ALP on the held-out slice (rank 0) every ``eval.every_steps`` steps or at each epoch's end."""
        every = self.cfg.eval.every_steps
        epoch_end = (step + 1) % self.job.steps_per_epoch == 0
        due = bool(every and (step + 1) % every == 0) or (self.cfg.eval.every_epoch and epoch_end)
        # Under FSDP a forward pass is collective: every worker evaluates, rank 0 records.
        return (self.rank == 0 or self.sharded) and bool(self.job.eval_rows) and due

    def _evaluate(self, alp_only: bool) -> dict[str, Any]:
        from revmix.platform.evaluation.hooks import evaluate_policy

        rows = self.job.eval_rows or []
        return evaluate_policy(self.cfg, rows, self.policy, self.tokenizer, alp_only=alp_only)

    def _log(self, step: int, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.job.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if (step + 1) % max(self.stage.log_every, 1) == 0 or step + 1 == self.job.steps:
            loss = record.get("loss", float("nan"))
            # ETA: this attempt's mean seconds per step (evaluation included) times the steps left
            done = step + 1 - self.start_step
            eta = (time.perf_counter() - self.t_start) / max(done, 1) * (self.job.steps - step - 1)
            print(
                f"[stage {self.job.stage_index}:{self.stage.name}] step {step + 1}/{self.job.steps} "
                f"loss {loss:.4f} rev {record.get('mix/reverse_fraction', 0):.2f} "
                f"tok/s {record.get('tokens_per_s', 0):.0f} eta {format_eta(eta)}",
                flush=True,
            )

    def _save_checkpoint_if_due(self, step: int) -> Any:
        """A Ray checkpoint (rank 0) every ``checkpoint_every`` steps and at the stage's last step, else None.

        It holds everything the stage's result needs (the last record, tokens, seconds), so a run
        resumed from its last step still writes a complete summary; ``checkpoint.keep_last`` prunes.
        """
        every = self.stage.checkpoint_every
        due = step + 1 == self.job.steps or bool(every and (step + 1) % every == 0)
        if not due or (self.rank != 0 and not self.sharded):  # a sharded one is written by every worker
            return None
        import ray.train

        path = checkpoint_path(self.job.out_dir, self.job.stage_index, step + 1)
        state = {
            "stage": self.job.stage_index,
            "mixer": self.mixer.state(step + 1),
            "tokens": self.tokens_total,
            "skipped_steps": self.skipped_steps,
            "train_s": self._train_seconds(),
            "last": self.last,
        }
        if self.sharded:
            save_sharded_checkpoint(path, self.policy, self.optimizer, self.scheduler, state, self.rank)
            if self.rank != 0:
                return None
        else:
            save_checkpoint(path, self.policy, self.optimizer, self.scheduler, state)
        keep = self.cfg.checkpoint.keep_last
        prune_checkpoints(stage_checkpoints(self.job.out_dir, self.job.stage_index), keep)
        store = _remote(self.job)
        if store is not None:  # the bucket's copy: metrics up to this step, then the checkpoint, then pruning
            self._publish("metrics.jsonl")
            publish_checkpoint(path, store.child(path.relative_to(self.job.out_dir).as_posix()))
            prune_checkpoints(stage_checkpoints(store, self.job.stage_index), keep)
        return ray.train.Checkpoint.from_directory(str(path))

    def _publish(self, *rels: str) -> None:
        """Upload files or folders rank 0 wrote under ``out_dir`` to the run's bucket (a no-op locally)."""
        store = _remote(self.job)
        if store is None:
            return
        for rel in rels:
            if (self.job.out_dir / rel).exists():
                store.upload(self.job.out_dir / rel, rel)

    def _train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t_start

    # ------------------------------------------------------------------ cleanup and finish

    def cleanup(self) -> None:
        """Close the rollout engine, so a vLLM engine's memory is free for the stage's evaluation and save."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def finish(self) -> dict[str, Any]:
        """The stage's result; rank 0 also evaluates and saves the stage model and ``result.json``."""
        result: dict[str, Any] = {
            "final": self.last,
            "wall_s": self._train_seconds(),
            "tokens": self.tokens_total,
            "steps": self.job.steps,
            "start_step": self.start_step,
            "skipped_steps": self.skipped_steps,
        }
        if self.sharded:  # from here on rank 0 evaluates and saves the whole model, unsharded
            self.policy = self._consolidated_policy()
        if self.rank == 0:
            if self.job.eval_rows and self.cfg.eval.at_stage_end:
                result["eval"] = self._evaluate(alp_only=False)
            self._save_stage_model(result)
        return result

    def _consolidated_policy(self) -> Any:
        """The trained model gathered whole on rank 0 (collective), loaded into a fresh unsharded policy
        on this worker's device; the other workers keep their shards (they neither evaluate nor save)."""
        from revmix.platform import fsdp

        full = fsdp.full_state_dict(self.policy)
        if self.rank != 0:
            return self.policy
        policy, _ = _build_policy(self.cfg, self.job.init_path, self.device, self.lora)
        policy.load_state_dict(full)
        return policy

    def _save_stage_model(self, result: dict[str, Any]) -> None:
        """A LoRA stage saves its adapter and the chain it completes (``stages/<i>/adapter``,
        ``revmix_chain.json``); a full model (``stages/<i>/model``) with full fine-tuning or
        ``save.merged``. ``result.json`` last: the driver takes it as the stage's end."""
        from revmix.platform.artifacts import ADAPTER_DIR, CHAIN_FILE, AdapterChain
        from revmix.platform.models import merge_lora, save_adapter, save_model

        self.objective.release_policy(self.policy)  # heads only training needs stay out of the model
        i = self.job.stage_index
        stage_dir = self.job.out_dir / "stages" / str(i)
        stage_dir.mkdir(parents=True, exist_ok=True)
        saved: list[str] = []
        if self.lora:
            start = self.job.chain or AdapterChain(self.job.init_path)
            save_adapter(self.policy, start.extend(f"stages/{i}/{ADAPTER_DIR}"), stage_dir)
            saved += [f"stages/{i}/{ADAPTER_DIR}", f"stages/{i}/{CHAIN_FILE}"]
        if self.cfg.saves_full_model(i):
            save_model(merge_lora(self.policy), self.tokenizer, stage_dir / "model")
            saved.append(f"stages/{i}/model")
        atomic_write(stage_dir / "result.json", json.dumps(result, indent=1))
        self._publish("metrics.jsonl", *saved, f"stages/{i}/result.json")


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _held(stream: ExampleStream) -> list[dict]:
    """The rows of a stream held in memory (the materialised path); a streamed one has none to give."""
    if not isinstance(stream, DirectionStream):
        raise TypeError("the reference cache needs the training rows in memory; this data is streamed")
    return stream.rows


def _device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch as rtt

        try:
            return rtt.get_device()
        except Exception:
            return torch.device("cuda")
    return torch.device("cpu")


def policy_forward(
    policy: torch.nn.Module,
    length_groups: int,
    world: int,
    packing: bool = False,
    logp_kernel: str = "chunked",
) -> PolicyForward:
    """What objectives may ask of the policy's forward pass. Shared-prompt DPO rows need an attention
    kernel that honours a boolean 4-D mask (sdpa, eager); with ``flash_attention_2`` (or flex attention)
    DPO falls back to concatenated pairs. DDP allows one forward call per backward: one length group.
    ``packing`` (``runtime.packing``): the packed layout the kernel takes (a ``ValueError`` when it takes
    none; :func:`revmix.objectives.packing.packing_mode`). ``logp_kernel``: the response log-prob kernel
    :func:`revmix.platform.models.choose_logp_kernel` chose."""
    from revmix.objectives.packing import packing_mode
    from revmix.objectives.prefix import supports_shared_prompt

    if logp_kernel not in typing.get_args(LogpKernel):
        raise ValueError(
            f"unknown logp_kernel {logp_kernel!r}; valid: {', '.join(typing.get_args(LogpKernel))}"
        )
    return PolicyForward(
        shared_prompt=supports_shared_prompt(policy),
        length_groups=length_groups if world == 1 else 1,
        packing=packing_mode(policy) if packing else "off",
        logp_kernel=typing.cast(LogpKernel, logp_kernel),
    )


def _build_policy(
    cfg: ExperimentConfig, init_path: str, device: torch.device, lora: bool, log: bool = False
) -> tuple[Any, Any]:
    """The policy (attention kernel and activation checkpointing as configured, LoRA when asked) and its
    tokenizer; ``log``: print one line naming the attention kernel and why it was chosen."""
    from revmix.platform.models import (
        LoraSpec,
        apply_activation_checkpointing,
        apply_lora,
        choose_attn_implementation,
        load_model,
        load_tokenizer,
    )

    dtype = cfg.model.dtype
    if dtype == "auto":  # FSDP keeps fp32 shards for the optimizer and computes in bf16 (fsdp.shard_policy)
        gpu_bf16 = device.type == "cuda" and cfg.runtime.strategy != "fsdp"
        dtype = "bfloat16" if gpu_bf16 else "float32"
    attn, why = choose_attn_implementation(cfg.model.attn_implementation, device)
    model: Any = load_model(init_path, dtype=dtype, device=device, attn_implementation=attn)
    # Before the adapter: on the base model, so the PeftModel's forward goes through checkpointed layers.
    checkpointing = apply_activation_checkpointing(model, cfg.runtime.activation_checkpointing, device)
    if log:
        print(
            f"attention: {attn} ({why}); activation checkpointing: {'on' if checkpointing else 'off'}",
            flush=True,
        )
    if lora:
        lo = cfg.model.lora
        model = apply_lora(model, LoraSpec(lo.r, lo.alpha, lo.dropout, tuple(lo.target_modules)))
    return model, load_tokenizer(init_path)


def _make_reference(kind: str, policy: torch.nn.Module, lora: bool, length_groups: int) -> Reference:
    """The stage's reference policy: the stage-start model, as the adapter-disabled view or a copy."""
    from revmix.objectives.reference import AdapterDisabledReference, FrozenCopyReference

    if kind in ("auto", "cache"):  # the cache is filled from the cheapest live reference, then used instead
        kind = "adapter" if lora else "copy"
    if kind == "adapter":
        if not lora:
            raise ValueError(
                "stages.*.reference: 'adapter' needs model.lora.enabled=true; use 'copy' or 'cache'"
            )
        return AdapterDisabledReference(policy, length_groups)
    return FrozenCopyReference(policy, length_groups)


def _reference_cache(
    ref: Reference, rows: dict[str, list[dict]], tokenizer: Any, init_path: str, device: torch.device
) -> ReferenceLogpCache:
    """Reference log-probs of every training row, computed once per (model, tokenizer, rows' tokens) and
    cached; the key hashes the reference weights' bytes and every token of every row, so edited data, a
    new ``max_length`` or chat template, or other weights never read a stale file (saved atomically)."""
    from revmix.objectives.reference import cache_key
    from revmix.platform.data.cache import cache_root, tokenizer_identity
    from revmix.platform.models import model_identity

    all_rows = [r for d in DIRECTIONS for r in rows[d]]
    key = cache_key(model_identity(init_path), tokenizer_identity(tokenizer), all_rows)
    cache = ReferenceLogpCache(cache_root() / "ref_logps", key)
    if not cache.load():
        for i in range(0, len(all_rows), 32):
            cache.fill(ref, collate(all_rows[i : i + 32], tokenizer.pad_token_id).to(device))
        cache.save()
    return cache


@contextlib.contextmanager
def _own_copy(ckpt: Any, rank: int) -> typing.Iterator[Path]:
    """A restart checkpoint downloaded into a directory of this rank's own, removed afterwards.

    Ray's ``Checkpoint.to_directory()`` without a path shares one directory per checkpoint between the
    processes of a node, and a rank that takes its file lock after another rank's download has finished
    downloads again over the files that rank is reading (a torn ``optim.pt``). A private directory
    cannot be written under a reader.
    """
    import tempfile

    local = Path(tempfile.mkdtemp(prefix=f"revmix-restart-rank{rank}-"))
    try:
        yield Path(ckpt.to_directory(str(local)))
    finally:
        shutil.rmtree(local, ignore_errors=True)
