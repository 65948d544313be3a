"""Tracking of one ``revmix train`` run: every step's record into TensorBoard, MLflow and W&B.

The trackers are switched by the run config's ``tracking`` (see :mod:`revmix.platform.tracking`); their
files go under ``<run>/tracking/``::

    tensorboard/          event files (tensorboard --logdir <run>/tracking/tensorboard)
    mlflow.db, mlruns/    the MLflow run (SQLite) and its artifacts, unless tracking.mlflow.tracking_uri
    wandb/offline-run-*/  the W&B run (offline mode; ``wandb sync`` uploads it), unless tracking.wandb.dir
    state.json            the MLflow and W&B run ids and each stage's first global step (for --resume)

How the records reach the tracker: in-process (``runtime.num_workers: 0``) ``run_experiment`` calls
``on_report`` with each record in the driver, and :class:`RunTracker` runs there. With Ray Train workers,
:class:`TrackerCallback`, a Ray Train V2 ``UserCallback``, runs in Ray Train's controller after every
``ray.train.report``; it forwards rank 0's record (the only one with the held-out ALP values) to the
tracker, which then runs as a Ray actor pinned to the driver's node, so its files land in the run
directory the driver made. Ray Train V2's ``RunConfig`` takes only its own callbacks (not Tune's logger
callbacks); reading ``metrics.jsonl`` or ``Result.metrics_dataframe`` after a stage would show the series
only when the stage ends, and the file is rank 0's, possibly on another node.

Steps: step ``s`` of a stage is global step ``offset + s``, the offset being the last global step when
the stage's first record arrived, so stages follow one another on one axis. A resumed run reopens the
same MLflow and W&B runs, and TensorBoard hides the steps it repeats (``purge_step``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from revmix.atomic import atomic_write
from revmix.config import ExperimentConfig, MlflowConfig, TrackingConfig, WandbConfig, to_dict
from revmix.platform.storage import Store, is_uri, resolve_location, staging_dir
from revmix.platform.tracking import (
    ensure_mlflow_experiment,
    mlflow_key,
    mlflow_uri,
    tracking_env,
    wandb_dir,
    wandb_settings,
)

TRACKING_DIR = "tracking"  # in the run directory
STATE = "state.json"


def series(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a step's record, by name (``stage_name`` and the ``step`` axis itself left out)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class _Writer(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, failed: bool) -> None: ...


class _TensorBoard:
    def __init__(self, root: Path, first_step: int) -> None:
        from tensorboardX import SummaryWriter  # type: ignore[import-untyped]

        # purge_step: TensorBoard hides what an earlier attempt logged at this step or later
        self.writer = SummaryWriter(str(root / "tensorboard"), purge_step=first_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class _Mlflow:
    def __init__(self, opts: MlflowConfig, root: Path, name: str, config: dict, run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_uri(opts, root))
        if run_id is None:
            experiment = ensure_mlflow_experiment(opts, root, opts.experiment_name or name)
            tags = {"revmix.run_dir": str(root.parent)}
            run_id = self.client.create_run(experiment, run_name=name, tags=tags).info.run_id
            self._log_params(run_id, config)
        else:  # --resume: the same run (its params stay those it started with)
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _log_params(self, run_id: str, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(mlflow_key(k), json.dumps(v)[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class _Wandb:
    def __init__(
        self, opts: WandbConfig, root: Path, name: str, config: dict, run_id: str | None, verbose: bool
    ) -> None:
        import wandb

        where = wandb_dir(opts, root)
        Path(where).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=opts.project,
            name=name,
            id=run_id,
            resume="allow" if run_id else None,
            mode=opts.mode,
            dir=where,
            config=config,
            reinit="create_new",
            settings=wandb.Settings(**wandb_settings(verbose)),
        )
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config as ``{"stages.0.lr": 0.003, ...}``."""
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        tree = {str(i): v for i, v in enumerate(tree)}
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


class RunTracker:
    """One run's trackers. Their files open at the first record, so a run refused by its checks (a bad
    ``--out``, a data error) leaves nothing behind."""

    def __init__(
        self, tracking: TrackingConfig, out_dir: str | Path, name: str, config: dict, verbose: bool = False
    ) -> None:
        self.tracking, self.name, self.config, self.verbose = tracking, name, config, verbose
        self.root = Path(out_dir).expanduser().absolute() / TRACKING_DIR
        self.writers: list[_Writer] | None = None
        self.state: dict[str, Any] = {}

    def log(self, record: dict[str, Any]) -> None:
        """One step's record (``stage``, ``step`` and its metrics) at its global step."""
        if self.writers is None:
            self._load_state()
        offsets = self.state.setdefault("offsets", {})
        offset = offsets.setdefault(str(int(record.get("stage", 0))), int(self.state.get("last", 0)))
        step = offset + int(record["step"])
        self.state["last"] = step
        if self.writers is None:
            self._open(step)
        self._write(series(record), step)

    def log_final(self, metrics: dict[str, float]) -> None:
        """End-of-run values (the evaluation's ``eval/…``) at the last step logged."""
        if self.writers is not None and metrics:
            self._write(metrics, int(self.state.get("last", 0)))

    def close(self, failed: bool = False) -> None:
        for writer in self.writers or []:
            writer.close(failed)
        self.writers = None

    def _write(self, metrics: dict[str, float], step: int) -> None:
        assert self.writers is not None
        for writer in self.writers:
            writer.log(metrics, step)
        atomic_write(self.root / STATE, json.dumps(self.state))

    def _load_state(self) -> None:
        path = self.root / STATE
        self.state = json.loads(path.read_text()) if path.exists() else {}

    def _open(self, first_step: int) -> None:
        """The switched trackers; MLflow and W&B reopen the runs ``state.json`` names (``--resume``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.environ.update(tracking_env(self.tracking, self.root))
        t, writers = self.tracking, list[_Writer]()
        if t.tensorboard:
            writers.append(_TensorBoard(self.root, first_step))
        if t.mlflow.enabled:
            mlflow = _Mlflow(t.mlflow, self.root, self.name, self.config, self.state.get("mlflow_run_id"))
            self.state["mlflow_run_id"] = mlflow.run_id
            writers.append(mlflow)
        if t.wandb.enabled:
            run_id = self.state.get("wandb_run_id")
            wandb = _Wandb(t.wandb, self.root, self.name, self.config, run_id, self.verbose)
            self.state["wandb_run_id"] = wandb.run_id
            writers.append(wandb)
        self.writers = writers


def _tracker_callback(actor: Any) -> Any:
    """A Ray Train V2 callback that hands rank 0's record of every report to the tracker ``actor``."""
    from ray.train.v2.api.callback import UserCallback

    class TrackerCallback(UserCallback):
        def __init__(self, actor: Any) -> None:
            self.actor = actor

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            import ray

            ray.get(self.actor.log.remote(metrics[0]))  # waited for: in order, before the stage ends

    return TrackerCallback(actor)


@dataclass
class RunTracking:
    """What ``run_experiment`` takes to track a run, and the end-of-run hook."""

    callbacks: list[Any] | None  # Ray Train callbacks (Ray workers)
    on_report: Callable[[dict], None] | None  # in-process runs
    log_summary: Callable[[dict], None]


def _final_metrics(summary: dict) -> dict[str, float]:
    """A run's summary as end-of-run series: evaluation and totals (``final/*`` are the last step's)."""
    from revmix.sweeps.results import flatten_summary

    return {k: v for k, v in flatten_summary(summary).items() if not k.startswith("final/")}


def _tracker_actor(args: tuple[Any, ...]) -> tuple[RunTracking, Callable[[bool], None]]:
    """The tracker as a Ray actor on the driver's node, fed by :func:`_tracker_callback`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor: Any = ray.remote(RunTracker).options(num_cpus=0, scheduling_strategy=here).remote(*args)

    def log_summary(summary: dict) -> None:
        ray.get(actor.log_final.remote(_final_metrics(summary)))

    def close(failed: bool) -> None:
        ray.get(actor.close.remote(failed))
        ray.kill(actor)

    return RunTracking([_tracker_callback(actor)], None, log_summary), close


@contextlib.contextmanager
def track_run(cfg: ExperimentConfig, out_dir: str | Path, verbose: bool = False) -> Iterator[RunTracking]:
    """The trackers of ``cfg.tracking`` for a run into ``out_dir``: in the driver for an in-process run,
    else as a Ray actor. Closed on exit; an exception marks the MLflow run FAILED and the W&B run's exit
    code 1. On a bucket the trackers write into a local folder on the driver's node (they need a file
    system), downloaded from the bucket first on a resume and uploaded to ``<run>/tracking`` at the end."""
    location = resolve_location(out_dir)
    if not cfg.tracking.enabled or not is_uri(location):
        with _track_into(cfg, location, verbose) as tracking:
            yield tracking
        return
    store, local = Store(location), staging_dir("tracking")
    try:
        if store.is_dir(TRACKING_DIR):
            store.download(TRACKING_DIR, local / TRACKING_DIR)
        with _track_into(cfg, local, verbose) as tracking:
            yield tracking
    finally:
        if (local / TRACKING_DIR).is_dir():
            store.upload(local / TRACKING_DIR, TRACKING_DIR)
        shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def _track_into(cfg: ExperimentConfig, out_dir: str | Path, verbose: bool) -> Iterator[RunTracking]:
    if not cfg.tracking.enabled:
        yield RunTracking(None, None, lambda summary: None)
        return
    args = (cfg.tracking, out_dir, cfg.name, to_dict(cfg), verbose)
    if cfg.runtime.num_workers == 0:
        tracker = RunTracker(*args)
        tracking = RunTracking(None, tracker.log, lambda s: tracker.log_final(_final_metrics(s)))
        close: Callable[[bool], None] = tracker.close
    else:
        tracking, close = _tracker_actor(args)
    try:
        yield tracking
    except BaseException:
        close(True)
        raise
    close(False)
