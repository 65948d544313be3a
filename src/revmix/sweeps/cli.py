"""``revmix sweep FILE --out DIR [--resume [--retry-errored]] [--dry-run] [--max-concurrent N] [--verbose]``.

The whole sweep file is validated before Ray starts (a typo in a swept path fails in milliseconds, naming
the path and its close matches); ``--dry-run`` stops there and prints the trial list.

Exit status: 0 every trial finished; 1 some trial ended in ERROR (each listed on stderr with its error
file; the others' results and the report are written all the same); 2 a bad sweep file or ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="sweep YAML (configs/sweeps/*.yaml)")
    p.add_argument(
        "--out",
        help="sweep directory: a path or a bucket URI (s3://..., gs://...); a relative name goes under "
        "$REVMIX_STORAGE when set; refused if it exists, unless --resume",
    )
    p.add_argument("--resume", action="store_true", help="continue the killed/interrupted sweep in --out")
    p.add_argument(
        "--retry-errored",
        action="store_true",
        help="with --resume: also run the trials that ended in ERROR again, each from its run's last checkpoint",
    )
    p.add_argument("--dry-run", action="store_true", help="validate and print the trials; start nothing")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N", help="cap on concurrent trials")
    p.add_argument("--no-report", action="store_true", help="skip report.md/report.html at the end")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also Tune's status tables, model load/save progress bars and library warnings",
    )


def run(args: argparse.Namespace) -> int:
    from revmix.sweeps.plan import describe_plan
    from revmix.sweeps.spec import SweepError, load_sweep

    try:
        spec = load_sweep(args.file)
    except SweepError as e:
        print(f"revmix sweep: {e}", file=sys.stderr)
        return 2
    if args.max_concurrent is not None and args.max_concurrent < 1:
        print("revmix sweep: --max-concurrent must be >= 1", file=sys.stderr)
        return 2
    if args.dry_run:
        from revmix.sweeps.resources import plan_resources

        cluster = {"CPU": float(os.cpu_count() or 1), "GPU": float(_local_gpus())}
        plan = plan_resources(spec, cluster, max_concurrent=args.max_concurrent)
        print(describe_plan(spec, plan.note.replace("cluster", "this machine")))
        return 0
    if not args.out:
        print("revmix sweep: --out DIR is required (or --dry-run)", file=sys.stderr)
        return 2
    if args.retry_errored and not args.resume:
        print("revmix sweep: --retry-errored continues a sweep: pass --resume too", file=sys.stderr)
        return 2
    from revmix.platform.console import quiet_libraries
    from revmix.platform.storage import StorageError
    from revmix.sweeps.runner import SweepExistsError, run_sweep

    quiet_libraries(args.verbose)  # before Ray starts: its processes inherit the choice
    try:
        outcome = run_sweep(
            spec,
            args.out,
            resume=args.resume,
            retry_errored=args.retry_errored,
            max_concurrent=args.max_concurrent,
            write_report=not args.no_report,
            verbose=args.verbose,
        )
    except (SweepExistsError, StorageError) as e:
        print(f"revmix sweep: {e}", file=sys.stderr)
        return 2
    return _report_failures(outcome.table, outcome.out_dir)


def _report_failures(table: Any, out_dir: str) -> int:
    """Exit status 1, with each failed trial and its error file on stderr, when any trial ended in ERROR.

    A sweep with a failed trial is not a success even if the others finished: scripts and CI must see it.
    """
    from revmix.sweeps.results import failed_trials

    failed = failed_trials(table, out_dir)
    if not failed:
        return 0
    errors = dict(zip(table["trial_id"].astype(str), table["error"])) if "error" in table.columns else {}
    print(f"revmix sweep: {len(failed)} of {len(table)} trial(s) ended in ERROR:", file=sys.stderr)
    for trial_id, error_file in failed:
        print(f"  {trial_id}: {errors.get(trial_id)}\n    traceback: {error_file}", file=sys.stderr)
    return 1


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or CUDA broken: plan for CPUs
        return 0
