"""Experiment tracking for runs and sweeps: TensorBoard, MLflow and Weights & Biases (W&B).

One ``tracking`` setting (:class:`revmix.config.TrackingConfig`) switches them, in a run config and in a
sweep file alike: ``tracking: [tensorboard, mlflow, wandb]``, or a mapping with options
(``tracking: {wandb: {project: revmix, mode: offline}}``). Default: TensorBoard only.

Every step's record becomes named series: ``loss``, ``loss/forward``, ``nll/reverse``, ``mix/reverse_fraction``,
``alp/forward/margin`` (with ``eval.every_steps``), …; the end-of-run evaluation adds ``eval/…`` values.

- **Sweeps** use Ray Tune's logger callbacks (:func:`tune_callbacks`): ``TBXLoggerCallback`` writes event
  files into every trial's directory (``DIR/tune/<trial_id>/``, view with ``tensorboard --logdir DIR/tune``);
  ``MLflowLoggerCallback`` makes one MLflow run per trial in the experiment named after the sweep;
  ``WandbLoggerCallback`` one W&B run per trial, grouped (W&B ``group``) by the sweep's name.
- **Runs** (``revmix train``) use :mod:`revmix.platform.run_tracker`, which writes the same three from the
  records the driver receives, under ``<run>/tracking/``.

MLflow goes to SQLite (``DIR/mlflow.db``, artifacts under ``DIR/mlruns``; view with
``mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db``) unless ``tracking_uri`` names a server. Why
not the plain ``mlruns/`` file store: MLflow 3.x refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``, and
it stores a metric as a file named by the metric, so ``nll`` and ``nll/forward`` cannot both exist. An
explicit ``file:`` URI is still honoured (:func:`tracking_env` opts in), with that limitation.

W&B defaults to ``mode: offline``: the run folders (``<dir>/wandb/offline-run-*``) hold every metric and
need no network or API key; ``wandb sync <folder>`` uploads one later. Its console banners are off unless
``--verbose``.

Tune adds its own CSV/JSON/TensorBoard loggers unless told not to; the sweep runner sets
``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1`` and :func:`tune_callbacks` adds CSV and JSON (which Tune's
result analysis reads) itself, so ``tensorboard: false`` really means no event files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from revmix.config import MlflowConfig, TrackingConfig, WandbConfig

# MLflow metric names: letters, digits, and _ - . space : / (e.g. no "@")
_MLFLOW_BAD = re.compile(r"[^\w\-. :/]")


def mlflow_uri(mlflow: MlflowConfig, root: Path) -> str:
    """The tracking URI: the one given, else SQLite in ``root/mlflow.db``."""
    return mlflow.tracking_uri or f"sqlite:///{Path(root).absolute() / 'mlflow.db'}"


def mlflow_key(name: str) -> str:
    """``name`` as MLflow accepts a metric or param name (other characters become ``_``)."""
    return _MLFLOW_BAD.sub("_", name)


def ensure_mlflow_experiment(mlflow: MlflowConfig, root: Path, name: str) -> str:
    """The id of experiment ``name``; made with its artifacts in ``root/mlruns`` (MLflow's default would be
    ./mlruns of the working directory) when it is new and no server was named."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(mlflow, root))
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None if mlflow.tracking_uri else (Path(root).absolute() / "mlruns").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def wandb_settings(verbose: bool) -> dict[str, Any]:
    """``wandb.init(settings=...)``: no banners unless ``verbose``; never wraps the console or reads git."""
    return {"silent": not verbose, "console": "off", "disable_git": True, "save_code": False}


def wandb_dir(wandb: WandbConfig, root: Path) -> str:
    """Where W&B puts its ``wandb/`` folder: ``wandb.dir``, else ``root``."""
    return str(Path(wandb.dir).expanduser().absolute() if wandb.dir else Path(root).absolute())


def tracking_env(tracking: TrackingConfig, root: Path) -> dict[str, str]:
    """Environment the trackers need in the process that runs them.

    ``WANDB_MODE``: Ray's W&B callback asks for an API key unless the mode is offline or disabled.
    """
    env: dict[str, str] = {}
    if tracking.mlflow.enabled and mlflow_uri(tracking.mlflow, root).startswith("file:"):
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if tracking.wandb.enabled:
        env["WANDB_MODE"] = tracking.wandb.mode
    return env


def tune_callbacks(tracking: TrackingConfig, out_dir: Path, sweep_name: str, verbose: bool) -> list[Any]:
    """Tune callbacks for a sweep: CSV + JSON always, TensorBoard, MLflow and W&B as switched."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    callbacks: list[Any] = [CSVLoggerCallback(), JsonLoggerCallback()]
    if tracking.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if tracking.mlflow.enabled:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        name = tracking.mlflow.experiment_name or sweep_name
        if tracking.mlflow.tracking_uri is None:  # a server's experiments are the callback's to make
            ensure_mlflow_experiment(tracking.mlflow, out_dir, name)
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=mlflow_uri(tracking.mlflow, out_dir),
                experiment_name=name,
                tags={"revmix.sweep": sweep_name},
                save_artifact=False,
            )
        )
    if tracking.wandb.enabled:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(
            WandbLoggerCallback(
                project=tracking.wandb.project,
                group=sweep_name,
                mode=tracking.wandb.mode,
                dir=wandb_dir(tracking.wandb, out_dir),
                settings=wandb_settings(verbose),
            )
        )
    return callbacks
