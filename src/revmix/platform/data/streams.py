"""Per-direction example streams: infinite, seeded per epoch, resumable by count, the same on every worker.

A stream over ``n`` rows visits them in a fresh seeded permutation every epoch, so the k-th example it
yields is a pure function of (seed, k): a resumed run skips exactly the examples already consumed. The
seed does not depend on the worker's rank: every Ray Train worker holds the same global stream, draws the
step's whole global batch from it and keeps its own slice (:func:`worker_slice`), so the examples of a
step are the same whatever the number of workers.

:func:`open_direction_stream` is the one place a worker's stream is built: rows held in memory (small
data, :class:`DirectionStream`) or a folder of tokenised Parquet read a window at a time (data above
``data.stream_threshold_rows``, :class:`~revmix.platform.data.parquet_stream.ParquetDirectionStream`), both
with the interface of :class:`ExampleStream`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from revmix.platform.data.schema import DIRECTIONS

T = TypeVar("T")


class ExampleStream(Protocol):
    """What the Mixer draws from: an endless iterator of one direction's rows, resumable by count."""

    position: int  # examples yielded (or skipped) so far

    def skip(self, n: int) -> None: ...

    def __next__(self) -> dict: ...


class DirectionStream:
    """Rows of one direction, cycled epoch after epoch in seeded order.

    A stream over no rows is valid until the mix asks it for an example.
    """

    def __init__(self, rows: list[dict], seed: int, name: str) -> None:
        self.rows = sorted(rows, key=lambda r: r["row_index"])  # Ray Data's row order is not deterministic
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


def open_direction_stream(direction: str, seed: int, source: list[dict] | str | Path | Any) -> ExampleStream:
    """The stream of one direction's training rows, identical on every worker.

    ``source``: the rows themselves (the in-process loop), a Ray Data dataset or iterator over *all* of
    the direction's (small, materialised) rows, or the path of its folder in the tokenised cache (large
    data, streamed from Parquet: each worker reads the global stream a window at a time).
    """
    if isinstance(source, str | Path):
        from revmix.platform.data.parquet_stream import ParquetDirectionStream

        return ParquetDirectionStream(source, seed, direction)
    rows = source if isinstance(source, list) else rows_from_shard(source)
    return DirectionStream(rows, seed, direction)


def rows_from_shard(shard: Any) -> list[dict]:
    """Pull a (small, materialised) Ray Data dataset into memory once, as plain Python values."""
    return [
        {k: (v.tolist() if isinstance(v, np.ndarray | np.generic) else v) for k, v in r.items()}
        for r in shard.iter_rows()
    ]


def worker_slice(rows: Sequence[T], rank: int, world: int) -> list[T]:
    """Worker ``rank``'s part of a step's global rows: the ``rank``-th of ``world`` contiguous equal parts.

    With micro-batches cut contiguously inside each part (``supervised_step``), global micro-batch ``j``
    is ``rows[j·m:(j+1)·m]`` (``m`` = batch / (world · grad_accum)) and worker ``r`` runs ``j = r·grad_accum
    + k`` for its k-th micro-batch: the partition of the global batch depends on world × grad_accum only.
    """
    if world < 1 or not 0 <= rank < world or len(rows) % world:
        raise ValueError(f"worker_slice: {len(rows)} rows cannot be cut into {world} parts for rank {rank}")
    n = len(rows) // world
    return list(rows[rank * n : (rank + 1) * n])


def row_id(row: dict) -> str:
    """A row's identity in traces: ``<direction>/<row_index>`` (row_index counts within a direction)."""
    return f"{DIRECTIONS[int(row['direction'])]}/{row['row_index']}"
