"""Real data in a run config: a source (local file or ``hf:NAME``) in the layout ``data.format`` names.

``data.format`` picks the converter from source records to canonical rows:

* ``canonical``: the rows already hold the canonical fields (:mod:`revmix.platform.data.schema`), maybe
  under other column names (``data.columns``); ``item_id`` falls back to the row number (``row-<n>``),
  which suits forward-only data (twins only pair through a shared id column).
* ``s1k``: the s1K layout (``simplescaling/s1K``: question, solution, cot_type, source_type, metadata,
  cot, thinking_trajectories, attempt) → one forward row per record; see :func:`render_s1_response`.
* ``r1k``: the paper's sample-pair layout (arXiv 2509.13079; ``revmix/assets/SOURCES.md``): one record per
  direction (``sample_type`` original/flipped), full ChatML ``text`` / ``worse-text`` → forward and
  reverse rows (:func:`revmix.platform.data.loaders.load_r1k_pairs` documents the mapping).

``data.columns`` maps a field of the chosen layout to the source column holding it (s1K-1.1 keeps its
trace in ``deepseek_thinking_trajectory``: ``columns: {thinking_trajectories:
deepseek_thinking_trajectory, attempt: deepseek_attempt}``). A record without a required column is a
problem ``FILE:LINE: column: required column missing; columns found: ...``; an ``hf:`` dataset is checked
once, up front, against its column names. Lines of Parquet files and datasets are row index + 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from revmix.platform.data.loaders import (
    DataError,
    LoadReport,
    _open_hf,
    _r1k_convert,
    extract_final_answer,
    load_records,
    normalise_scalars,
    r1k_asset_path,
    stable_item_id,
)
from revmix.platform.data.schema import ALL_FIELDS
from revmix.platform.data.validate import FILE, Problem, Record, RowError, describe, iter_records

S1K_FIELDS: tuple[str, ...] = (
    "question",
    "thinking_trajectories",
    "attempt",
    "solution",
    "cot_type",
    "item_id",
)
R1K_FIELDS: tuple[str, ...] = ("question", "sample_type", "cot_type", "text", "worse-text", "solution")
LAYOUT_FIELDS: dict[str, tuple[str, ...]] = {"canonical": ALL_FIELDS, "s1k": S1K_FIELDS, "r1k": R1K_FIELDS}
"""Per ``data.format``: the fields ``data.columns`` may map to source columns."""
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "canonical": (),  # the canonical rules name missing fields themselves
    "s1k": ("question", "thinking_trajectories", "attempt"),
    "r1k": ("question", "sample_type", "cot_type", "text", "worse-text"),
}
S1_THINK, S1_ANSWER = "<|im_start|>think\n", "\n<|im_start|>answer\n"


def check_columns(fmt: str, columns: dict[str, str]) -> None:
    """Raise ``ValueError`` naming the valid keys when ``columns`` maps a field ``fmt`` does not have."""
    if fmt not in LAYOUT_FIELDS:
        raise ValueError(f"unknown data.format {fmt!r}; valid: {', '.join(LAYOUT_FIELDS)}")
    unknown = sorted(set(columns) - set(LAYOUT_FIELDS[fmt]))
    if unknown:
        raise ValueError(
            f"columns: {unknown} are not fields of the {fmt} layout; valid keys: {', '.join(LAYOUT_FIELDS[fmt])}"
        )


def render_s1_response(trace: str | list[str], attempt: str) -> str:
    """The assistant turn s1 trains on (``simplescaling/s1``, ``data/tokenization.py``)::

        <|im_start|>think\\n{"\\n".join(trace).strip()}\\n<|im_start|>answer\\n{answer.strip()}

    where ``answer = "Answer: " + attempt`` unless the attempt already contains ``Answer:``. Why this
    rendering (not ``<think>…</think>``): it is what the paper's forward traces hold (the r1k ``text``
    column), so s1K rows and r1k forward rows of one question are rendered alike. The chat template adds
    the user turn and the assistant header around it when the row is tokenised.
    """
    joined = "\n".join(trace) if isinstance(trace, list) else trace
    answer = attempt if "Answer:" in attempt else "Answer: " + attempt
    return S1_THINK + joined.strip() + S1_ANSWER + answer.strip()


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def s1k_row(rec: dict[str, Any]) -> dict[str, Any] | RowError:
    """One s1K record (layout field names) → a canonical forward row.

    prompt = question; response = :func:`render_s1_response`; ``answer`` = the boxed value or
    ``Answer:`` line of ``solution`` (:func:`extract_final_answer`), else of the attempt, else null;
    ``item_id`` = the ``item_id`` column when mapped, else :func:`stable_item_id` of the question (the id
    the r1k pairs give the same question, so held-out splits agree across the two sources); ``task`` =
    ``s1k/<cot_type>`` (``s1k`` without one).
    """
    trace = rec.get("thinking_trajectories")
    if isinstance(trace, list) and trace and all(isinstance(t, str) for t in trace):
        trace = "\n".join(trace)  # s1K holds a list of one trace; s1 joins with newlines
    problems = [
        (k, f"expected a non-empty string, got {describe(rec.get(k))}") for k in ("question", "attempt")
    ]
    problems = [p for p in problems if not _nonempty(rec.get(p[0]))]
    if not isinstance(trace, str) or not trace.strip():
        why = f"expected a string or list of strings, got {describe(rec.get('thinking_trajectories'))}"
        problems.append(("thinking_trajectories", why))
    if problems or not isinstance(trace, str):
        return RowError(problems)
    response = render_s1_response(trace, rec["attempt"])
    solution = rec.get("solution")
    truth = extract_final_answer(solution) if isinstance(solution, str) else None
    ident, cot = rec.get("item_id"), rec.get("cot_type")
    has_id = isinstance(ident, int | str) and not isinstance(ident, bool) and str(ident).strip()
    return {
        "item_id": str(ident) if has_id else stable_item_id(rec["question"]),
        "direction": "forward",
        "task": f"s1k/{cot}" if _nonempty(cot) else "s1k",
        "prompt": rec["question"],
        "response": response,
        "answer": truth or extract_final_answer(response),
    }


def canonical_row(rec: dict[str, Any], line: int) -> dict[str, Any]:
    """A record already in canonical fields: ids and numeric answers as strings, 0/1 directions as labels;
    no ``item_id`` → ``row-<line>``. Anything else is left for the canonical rules to name."""
    out = {k: rec[k] for k in ALL_FIELDS if k in rec}
    if out.get("item_id") is None:
        out["item_id"] = f"row-{line}"
    return normalise_scalars(out)


def _convert(fmt: str, columns: dict[str, str], line: int, rec: Any) -> Any:
    """Rename a source record to layout fields, check its required columns, convert it; problems name the
    source's columns. Unparsed lines and non-objects pass through for the shared rules to name."""
    if not isinstance(rec, dict):
        return rec
    source_of = {f: columns.get(f, f) for f in LAYOUT_FIELDS[fmt]}
    missing = [source_of[f] for f in REQUIRED_COLUMNS[fmt] if source_of[f] not in rec]
    if missing:
        found = ", ".join(rec) or "(none)"
        return RowError([(c, f"required column missing; columns found: {found}") for c in missing])
    renamed = {f: rec[c] for f, c in source_of.items() if c in rec}
    if fmt == "canonical":
        return canonical_row(renamed, line)
    out = s1k_row(renamed) if fmt == "s1k" else _r1k_convert(renamed)
    if isinstance(out, RowError):
        return RowError([(source_of.get(f, f), m) for f, m in out.problems])
    return out


def _records(
    source: str, split: str, config_name: str | None
) -> tuple[str, Iterator[Record], list[str] | None]:
    """``(label, (line, record) pairs, column names when known up front)`` of a local file or ``hf:``."""
    if source.startswith("hf:"):
        name = source[3:]
        label = f"hf:{name}[{split}]"
        try:
            ds = _open_hf(name, split, config_name, None)
        except Exception as err:
            local = Path(name).exists()
            why = (
                f"expected a loadable dataset: {err}"
                if local
                else f"{name!r} is not a local directory or file, and datasets.load_dataset could not read it "
                f"from the Hugging Face cache or the Hub (offline, or no such dataset): {err}. Load it once "
                f"online (datasets.load_dataset({name!r}).save_to_disk(DIR)) and set data.source=hf:DIR"
            )
            raise DataError(label, [Problem(label, 1, FILE, why)], 0) from err
        return label, enumerate(ds, start=1), list(ds.column_names)
    if source == "r1k_sample":  # the shipped sample of the paper's pairs
        source = str(r1k_asset_path())
    if Path(source).suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(
            f"data.source {source!r}: data.format needs a FILE.jsonl | FILE.json | FILE.parquet | hf:NAME source"
        )
    return source, iter_records(source), None


def load_formatted(
    source: str,
    fmt: str,
    columns: dict[str, str] | None = None,
    *,
    split: str = "train",
    config_name: str | None = None,
    skip_invalid: bool = False,
) -> LoadReport:
    """Canonical rows of ``source`` read in the ``fmt`` layout (see the module docstring)."""
    columns = dict(columns or {})
    check_columns(fmt, columns)
    label, records, names = _records(source, split, config_name)
    if names is not None:
        wanted = [columns.get(f, f) for f in REQUIRED_COLUMNS[fmt]] + [
            c for f, c in columns.items() if f not in REQUIRED_COLUMNS[fmt]
        ]
        missing = [c for c in wanted if c not in names]
        if missing:
            why = f"column(s) {missing} not in the dataset; columns found: {', '.join(names)}"
            raise DataError(label, [Problem(label, 1, FILE, why)], 0)
    converted = ((line, _convert(fmt, columns, line, rec)) for line, rec in records)
    names_for = {f: f"{c} (as {f})" for f, c in columns.items()} if fmt == "canonical" else None
    return load_records(converted, label, skip_invalid=skip_invalid, field_names=names_for)
