"""Tokenisation of a large training set in Ray Data: actors hold the tokenizer, batches stream to Parquet.

Why actors (a callable class in ``map_batches``): loading a tokenizer costs far more than tokenising one
batch, so each actor builds its state once and then serves many batches. Each batch goes through
:func:`revmix.platform.data.tokenize.tokenise_chunk` — the very function the in-process path uses, so the
chat template, truncation and ``row_index`` come out the same either way. What a batch left out (prompts
too long, rows over ``max_length``) is written as a small JSON file per batch, named by the batch's first
``row_index`` (a retried task rewrites the same file), and added up by the driver after the pass.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from revmix.atomic import atomic_write
from revmix.platform.data.cache import CACHE_DONE, tokenised_schema, write_direction
from revmix.platform.data.tokenize import merge_stats, tokenise_chunk

BATCH_ROWS = 1024  # canonical rows per map_batches call: big enough to amortise the call, small in memory
MAX_ACTORS = 8  # tokenizer actors at most (each holds a tokenizer; more rarely pays on one node)


class TokeniseBatch:
    """The ``map_batches`` callable: canonical rows (Arrow) in, tokenised rows (Arrow) out."""

    def __init__(
        self, tokenizer: Any, max_length: int, truncation: str, stats_dir: str, index_offset: int = 0
    ) -> None:
        self.tokenizer, self.max_length, self.truncation = tokenizer, max_length, truncation
        self.stats_dir, self.index_offset = Path(stats_dir), index_offset

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        for r in rows:  # the lazy reader numbers each direction from 0; reverse rows follow forward ones
            r["row_index"] = int(r["row_index"]) + self.index_offset
        out, stats = tokenise_chunk(rows, self.tokenizer, self.max_length, self.truncation)
        first = min(int(r["row_index"]) for r in rows)
        atomic_write(self.stats_dir / f"{first:012d}.json", json.dumps(stats))
        return pa.Table.from_pylist(out, schema=tokenised_schema())


def tokenise_direction_in_ray(
    rows: list[dict[str, Any]], folder: Path, tokenizer: Any, max_length: int, truncation: str
) -> dict[str, Any]:
    """Tokenise one direction's canonical rows (with ``row_index`` and origin) into ``folder`` as Parquet;
    returns the merged stats of every batch (rows already in memory: synthetic and ``hf:`` sources)."""
    import ray.data

    from revmix.platform.runtime import ensure_ray

    if not rows:
        write_direction(folder, [])
        return merge_stats([])
    ensure_ray()
    return _tokenise_dataset(ray.data.from_items(rows), len(rows), folder, tokenizer, max_length, truncation)


def tokenise_spool_in_ray(
    spool: Path,
    n_rows: int,
    folder: Path,
    tokenizer: Any,
    max_length: int,
    truncation: str,
    index_offset: int = 0,
) -> dict[str, Any]:
    """Tokenise the canonical rows of a spool folder of Parquet files (:mod:`revmix.platform.data.lazy`)
    into ``folder``, read by Ray Data a block at a time, so no process holds the direction whole;
    ``index_offset`` is added to every ``row_index``."""
    import ray.data

    from revmix.platform.runtime import ensure_ray

    if n_rows == 0:
        write_direction(folder, [])
        return merge_stats([])
    ensure_ray()
    ds = ray.data.read_parquet(str(spool))
    return _tokenise_dataset(ds, n_rows, folder, tokenizer, max_length, truncation, index_offset)


def _tokenise_dataset(
    ds: Any,
    n_rows: int,
    folder: Path,
    tokenizer: Any,
    max_length: int,
    truncation: str,
    index_offset: int = 0,
) -> dict[str, Any]:
    """``ds`` through tokenizer actors into ``folder``. One actor per batch up to one per cluster CPU but
    one (the Parquet write tasks need a CPU while the actors hold theirs), at most :data:`MAX_ACTORS`."""
    import ray
    import ray.data

    stats_dir = folder.parent / f".stats-{folder.name}"
    stats_dir.mkdir(parents=True)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = max(1, min(MAX_ACTORS, cpus - 1, math.ceil(n_rows / BATCH_ROWS)))
    ds = ds.map_batches(
        TokeniseBatch,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "truncation": truncation,
            "stats_dir": str(stats_dir),
            "index_offset": index_offset,
        },
        batch_size=BATCH_ROWS,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    ds.write_parquet(str(folder))
    parts = [json.loads(p.read_text()) for p in sorted(stats_dir.glob("*.json"))]
    for p in stats_dir.iterdir():
        p.unlink()
    stats_dir.rmdir()
    if not any(folder.glob("*.parquet")):  # every row left out: still a readable, typed folder
        write_direction(folder, [])
    (folder / CACHE_DONE).touch()
    return merge_stats(parts)
