"""``revmix data validate | synth | convert [| reverse]``: check, generate and convert canonical rows.

Exit codes: 0 success, 1 bad data (problems printed as ``FILE:LINE: field: what was expected``), 2 usage
errors (unknown family, unsupported output suffix, missing optional module).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from revmix.platform.data.loaders import (
    SOURCE_FORMS,
    DataError,
    LoadReport,
    load_rows,
    write_jsonl,
    write_parquet,
)
from revmix.platform.data.validate import check_file

WRITERS: dict[str, Callable[[list[dict[str, Any]], str], int]] = {
    ".jsonl": write_jsonl,
    ".parquet": write_parquet,
}


def _validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        result = check_file(path, require_pairs=args.require_pairs)
        for problem in result.problems:
            print(problem)
        print(result.summary())
        bad += bool(result.problems)
    if len(args.files) > 1:
        print(f"{len(args.files) - bad} of {len(args.files)} files OK")
    return 1 if bad else 0


def _synth(args: argparse.Namespace) -> int:
    from revmix.platform.data.synthetic import family_names

    names = family_names()
    if args.list:
        print("\n".join(names))
        return 0
    families = [f.strip() for spec in args.family or [] for f in spec.split(",") if f.strip()]
    given = (("--family", bool(families)), ("--n", args.n is not None), ("--out", bool(args.out)))
    missing = [flag for flag, present in given if not present]
    if missing:
        print(f"revmix data synth: {', '.join(missing)} required (or --list)", file=sys.stderr)
        return 2
    unknown = [f for f in families if f not in names]
    if unknown:
        print(f"revmix data synth: unknown family {unknown}; valid: {', '.join(names)}", file=sys.stderr)
        return 2
    kw = {"n": args.n, "seed": args.seed}
    return _load_and_write("revmix data synth", f"synthetic:{','.join(families)}", kw, args.out)


def _write_report(report: LoadReport, out: str) -> int:
    writer = WRITERS[Path(out).suffix]
    try:
        n = writer(report.rows, out)
    except DataError as err:  # e.g. every row rejected under --skip-invalid: nothing to write
        print(err, file=sys.stderr)
        for problem in report.rejected:
            print(f"rejected: {problem}", file=sys.stderr)
        return 1
    print(f"wrote {n} rows to {out} ({report.summary()})")
    for problem in report.rejected:
        print(f"rejected: {problem}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    if args.format != "canonical":  # s1K / r1k layouts: the converters a run's data.format uses
        from revmix.platform.data.formats import load_formatted

        try:
            report = load_formatted(
                args.source, args.format, split=args.split, skip_invalid=args.skip_invalid
            )
        except DataError as err:
            print(err, file=sys.stderr)
            return 1
        except ValueError as err:
            print(f"revmix data convert: {err}", file=sys.stderr)
            return 2
        return _write_report(report, args.out)
    kw: dict[str, Any] = {"skip_invalid": args.skip_invalid, "require_pairs": args.require_pairs}
    if args.source.startswith("hf:"):
        kw["split"] = args.split
        if args.field_map:
            pairs = [pair.split("=", 1) for pair in args.field_map.split(",")]
            if any(len(p) != 2 for p in pairs):
                print(
                    f"revmix data convert: expected --field-map a=b[,c=d], got {args.field_map!r}",
                    file=sys.stderr,
                )
                return 2
            kw["field_map"] = dict(pairs)
    elif args.field_map:
        print("revmix data convert: --field-map only applies to hf: sources", file=sys.stderr)
        return 2
    return _load_and_write("revmix data convert", args.source, kw, args.out)


def _load_and_write(command: str, source: str, kw: dict[str, Any], out: str) -> int:
    """Exit 1 for bad rows (every problem printed), 2 for a bad source or option."""
    try:
        report = load_rows(source, **kw)
    except DataError as err:
        print(err, file=sys.stderr)
        return 1
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"{command}: {err}", file=sys.stderr)
        return 2
    return _write_report(report, out)


def _out_path(value: str) -> str:
    if Path(value).suffix not in WRITERS:
        raise argparse.ArgumentTypeError(f"expected a {' or '.join(WRITERS)} file, got {value!r}")
    return value


def _add_reverse(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from revmix.platform.data import reverse_builder

    help_text = "build reverse twins of forward rows with a teacher model"
    p = sub.add_parser("reverse", help=help_text, description=help_text)
    reverse_builder.add_arguments(p)
    p.set_defaults(data_run=reverse_builder.run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    p = sub.add_parser("validate", help="check canonical JSONL/Parquet files; exit 1 on any problem")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--require-pairs", action="store_true", help="every reverse row needs a forward twin")
    p.set_defaults(data_run=_validate)

    p = sub.add_parser("synth", help="generate the synthetic forward/reverse task family")
    p.add_argument("--family", action="append", help="family name (repeat or comma-separate)")
    p.add_argument("--n", type=int, help="number of items to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=_out_path, help="output FILE.jsonl or FILE.parquet")
    p.add_argument("--list", action="store_true", help="list the family names and exit")
    p.set_defaults(data_run=_synth)

    p = sub.add_parser("convert", help="load any source, validate, write canonical JSONL/Parquet")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_FORMS)
    p.add_argument("--out", required=True, type=_out_path, help="FILE.jsonl or FILE.parquet")
    p.add_argument("--skip-invalid", action="store_true", help="drop bad rows, report how many")
    p.add_argument("--require-pairs", action="store_true")
    p.add_argument("--split", default="train", help="split for hf: sources")
    p.add_argument("--field-map", help="hf: column renames, e.g. question=prompt,solution=response")
    p.add_argument(
        "--format",
        choices=("canonical", "s1k", "r1k"),
        default="canonical",
        help="source layout: s1k (question + thinking trace → forward rows), r1k (the paper's pairs)",
    )
    p.set_defaults(data_run=_convert)

    _add_reverse(sub)
    parser.set_defaults(data_parser=parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "data_run", None) is None:
        args.data_parser.print_help(sys.stderr)
        return 2
    return int(args.data_run(args) or 0)
