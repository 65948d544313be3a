"""``revmix objectives list [NAME ...]`` and ``revmix objectives check NAME [--json]``.

``list`` prints one block per objective — the built-ins, installed plug-ins, or the names given (import
paths too) — with each hyper-parameter's type, default, range and reason, read from its pydantic field.
``check`` runs the contract (:mod:`revmix.objectives.contract`) on the default instance of one objective,
typically a plug-in named ``pkg.module:ClassName``, and prints PASS / FAIL / SKIP per check.

Exit codes: 0 every check passed; 1 a check failed; 2 the objective could not be found or built.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from revmix.objectives.base import (
    Objective,
    UnknownObjective,
    build_objective,
    known_objective_names,
    objective_class,
    objective_names,
)
from revmix.objectives.contract import run_checks
from revmix.validation import ConfigError, bounds_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="objectives and their hyper-parameters (type, default, range, reason)")
    ls.add_argument("names", nargs="*", help="objectives to show (default: built-in and installed ones)")
    ck = sub.add_parser("check", help="run the objective contract on an objective's default instance")
    ck.add_argument("objective", help="pkg.module:ClassName, an installed plug-in's name, or a built-in")
    ck.add_argument("--json", action="store_true", help="print the results as one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            print("\n\n".join(describe(objective_class(n)) for n in args.names or known_objective_names()))
            return 0
        return _check(build_objective({"name": args.objective}), args.json)
    except (UnknownObjective, ConfigError) as e:
        print(f"revmix objectives {args.action}: {e}", file=sys.stderr)
        return 2


def _check(objective: Objective, as_json: bool) -> int:
    results = run_checks(objective)
    failed = [r for r in results if r.status == "fail"]
    if as_json:
        checks = [{"check": r.check, "status": r.status, "message": r.message} for r in results]
        print(json.dumps({"objective": objective.name, "passed": not failed, "checks": checks}, indent=1))
    else:
        for r in results:
            print(f"{r.status.upper():4}  {r.check}" + (f": {r.message}" if r.message else ""))
        counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
        print(f"{objective.name}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return 1 if failed else 0


def describe(cls: type[Objective]) -> str:
    """One block: the name and summary line, where the class comes from, and a table of its fields."""
    name = cls.model_fields["name"].default
    summary = next(iter((cls.__doc__ or "").strip().splitlines()), "")
    kind = "built-in" if name in objective_names() else "plug-in"
    rows = [
        (field, type_name(f.annotation), _default(f), value_range(f), f.description or "")
        for field, f in cls.model_fields.items()
        if field != "name"
    ]
    lines = [f"{name} — {summary}", f"  {kind}: {cls.__module__}:{cls.__qualname__}"]
    if not rows:
        return "\n".join([*lines, "  (no hyper-parameters)"])
    table = [("hyper-parameter", "type", "default", "range", "description"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4] for row in table]
    return "\n".join(line.rstrip() for line in lines)


def type_name(tp: Any) -> str:
    """A field type as a reader writes it: ``float``, ``forward | reverse | null``, ``list of RouteSpec``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (list, tuple, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        return f"list of {type_name(items[0])}" if items else "list"
    if origin is dict:
        return f"mapping to {type_name(args[1])}" if args else "mapping"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def value_range(f: FieldInfo) -> str:
    """The bounds of a number (``[0, 1)``, ``> 0``) or a list's least length (``>= 1 items``); ``-`` if none."""
    for c in f.metadata:
        if isinstance(c, at.MinLen) and c.min_length:
            return f">= {c.min_length} items"
    return bounds_text(f.metadata) or "-"


def _default(f: FieldInfo) -> str:
    default = f.get_default(call_default_factory=True)
    return "required" if default is PydanticUndefined else json.dumps(to_jsonable_python(default))
