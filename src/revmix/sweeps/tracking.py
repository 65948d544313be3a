"""Experiment tracking for sweeps: TensorBoard and MLflow as Ray Tune logger callbacks.

Both are switched in the sweep file (``tracking: {tensorboard: true, mlflow: false}``):

- TensorBoard: ``ray.tune.logger.TBXLoggerCallback`` writes event files into every trial's Tune directory
  (``DIR/tune/<trial_id>/``); view with ``tensorboard --logdir DIR/tune``.
- MLflow: ``ray.air.integrations.mlflow.MLflowLoggerCallback``, one run per trial with its swept values as
  params and every reported metric as a series. By default runs go to SQLite in ``DIR/mlflow.db`` and
  artifacts under ``DIR/mlruns`` (view with ``mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db``);
  ``tracking: {mlflow: {tracking_uri: ..., experiment_name: ...}}`` sends them to a server instead.

  Why not the plain ``mlruns/`` file store: MLflow 3.x refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``,
  and it stores a metric as a file named by the metric, so ``nll`` and ``nll/forward`` cannot both exist.
  An explicit ``file:`` URI is still honoured (:func:`tracking_env` opts in), with that limitation.
  ``mlflow-skinny`` is enough: SQLite needs SQLAlchemy and Alembic, which optuna brings.

Tune adds its own CSV/JSON/TensorBoard loggers unless told not to; we set
``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1`` for the fit and add CSV and JSON (which Tune's result analysis
reads) ourselves, so ``tensorboard: false`` really means no event files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from revmix.sweeps.spec import TrackingSpec


def mlflow_uri(tracking: TrackingSpec, out_dir: Path) -> str:
    """The tracking URI: the one given, else SQLite in ``DIR/mlflow.db``."""
    return tracking.mlflow_tracking_uri or f"sqlite:///{Path(out_dir).absolute() / 'mlflow.db'}"


def _ensure_mlflow_experiment(uri: str, name: str, out_dir: Path) -> None:
    """Create the experiment with its artifacts in ``DIR/mlruns`` (MLflow's default is ./mlruns of the cwd)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=(Path(out_dir).absolute() / "mlruns").as_uri())


def tracking_env(tracking: TrackingSpec, out_dir: Path) -> dict[str, str]:
    """Environment the tracking callbacks need in the driver while the sweep runs."""
    if tracking.mlflow and mlflow_uri(tracking, out_dir).startswith("file:"):
        return {"MLFLOW_ALLOW_FILE_STORE": "true"}
    return {}


def tracking_callbacks(tracking: TrackingSpec, out_dir: Path, sweep_name: str) -> list[Any]:
    """Tune callbacks for the sweep: CSV + JSON always, TensorBoard and MLflow as switched."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    callbacks: list[Any] = [CSVLoggerCallback(), JsonLoggerCallback()]
    if tracking.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if tracking.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri, name = mlflow_uri(tracking, out_dir), tracking.mlflow_experiment or sweep_name
        if tracking.mlflow_tracking_uri is None:
            _ensure_mlflow_experiment(uri, name, out_dir)
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=uri,
                experiment_name=name,
                tags={"revmix.sweep": sweep_name},
                save_artifact=False,
            )
        )
    return callbacks
