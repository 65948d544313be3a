"""One swept path of a sweep's ``space``: its distribution, as written in a sweep file and as Ray Tune runs it.

``{grid: [...]}`` and ``{choice: [...]}`` list values; ``{uniform: [low, high]}``, ``{loguniform: [low,
high]}`` and ``{randint: [low, high]}`` give a range (``randint`` includes both ends; Tune's own excludes
the upper one). ``link: [paths]`` gives more paths the same value (SFT and DPO stages at the same reverse
fraction); the results table has one column per swept path, not per link.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from revmix.validation import SweepError, did_you_mean

DISTRIBUTIONS: tuple[str, ...] = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Distribution:
    """One swept path: ``grid``/``choice`` hold values; the others a ``(low, high)`` range."""

    kind: str
    values: tuple[Any, ...]
    links: tuple[str, ...] = ()  # more paths that take the same value (r of every stage, say)

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def probe_values(self) -> list[Any]:
        """Values pushed through ``build_config`` at validation: every discrete value, both range ends."""
        return list(self.values) if self.kind in ("grid", "choice") else [self.values[0], self.values[1]]

    def representative(self) -> Any:
        return self.values[0]

    def to_tune(self) -> Any:
        """The Ray Tune search-space object (imported lazily: validation must not need Ray)."""
        from ray import tune

        if self.kind in ("grid", "choice"):
            return (tune.grid_search if self.is_grid else tune.choice)(list(self.values))
        low, high = self.values
        if self.kind == "randint":
            return tune.randint(low, high + 1)  # ours is inclusive, Tune's upper bound is exclusive
        return (tune.uniform if self.kind == "uniform" else tune.loguniform)(low, high)

    def describe(self) -> str:
        if self.kind in ("grid", "choice"):
            text = f"{self.kind} " + json.dumps(list(self.values))
        else:
            text = f"{self.kind}[{self.values[0]}, {self.values[1]}]"
        return text + (f" (also {', '.join(self.links)})" if self.links else "")

    def to_dict(self) -> dict[str, Any]:
        """The sweep-file form (``parse_distribution`` reads it back)."""
        return {self.kind: list(self.values), **({"link": list(self.links)} if self.links else {})}


def plain_value(v: Any) -> Any:
    """numpy scalars (Tune samples them) → Python scalars, which the typed config accepts."""
    return v.item() if isinstance(v, np.generic) else v


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_distribution(path: str, value: Any, where: str) -> Distribution:
    """``{grid: [...]}`` etc. → :class:`Distribution`; malformed ones raise naming ``where: space.path``."""
    at = f"{where}: space.{path}"
    links: Any = ()
    if isinstance(value, dict) and "link" in value:
        value = dict(value)
        links = [value.pop("link")] if isinstance(value.get("link"), str) else value.pop("link")
        if not isinstance(links, list) or not links or not all(isinstance(x, str) and x for x in links):
            raise SweepError(f"{at}.link: expected a list of config paths that take the same value")
        if path in links or len(set(links)) != len(links):
            raise SweepError(f"{at}.link: repeats a path")
    if not isinstance(value, dict) or len(value) != 1:
        raise SweepError(
            f"{at}: expected a mapping with exactly one of {', '.join(DISTRIBUTIONS)} (and optionally "
            f"link: [paths]), e.g. {{grid: [0.0, 0.5, 1.0]}}; got {value!r}"
        )
    ((kind, args),) = value.items()
    if kind not in DISTRIBUTIONS:
        raise SweepError(
            f"{at}: unknown distribution {kind!r}{did_you_mean(kind, DISTRIBUTIONS)}; valid: {', '.join(DISTRIBUTIONS)}"
        )
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise SweepError(f"{at}.{kind}: expected a non-empty list of values, got {args!r}")
        keys = [json.dumps(a, sort_keys=True, default=str) for a in args]
        if dup := sorted({k for k in keys if keys.count(k) > 1}):
            raise SweepError(f"{at}.{kind}: duplicate value(s) {', '.join(dup)}")
        return Distribution(kind, tuple(args), tuple(links))
    if not isinstance(args, list) or len(args) != 2 or not all(_is_number(a) for a in args):
        raise SweepError(f"{at}.{kind}: expected [low, high] (two numbers), got {args!r}")
    if kind == "randint":
        if not all(float(a).is_integer() for a in args):
            raise SweepError(f"{at}.randint: expected two integers [low, high], got {args!r}")
        if args[0] > args[1]:
            raise SweepError(f"{at}.randint: low {int(args[0])} > high {int(args[1])}")
        return Distribution(kind, (int(args[0]), int(args[1])), tuple(links))
    low, high = float(args[0]), float(args[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SweepError(f"{at}.{kind}: bounds must be finite, got {args!r}")
    if low >= high:
        raise SweepError(f"{at}.{kind}: low {low:g} must be < high {high:g}")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{at}.loguniform: bounds must be > 0 (log scale), got low {low:g}")
    return Distribution(kind, (low, high), tuple(links))
