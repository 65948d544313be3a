"""Tokenised-row shaped Parquet corpora of any size, written without holding them, for the streaming
benchmark and the scale tests.

Row ``i`` of a corpus is base row ``i % len(base)`` with ``row_index = i`` and ``item_id = "x{i}"``: the
base rows are real tokenised rows (the benchmark's) or seeded random ones of the same shape (about 40
prompt and 55 + 55 response tokens, ids below 512 like the tiny model's vocabulary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from revmix.platform.data.cache import CACHE_DONE

ROWS_PER_GROUP = 8192
ROWS_PER_FILE = 131072


def random_tokenised_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` seeded rows with the columns and typical lengths of tokenised synthetic rows."""
    rng = np.random.default_rng(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return rng.integers(3, 512, int(rng.integers(lo, hi))).tolist()

    return [
        {
            "row_index": i,
            "item_id": f"b{i}",
            "direction": i % 2,
            "task": "synthetic/affine_mod",
            "answer": str(i % 97),
            "prompt_ids": ids(20, 60),
            "response_ids": ids(20, 90),
            "other_ids": ids(20, 90),
        }
        for i in range(n)
    ]


def write_corpus(
    path: Path,
    n_rows: int,
    base: list[dict[str, Any]] | None = None,
    *,
    rows_per_group: int = ROWS_PER_GROUP,
    rows_per_file: int = ROWS_PER_FILE,
) -> Path:
    """Write an ``n_rows`` corpus to the new directory ``path`` (files of ``rows_per_file`` rows in row
    groups of ``rows_per_group``) plus the cache's done marker; memory holds one file's rows at most."""
    if path.exists():
        raise FileExistsError(f"{path}: exists; write_corpus writes a new directory only")
    base_table = pa.Table.from_pylist(base or random_tokenised_rows(1000))
    path.mkdir(parents=True)
    for k, first in enumerate(range(0, n_rows, rows_per_file)):
        index = np.arange(first, min(first + rows_per_file, n_rows))
        table = base_table.take(pa.array(index % base_table.num_rows))
        table = table.set_column(table.schema.get_field_index("row_index"), "row_index", pa.array(index))
        item_ids = pa.array([f"x{i}" for i in index.tolist()])
        table = table.set_column(table.schema.get_field_index("item_id"), "item_id", item_ids)
        pq.write_table(table, path / f"part-{k:05d}.parquet", row_group_size=rows_per_group)
    (path / CACHE_DONE).touch()
    return path
