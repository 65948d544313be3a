"""``revmix report DIR``: rebuild ``results.parquet``/``results.csv`` and (re)write ``report.md`` and
``report.html`` for a sweep directory.

The table is rebuilt from ``trials/*/`` — the same table ``revmix sweep`` wrote, so lost or damaged
``results.*`` files come back — and on a killed sweep it shows the partial results before
``revmix sweep --resume``. A directory holding only ``results.*`` (no trial folders) is reported from them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="sweep directory (the --out of revmix sweep): a path or a bucket URI")


def run(args: argparse.Namespace) -> int:
    from revmix.platform.storage import open_store
    from revmix.sweeps import results as res

    store = open_store(args.dir)
    if not store.is_file("spec.json"):
        print(f"revmix report: {store} is not a sweep directory (no spec.json)", file=sys.stderr)
        return 2
    with res.local_record(store) as out:  # a bucket's record is read back into a staging folder
        code = _report(out)
    if code == 0:
        print(
            f"results: {store.url('results.csv')}\nreport: {store.url('report.html')}\n        {store.url('report.md')}"
        )
    return code


def _report(out: Path) -> int:
    from revmix.sweeps import results as res
    from revmix.sweeps.report import load_spec_for_dir, write_report

    spec = load_spec_for_dir(out)
    if res.has_trial_folders(out):
        table = res.rebuild_table(spec, out)
        res.write_table(table, out)
    else:
        try:
            table = res.read_table(out)
        except FileNotFoundError as e:
            print(
                f"revmix report: {e}; it has no trial folders (trials/*/trial.json) either", file=sys.stderr
            )
            return 2
    write_report(out, spec=spec, table=table)
    return 0
