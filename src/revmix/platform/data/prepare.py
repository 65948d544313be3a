"""From a DataConfig to train rows per direction (tokenised once) and held-out canonical rows.

The driver does this once per experiment; stages and sweep trials reuse the result. With
``num_workers = 0`` the tokenised rows go to the in-process loop as lists; with Ray workers they become
per-direction Ray datasets (:func:`to_ray_datasets`), materialised when small and streamed from a
tokenised Parquet cache when large.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revmix.config import DataConfig
from revmix.platform.data.schema import DIRECTIONS, Direction
from revmix.platform.data.tokenize import fingerprint, tokenise_rows


@dataclass
class PreparedData:
    train: dict[str, list[dict[str, Any]]]  # direction -> tokenised rows
    test_rows: list[dict[str, Any]]  # canonical held-out rows (both directions)
    n_items: int  # training items (distinct item_id)
    truncated: int  # training rows whose response was truncated to max_length
    rejected: int = 0  # rows skipped as invalid (only with data.skip_invalid)
    key: str = ""  # fingerprint of the tokenised training data
    meta: dict[str, Any] = field(default_factory=dict)


def cache_root() -> Path:
    return Path(os.environ.get("REVMIX_CACHE", Path.home() / ".cache" / "revmix"))


def load_canonical_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], int]:
    """All canonical rows of the configured source, and how many were rejected (skip_invalid only)."""
    if cfg.source == "synthetic":
        from revmix.platform.data.synthetic import generate_mix

        return generate_mix(list(cfg.families), cfg.n_items, seed=cfg.seed), 0
    from revmix.platform.data.loaders import load_rows

    extra = {"n": cfg.n_items, "seed": cfg.seed} if cfg.source.startswith("synthetic:") else {}
    report = load_rows(cfg.source, skip_invalid=cfg.skip_invalid, **extra)
    return list(report.rows), len(report.rejected)


def split_rows(
    rows: list[dict[str, Any]], cfg: DataConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from revmix.platform.data.synthetic import split_by_item

    return split_by_item(rows, cfg.test_fraction, seed=cfg.seed)


def prepare_data(cfg: DataConfig, tokenizer: Any, tokenizer_id: str = "") -> PreparedData:
    rows, rejected = load_canonical_rows(cfg)
    train, test = split_rows(rows, cfg)
    by_dir: dict[str, list[dict[str, Any]]] = {d: [] for d in DIRECTIONS}
    for r in train:
        by_dir[Direction.parse(r["direction"]).label].append(r)
    tokenised: dict[str, list[dict[str, Any]]] = {}
    truncated = 0
    start = 0
    for d in DIRECTIONS:
        tokenised[d], t = tokenise_rows(by_dir[d], tokenizer, cfg.max_length, start_index=start)
        truncated += t
        start += len(by_dir[d])
    key = fingerprint((), [r["item_id"] + r["direction"] for r in train], tokenizer_id, cfg.max_length)
    return PreparedData(
        train=tokenised,
        test_rows=test,
        n_items=len({r["item_id"] for r in train}),
        truncated=truncated,
        rejected=rejected,
        key=key,
    )


def to_ray_datasets(data: PreparedData, cfg: DataConfig) -> dict[str, Any]:
    """Per-direction Ray datasets of tokenised rows: materialised, or a Parquet cache when large."""
    import ray.data

    out = {}
    for d, rows in data.train.items():
        if len(rows) > cfg.stream_threshold_rows:
            path = Path(cfg.cache_dir or cache_root() / "tokenised") / data.key / d
            if not (path / "_done").exists():
                ray.data.from_items(rows).write_parquet(str(path))
                (path / "_done").touch()
            out[d] = ray.data.read_parquet(str(path))
        else:
            out[d] = ray.data.from_items(rows).materialize()
    return out
