"""Per-direction example streams on a worker: infinite, seeded per epoch, resumable by count.

A stream over ``n`` rows visits them in a fresh seeded permutation every epoch, so the k-th example it
yields is a pure function of (seed, k): a resumed run skips exactly the examples already consumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np


class DirectionStream:
    """Rows of one direction, cycled epoch after epoch in seeded order.

    A stream over no rows is valid until the mix asks it for an example.
    """

    def __init__(self, rows: list[dict], seed: int, name: str) -> None:
        self.rows = sorted(rows, key=lambda r: r["row_index"])  # shard order is not deterministic
        self.seed, self.name = seed, name
        self.position = 0  # examples yielded so far
        self._order: list[int] = []
        self._epoch = -1

    def _ensure_epoch(self) -> None:
        epoch = self.position // len(self.rows)
        if epoch != self._epoch:
            self._order = list(range(len(self.rows)))
            random.Random(f"{self.seed}:{self.name}:{epoch}").shuffle(self._order)
            self._epoch = epoch

    def skip(self, n: int) -> None:
        self.position += n

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if not self.rows:
            raise ValueError(
                f"no training rows for direction {self.name!r}: the mix asks for {self.name} examples but "
                "the data has none"
            )
        self._ensure_epoch()
        row = self.rows[self._order[self.position % len(self.rows)]]
        self.position += 1
        return row


def rows_from_shard(shard: Any) -> list[dict]:
    """Pull a (small, materialised) Ray Data shard into memory once, as plain Python values."""
    return [
        {k: (v.tolist() if isinstance(v, np.ndarray | np.generic) else v) for k, v in r.items()}
        for r in shard.iter_rows()
    ]
