"""Loaders: every source becomes canonical row dicts, and nothing is silently dropped.

Each loader reads ``(line, record)`` pairs, converts foreign layouts (r1k pairs, preference data, HF
columns) to canonical fields, and runs the shared rules of :mod:`revmix.platform.data.validate`. Bad rows
raise :class:`DataError` listing every problem as ``FILE:LINE: field: what was expected``; with
``skip_invalid=True`` the valid rows load and the rejected ones come back in :class:`LoadReport` (and are
logged), so ``n_read == len(rows) + n_rejected`` always holds.

Sources understood by :func:`load_rows`::

    data.jsonl | data.json | data.parquet     canonical rows
    hf:<name or local dir/file>               datasets.load_dataset / load_from_disk (+ field_map)
    r1k:<path> | r1k_sample                   the paper's sample-pair layout (shipped asset)
    preference:<path>                         prompt / chosen / rejected rows
    synthetic:<family>[,<family>...]          revmix.platform.data.synthetic.generate_mix (n=, seed=)
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revmix.atomic import atomic_target
from revmix.platform.data.schema import ALL_FIELDS, DIRECTIONS, Direction, Row
from revmix.platform.data.validate import (
    FILE,
    Problem,
    Record,
    RowError,
    check_rows,
    describe,
    iter_jsonl,
    iter_parquet,
    iter_records,
)

logger = logging.getLogger(__name__)

MAX_MESSAGE_PROBLEMS = 50
R1K_ASSET = "r1k_sample_pairs.jsonl"


class DataError(ValueError):
    """Rows failed validation; ``problems`` holds every one, the message the first 50."""

    def __init__(self, source: str, problems: list[Problem], n_read: int) -> None:
        self.source, self.problems, self.n_read = source, problems, n_read
        lines = [str(p) for p in problems[:MAX_MESSAGE_PROBLEMS]]
        if len(problems) > MAX_MESSAGE_PROBLEMS:
            lines.append(f"... and {len(problems) - MAX_MESSAGE_PROBLEMS} more problem(s)")
        if all(p.field == FILE for p in problems):  # the source itself: no rows to skip
            super().__init__("\n".join(lines))
            return
        bad = len({p.line for p in problems})
        super().__init__(
            f"{source}: {len(problems)} problem(s) in {bad} of {n_read} rows; nothing was loaded:\n"
            + "\n".join(lines)
            + "\n(to load the valid rows and count the rejected ones: data.skip_invalid=true in a run config, "
            "--skip-invalid on the command line, skip_invalid=True in Python)"
        )


@dataclass
class LoadReport:
    """Canonical rows plus an account of everything not loaded."""

    rows: list[dict[str, Any]]
    rejected: list[Problem] = field(default_factory=list)
    source: str = ""
    n_read: int = 0
    ignored_fields: dict[str, int] = field(default_factory=dict)
    origins: list[tuple[str, int]] = field(default_factory=list)  # (file, line) of each row, for later checks

    @property
    def n_rejected(self) -> int:
        """Rejected rows (a row with three problems counts once)."""
        return len({p.line for p in self.rejected})

    def summary(self) -> str:
        counts = Counter(r["direction"] for r in self.rows)
        dirs = ", ".join(f"{counts[d]} {d}" for d in DIRECTIONS)
        return f"{self.source}: {len(self.rows)} rows ({dirs}), {self.n_rejected} rejected"


def stable_item_id(text: str) -> str:
    """``q-<16 hex>`` from the whitespace-normalised text: identical across runs, machines and sources.

    Keyed on the forward question, so the r1k pairs and a forward-only load of the same questions (s1K
    via :func:`load_hf` with ``item_id_from="question"``) agree on ids.
    """
    digest = hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()
    return f"q-{digest[:16]}"


def load_records(
    records: Iterable[Record],
    source: str,
    *,
    skip_invalid: bool = False,
    require_pairs: bool = False,
    field_names: dict[str, str] | None = None,
) -> LoadReport:
    """Validate converted records; keep the valid ones as canonical dicts or raise :class:`DataError`."""
    records = _read_all(records, source)
    result = check_rows(records, source, require_pairs)
    problems = result.problems
    if field_names:  # report foreign column names: "solution (as response)"
        problems = [Problem(p.file, p.line, field_names.get(p.field, p.field), p.message) for p in problems]
    if not records:
        raise DataError(source, [Problem(source, 1, FILE, "expected at least one row, found none")], 0)
    if problems and not skip_invalid:
        raise DataError(source, problems, len(records))
    bad = {p.line for p in problems}
    # Records that failed to parse always carry a problem; the isinstance check says so to the type checker.
    kept = [(line, rec) for line, rec in records if line not in bad and isinstance(rec, dict)]
    rows = [{f: rec.get(f) for f in ALL_FIELDS} for _, rec in kept]
    report = LoadReport(rows, problems, source, len(records), dict(result.ignored_fields))
    report.origins = [(source, line) for line, _ in kept]
    if problems:
        logger.warning(
            "%s: rejected %d of %d rows (%d problems); first: %s",
            source,
            report.n_rejected,
            report.n_read,
            len(problems),
            problems[0],
        )
    return report


def _read_all(records: Iterable[Record], source: str) -> list[Record]:
    """Every record of a source; a source that cannot be read (missing, not UTF-8, not Parquet, not a JSON
    array) is one problem naming it, not a traceback."""
    try:
        return list(records)
    except (OSError, ValueError) as err:  # UnicodeDecodeError and pyarrow's ArrowInvalid are ValueErrors
        raise DataError(
            source, [Problem(source, 1, FILE, f"expected a readable row file, got {err}")], 0
        ) from None


def load_jsonl(path: str | Path, *, skip_invalid: bool = False, require_pairs: bool = False) -> LoadReport:
    """Canonical rows from JSON Lines (``.json`` holding one ``[...]`` array works too)."""
    return load_records(iter_records(path), str(path), skip_invalid=skip_invalid, require_pairs=require_pairs)


def load_parquet(path: str | Path, *, skip_invalid: bool = False, require_pairs: bool = False) -> LoadReport:
    """Canonical rows from Parquet; problems name ``row index + 1`` as the line."""
    return load_records(iter_parquet(path), str(path), skip_invalid=skip_invalid, require_pairs=require_pairs)


# --------------------------------------------------------------------------------------------- HF datasets


def _open_hf(name_or_path: str, split: str, config: str | None, cache_dir: str | None) -> Any:
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not found; available: {', '.join(ds)}")
            ds = ds[split]
        return ds
    if path.is_file():
        builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
        if path.suffix not in builders:
            raise ValueError(f"expected a {', '.join(builders)} file, got {path.name}")
        return datasets.load_dataset(
            builders[path.suffix], data_files={split: str(path)}, split=split, cache_dir=cache_dir
        )
    return datasets.load_dataset(name_or_path, config, split=split, cache_dir=cache_dir)


def normalise_scalars(out: dict[str, Any]) -> dict[str, Any]:
    """Ids and numeric answers as strings, 0/1 (or any parseable) directions as labels, in place; a
    direction that does not parse is left as is for validation to name with the valid choices."""
    for k in ("item_id", "answer"):
        if isinstance(out.get(k), int | float) and not isinstance(out.get(k), bool):
            out[k] = str(out[k])
    try:
        if out.get("direction") is not None:
            out["direction"] = Direction.parse(out["direction"]).label
    except ValueError:
        pass
    return out


def load_hf(
    name_or_path: str,
    split: str = "train",
    *,
    field_map: dict[str, str] | None = None,
    defaults: dict[str, str] | None = None,
    item_id_from: str | None = None,
    config: str | None = None,
    cache_dir: str | None = None,
    skip_invalid: bool = False,
    require_pairs: bool = False,
) -> LoadReport:
    """Rows of a Hugging Face dataset (hub name when online, or a local dir / file / ``save_to_disk``).

    ``field_map`` renames source columns to canonical ones (``{"question": "prompt"}``); ``defaults`` fills
    canonical fields the source lacks (``{"direction": "forward", "task": "s1k"}``); ``item_id_from`` names
    a column hashed with :func:`stable_item_id` when the source has no id. Foreign values are normalised
    where unambiguous: integer ids and numeric answers become strings, directions 0/1/"Forward" become
    labels. Problems name the source column: ``solution (as response)``.
    """
    field_map = dict(field_map or {})
    defaults = dict(defaults or {})
    unknown = sorted({*field_map.values(), *defaults} - set(ALL_FIELDS))
    if unknown:
        raise ValueError(
            f"field_map/defaults target unknown field(s) {unknown}; valid: {', '.join(ALL_FIELDS)}"
        )
    source = f"hf:{name_or_path}[{split}]"
    try:
        ds = _open_hf(name_or_path, split, config, cache_dir)
    except Exception as err:
        raise DataError(source, [Problem(source, 1, FILE, f"expected a loadable dataset: {err}")], 0) from err
    columns = list(ds.column_names)
    wanted = list(field_map) + ([item_id_from] if item_id_from else [])
    missing = [c for c in wanted if c not in columns]
    clash = [c for c in columns if c in field_map.values() and c not in field_map]
    if missing or clash:
        why = (
            f"column(s) {missing} not in the dataset"
            if missing
            else f"field_map targets {clash} already exist"
        )
        raise DataError(source, [Problem(source, 1, FILE, f"{why}; columns: {', '.join(columns)}")], 0)

    def convert(rec: dict[str, Any]) -> dict[str, Any] | RowError:
        out = {field_map.get(k, k): v for k, v in rec.items()}
        for k, v in defaults.items():
            if out.get(k) is None:
                out[k] = v
        if item_id_from and out.get("item_id") is None:
            key = rec[item_id_from]
            if not isinstance(key, str) or not key.strip():
                return RowError([(item_id_from, f"expected a non-empty string to hash, got {describe(key)}")])
            out["item_id"] = stable_item_id(key)
        return normalise_scalars(out)

    names = {canon: f"{src} (as {canon})" for src, canon in field_map.items()}
    records = ((i, convert(rec)) for i, rec in enumerate(ds, start=1))
    return load_records(
        records, source, skip_invalid=skip_invalid, require_pairs=require_pairs, field_names=names
    )


# ------------------------------------------------------------------------------------ r1k sample pairs

_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(r"^[\s*#>_-]*answer[\s*_]*:[\s*_]*(.*)$", re.IGNORECASE | re.MULTILINE)


def chatml_turns(text: str) -> dict[str, str]:
    """``{role: content}`` of a Qwen ChatML string (last turn per role; trailing ``<|im_end|>`` removed).

    Only system/user/assistant headers split turns, so the s1 markers ``<|im_start|>think`` and
    ``<|im_start|>answer`` stay inside the assistant turn.
    """
    parts = _TURN.split(text)
    turns: dict[str, str] = {}
    for role, body in zip(parts[1::2], parts[2::2]):
        body = body.rstrip()
        if body.endswith("<|im_end|>"):
            body = body[: -len("<|im_end|>")]
        turns[role] = body
    return turns


def extract_final_answer(response: str) -> str | None:
    """The answer a trace concludes: its last ``\\boxed{...}``, else its last ``Answer:`` line, else None.

    Only the s1 answer section (after ``<|im_start|>answer``) is searched when there is one, so boxed
    expressions inside the thinking do not count. Why boxed first: reverse traces write
    ``Answer: <sentence> \\boxed{x}`` where the box is the answer and the sentence is not.
    """
    section = response.rsplit("<|im_start|>answer", 1)[-1]
    boxes = list(_BOXED.finditer(section))
    if boxes:
        start, depth = boxes[-1].end(), 1
        for i in range(start, len(section)):
            depth += {"{": 1, "}": -1}.get(section[i], 0)
            if depth == 0:
                return section[start:i].strip() or None
    lines = list(_ANSWER_LINE.finditer(section))
    if lines:
        value = lines[-1].group(1).strip().strip("*").strip().rstrip(".")
        if not value:  # "**Answer:**\n  value" puts the value on the next line
            after = section[lines[-1].end() :].split("\n")
            value = next((s.strip() for s in after if s.strip()), "")
        return value or None
    return None


def _r1k_convert(rec: dict[str, Any]) -> dict[str, Any] | RowError:
    """One r1k record → one canonical row (original → forward, flipped → reverse)."""
    problems: list[tuple[str, str]] = []
    kind = rec.get("sample_type")
    if kind not in ("original", "flipped"):
        problems.append(("sample_type", f"expected 'original' or 'flipped', got {describe(kind)}"))
    for key in ("question", "cot_type"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            problems.append((key, f"expected a non-empty string, got {describe(rec.get(key))}"))
    turns: dict[str, dict[str, str]] = {}
    for key in ("text", "worse-text"):
        value = rec.get(key)
        turns[key] = chatml_turns(value) if isinstance(value, str) else {}
        if not turns[key].get("user", "").strip() or not turns[key].get("assistant", "").strip():
            problems.append(
                (key, f"expected a ChatML string with user and assistant turns, got {describe(value)}")
            )
    if problems:
        return RowError(problems)
    response = turns["text"]["assistant"]
    answer = extract_final_answer(response)
    if kind == "original" and isinstance(rec.get("solution"), str):
        answer = extract_final_answer(rec["solution"]) or answer  # ground truth first
    return {
        "item_id": stable_item_id(rec["question"]),
        "direction": "forward" if kind == "original" else "reverse",
        "task": f"r1k/{rec['cot_type']}",
        "prompt": turns["text"]["user"],
        "response": response,
        "other_response": turns["worse-text"]["assistant"],
        "answer": answer,
    }


def load_r1k_pairs(
    path: str | Path | None = None, *, skip_invalid: bool = False, require_pairs: bool = False
) -> LoadReport:
    """The paper's sample-pair layout (SOURCES.md) → one canonical row per record.

    ``text``/``worse-text`` are full ChatML strings; the prompt is ``text``'s user turn (what the
    paper's model was trained on; it differs from ``question``/``relevant-question`` only in whitespace),
    the response its assistant turn verbatim (s1 ``think``/``answer`` markers kept), ``other_response`` the
    assistant turn of ``worse-text``. ``item_id`` hashes the forward ``question`` (present in both
    records), so twins share it. ``answer`` (:func:`extract_final_answer`): for forward rows the
    ground-truth ``solution``'s boxed value or ``Answer:`` line when it has one (crossword solutions do),
    else what the forward trace concludes; for reverse rows what the reverse trace concludes (there is no
    ground truth for the reverse question). ``path=None`` loads the shipped 70-row asset.
    """
    path = Path(path) if path else r1k_asset_path()
    records: Iterator[Record] = iter_parquet(path) if path.suffix == ".parquet" else iter_jsonl(path)
    converted = ((i, _r1k_convert(r) if isinstance(r, dict) else r) for i, r in records)
    return load_records(converted, str(path), skip_invalid=skip_invalid, require_pairs=require_pairs)


def r1k_asset_path() -> Path:
    """The shipped sample, ``revmix/assets/r1k_sample_pairs.jsonl``."""
    from revmix.assets import asset_path

    return asset_path(R1K_ASSET)


# ----------------------------------------------------------------------------------------- preference


def _message_text(value: Any, role: str) -> Any:
    """Chat-list values (``[{"role", "content"}, ...]``) → the last ``role`` message; strings unchanged."""
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        picked = [m["content"] for m in value if m.get("role") == role]
        return picked[-1] if picked else None
    return value


def load_preference(
    path: str | Path,
    *,
    task: str | None = None,
    skip_invalid: bool = False,
    require_pairs: bool = False,
) -> LoadReport:
    """Generic preference data (``prompt``, ``chosen``, ``rejected``; JSONL or Parquet) → canonical rows.

    response = chosen, other_response = rejected; ``direction`` and ``answer`` are kept when present
    (direction defaults to forward); ``task`` from the row, else the argument, else the file stem;
    ``item_id`` from ``item_id``/``id``, else :func:`stable_item_id` of the prompt (two pairs for one
    prompt then collide, loudly, as duplicates: one canonical row per item and direction). Chat-list
    values are reduced to the last user (prompt) or assistant (chosen/rejected) message.
    """
    path = Path(path)
    default_task = task or path.stem

    def convert(rec: dict[str, Any]) -> dict[str, Any] | RowError:
        out: dict[str, Any] = {}
        problems = []
        for src, canon, role in (
            ("prompt", "prompt", "user"),
            ("chosen", "response", "assistant"),
            ("rejected", "other_response", "assistant"),
        ):
            value = _message_text(rec.get(src), role)
            if not isinstance(value, str) or not value.strip():
                why = "required field is missing" if src not in rec else f"got {describe(value)}"
                problems.append((src, f"expected a non-empty string or chat message list; {why}"))
            out[canon] = value
        if problems:
            return RowError(problems)
        ident = rec.get("item_id", rec.get("id"))
        out["item_id"] = str(ident) if isinstance(ident, int | str) else stable_item_id(out["prompt"])
        out["direction"] = rec.get("direction", "forward")
        out["task"] = rec.get("task") or default_task
        out["answer"] = rec.get("answer")
        return out

    records = iter_parquet(path) if path.suffix == ".parquet" else iter_jsonl(path)
    converted = ((i, convert(r) if isinstance(r, dict) else r) for i, r in records)
    return load_records(converted, str(path), skip_invalid=skip_invalid, require_pairs=require_pairs)


# ------------------------------------------------------------------------------------------ dispatch


def _load_synthetic(
    spec: str,
    *,
    n: int | None = None,
    seed: int = 0,
    skip_invalid: bool = False,
    require_pairs: bool = False,
) -> LoadReport:
    from revmix.platform.data import synthetic

    families = [f.strip() for f in spec.split(",") if f.strip()]
    if not families or n is None:
        raise ValueError(
            f"synthetic:{spec}: expected synthetic:<family>[,<family>...] and n=<rows>; "
            f"families: {', '.join(synthetic.family_names())}"
        )
    rows = synthetic.generate_mix(families, n=n, seed=seed)
    records = ((i, r.to_dict() if isinstance(r, Row) else r) for i, r in enumerate(rows, start=1))
    source = f"synthetic:{','.join(families)}"
    return load_records(records, source, skip_invalid=skip_invalid, require_pairs=require_pairs)


SOURCE_FORMS = (
    "FILE.jsonl | FILE.json | FILE.parquet | hf:<name or path> | r1k:<path> | r1k_sample | "
    "preference:<path> | synthetic:<family>[,<family>...]"
)


def load_rows(source: str, **kw: Any) -> LoadReport:
    """Load any supported source (see the module docstring); ``kw`` goes to the chosen loader."""
    prefix, _, rest = source.partition(":")
    if source == "r1k_sample" or source == "r1k:":
        return load_r1k_pairs(None, **kw)
    if rest and prefix == "r1k":
        return load_r1k_pairs(rest, **kw)
    if rest and prefix == "hf":
        return load_hf(rest, **kw)
    if rest and prefix == "preference":
        return load_preference(rest, **kw)
    if prefix == "synthetic":
        return _load_synthetic(rest, **kw)
    suffix = Path(source).suffix
    if suffix in (".jsonl", ".json"):
        return load_jsonl(source, **kw)
    if suffix == ".parquet":
        return load_parquet(source, **kw)
    raise ValueError(f"unknown data source {source!r}; expected one of: {SOURCE_FORMS}")


# --------------------------------------------------------------------------------------------- writers


def _canonical(rows: Iterable[dict[str, Any] | Row], path: str | Path) -> list[dict[str, Any]]:
    """Validate before writing, so that no tool ever writes a file ``revmix data validate`` rejects."""
    dicts = [r.to_dict() if isinstance(r, Row) else r for r in rows]
    source = f"{path} (rows to write)"
    if not dicts:
        raise DataError(source, [Problem(source, 1, FILE, "expected at least one row to write")], 0)
    return load_records(enumerate(dicts, start=1), source).rows


def write_jsonl(rows: Iterable[dict[str, Any] | Row], path: str | Path) -> int:
    """Write canonical rows (canonical fields only, in schema order) atomically; returns the count."""
    import json

    data = _canonical(rows, path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in data:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(data)


def write_parquet(rows: Iterable[dict[str, Any] | Row], path: str | Path) -> int:
    """Write canonical rows as Parquet (every column a nullable string) atomically; returns the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _canonical(rows, path)
    schema = pa.schema([(f, pa.string()) for f in ALL_FIELDS])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        pq.write_table(pa.Table.from_pylist(data, schema=schema), tmp)
    return len(data)
