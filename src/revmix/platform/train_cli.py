"""``revmix train CONFIG [path=value ...] --out DIR [--resume]``."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (configs/runs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.lr=1e-3 model.scale=small")
    p.add_argument("--out", help="run directory (refused if it holds a run, unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation during and after training")
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
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # typos fail here, before Ray starts
        print(f"revmix train: config error: {e}", file=sys.stderr)
        return 2
    from revmix.platform.runtime import ensure_ray
    from revmix.platform.train import RunExistsError, run_experiment

    if cfg.runtime.num_workers > 0:
        ensure_ray()
    try:
        summary = run_experiment(cfg, args.out, resume=args.resume, evaluate=not args.no_eval)
    except RunExistsError as e:
        print(f"revmix train: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps({"out": os.path.abspath(args.out), "steps": summary["steps"], "final": summary["final"]})
    )
    return 0
