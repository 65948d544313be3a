"""``revmix train CONFIG [path=value ...] --out DIR [--resume [--allow-change PATH ...]] [--verbose]``.

Exit codes: 0 done; 2 refused before anything was written to ``--out`` (a bad config value, a data
problem named ``FILE:LINE``, an ``--out`` that is not an empty directory or a run, a resume whose config
changed); 1 training stopped (a non-finite loss or gradient norm; the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from revmix.config import ExperimentConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (configs/runs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.lr=1e-3 model.scale=small")
    p.add_argument(
        "--out",
        help="run directory, a path or a bucket URI (s3://..., gs://...; a relative name goes under "
        "$REVMIX_STORAGE when set): new, empty, or a run to --resume (anything else is refused)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="PATH",
        help="with --resume: accept this changed config path (safe ones only, e.g. stages.0.steps to train more)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip evaluation during and after training")
    p.add_argument(
        "--verbose", action="store_true", help="also model load/save progress bars and library warnings"
    )
    p.add_argument(
        "--help-config", action="store_true", help="list every config path with its default and reason"
    )


def run(args: argparse.Namespace) -> int:
    from revmix.config import ConfigError, describe, load_config

    if args.help_config:
        print("\n".join(describe()))
        return 0
    if not args.config or not args.out:
        print("revmix train: CONFIG and --out DIR are required", file=sys.stderr)
        return 2
    if args.allow_change and not args.resume:
        print("revmix train: --allow-change is for --resume (a new run takes any config)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # typos and out-of-range numbers fail here, before Ray starts
        print(f"revmix train: config error: {e}", file=sys.stderr)
        return 2
    return _train(cfg, args)


def _train(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from revmix.config import ConfigError
    from revmix.platform.checkpoint import CheckpointError
    from revmix.platform.console import quiet_libraries
    from revmix.platform.data.loaders import DataError
    from revmix.platform.run_tracker import track_run
    from revmix.platform.runtime import ensure_ray
    from revmix.platform.storage import StorageError
    from revmix.platform.train import RunDirError, TrainingStopped, run_experiment

    quiet_libraries(args.verbose)  # before Ray starts: its workers inherit the choice
    if cfg.runtime.num_workers > 0:
        ensure_ray()
    try:
        with track_run(cfg, args.out, verbose=args.verbose) as tracking:  # cfg.tracking
            summary = run_experiment(
                cfg,
                args.out,
                resume=args.resume,
                allow_changes=args.allow_change,
                evaluate=not args.no_eval,
                callbacks=tracking.callbacks,
                on_report=tracking.on_report,
            )
            tracking.log_summary(summary)
    except (RunDirError, ConfigError, DataError, CheckpointError, TrainingStopped, StorageError) as e:
        prefix = {DataError: "data error: ", TrainingStopped: "stopped: "}.get(type(e), "")
        print(f"revmix train: {prefix}{e}", file=sys.stderr)
        return 1 if isinstance(e, (CheckpointError, TrainingStopped)) else 2  # 2: nothing was written
    print(json.dumps({"out": summary["out_dir"], "steps": summary["steps"], "final": summary["final"]}))
    return 0
