"""Every validation rule, one hand-made bad file each: the exact ``FILE:LINE: field: message`` line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from revmix.platform.data.validate import (
    Problem,
    check_file,
    check_rows,
    iter_parquet,
    validate_file,
    validate_rows,
)

REQUIRED = "required: item_id, direction, task, prompt, response"


def good(item_id: str = "a", direction: str = "forward", **kw: object) -> dict:
    row = {
        "item_id": item_id,
        "direction": direction,
        "task": "t",
        "prompt": f"q-{item_id}-{direction}",
        "response": "r",
        "other_response": None,
        "answer": "1",
    }
    row.update(kw)
    return row


def write_lines(path: Path, lines: list[object]) -> str:
    """Dicts become JSON; strings are written raw (for broken lines)."""
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


def test_problem_str_is_file_line_field_message() -> None:
    assert str(Problem("d.jsonl", 7, "prompt", "expected x")) == "d.jsonl:7: prompt: expected x"


def test_good_file_has_no_problems_and_a_summary(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "ok.jsonl", [good("a"), good("a", "reverse"), good("b")])
    result = check_file(f, require_pairs=True)
    assert result.problems == []
    assert result.n_records == 3
    assert result.summary() == f"{f}: OK, 3 rows (2 forward, 1 reverse)"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (without(good(), "prompt"), f"1: prompt: required field is missing ({REQUIRED})"),
        (without(good(), "item_id"), f"1: item_id: required field is missing ({REQUIRED})"),
        (good(response="   "), "1: response: expected a non-empty string, got '   '"),
        (good(task=""), "1: task: expected a non-empty string, got ''"),
        (good(task=5), "1: task: expected a non-empty string, got int 5"),
        (good(prompt=None), "1: prompt: expected a non-empty string, got null"),
        (good(item_id=["x"]), "1: item_id: expected a non-empty string, got list ['x']"),
        (good(answer=7), "1: answer: expected a string or null, got int 7"),
        (good(other_response={"a": 1}), "1: other_response: expected a string or null, got dict {'a': 1}"),
        (good(direction="backward"), "1: direction: expected one of forward, reverse, got 'backward'"),
        (good(direction="Forward"), "1: direction: expected one of forward, reverse, got 'Forward'"),
        (good(direction=0), "1: direction: expected a non-empty string, got int 0"),
    ],
)
def test_each_field_rule_gives_one_exact_problem(tmp_path: Path, row: dict, expected: str) -> None:
    f = write_lines(tmp_path / "bad.jsonl", [row])
    assert [str(p) for p in validate_file(f)] == [f"{f}:{expected}"]


def test_null_optional_fields_and_missing_optional_fields_are_fine(tmp_path: Path) -> None:
    f = write_lines(
        tmp_path / "ok.jsonl", [good(answer=None), without(without(good("b"), "answer"), "other_response")]
    )
    assert validate_file(f) == []


def test_invalid_json_and_non_object_lines(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "bad.jsonl", [good(), '{"item_id": "b",', "[1, 2]", '"text"'])
    problems = [str(p) for p in validate_file(f)]
    assert len(problems) == 3
    assert problems[0].startswith(f"{f}:2: <line>: expected a JSON object, got invalid JSON (")
    assert problems[1] == f"{f}:3: <line>: expected a JSON object, got list [1, 2]"
    assert problems[2] == f"{f}:4: <line>: expected a JSON object, got 'text'"


def test_non_utf8_line_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(good()).encode() + b"\n\xff\xfe{}\n")
    problems = validate_file(path)
    assert [(p.line, p.field) for p in problems] == [(2, "<line>")]
    assert "invalid JSON" in problems[0].message


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "gaps.jsonl", [good("a"), "", "   ", good("b", task="")])
    result = check_file(f)
    assert result.n_records == 2
    assert [str(p) for p in result.problems] == [f"{f}:4: task: expected a non-empty string, got ''"]


def test_duplicate_names_the_first_occurrence(tmp_path: Path) -> None:
    f = write_lines(
        tmp_path / "dup.jsonl", [good("a"), good("a", "reverse"), good("b"), good("a", prompt="other")]
    )
    assert [str(p) for p in validate_file(f)] == [
        f"{f}:4: item_id: expected a unique (item_id, direction); ('a', 'forward') first appears on line 1"
    ]


def test_require_pairs_flags_reverse_rows_without_a_valid_forward_twin(tmp_path: Path) -> None:
    rows = [good("a", "reverse"), good("b", "reverse"), good("b"), good("c", task=""), good("c", "reverse")]
    f = write_lines(tmp_path / "pairs.jsonl", rows)
    assert [str(p) for p in validate_file(f)] == [f"{f}:4: task: expected a non-empty string, got ''"]
    assert [str(p) for p in validate_file(f, require_pairs=True)] == [
        f"{f}:1: item_id: expected a valid forward twin with item_id 'a' (--require-pairs), found none",
        f"{f}:4: task: expected a non-empty string, got ''",
        f"{f}:5: item_id: expected a valid forward twin with item_id 'c' (--require-pairs), found none",
    ]


def test_a_forward_row_alone_is_fine_with_require_pairs(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "fwd.jsonl", [good("a"), good("b")])
    assert validate_file(f, require_pairs=True) == []


def test_extra_fields_are_not_problems_but_are_counted(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "extra.jsonl", [good("a", respones="typo", note=1), good("b", note=2)])
    result = check_file(f)
    assert result.problems == []
    assert dict(result.ignored_fields) == {"note": 2, "respones": 1}
    assert result.summary().endswith("; ignored extra fields: note (2 rows), respones (1 rows)")


def test_several_problems_in_one_row_are_all_reported_and_sorted_by_line(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "many.jsonl", [good("a"), {"direction": "up", "task": 3}, "nope"])
    problems = validate_file(f)
    assert [(p.line, p.field) for p in problems] == [
        (2, "item_id"),
        (2, "direction"),
        (2, "task"),
        (2, "prompt"),
        (2, "response"),
        (3, "<line>"),
    ]
    assert check_file(f).summary() == f"{f}: 6 problem(s) in 2 of 3 rows"


def test_empty_and_missing_files_are_one_file_problem(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert [str(p) for p in validate_file(empty)] == [
        f"{empty}:1: <file>: expected at least one row, the file has none"
    ]
    missing = tmp_path / "missing.jsonl"
    (problem,) = validate_file(missing)
    assert (problem.line, problem.field) == (1, "<file>")
    assert "No such file" in problem.message


def test_parquet_line_is_row_index_plus_one(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    rows = [good("a"), good("b", direction="sideways"), good("c")]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [str(p) for p in validate_file(path)] == [
        f"{path}:2: direction: expected one of forward, reverse, got 'sideways'"
    ]


def test_parquet_is_read_in_batches_and_lines_run_on_across_them(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    rows = [good(c) for c in "abcde"]
    rows[3] = good("d", prompt="")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # 3 row groups
    got = list(iter_parquet(path, batch_rows=2))
    assert [line for line, _ in got] == [1, 2, 3, 4, 5]
    assert [r["item_id"] for _, r in got if isinstance(r, dict)] == list("abcde")
    assert [str(p) for p in validate_file(path)] == [f"{path}:4: prompt: expected a non-empty string, got ''"]


def test_json_array_file_counts_elements(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([good("a"), good("b", prompt="")]))
    assert [str(p) for p in validate_file(path)] == [f"{path}:2: prompt: expected a non-empty string, got ''"]


def test_validate_rows_takes_parsed_records_and_exceptions() -> None:
    records = [(1, good("a")), (2, ValueError("boom")), (5, good("a"))]
    problems = validate_rows(records, "mem")
    assert [str(p) for p in problems] == [
        "mem:2: <line>: expected a JSON object, got invalid JSON (boom)",
        "mem:5: item_id: expected a unique (item_id, direction); ('a', 'forward') first appears on line 1",
    ]
    assert check_rows(records, "mem").bad_lines == {2, 5}
