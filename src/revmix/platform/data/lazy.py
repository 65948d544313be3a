"""Large JSONL / Parquet sources read lazily: counted, keyed, validated, split and spooled a row at a time.

Why: above ``data.stream_threshold_rows`` the driver must not hold the corpus as Python lists. A local
``.jsonl`` or ``.parquet`` source (any ``data.format``) is read here in three cheap steps, none of which
keeps rows:

1. :func:`count_rows` decides the path: Parquet footers (``num_rows``, no data read) or the JSONL file's
   newline count (1 MiB binary reads; a last line without a newline counts too, blank lines count as rows).
   The content key is a hash of the file's bytes (:meth:`ContentKey.update_file`): with it an existing
   cache entry is reused and no record is parsed.
2. :func:`scan`, run only when the entry is built, is the first streaming pass: it counts the records and
   notes a 64-bit hash of each per-row-valid ``(item_id, direction)`` (16 bytes a row in two arrays,
   never Python objects), from which the later duplicates are found by sorting.
3. :func:`spool` is the second pass: the same rules as
   :mod:`revmix.platform.data.validate` on each record, naming ``FILE:LINE`` (Parquet: row index + 1);
   duplicates confirmed against the earlier row's actual key (a hash collision is no duplicate);
   train/test assigned by :func:`is_test_item`; with ``data.pairing: independent`` each training row kept
   or left out by :func:`~revmix.platform.data.pairing.keeps_row`; training rows written to per-direction
   Parquet spools that Ray Data tokenises; held-out rows kept (they are ``data.test_fraction`` of the items).

The split here is a hash split (an item is held out when a hash of ``(seed, item_id)`` falls under
``test_fraction``): a pure function of the id, so it needs no list of ids; the small, in-process path
keeps :func:`~revmix.platform.data.synthetic.split_by_item` (exactly ``round(test_fraction * items)``
held out). A corpus that crosses the threshold therefore gets a different (but equally item-wise) split.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from revmix.platform.data.pairing import Pairing, keeps_row
from revmix.platform.data.schema import ALL_FIELDS, DIRECTIONS, Direction
from revmix.platform.data.tokenize import ORIGIN_FILE, ORIGIN_LINE
from revmix.platform.data.validate import Problem, Record, describe, duplicate_problem, record_problems

LAZY_SUFFIXES = (".jsonl", ".parquet")
SPOOL_ROWS = 8192  # canonical rows buffered per spool write: the only rows the driver holds at a time
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class LazySource:
    """A local JSONL or Parquet file and the layout its records are converted from."""

    path: Path
    fmt: str = "canonical"
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.path)

    def records(self) -> Iterator[Record]:
        """``(line, canonical dict | RowError | Exception)`` per record, converted as ``data.format`` says."""
        from revmix.platform.data.formats import _convert
        from revmix.platform.data.validate import iter_records

        raw = iter_records(self.path)
        if self.fmt == "canonical" and not self.columns:
            return raw  # as load_jsonl / load_parquet: the canonical rules name every field
        return ((line, _convert(self.fmt, self.columns, line, rec)) for line, rec in raw)

    def named(self, problem: Problem) -> Problem:
        """A problem naming the source column a canonical field was read from (``q (as prompt)``)."""
        if self.fmt != "canonical" or problem.field not in self.columns:
            return problem
        name = f"{self.columns[problem.field]} (as {problem.field})"
        return Problem(problem.file, problem.line, name, problem.message)


def lazy_source(source: str, fmt: str, columns: dict[str, str]) -> LazySource | None:
    """The source as a :class:`LazySource` when it is a local ``.jsonl`` / ``.parquet`` file, else None
    (synthetic, ``hf:``, ``r1k:``, ``preference:`` and ``.json`` sources are loaded whole)."""
    path = Path(source)
    if ":" in source.split("/")[0] or path.suffix not in LAZY_SUFFIXES or not path.is_file():
        return None
    return LazySource(path, fmt, dict(columns))


def count_rows(path: Path) -> int:
    """Rows of a Parquet file from its footer; lines of a JSONL file by counting newlines (blank lines
    included: an upper bound on the rows, and the one used for the switch)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def is_test_item(item_id: str, seed: int, test_fraction: float) -> bool:
    """Whether ``item_id`` is held out: a hash of ``(seed, item_id)`` read as a fraction in [0, 1)."""
    digest = hashlib.blake2b(f"revmix.split/{seed}/{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < test_fraction


def _pair_hash(item_id: str, direction: str) -> int:
    digest = hashlib.blake2b(json.dumps([item_id, direction]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass
class Scan:
    """What the first pass learned: the count and the possible duplicates."""

    n_read: int
    earlier: dict[int, list[int]]  # line -> earlier lines with the same (item_id, direction) hash
    watched: set[int]  # lines whose (item_id, direction) a later line may repeat


def scan(src: LazySource) -> Scan:
    """First pass: the records counted, and the lines that may repeat an earlier key."""
    n_read = 0
    hashes, lines = array("q"), array("q")
    for line, rec in src.records():
        n_read += 1
        if isinstance(rec, dict) and not record_problems(src.label, line, rec):
            hashes.append(_pair_hash(rec["item_id"], rec["direction"]))
            lines.append(line)
    earlier, watched = _repeats(np.frombuffer(hashes, dtype=np.int64), np.frombuffer(lines, dtype=np.int64))
    return Scan(n_read, earlier, watched)


def _repeats(hashes: np.ndarray, lines: np.ndarray) -> tuple[dict[int, list[int]], set[int]]:
    """Groups of lines sharing a hash, by sorting (no Python object per row)."""
    order = np.lexsort((lines, hashes))
    h, ln = hashes[order], lines[order]
    same = np.flatnonzero(h[1:] == h[:-1]) + 1  # positions repeating the previous position's hash
    earlier: dict[int, list[int]] = {}
    watched: set[int] = set()
    for pos in same.tolist():
        start = pos
        while start > 0 and h[start - 1] == h[pos]:
            start -= 1
        earlier[int(ln[pos])] = [int(x) for x in ln[start:pos]]
        watched.update(earlier[int(ln[pos])])
    return earlier, watched


@dataclass
class Spooled:
    """What the second pass wrote and kept: counts, problems, held-out rows and the training items."""

    n_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    test_rows: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {d: 0 for d in DIRECTIONS})
    item_hashes: array = field(default_factory=lambda: array("q"))  # one per training row
    unpaired: int = 0  # training rows left out by data.pairing=independent

    @property
    def n_rejected(self) -> int:
        return len({p.line for p in self.problems})


class _SpoolWriter:
    """Canonical rows of one direction, with ``row_index`` and origin, appended to one Parquet file."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.path = path
        cols = [(f, pa.string()) for f in ALL_FIELDS] + [("row_index", pa.int64())]
        self.schema = pa.schema(cols + [(ORIGIN_FILE, pa.string()), (ORIGIN_LINE, pa.int64())])
        self.buffer: list[dict[str, Any]] = []
        self.writer: Any = None

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= SPOOL_ROWS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffer:
            return
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, self.schema)
        self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.buffer = []

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def spool(
    src: LazySource,
    seen: Scan,
    folder: Path,
    seed: int,
    test_fraction: float,
    pairs_needed_by: str | None,
    pairing: Pairing = "twins",
) -> Spooled:
    """Second pass: validate each record, hold out test items, leave out the training rows ``pairing`` does
    not keep (:func:`~revmix.platform.data.pairing.keeps_row`, counted in ``unpaired``), write the others to
    ``folder/<direction>/part-0.parquet`` (each direction numbered from 0 in source order)."""
    out = Spooled()
    writers: dict[str, _SpoolWriter] = {d: _SpoolWriter(folder / d / "part-0.parquet") for d in DIRECTIONS}
    keys: dict[int, tuple[str, str]] = {}  # (item_id, direction) of the watched lines
    try:
        for line, rec in src.records():
            out.n_read += 1
            found = _problems(src, line, rec, seen, keys, pairs_needed_by)
            if found or not isinstance(rec, dict):  # a record without problems is a dict
                out.problems += found
                continue
            row: dict[str, Any] = {f: rec.get(f) for f in ALL_FIELDS}
            if is_test_item(row["item_id"], seed, test_fraction):
                out.test_rows.append(row)
                continue
            d: str = Direction.parse(row["direction"]).label
            if not keeps_row(row["item_id"], d, pairing, seed):
                out.unpaired += 1
                continue
            writers[d].add({**row, "row_index": out.counts[d], ORIGIN_FILE: src.label, ORIGIN_LINE: line})
            out.counts[d] += 1
            out.item_hashes.append(_pair_hash(row["item_id"], ""))
    finally:
        for w in writers.values():
            w.close()
    return out


def _problems(
    src: LazySource,
    line: int,
    rec: Any,
    seen: Scan,
    keys: dict[int, tuple[str, str]],
    pairs_needed_by: str | None,
) -> list[Problem]:
    """Every problem of one record: the shared rules, a repeated key, a missing pair."""
    found = [src.named(p) for p in record_problems(src.label, line, rec)]
    if found:
        return found
    key = (rec["item_id"], rec["direction"])
    if line in seen.watched:
        keys[line] = key
    first = next((e for e in seen.earlier.get(line, []) if keys.get(e) == key), None)
    if first is not None:
        return [duplicate_problem(src.label, line, key, first)]
    other = rec.get("other_response")
    if pairs_needed_by and not (isinstance(other, str) and other.strip()):
        why = f"expected a non-empty string ({pairs_needed_by} trains on response/other_response pairs)"
        return [Problem(src.label, line, "other_response", f"{why}, got {describe(other)}")]
    return []


def training_items(item_hashes: array, left_out: list[str]) -> int:
    """Distinct training items with at least one row kept (``left_out``: item ids of rows not kept)."""
    ids, counts = np.unique(np.frombuffer(item_hashes, dtype=np.int64), return_counts=True)
    for item in left_out:
        counts[np.searchsorted(ids, _pair_hash(item, ""))] -= 1
    return int((counts > 0).sum())
