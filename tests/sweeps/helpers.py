"""Shared helpers for sweep tests: a small base experiment and sweep mappings built in memory."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SFT_TINY = ROOT / "configs" / "runs" / "sft_tiny.yaml"

BASE_RAW: dict[str, Any] = {
    "name": "unit",
    "seed": 0,
    "data": {"n_items": 40},
    "stages": [{"name": "sft", "objective": {"name": "sft"}, "steps": 3, "batch_size": 4}],
    "eval": {"benchmarks": ["synthetic"], "limit": 4},
}


def sweep_raw(**changes: Any) -> dict[str, Any]:
    """A valid sweep mapping (grid over r × 2 seeds); keyword arguments replace top-level keys."""
    raw: dict[str, Any] = {
        "base": "base.yaml",
        "metric": "eval/accuracy/synthetic",
        "mode": "max",
        "seeds": [0, 1],
        "space": {"stages.0.mix.reverse_fraction": {"grid": [0.0, 0.5, 1.0]}},
    }
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    return raw


def write_sweep(tmp: Path, raw: dict[str, Any], base: dict[str, Any] | None = None) -> Path:
    """Write ``base.yaml`` and ``sweep.yaml`` into ``tmp``; return the sweep file."""
    (tmp / "base.yaml").write_text(yaml.safe_dump(copy.deepcopy(base or BASE_RAW)))
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
