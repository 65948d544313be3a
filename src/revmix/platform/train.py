"""Training on Ray Train V2: the driver that runs an experiment's stages one after another.

:func:`run_experiment` prepares the data once, then fits one ``TorchTrainer`` per stage; every worker runs
the stage recipe (:mod:`revmix.platform.recipe`) on a typed :class:`~revmix.platform.recipe.StageJob`. A
stage ends by merging its LoRA adapter into a full model saved under ``stages/<i>/model``, which the next
stage loads and trains a fresh adapter on — its reference policy is that model with the adapter disabled.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from revmix.config import ExperimentConfig, StageConfig, to_dict
from revmix.platform.data.mixer import schedule_from_config
from revmix.platform.data.prepare import PreparedData, prepare_data, to_ray_datasets
from revmix.platform.data.schema import DIRECTIONS
from revmix.platform.recipe import CKPT_STATE, StageJob, train_loop_per_worker


class RunExistsError(RuntimeError):
    """The output directory already holds a run and ``--resume`` was not given."""


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


def latest_checkpoint(out_dir: Path, stage_idx: int) -> Path | None:
    root = out_dir / "checkpoints" / f"stage{stage_idx}"
    done = sorted(p for p in root.glob("step_*") if (p / CKPT_STATE).exists()) if root.exists() else []
    return done[-1] if done else None


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
    out_dir: str | Path,
    *,
    resume: bool = False,
    callbacks: list | None = None,
    evaluate: bool = True,
    on_report: Callable[[dict], None] | None = None,
) -> dict:
    """Run every stage of ``cfg`` into ``out_dir``; returns (and writes) ``summary.json``.

    ``on_report(record)`` is called with every step's metrics when the loop runs in-process
    (``num_workers = 0``), e.g. to forward them to Tune, or to interrupt the run by raising; with Ray
    workers pass ``callbacks`` instead.
    """
    out = _open_run_dir(cfg, Path(out_dir).expanduser().absolute(), resume)
    t0 = time.perf_counter()
    inputs = _prepare_inputs(cfg, evaluate)
    summary = _summary_head(cfg, out, inputs)
    init_path = inputs.model_path
    for i, stage in enumerate(cfg.stages):
        result = _run_stage(cfg, i, out, init_path, inputs, resume, callbacks, on_report)
        summary["stages"].append(_stage_summary(stage, i, result))
        init_path = str(out / "stages" / str(i) / "model")
    _link_final_model(out, len(cfg.stages))
    summary["wall_s"] = time.perf_counter() - t0
    summary["steps"] = sum(s["steps"] for s in summary["stages"])
    summary["final"] = summary["stages"][-1]["final"]
    summary["eval"] = summary["stages"][-1].get("eval")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _open_run_dir(cfg: ExperimentConfig, out_dir: Path, resume: bool) -> Path:
    """Refuse to overwrite a run (or to resume none); write the run's ``config.yaml``."""
    import yaml

    if (out_dir / "config.yaml").exists() and not resume:
        raise RunExistsError(
            f"{out_dir} already holds a run; pass --resume to continue it or choose a new --out"
        )
    if resume and not (out_dir / "config.yaml").exists():
        raise RunExistsError(f"--resume: {out_dir} holds no run to resume")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out_dir


def _prepare_inputs(cfg: ExperimentConfig, evaluate: bool) -> _Inputs:
    from revmix.platform.models import load_tokenizer, resolve_model_path

    model_path = resolve_model_path(cfg.model.name_or_path, cfg.model.scale, cfg.model.init_seed)
    tokenizer = load_tokenizer(model_path)
    data = prepare_data(cfg.data, tokenizer, tokenizer_id=model_path)
    use_gpu = cfg.runtime.use_gpu if cfg.runtime.use_gpu is not None else torch.cuda.is_available()
    datasets = to_ray_datasets(data, cfg.data) if cfg.runtime.num_workers > 0 else None
    return _Inputs(model_path, data, datasets, use_gpu, data.test_rows if evaluate else None)


def _summary_head(cfg: ExperimentConfig, out_dir: Path, inputs: _Inputs) -> dict[str, Any]:
    data = inputs.data
    return {
        "name": cfg.name,
        "out_dir": str(out_dir),
        "model": inputs.model_path,
        "data": {
            "train_items": data.n_items,
            "train_rows": {d: len(data.train[d]) for d in DIRECTIONS},
            "test_rows": len(data.test_rows),
            "truncated_rows": data.truncated,
            "rejected_rows": data.rejected,
        },
        "stages": [],
    }


def _run_stage(
    cfg: ExperimentConfig,
    i: int,
    out_dir: Path,
    init_path: str,
    inputs: _Inputs,
    resume: bool,
    callbacks: list | None,
    on_report: Callable[[dict], None] | None,
) -> dict:
    """Fit one stage (or read its result when a resumed run already finished it); returns its result."""
    result_path = out_dir / "stages" / str(i) / "result.json"
    if resume and result_path.exists():
        return json.loads(result_path.read_text())
    data = inputs.data
    plan = stage_plan(cfg.stages[i], data.n_items, len(data.train["forward"]), len(data.train["reverse"]))
    in_process = cfg.runtime.num_workers == 0
    job = StageJob(
        cfg=cfg,
        stage_index=i,
        init_path=init_path,
        steps=plan["steps"],
        steps_per_epoch=plan["steps_per_epoch"],
        schedule=plan["schedule"],
        out_dir=out_dir,
        use_gpu=inputs.use_gpu,
        resume_from=latest_checkpoint(out_dir, i) if resume else None,
        inline_data=data.train if in_process else None,
        eval_rows=inputs.eval_rows,
        on_report=on_report if in_process else None,
    )
    _fit(job, inputs.datasets, callbacks)
    return json.loads(result_path.read_text())


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
            storage_path=_storage_path(cfg, job.out_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.runtime.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all") if datasets else None,
    )
    trainer.fit()


def _storage_path(cfg: ExperimentConfig, out_dir: Path) -> str:
    sp = cfg.runtime.storage_path
    if sp is None:
        return str(out_dir / "ray")
    return sp if "://" in sp else str(Path(sp).expanduser().absolute())


def _link_final_model(out_dir: Path, n_stages: int) -> None:
    """``<out>/model`` points at the last stage's model."""
    final = out_dir / "model"
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    final.symlink_to(Path("stages") / str(n_stages - 1) / "model")


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
        "eval": result.get("eval"),
    }
