"""``revmix report DIR``: (re)write ``report.md`` and ``report.html`` for a sweep directory.

Works on a finished sweep (reads ``results.parquet``) and on a killed one (rebuilds the rows from
``trials/*/``), so partial results can be looked at before ``revmix sweep --resume``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="sweep directory (the --out of revmix sweep)")


def run(args: argparse.Namespace) -> int:
    from revmix.sweeps.report import write_report

    out = Path(args.dir)
    if not (out / "spec.json").exists():
        print(f"revmix report: {out} is not a sweep directory (no spec.json)", file=sys.stderr)
        return 2
    path = write_report(out)
    print(f"report: {path}\n        {out / 'report.md'}")
    return 0
