"""Validation of canonical rows: every problem names its file, line and field.

Why a separate module: ``revmix data validate`` and every loader share one set of rules, so a file that
validates clean is exactly a file that loads without ``skip_invalid``. Rules:

* a line must be UTF-8 and a JSON object (``<line>`` problems: not UTF-8, not JSON, not an object);
  a byte-order mark before the first line is allowed;
* ``item_id``, ``direction``, ``task``, ``prompt``, ``response`` are required non-empty strings;
* ``other_response`` and ``answer`` are strings or null;
* no string holds a lone surrogate (``"\ud800"`` in JSON is valid JSON but no text: it cannot be encoded
  for the tokenizer);
* ``direction`` is one of :data:`~revmix.platform.data.schema.DIRECTIONS`;
* ``(item_id, direction)`` is unique per file (the problem names the line of the first occurrence);
* with ``require_pairs``, every reverse row has a valid forward twin (same ``item_id``).

Extra fields are allowed and ignored; they are not problems but are counted
(:attr:`Validation.ignored_fields`) so that a typo like ``respones`` is still visible in the summary.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revmix.platform.data.schema import ALL_FIELDS, DIRECTIONS, OPTIONAL_FIELDS, REQUIRED_FIELDS

LINE = "<line>"  # field name for problems with the whole line (not JSON, not an object)
FILE = "<file>"  # field name for problems with the whole file (empty, unreadable)

Record = tuple[int, "dict[str, Any] | Exception"]
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Problem:
    """One validation failure. ``str(problem)`` is ``FILE:LINE: field: what was expected``."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class RowError(Exception):
    """Raised by a source converter (r1k, preference, HF field maps) for a record it cannot convert.

    Carries ``(field, message)`` pairs in the *source's* field names, so that the user is told about the
    column they wrote (``chosen``) rather than the canonical one it maps to (``response``).
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))
        self.problems = problems


@dataclass
class Validation:
    """Everything a scan of one source learned: problems plus counts for the summary line."""

    file: str
    problems: list[Problem] = field(default_factory=list)
    n_records: int = 0
    ignored_fields: Counter[str] = field(default_factory=Counter)
    directions: Counter[str] = field(default_factory=Counter)

    @property
    def bad_lines(self) -> set[int]:
        return {p.line for p in self.problems}

    def summary(self) -> str:
        """One line for the CLI: ``FILE: OK, 70 rows (35 forward, 35 reverse)`` or the problem count."""
        dirs = ", ".join(f"{self.directions[d]} {d}" for d in DIRECTIONS)
        if self.problems:
            text = (
                f"{self.file}: {len(self.problems)} problem(s) in {len(self.bad_lines)} of "
                f"{self.n_records} rows"
            )
        else:
            text = f"{self.file}: OK, {self.n_records} rows ({dirs})"
        if self.ignored_fields:
            extra = ", ".join(f"{k} ({n} rows)" for k, n in sorted(self.ignored_fields.items()))
            text += f"; ignored extra fields: {extra}"
        return text


def describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, str) else text


def _check_record(rec: dict[str, Any]) -> list[tuple[str, str]]:
    """Per-row checks (no cross-row state); returns ``(field, message)`` pairs."""
    out: list[tuple[str, str]] = []
    for name in REQUIRED_FIELDS:
        if name not in rec:
            out.append((name, f"required field is missing (required: {', '.join(REQUIRED_FIELDS)})"))
            continue
        value = rec[name]
        if not isinstance(value, str) or not value.strip():
            out.append((name, f"expected a non-empty string, got {describe(value)}"))
        elif name == "direction" and value not in DIRECTIONS:
            out.append((name, f"expected one of {', '.join(DIRECTIONS)}, got {value!r}"))
    for name in OPTIONAL_FIELDS:
        value = rec.get(name)
        if value is not None and not isinstance(value, str):
            out.append((name, f"expected a string or null, got {describe(value)}"))
    for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
        value = rec.get(name)
        bad = LONE_SURROGATE.search(value) if isinstance(value, str) else None
        if bad:
            out.append(
                (
                    name,
                    f"expected text, got a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start()}",
                )
            )
    return out


def record_problems(file: str, line: int, rec: Any) -> list[Problem]:
    """The problems of one record on its own (no cross-row state): a converter's :class:`RowError`, a
    line that is not JSON or not an object, or the per-field rules. Shared by :func:`check_rows` and the
    lazy reader (:mod:`revmix.platform.data.lazy`), so both name the same problems."""
    if isinstance(rec, RowError):
        return [Problem(file, line, f, m) for f, m in rec.problems]
    if isinstance(rec, Exception):
        return [Problem(file, line, LINE, f"expected a JSON object, got invalid JSON ({rec})")]
    if not isinstance(rec, dict):
        return [Problem(file, line, LINE, f"expected a JSON object, got {describe(rec)}")]
    return [Problem(file, line, f, m) for f, m in _check_record(rec)]


def duplicate_problem(file: str, line: int, key: tuple[str, str], first_line: int) -> Problem:
    """The problem of a later row repeating an earlier row's ``(item_id, direction)``."""
    return Problem(
        file,
        line,
        "item_id",
        f"expected a unique (item_id, direction); ({key[0]!r}, {key[1]!r}) first appears on line {first_line}",
    )


def check_rows(records: Iterable[Record], file: str, require_pairs: bool = False) -> Validation:
    """Scan ``(line, record)`` pairs; a record is a parsed dict, or the Exception parsing raised.

    Problems come back sorted by line. Duplicates keep the first occurrence valid and flag the later
    ones, so that ``skip_invalid`` keeps exactly one row per ``(item_id, direction)``.
    """
    result = Validation(file=file)
    problems: list[Problem] = []
    first_seen: dict[tuple[str, str], int] = {}
    valid: list[tuple[int, str, str]] = []  # (line, item_id, direction) of rows with no problem so far
    for line, rec in records:
        result.n_records += 1
        found = record_problems(file, line, rec)
        if not isinstance(rec, dict):
            problems += found
            continue
        for name in rec:
            if name not in ALL_FIELDS:
                result.ignored_fields[name] += 1
        if not found:
            key = (rec["item_id"], rec["direction"])
            if key in first_seen:
                found.append(duplicate_problem(file, line, key, first_seen[key]))
            else:
                first_seen[key] = line
                valid.append((line, key[0], key[1]))
                result.directions[key[1]] += 1
        problems += found
    if require_pairs:
        forward_ids = {item for _, item, d in valid if d == "forward"}
        for line, item, d in valid:
            if d == "reverse" and item not in forward_ids:
                problems.append(
                    Problem(
                        file,
                        line,
                        "item_id",
                        f"expected a valid forward twin with item_id {item!r} (--require-pairs), found none",
                    )
                )
                result.directions["reverse"] -= 1
    result.problems = sorted(problems, key=lambda p: p.line)
    return result


def validate_rows(records: Iterable[Record], file: str, require_pairs: bool = False) -> list[Problem]:
    """Problems in ``(line, dict | Exception)`` records, sorted by line (empty list: all good)."""
    return check_rows(records, file, require_pairs).problems


def iter_jsonl(path: str | Path) -> Iterator[Record]:
    """``(line_number, dict | Exception)`` per non-blank line; parse errors are yielded, not raised.

    Blank lines are skipped (they carry no row, so nothing is dropped); line numbers stay physical.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield (
                    lineno,
                    ValueError(f"invalid UTF-8: byte 0x{raw[err.start]:02x} at position {err.start}"),
                )
                continue
            try:
                yield lineno, json.loads(text)
            except ValueError as err:
                yield lineno, err


def iter_json_array(path: str | Path) -> Iterator[Record]:
    """Records of a ``[...]`` JSON file; the "line" is the element's position (1-based)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of row objects, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def iter_parquet(path: str | Path, batch_rows: int = 8192) -> Iterator[Record]:
    """``(row_index + 1, dict)`` per Parquet row, read one record batch at a time (a large file is never
    held whole just to be scanned)."""
    import pyarrow.parquet as pq

    line = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for rec in batch.to_pylist():
            line += 1
            yield line, rec


def iter_records(path: str | Path) -> Iterator[Record]:
    """Records of a canonical file, by suffix: ``.parquet``, ``.json`` (array or JSON Lines), else JSONL."""
    path = Path(path)
    if path.suffix == ".parquet":
        return iter_parquet(path)
    if path.suffix == ".json":
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip()
        if head.startswith(b"["):
            return iter_json_array(path)
    return iter_jsonl(path)


def check_file(path: str | Path, require_pairs: bool = False) -> Validation:
    """:func:`check_rows` over a file; an unreadable or empty file is one ``<file>`` problem on line 1."""
    name = str(path)
    try:
        result = check_rows(iter_records(path), name, require_pairs)
    except Exception as err:  # unreadable: missing, not Parquet, not a JSON array
        result = Validation(file=name)
        result.problems = [Problem(name, 1, FILE, f"expected a readable row file, got {err}")]
        return result
    if result.n_records == 0:
        result.problems = [Problem(name, 1, FILE, "expected at least one row, the file has none")]
    return result


def validate_file(path: str | Path, require_pairs: bool = False) -> list[Problem]:
    """Problems in a canonical JSONL / JSON / Parquet file (empty list: all good)."""
    return check_file(path, require_pairs).problems
