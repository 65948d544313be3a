"""Benchmark registry: every evaluation set as a list of ``EvalItem``.

Shipped (``revmix.assets``, see its ``SOURCES.md``): ``math500``, ``aime2024``, ``aime2025``, ``gsm8k``.
From a user-supplied file: ``gpqa`` (the official GPQA-Diamond CSV, never shipped because its authors ask
that the questions not be published in plain text) and ``jsonl:<path>`` (any JSONL with ``prompt`` and
``answer``). Generated: ``synthetic`` (the held-out split of the synthetic forward/reverse task family,
with both directions' solutions so that ALP can score y+ and y− on the same items).

Every item carries the answer ``kind`` that ``revmix.platform.evaluation.answers.is_equivalent`` needs, so
the eval runner never has to know which benchmark it is scoring.
"""

from __future__ import annotations

import csv
import functools
import json
import pathlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from revmix.assets import asset_path
from revmix.platform.data.schema import Direction
from revmix.platform.evaluation.answers import CHOICE_LETTERS, KINDS

# Appended to every math prompt; the answer extractor looks for "Answer:" first. Override by assigning
# the module attribute (it is read at load time), e.g. ``benchmarks.MATH_PROMPT_SUFFIX = ""``.
MATH_PROMPT_SUFFIX: str = "\n\nPut the final answer after 'Answer:'."
CHOICE_PROMPT_SUFFIX: str = "\n\nPut the letter of the correct choice (A, B, C or D) after 'Answer:'."

GPQA_COLUMNS: tuple[str, ...] = (
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
)


@dataclass(frozen=True)
class EvalItem:
    """One evaluation question.

    ``answer`` is the gold final answer compared under ``kind`` (one of ``answers.KINDS``). ``direction`` is
    set for forward/reverse items; ``response``/``other_response`` are the reference solutions y+ and y−
    when the benchmark has them (synthetic, JSONL), for ALP scoring.
    """

    id: str
    prompt: str
    answer: str
    kind: str
    direction: str | None = None
    task: str = "custom"
    response: str | None = None
    other_response: str | None = None


# ----------------------------------------------------------------------------------------------------------
# helpers


def _read_jsonl(path: pathlib.Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


def _field(obj: dict[str, Any], key: str, where: str) -> str:
    """A required non-empty field as a string (numbers are accepted and converted)."""
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
    value = obj[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _optional(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string or null, got {type(value).__name__}")
    return value


def _math_prompt(problem: str) -> str:
    return problem.strip() + MATH_PROMPT_SUFFIX


# ----------------------------------------------------------------------------------------------------------
# shipped benchmarks


def _shipped_problems(filename: str, task: str, id_field: str, kind: str, **_: Any) -> list[EvalItem]:
    """A shipped ``{id_field, problem, answer}`` file as items with ids ``task/<id>``."""
    path = asset_path(filename)
    return [
        EvalItem(
            id=f"{task}/{_field(obj, id_field, f'{path}:{n}')}",
            prompt=_math_prompt(_field(obj, "problem", f"{path}:{n}")),
            answer=_field(obj, "answer", f"{path}:{n}"),
            kind=kind,
            task=task,
        )
        for n, obj in _read_jsonl(path)
    ]


def _load_aime2025(**_: Any) -> list[EvalItem]:
    path = asset_path("aime2025.jsonl")
    rows = _read_jsonl(path)
    items = []
    for i, (n, obj) in enumerate(rows):
        contest, number = ("I", i + 1) if i < 15 else ("II", i - 14)  # file order: I 1-15, then II 1-15
        items.append(
            EvalItem(
                id=f"aime2025/{contest}-{number}",
                prompt=_math_prompt(_field(obj, "problem", f"{path}:{n}")),
                answer=_field(obj, "answer", f"{path}:{n}"),
                kind="integer",
                task="aime2025",
            )
        )
    return items


def _load_gsm8k(**_: Any) -> list[EvalItem]:
    path = asset_path("gsm8k_test.jsonl")
    items = []
    for i, (n, obj) in enumerate(_read_jsonl(path)):
        where = f"{path}:{n}"
        solution = _field(obj, "answer", where)
        if "####" not in solution:
            raise ValueError(f"{where}: field 'answer' has no '####' final-answer marker")
        final = solution.rsplit("####", 1)[1].strip().replace(",", "")  # "2,125" -> "2125"
        items.append(
            EvalItem(
                id=f"gsm8k/{i}",
                prompt=_math_prompt(_field(obj, "question", where)),
                answer=final,
                kind="math",
                task="gsm8k",
                response=solution,
            )
        )
    return items


# ----------------------------------------------------------------------------------------------------------
# user-supplied files


def _load_gpqa(*, path: str | None = None, seed: int = 0, **_: Any) -> list[EvalItem]:
    """GPQA-Diamond from the official CSV; the four choices of each row are shuffled by (seed, row)."""
    if not path:
        raise ValueError(
            "benchmark 'gpqa' reads the official GPQA-Diamond CSV (gpqa_diamond.csv from the authors' "
            "password-protected release, https://github.com/idavidrein/gpqa) and revmix never ships it: "
            "pass path=/path/to/gpqa_diamond.csv"
        )
    csv_path = pathlib.Path(path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"GPQA CSV not found: {csv_path}")
    items: list[EvalItem] = []
    with csv_path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in GPQA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{csv_path}: missing GPQA column(s) {missing}; expected the official layout with "
                f"{list(GPQA_COLUMNS)} (found {reader.fieldnames})"
            )
        for i, row in enumerate(reader):
            where = f"{csv_path}:{reader.line_num}"
            texts = {}
            for column in GPQA_COLUMNS:
                value = (row.get(column) or "").strip()
                if not value:
                    raise ValueError(f"{where}: empty GPQA column {column!r}")
                texts[column] = value
            choices = [texts[c] for c in GPQA_COLUMNS[1:]]  # correct answer first
            order = list(range(4))
            random.Random(f"gpqa/{seed}/{i}").shuffle(order)
            letter = CHOICE_LETTERS[order.index(0)]
            lines = [f"{CHOICE_LETTERS[k]}) {choices[j]}" for k, j in enumerate(order)]
            record_id = (row.get("Record ID") or "").strip() or str(i)
            items.append(
                EvalItem(
                    id=f"gpqa/{record_id}",
                    prompt=texts["Question"] + "\n\n" + "\n".join(lines) + CHOICE_PROMPT_SUFFIX,
                    answer=letter,
                    kind="choice",
                    task="gpqa",
                )
            )
    return items


def _load_jsonl(*, path: str | None = None, **_: Any) -> list[EvalItem]:
    """Any JSONL: required ``prompt``, ``answer``; optional ``id``, ``kind`` (default math), ``direction``,
    ``task``, ``response``, ``other_response``. The prompt is used verbatim (no suffix is added)."""
    if not path:
        raise ValueError("benchmark 'jsonl' needs a file: use the name 'jsonl:<path>' or pass path=...")
    file = pathlib.Path(path).expanduser()
    items = []
    for n, obj in _read_jsonl(file):
        where = f"{file}:{n}"
        kind = _optional(obj, "kind", where) or "math"
        if kind not in KINDS:
            raise ValueError(f"{where}: field 'kind' is {kind!r}; valid kinds: {', '.join(KINDS)}")
        direction = obj.get("direction")
        if direction is not None:
            try:
                direction = Direction.parse(direction).label
            except ValueError as err:
                raise ValueError(f"{where}: field 'direction': {err}") from None
        item_id = obj.get("id", obj.get("item_id"))
        items.append(
            EvalItem(
                id=str(item_id) if item_id is not None else f"{file.stem}/{n}",
                prompt=_field(obj, "prompt", where),
                answer=_field(obj, "answer", where),
                kind=kind,
                direction=direction,
                task=_optional(obj, "task", where) or f"jsonl/{file.stem}",
                response=_optional(obj, "response", where),
                other_response=_optional(obj, "other_response", where),
            )
        )
    return items


# ----------------------------------------------------------------------------------------------------------
# synthetic


def _load_synthetic(
    *,
    seed: int = 0,
    synthetic_families: list[str] | None = None,
    synthetic_n: int = 200,
    synthetic_test_fraction: float = 0.2,
    **_: Any,
) -> list[EvalItem]:
    """The held-out split (by item, so a test fact never appears in training in either direction).

    Uses the same ``generate_mix``/``split_by_item`` calls as training data preparation, so with the same
    (families, n, seed, test_fraction) these are exactly the items training held out. All families by
    default; answers are compared with kind ``exact``.
    """
    from revmix.platform.data import synthetic

    if not 0.0 < synthetic_test_fraction < 1.0:
        raise ValueError(f"synthetic_test_fraction must be in (0, 1), got {synthetic_test_fraction}")
    families = list(synthetic_families) if synthetic_families is not None else synthetic.family_names()
    rows = synthetic.generate_mix(families, synthetic_n, seed)
    test = synthetic.split_by_item(rows, synthetic_test_fraction, seed)[1]
    items = []
    for i, row in enumerate(test):
        where = f"synthetic test row {i}"
        direction = Direction.parse(row["direction"]).label
        answer = row.get("answer")
        if answer is None:
            raise ValueError(f"{where}: synthetic row {row.get('item_id')!r} has no 'answer'")
        items.append(
            EvalItem(
                id=f"{row['item_id']}/{direction}",
                prompt=_field(row, "prompt", where),
                answer=str(answer),
                kind="exact",
                direction=direction,
                task=str(row.get("task") or "synthetic"),
                response=row.get("response"),
                other_response=row.get("other_response"),
            )
        )
    return items


# ----------------------------------------------------------------------------------------------------------
# registry

_LOADERS: dict[str, Callable[..., list[EvalItem]]] = {
    "math500": functools.partial(_shipped_problems, "math500_test.jsonl", "math500", "unique_id", "math"),
    "aime2024": functools.partial(_shipped_problems, "aime2024.jsonl", "aime2024", "id", "integer"),
    "aime2025": _load_aime2025,
    "gsm8k": _load_gsm8k,
    "gpqa": _load_gpqa,
    "jsonl": _load_jsonl,
    "synthetic": _load_synthetic,
}


def benchmark_names() -> list[str]:
    """Registered benchmark names; ``jsonl`` is used as ``jsonl:<path>`` (``gpqa:<path>`` also works)."""
    return list(_LOADERS)


def load_benchmark(
    name: str,
    limit: int | None = None,
    *,
    seed: int = 0,
    path: str | None = None,
    synthetic_families: list[str] | None = None,
    synthetic_n: int = 200,
    synthetic_test_fraction: float = 0.2,
) -> list[EvalItem]:
    """Load benchmark ``name`` as a list of items, the first ``limit`` of them when given.

    ``name`` is a registered name or ``<name>:<path>`` (``jsonl:data/eval.jsonl``); ``path`` gives the file
    for ``gpqa``/``jsonl`` otherwise. ``seed`` fixes GPQA's choice order and the synthetic split.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"benchmark name must be a non-empty string; valid: {benchmark_names()}")
    key, sep, inline_path = name.partition(":")
    if key not in _LOADERS or (sep and key not in ("jsonl", "gpqa")):
        raise ValueError(
            f"unknown benchmark {name!r}; valid: {', '.join(benchmark_names())} (use 'jsonl:<path>' for a file)"
        )
    if sep:
        if not inline_path:
            raise ValueError(f"benchmark {name!r}: empty path after '{key}:'")
        if path is not None and path != inline_path:
            raise ValueError(f"benchmark {name!r} names a path and path={path!r} names another")
        path = inline_path
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    items = _LOADERS[key](
        path=path,
        seed=seed,
        synthetic_families=synthetic_families,
        synthetic_n=synthetic_n,
        synthetic_test_fraction=synthetic_test_fraction,
    )
    return items if limit is None else items[:limit]
