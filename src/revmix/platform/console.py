"""A quiet console by default: revmix's own progress lines, not the libraries' bars, warnings and tables.

``revmix train`` and ``revmix sweep`` call :func:`quiet_libraries` with their ``--verbose`` flag; the
processes Ray starts (a Tune trial, a Ray Train worker) call it with ``None`` and read the flag from
``REVMIX_VERBOSE``, which the driver sets before Ray starts, so Ray's processes inherit it.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "REVMIX_VERBOSE"  # "1": the driver was given --verbose; Ray's processes inherit it
# transformers/peft/torch warn about their own deprecations (e.g. peft reading transformers'
# `is_gradient_checkpointing`) once per process, i.e. once per trial: nothing a revmix user can change.
NOISY_MODULES = r"(transformers|peft|torch)(\.|$)"
# INFO loggers that print a line per reported step ("Reported metrics: {...}"), per stage ("Running in
# local mode") or per checkpoint ("Checkpoint successfully created at: ...").
NOISY_LOGGERS = (
    "ray.train.v2._internal.execution.train_fn_utils",
    "ray.train.v2.api.config",
    "ray.train.v2._internal.execution.storage",
    "ray.train._internal.storage",
    # MLflow's SQLite store, made on a run's or sweep's first MLflow record ("Creating initial MLflow
    # database tables...", Alembic's migration lines)
    "mlflow.store.db.utils",
    "alembic.runtime.migration",
)


def quiet_libraries(verbose: bool | None = None) -> bool:
    """Turn the libraries' console noise off unless ``verbose``; returns the ``verbose`` in effect.

    Off: transformers' and huggingface_hub's progress bars ("Loading weights", "Writing model shards"),
    FutureWarning/UserWarning raised inside transformers, peft or torch (revmix's own warnings still
    show), Ray Train's per-step INFO lines, and MLflow's database set-up lines (W&B's banners are off
    by the settings :func:`revmix.platform.tracking.wandb_settings` gives it). ``verbose=True`` changes
    none of them. Ray Tune's tables are the sweep runner's to switch (``run_sweep(verbose=...)``).

    Args:
        verbose: the ``--verbose`` flag of a driver, also written to ``REVMIX_VERBOSE`` for the
            processes it starts; ``None`` in a process Ray started: read ``REVMIX_VERBOSE``.
    """
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    else:
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        return True
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # also huggingface_hub's bars
    for category in (FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return False


def format_eta(seconds: float) -> str:
    """``seconds`` left as ``1h02m``, ``3m05s`` or ``42s`` for a progress line (negative reads ``0s``)."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
