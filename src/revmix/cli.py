"""The ``revmix`` command line: ``revmix train | sweep | eval | data | report | serve | launch | objectives``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; this file
only dispatches, so ``revmix --help`` stays fast (no torch or ray import until a command runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("revmix.platform.train_cli", "train an experiment config (stages of objectives) on Ray Train"),
    "sweep": ("revmix.sweeps.cli", "run a Ray Tune sweep over config paths; writes results + report"),
    "eval": ("revmix.platform.evaluation.cli", "evaluate a model or run: benchmark accuracy and ALP"),
    "data": ("revmix.platform.data.cli", "synthesise, validate, convert and build reverse data"),
    "report": ("revmix.sweeps.report_cli", "turn a sweep directory into report.md / report.html"),
    "serve": ("revmix.platform.generation.serve_cli", "serve a model with an OpenAI-compatible API"),
    "launch": ("revmix.cluster.launch", "submit a revmix command to a Ray cluster (Jobs API)"),
    "objectives": (
        "revmix.objectives.cli",
        "list objectives; check a plug-in objective against the contract",
    ),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revmix",
        description="Sweeps and fine-tuning objectives for forward/reverse reasoning data, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(load=command)
    if command is None:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("revmix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
