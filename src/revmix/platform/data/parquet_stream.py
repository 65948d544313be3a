"""A direction's tokenised rows streamed from Parquet: a global, seeded order with bounded memory.

:class:`ParquetDirectionStream` has :class:`~revmix.platform.data.streams.DirectionStream`'s interface
(``position``, ``skip(n)``, ``__next__``, ``__iter__``) but never holds the corpus: the k-th row it
yields is a pure function of (files, seed, name, k), whatever the worker's rank, and at any time it holds
one *window* of rows, plus the next one, read ahead by a background thread. A row is a dict whose
token-id fields are read-only numpy integer views of the window's Arrow buffers (which
:func:`~revmix.platform.data.tokenize.collate` pads without a Python int per token) and whose other
fields are plain Python values.

Order, per epoch ``e``: the blocks (Parquet row groups, listed from the footers of the directory's
``*.parquet`` files in name order) are permuted with a generator seeded by (seed, name, e); consecutive
blocks of that order are grouped into windows of at least ``shuffle_buffer`` rows (whole blocks, so a
window holds fewer than ``shuffle_buffer`` + one block rows); each window's rows are permuted by
(seed, name, e, window). Every row is yielded exactly once per epoch. Because a window's place in the
epoch is known from the footers' row counts, ``skip(n)`` moves ``position`` only, and the next row reads
just the one window that holds it: a resumed run skips consumed rows without reading them.

Why pyarrow and not Ray Data's ``read_parquet`` + ``iter_batches(local_shuffle_buffer_size=...,
local_shuffle_seed=...)``: with ``preserve_order`` and a seeded file shuffle, Ray Data (2.60) does repeat
its order (checked: two reads of a 100k-row, 10-file corpus gave the same ids, another seed another order),
but only for one Ray version and block layout, and its sliding shuffle buffer makes the k-th row depend on
every row before it, so a resume must read and discard everything consumed. It also starts a streaming
executor inside every worker (first batch after 2.4 s warm, 9 s cold, on 2 CPUs, its read tasks competing
with training). Reading row groups directly gives an order defined here, exact skips from metadata, and
start-up in milliseconds.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_ROWS = 256  # rows converted to Python at a time: the only rows held as Python objects
DEFAULT_SHUFFLE_BUFFER = 4096
_READ_AHEAD: dict[int, ThreadPoolExecutor] = {}  # by process id: see read_ahead_pool


def read_ahead_pool() -> ThreadPoolExecutor:
    """The thread that reads every stream's next window while the current one is consumed (Parquet
    decoding releases the GIL; it was a third of a streamed row's cost on the training thread). One per
    process, made on first use: a forked child gets its own, as the parent's thread does not exist there
    and its queue would never be served."""
    pid = os.getpid()
    if pid not in _READ_AHEAD:
        _READ_AHEAD[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="revmix-parquet-read-ahead")
    return _READ_AHEAD[pid]


@dataclass(frozen=True)
class Block:
    """One Parquet row group: the unit read from disk and the unit the epoch order permutes."""

    file: Path
    group: int
    rows: int
    meta: pq.FileMetaData | None = field(default=None, compare=False, repr=False)  # the file's footer


class ParquetDirectionStream:
    """Tokenised rows of one direction, read from ``path`` epoch after epoch in a seeded global order.

    ``path`` is a Parquet file or a directory of ``*.parquet`` files (a tokenised cache entry); ``name``
    is the direction. A stream over no rows is valid until the mix asks it for an example.
    """

    def __init__(
        self,
        path: str | Path,
        seed: int,
        name: str,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        read_ahead: bool = True,
    ) -> None:
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer: expected a row count >= 1, got {shuffle_buffer}")
        self.path, self.seed, self.name = Path(path), seed, name
        self.shuffle_buffer = shuffle_buffer
        self.read_ahead = read_ahead  # read the next window in the background (off: the benchmark's baseline)
        self.blocks = list_blocks(self.path)
        self.n_rows = sum(b.rows for b in self.blocks)
        self.position = 0  # examples yielded (or skipped) so far
        self._epoch = -1
        self._windows: list[list[Block]] = []
        self._starts: list[int] = []  # first in-epoch offset of each window
        self._window_index = -1
        self._window: dict[str, Column] = {}  # the current window's columns, in the order read
        self._order = np.zeros(0, dtype=np.int64)  # the window's rows in their seeded order
        self._chunk_index = -1
        self._chunk: list[dict[str, Any]] = []
        self._chunk_first = 0  # the position of the chunk's first row
        self._ahead: tuple[tuple[int, int], Future[Window]] | None = None  # (epoch, window) being read

    def skip(self, n: int) -> None:
        """Advance past ``n`` examples without reading them (the next row reads only its own window)."""
        self.position += n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        i = self.position - self._chunk_first
        if 0 <= i < len(self._chunk):  # the common case: the next row of the converted chunk
            self.position += 1
            return self._chunk[i]
        return self._locate()

    def _locate(self) -> dict[str, Any]:
        """The row at ``position`` after a chunk, window or epoch boundary or a skip."""
        if not self.n_rows:
            raise ValueError(
                f"no training rows for direction {self.name!r} in {self.path}: the mix asks for {self.name} "
                "examples but the data has none"
            )
        epoch, offset = divmod(self.position, self.n_rows)
        if epoch != self._epoch:
            self._windows, self._starts = self._epoch_windows(epoch)
            self._epoch, self._window_index, self._window = epoch, -1, {}
            self._chunk_index, self._chunk = -1, []
        window = bisect.bisect_right(self._starts, offset) - 1
        if window != self._window_index:
            self._load(window)
        chunk, i = divmod(offset - self._starts[window], CHUNK_ROWS)
        if chunk != self._chunk_index:
            self._chunk = []  # freed before the next chunk is made
            self._chunk = window_rows(
                self._window, self._order[chunk * CHUNK_ROWS : (chunk + 1) * CHUNK_ROWS], int_arrays=True
            )
            self._chunk_index = chunk
            self._chunk_first = self.position - i
        self.position += 1
        return self._chunk[i]

    def _epoch_windows(self, epoch: int) -> tuple[list[list[Block]], list[int]]:
        """Epoch ``epoch``'s block order grouped into windows of at least ``shuffle_buffer`` rows, and
        each window's first in-epoch offset."""
        order = [
            self.blocks[i] for i in seeded_rng(self.seed, self.name, epoch).permutation(len(self.blocks))
        ]
        windows: list[list[Block]] = []
        starts: list[int] = []
        start, pending = 0, 0
        for block in order:
            if not pending:
                windows.append([])
                starts.append(start)
            windows[-1].append(block)
            pending += block.rows
            start += block.rows
            if pending >= self.shuffle_buffer:
                pending = 0
        return windows, starts

    def _load(self, window: int) -> None:
        """Take one window's columns (read ahead, or read now after a skip or at the first row) and draw
        its rows' seeded order; then start reading the window after it. The previous window is released
        first, so at most two are held: this one and the next. The rows stay in Arrow's buffers in the
        order read: a chunk's rows are views taken in the drawn order, so the window is never copied."""
        self._window, self._chunk, self._chunk_index = {}, [], -1
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (self._epoch, window):
            self._window, rows = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()  # a skip moved past it; a read already running is left to finish
            self._window, rows = read_window(self._windows[window])
        self._order = seeded_rng(self.seed, self.name, self._epoch, window).permutation(rows)
        self._window_index = window
        if self.read_ahead:
            self._read_ahead_after(window)

    def _read_ahead_after(self, window: int) -> None:
        epoch, windows, following = self._epoch, self._windows, window + 1
        if following == len(windows):  # the next epoch's first window
            epoch, following = epoch + 1, 0
            windows = self._epoch_windows(epoch)[0]
        self._ahead = ((epoch, following), read_ahead_pool().submit(read_window, windows[following]))


def list_blocks(path: Path) -> list[Block]:
    """Every non-empty row group of the Parquet file ``path`` or of the ``*.parquet`` files in the
    directory ``path`` (name order), from the footers only; all files must have the same columns."""
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_"))
        )
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(
            f"{path}: no such file or directory (expected a Parquet file or a directory of *.parquet files, "
            "such as a tokenised cache entry)"
        )
    blocks: list[Block] = []
    columns: tuple[list[str], Path] | None = None
    for f in files:
        meta = _footer(f)
        names = meta.schema.to_arrow_schema().names
        if columns is not None and sorted(names) != sorted(columns[0]):
            raise ValueError(f"{f}: columns {names} differ from {columns[0]} in {columns[1]}")
        columns = columns or (names, f)
        blocks += [Block(f, g, meta.row_group(g).num_rows, meta) for g in range(meta.num_row_groups)]
    return [b for b in blocks if b.rows]


def _footer(file: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(file)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from e


def read_block(block: Block) -> pa.Table:
    """The block's rows, opened with the footer :func:`list_blocks` read: a file opened without it costs
    about 40% more CPU on its first row group (footer and schema parsed again), and the random block order
    of a large corpus rarely reads two blocks of one file in a row. Entries are written once and renamed
    whole, so the footer stays that of the file."""
    try:
        file = pq.ParquetFile(block.file, metadata=block.meta, pre_buffer=True)
        return file.read_row_group(block.group, use_threads=False)  # one thread: training runs beside
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{block.file}: row group {block.group}: unreadable ({e})") from e


def read_window(blocks: list[Block]) -> Window:
    """One window's rows in the order read: its :func:`window_columns` and its row count."""
    table = concat([read_block(b) for b in blocks])
    return window_columns(table), table.num_rows


def concat(tables: list[pa.Table]) -> pa.Table:
    """One table of blocks whose types may differ only where a block had nothing to infer from
    (an all-null ``answer`` column is ``null``-typed in a block written by Ray Data)."""
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive").combine_chunks()


def seeded_rng(*parts: Any) -> np.random.Generator:
    """A generator that depends on ``parts`` only (not on the process's hash seed or the platform)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The rows of ``table`` as plain Python dicts, in order (list columns as lists of ints)."""
    return window_rows(window_columns(table), np.arange(table.num_rows))


@dataclass(frozen=True)
class ListColumn:
    """A list<integer> column without nulls as two numpy views of the Arrow buffers: row ``i`` is
    ``values[offsets[i]:offsets[i + 1]]`` (``offsets`` index the unsliced child array)."""

    offsets: np.ndarray
    values: np.ndarray


class SharedInts:
    """One Python ``int`` object per value in ``[0, size)``, for token ids: a row's ids are picked from it
    rather than allocated (ids above 256 are not cached by Python), which is about a third of converting a
    row and also spares freeing them. Grown on demand (doubling) up to ``LIMIT`` values, which covers
    every tokenizer vocabulary in use (about 10 MB at most, shared by every conversion to lists in the
    process: held-out rows, tables)."""

    LIMIT = 1 << 18

    def __init__(self) -> None:
        self.table = np.zeros(0, dtype=object)

    def covering(self, values: np.ndarray) -> np.ndarray | None:
        """The table, grown to cover ``values``; ``None`` when some value is negative or >= ``LIMIT``."""
        if not len(values):
            return self.table
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= self.LIMIT:
            return None
        if high >= len(self.table):
            size = min(self.LIMIT, max(high + 1, 2 * len(self.table)))
            self.table = np.array(range(size), dtype=object)
        return self.table


SHARED_INTS = SharedInts()


Column = ListColumn | np.ndarray | list[Any]
Window = tuple[dict[str, Column], int]


def window_columns(table: pa.Table) -> dict[str, Column]:
    """``table``'s columns in the form :func:`window_rows` converts fastest: list<integer> and integer
    columns without nulls as numpy views (no Python objects), strings and all-null columns as numpy object
    arrays (one ``str`` or ``None`` a row), anything else as a Python list."""
    return {name: _column(table.column(name).combine_chunks()) for name in table.column_names}


def _column(array: pa.Array) -> Column:
    kind, nulls = array.type, array.null_count
    if pa.types.is_list(kind) and pa.types.is_integer(kind.value_type) and not nulls:
        values = array.values
        if not values.null_count:
            ids = values.to_numpy()
            return ListColumn(array.offsets.to_numpy(), ids)
    if pa.types.is_integer(kind) and not nulls:
        return array.to_numpy()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        return array.to_numpy(zero_copy_only=False)
    return array.to_pylist()


def window_rows(
    columns: dict[str, Column], rows: np.ndarray, int_arrays: bool = False
) -> list[dict[str, Any]]:
    """The rows at the indices ``rows`` (an int64 array) as plain Python dicts, in that order. Each column
    is converted for all the rows at once, so no Arrow scalar is made. A list<integer> value is a Python
    list (the column's values gathered with numpy, then cut into rows), or with ``int_arrays`` a
    read-only numpy view of the row's values in the Arrow buffer: no copy and no Python int per token,
    what the stream hands to :func:`~revmix.platform.data.tokenize.collate`."""
    values = [_column_rows(column, rows, int_arrays) for column in columns.values()]
    return _dicts_of(tuple(columns))(values)


@functools.lru_cache(maxsize=64)
def _dicts_of(names: tuple[str, ...]) -> Callable[[list[list[Any]]], list[dict[str, Any]]]:
    """A function making one dict per row from per-column value lists, with a dict display compiled for
    ``names``: about 0.4 us a row less than ``dict(zip(names, row))`` (a tenth of what a streamed row
    costs the training loop). Names enter the code as ``repr`` literals, so any column name is safe."""
    if not names:
        return lambda values: []
    params = ", ".join(f"v{i}" for i in range(len(names)))
    display = ", ".join(f"{name!r}: v{i}" for i, name in enumerate(names))
    return eval(f"lambda values: [{{{display}}} for {params}, in zip(*values)]")  # noqa: S307


def _column_rows(column: Column, rows: np.ndarray, int_arrays: bool) -> list[Any]:
    if isinstance(column, ListColumn) and int_arrays:  # views of the window's values: nothing copied
        values = column.values
        return [values[a:b] for a, b in zip(column.offsets[rows].tolist(), column.offsets[rows + 1].tolist())]
    if isinstance(column, ListColumn):
        starts = column.offsets[rows]
        lengths = column.offsets[rows + 1] - starts
        bounds = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        gather = np.repeat(starts - bounds[:-1], lengths) + np.arange(bounds[-1])
        picked = column.values[gather]
        ints = SHARED_INTS.covering(picked)  # one shared int object per token id where it covers them
        flat = (picked if ints is None else ints[picked]).tolist()
        cuts = bounds.tolist()
        return [flat[a:b] for a, b in zip(cuts, cuts[1:])]
    if isinstance(column, np.ndarray):
        return column[rows].tolist()
    return [column[i] for i in rows.tolist()]
