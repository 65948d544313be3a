"""Training on Ray Train V2: the driver that runs an experiment's stages one after another.

:func:`run_experiment` prepares the data once, then fits one ``TorchTrainer`` per stage; every worker runs
the stage recipe (:mod:`revmix.platform.recipe`) on a typed :class:`~revmix.platform.recipe.StageJob`. A
LoRA stage ends by saving its adapter (``stages/<i>/adapter``) and the chain of base model and adapters
it completes (``stages/<i>/revmix_chain.json``); the next stage loads the base with every adapter merged
in memory and trains a fresh adapter on top — its reference policy is that model with the adapter
disabled. A full model (``stages/<i>/model``) is saved by full fine-tuning, or by LoRA stages with
``save.merged: true``; the next stage then starts from it.

``out_dir`` is a local/NFS folder or a bucket URI (:mod:`revmix.platform.storage`). The driver reads what a
stage produced (``result.json``, ``stopped.json``, checkpoints to resume from) from that store, never from
rank 0's local disk: rank 0 writes there (on a bucket: writes locally, then uploads) before it returns.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from revmix.config import ConfigError, ExperimentConfig, StageConfig
from revmix.platform.artifacts import ADAPTER_DIR, AdapterChain, fetch_local
from revmix.platform.checkpoint import latest_checkpoint, remove_stale_temporaries, stage_checkpoints
from revmix.platform.data.mixer import Mixer, schedule_from_config
from revmix.platform.data.prepare import PreparedData, prepare_experiment_data, to_ray_datasets
from revmix.platform.data.schema import DIRECTIONS
from revmix.platform.evaluation.hooks import (
    complete_stage_eval,
    eval_pending,
    evaluate_start,
    resolve_generator,
)
from revmix.platform.recipe import STOPPED, StageJob, train_loop_per_worker
from revmix.platform.run_dir import (
    RunDirError,
    RunExistsError,
    check_out_dir,
    check_resume_config,
    link_final_model,
    write_run,
)
from revmix.platform.storage import Store, open_store

__all__ = ["RunDirError", "RunExistsError", "TrainingStopped", "run_experiment", "stage_plan"]

START_EVAL = "start_eval.json"  # the starting model's evaluation (eval.at_start), kept for a resume


class TrainingStopped(RuntimeError):
    """A stage stopped early (a non-finite loss or gradient norm); its last good checkpoint is kept."""


def stage_plan(stage: StageConfig, n_items: int, n_forward: int, n_reverse: int) -> dict[str, Any]:
    """Steps and the mix of one stage (see the Mixer docstring for what ``reverse_fraction`` means)."""
    if stage.mix.mode == "union":
        per_epoch = n_forward + n_reverse
        schedule = schedule_from_config(stage.mix)
        r = n_reverse / per_epoch if per_epoch else 0.0
        schedule = type(schedule)(kind="constant", start=r, end=r)
    else:
        per_epoch = stage.mix.total or n_items
        schedule = schedule_from_config(stage.mix)
    if stage.steps is not None:
        steps = stage.steps
    else:
        assert stage.epochs is not None  # the config requires steps or epochs
        steps = max(1, math.ceil(stage.epochs * per_epoch / stage.batch_size))
    steps_per_epoch = max(1, round(per_epoch / stage.batch_size))
    return {"steps": steps, "steps_per_epoch": steps_per_epoch, "schedule": schedule}


@dataclass
class _Inputs:
    """What every stage shares: the base model, the prepared data and how the workers read it."""

    model_path: str
    data: PreparedData
    datasets: dict[str, Any] | None  # Ray datasets by direction (num_workers > 0)
    use_gpu: bool
    eval_rows: list[dict] | None


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path | Store,
    *,
    resume: bool = False,
    allow_changes: Sequence[str] = (),
    callbacks: list | None = None,
    evaluate: bool = True,
    on_report: Callable[[dict], None] | None = None,
) -> dict:
    """Run every stage of ``cfg`` into ``out_dir`` (a path, a URI or a :class:`Store`); returns (and
    writes) ``summary.json``.

    Nothing is written to ``out_dir`` before the directory (:mod:`revmix.platform.run_dir`), the config
    (on ``resume``: unchanged but for the ``allow_changes`` paths), the data and every stage's mix have
    passed their checks. ``on_report(record)`` is called with every step's metrics when the loop runs
    in-process (``num_workers = 0``), e.g. to forward them to Tune, or to interrupt the run by raising;
    with Ray workers pass ``callbacks`` instead. Raises :class:`TrainingStopped` when a stage stops on a
    non-finite loss or gradient norm.
    """
    out = open_store(out_dir)
    check_out_dir(out, resume)
    changes = check_resume_config(out, cfg, allow_changes) if resume else []
    t0 = time.perf_counter()
    inputs = _prepare_inputs(cfg, evaluate)
    run_cfg = resolve_generator(cfg, inputs.use_gpu) if evaluate and cfg.eval.at_stage_end else cfg
    write_run(out, cfg, changes)
    summary = _summary_head(cfg, out, inputs)
    if inputs.eval_rows and cfg.eval.at_start:
        summary["start_eval"] = _start_eval(cfg, out, inputs, resume)
    init_path, chain = inputs.model_path, AdapterChain(inputs.model_path)
    for i, stage in enumerate(cfg.stages):
        result = _run_stage(run_cfg, i, out, init_path, chain, inputs, resume, callbacks, on_report)
        summary["stages"].append(_stage_summary(stage, i, result))
        init_path, chain = out.url(stage_model(cfg, i)), _next_chain(cfg, i, chain)
    link_final_model(out, stage_model(cfg, len(cfg.stages) - 1))
    summary["final_model"] = init_path
    summary["wall_s"] = time.perf_counter() - t0
    summary["steps"] = sum(s["steps"] for s in summary["stages"])
    summary["final"] = summary["stages"][-1]["final"]
    summary["eval"] = summary["stages"][-1].get("eval")
    out.write("summary.json", json.dumps(summary, indent=1))
    return summary


def stage_model(cfg: ExperimentConfig, i: int) -> str:
    """Where stage ``i``'s model lies in the run: its full model, else its adapter stage folder (which
    :func:`revmix.platform.models.load_model` rebuilds as base + adapters merged in memory)."""
    return f"stages/{i}/model" if cfg.saves_full_model(i) else f"stages/{i}"


def _next_chain(cfg: ExperimentConfig, i: int, chain: AdapterChain) -> AdapterChain:
    """The chain the stage after ``i`` starts on: stage ``i``'s full model, or ``chain`` + its adapter.
    Starting from base + adapters merged in memory keeps a LoRA run free of full copies on disk."""
    if cfg.saves_full_model(i):
        return AdapterChain(f"stages/{i}/model", base_in_run=True)
    return chain.extend(f"stages/{i}/{ADAPTER_DIR}")


def _prepare_inputs(cfg: ExperimentConfig, evaluate: bool) -> _Inputs:
    """The base model and the checked, tokenised data; data problems raise here, before any write.
    The data comes from :func:`~revmix.platform.data.prepare.prepare_experiment_data`, the call a sweep's
    driver makes ahead of its trials, so both reach the same cache key."""
    model_path, _, data = prepare_experiment_data(cfg)
    check_mix(cfg, data)
    check_streamed(cfg, data)
    use_gpu = cfg.runtime.use_gpu if cfg.runtime.use_gpu is not None else torch.cuda.is_available()
    # Streamed data: every worker opens the cache entry's Parquet itself (StageJob.stream_dirs).
    datasets = to_ray_datasets(data, cfg.data) if cfg.runtime.num_workers > 0 and not data.streamed else None
    return _Inputs(model_path, data, datasets, use_gpu, data.test_rows if evaluate else None)


def check_streamed(cfg: ExperimentConfig, data: PreparedData) -> None:
    """A reference cache holds log-probs of every training row: only for data held in memory."""
    for i, stage in enumerate(cfg.stages):
        if data.streamed and stage.objective.needs_reference and stage.reference == "cache":
            raise ConfigError(
                f"stages.{i}.reference: 'cache' keeps every training row's reference log-probs, but the "
                f"{sum(len(r) for r in data.train.values())} training rows are streamed (above "
                f"data.stream_threshold_rows {cfg.data.stream_threshold_rows}); use 'adapter' or 'copy', or "
                "raise data.stream_threshold_rows"
            )


def check_mix(cfg: ExperimentConfig, data: PreparedData) -> None:
    """Every direction a stage's mix draws from has training rows (else the stage would fail at a step)."""
    have = {d: len(data.train[d]) for d in DIRECTIONS}
    for i, stage in enumerate(cfg.stages):
        plan = stage_plan(stage, data.n_items, have["forward"], have["reverse"])
        drawn = Mixer(stage.batch_size, plan["steps"], plan["schedule"]).consumed(plan["steps"])
        for d, n in zip(DIRECTIONS, drawn):
            if n and not have[d]:
                fix = "0" if d == "reverse" else "1"
                raise ConfigError(
                    f"stages.{i}.mix: the stage draws {n} {d} examples "
                    f"(reverse_fraction {stage.mix.reverse_fraction}, schedule {stage.mix.schedule.kind}) but "
                    f"the training split of data.source {cfg.data.source!r} has no {d} rows "
                    f"({have['forward']} forward, {have['reverse']} reverse); "
                    f"set stages.{i}.mix.reverse_fraction={fix} or add {d} rows"
                )


def _start_eval(cfg: ExperimentConfig, out: Store, inputs: _Inputs, resume: bool) -> dict[str, Any]:
    """``eval.at_start``'s evaluation, kept in the run (``start_eval.json``) so a resume does not redo it."""
    if resume and out.is_file(START_EVAL):
        return dict(json.loads(out.read_text(START_EVAL)))
    found = evaluate_start(cfg, inputs.model_path, inputs.eval_rows or [])
    out.write(START_EVAL, json.dumps(found, indent=1))
    return found


def _summary_head(cfg: ExperimentConfig, out: Store, inputs: _Inputs) -> dict[str, Any]:
    data = inputs.data
    return {
        "name": cfg.name,
        "out_dir": out.url(),
        "model": inputs.model_path,
        "data": {
            "train_items": data.n_items,
            "train_rows": {d: len(data.train[d]) for d in DIRECTIONS},
            "test_rows": len(data.test_rows),
            "truncated": data.truncated,  # direction -> {rows, tokens} cut to data.max_length
            "dropped": data.dropped,  # direction -> {rows, tokens} left out (data.truncation=drop)
            "rejected_rows": data.rejected,
        },
        "stages": [],
    }


def _run_stage(
    cfg: ExperimentConfig,
    i: int,
    out: Store,
    init_path: str,
    chain: AdapterChain,
    inputs: _Inputs,
    resume: bool,
    callbacks: list | None,
    on_report: Callable[[dict], None] | None,
) -> dict:
    """Fit one stage (or read its result when a resumed run already finished it); returns its result."""
    stage_dir = f"stages/{i}"
    data = inputs.data
    plan = stage_plan(cfg.stages[i], data.n_items, len(data.train["forward"]), len(data.train["reverse"]))
    if resume and out.is_file(f"{stage_dir}/result.json"):
        result = json.loads(out.read_text(f"{stage_dir}/result.json"))
        if result.get("steps") == plan["steps"]:  # else the stage grew (--allow-change stages.<i>.steps)
            return _with_stage_eval(cfg, result, out, i, inputs)
    out.delete_file(f"{stage_dir}/{STOPPED}")  # an earlier attempt's stop record
    if out.is_local:  # uploads to a bucket leave no temporaries (an object appears whole or not at all)
        remove_stale_temporaries(stage_checkpoints(out.local_path(), i))
    resume_from = latest_checkpoint(out, i) if resume else None
    in_process = cfg.runtime.num_workers == 0
    job = StageJob(
        cfg=cfg,
        stage_index=i,
        init_path=init_path,
        steps=plan["steps"],
        steps_per_epoch=plan["steps_per_epoch"],
        schedule=plan["schedule"],
        out_dir=out.local_path() if out.is_local else Path(),  # a bucket: each worker stages locally
        store=out,
        use_gpu=inputs.use_gpu,
        resume_from=resume_from.url() if resume_from is not None else None,
        inline_data=data.train if in_process and not data.streamed else None,
        stream_dirs={d: str(data.entry / d) for d in DIRECTIONS} if data.streamed and data.entry else None,
        eval_rows=inputs.eval_rows,
        on_report=on_report if in_process else None,
        chain=chain,
    )
    _fit(job, inputs.datasets, callbacks)
    if out.is_file(f"{stage_dir}/{STOPPED}"):
        raise TrainingStopped(json.loads(out.read_text(f"{stage_dir}/{STOPPED}"))["message"])
    return _with_stage_eval(cfg, json.loads(out.read_text(f"{stage_dir}/result.json")), out, i, inputs)


def _with_stage_eval(cfg: ExperimentConfig, result: dict, out: Store, i: int, inputs: _Inputs) -> dict:
    """The stage's result with the generation rank 0 left to the driver done (``eval.generator: vllm``).
    vLLM reads a full model from local disk: an adapter stage is merged into a temporary copy for it."""
    from revmix.platform.models import full_model_dir

    if inputs.eval_rows is None or not eval_pending(result):  # evaluation off (e.g. evaluate=False): pending
        return result
    with fetch_local(out, stage_model(cfg, i)) as stage, full_model_dir(stage) as model:
        done = complete_stage_eval(cfg, result, model, inputs.eval_rows, inputs.use_gpu)
    if done is not result:
        out.write(f"stages/{i}/result.json", json.dumps(done, indent=1))
    return done


def _fit(job: StageJob, datasets: dict[str, Any] | None, callbacks: list | None) -> None:
    """One ``TorchTrainer`` for the stage: workers, resources, storage, restarts and callbacks."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg, workers = job.cfg, job.cfg.runtime.num_workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=job.use_gpu,
            resources_per_worker={"CPU": cfg.runtime.cpus_per_worker} if workers else None,
        ),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-stage{job.stage_index}-{int(time.time() * 1000)}",
            **_ray_storage(cfg, job.store or Store(job.out_dir)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.runtime.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Not split: every worker reads every row and keeps its slice of each step's global batch
        # (revmix.platform.data.streams), so the data order does not depend on the number of workers.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]) if datasets else None,
    )
    trainer.fit()


def _ray_storage(cfg: ExperimentConfig, out: Store) -> dict[str, Any]:
    """Where Ray keeps its copies of the stage's checkpoints: ``<out>/ray`` on the run's own store, or
    ``runtime.storage_path`` when set (any path or URI)."""
    sp = cfg.runtime.storage_path
    if sp is None:
        return out.ray_storage("ray")
    return Store(sp if "://" in sp else Path(sp).expanduser().absolute()).ray_storage("")


def _stage_summary(stage: StageConfig, idx: int, result: dict) -> dict:
    final = result.get("final", {})
    by_dir = {
        d: {k.rsplit("/", 1)[0]: v for k, v in final.items() if k.endswith("/" + d)} for d in DIRECTIONS
    }
    return {
        "index": idx,
        "name": stage.name,
        "objective": stage.objective.name,
        "steps": result.get("steps"),
        "wall_s": result.get("wall_s"),
        "tokens": result.get("tokens"),
        "tokens_per_s": (result.get("tokens", 0) / result["wall_s"]) if result.get("wall_s") else None,
        "final": final,
        "final_by_direction": by_dir,
        "skipped_steps": result.get("skipped_steps", 0),
        "eval": result.get("eval"),
    }
