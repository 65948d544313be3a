"""Loaders: round trips, loud failures, skip_invalid accounting, the r1k sample, HF and preference data."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from revmix.platform.data.loaders import (
    DataError,
    LoadReport,
    chatml_turns,
    extract_final_answer,
    load_hf,
    load_jsonl,
    load_parquet,
    load_preference,
    load_r1k_pairs,
    load_rows,
    r1k_asset_path,
    stable_item_id,
    write_jsonl,
    write_parquet,
)
from revmix.platform.data.schema import ALL_FIELDS, Row
from tests.platform.data.test_validate import good, write_lines


def r1k_path() -> Path:
    """The paper's sample pairs, shipped in the package (revmix/assets/r1k_sample_pairs.jsonl)."""
    path = r1k_asset_path()
    assert path.is_file(), f"{path}: the packaged r1k sample pairs are missing"
    return path


ROWS = [
    good("a"),
    good("a", "reverse", other_response="fwd ✓", answer=None),
    good("b", prompt='naïve\nmulti-line "quoted"', response="y\t+"),
]


def assert_accounted(report: LoadReport) -> None:
    assert report.n_read == len(report.rows) + report.n_rejected


# ------------------------------------------------------------------------------------- round trips


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rows.jsonl"
    assert write_jsonl(ROWS, path) == 3
    report = load_jsonl(path)
    assert report.rows == ROWS
    assert (report.rejected, report.n_read) == ([], 3)
    assert list(report.rows[0]) == list(ALL_FIELDS)


def test_parquet_round_trip_keeps_nulls_and_string_schema(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    all_null = [good("a", answer=None), good("b", answer=None)]
    assert write_parquet(all_null, path) == 2
    assert pq.read_schema(path).field("answer").type == pa.string()
    assert load_parquet(path).rows == all_null
    write_parquet(ROWS, path)
    assert load_parquet(path).rows == ROWS


def test_writers_accept_rows_and_drop_extra_keys(tmp_path: Path) -> None:
    rows = [Row("a", "forward", "t", "p", "r"), {**good("b"), "note": "x"}]
    write_jsonl(rows, tmp_path / "r.jsonl")
    loaded = load_jsonl(tmp_path / "r.jsonl")
    assert loaded.rows == [Row("a", "forward", "t", "p", "r").to_dict(), good("b")]
    assert loaded.ignored_fields == {}


def test_writers_refuse_invalid_or_empty_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"rows to write\):2: direction: expected one of forward, reverse"):
        write_jsonl([good("a"), good("b", direction="up")], tmp_path / "x.jsonl")
    with pytest.raises(DataError, match="expected at least one row to write"):
        write_parquet([], tmp_path / "x.parquet")
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.parquet").exists()


# -------------------------------------------------------------------------- failures and skipping


def bad_file(tmp_path: Path) -> str:
    return write_lines(
        tmp_path / "bad.jsonl",
        [good("a"), "{broken", good("b", task=""), good("a"), good("c", "reverse"), good("d", answer=3)],
    )


def test_bad_rows_raise_with_every_problem(tmp_path: Path) -> None:
    f = bad_file(tmp_path)
    with pytest.raises(DataError) as info:
        load_jsonl(f)
    err = info.value
    assert isinstance(err, ValueError)
    assert [(p.line, p.field) for p in err.problems] == [
        (2, "<line>"),
        (3, "task"),
        (4, "item_id"),
        (6, "answer"),
    ]
    text = str(err)
    assert text.startswith(f"{f}: 4 problem(s) in 4 of 6 rows; nothing was loaded:\n")
    assert (
        f"{f}:4: item_id: expected a unique (item_id, direction); ('a', 'forward') first appears on line 1"
        in text
    )
    assert "skip_invalid=True" in text


def test_skip_invalid_returns_rejected_count_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = bad_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="revmix.platform.data.loaders"):
        report = load_jsonl(f, skip_invalid=True)
    assert [r["item_id"] for r in report.rows] == ["a", "c"]
    assert report.n_rejected == 4
    assert report.n_read == 6
    assert_accounted(report)
    assert f"{f}: rejected 4 of 6 rows (4 problems)" in caplog.text
    assert report.summary() == f"{f}: 2 rows (1 forward, 1 reverse), 4 rejected"


def test_skip_invalid_with_require_pairs_rejects_orphans(tmp_path: Path) -> None:
    report = load_jsonl(bad_file(tmp_path), skip_invalid=True, require_pairs=True)
    assert [r["item_id"] for r in report.rows] == ["a"]
    assert report.n_rejected == 5
    assert_accounted(report)


def test_message_is_capped_at_50_problems(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "many.jsonl", [good(str(i), task="") for i in range(120)])
    with pytest.raises(DataError) as info:
        load_jsonl(f)
    lines = str(info.value).splitlines()
    assert len(info.value.problems) == 120
    assert lines[50] == f"{f}:50: task: expected a non-empty string, got ''"
    assert lines[51] == "... and 70 more problem(s)"
    assert len(lines) == 53


def test_parquet_bad_rows_name_row_index_plus_one(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([good("a"), good("b"), good("c", response="")]), path)
    with pytest.raises(DataError, match=rf"{path}:3: response: expected a non-empty string"):
        load_parquet(path)
    report = load_parquet(path, skip_invalid=True)
    assert (len(report.rows), report.n_rejected) == (2, 1)


def test_empty_file_raises_even_when_skipping(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="expected at least one row"):
        load_jsonl(path, skip_invalid=True)


def test_extra_fields_are_dropped_but_counted(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "x.jsonl", [good("a", meta=1), good("b", meta=2)])
    report = load_jsonl(f)
    assert report.ignored_fields == {"meta": 2}
    assert all(list(r) == list(ALL_FIELDS) for r in report.rows)


# -------------------------------------------------------------------------------------------- r1k


def test_r1k_sample_is_35_twin_pairs() -> None:
    report = load_r1k_pairs(r1k_path(), require_pairs=True)
    rows = report.rows
    assert (len(rows), report.n_rejected) == (70, 0)
    assert Counter(r["direction"] for r in rows) == {"forward": 35, "reverse": 35}
    by_item: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_item.setdefault(r["item_id"], {})[r["direction"]] = r
    assert len(by_item) == 35
    for twins in by_item.values():
        fwd, rev = twins["forward"], twins["reverse"]
        for r in (fwd, rev):
            assert r["response"].strip() and r["other_response"].strip()
            assert r["response"].startswith("<|im_start|>think\n") and "<|im_start|>answer\n" in r["response"]
            assert "<|im_end|>" not in r["response"] and "<|im_start|>assistant" not in r["response"]
        # the twin swap: y+ of one direction is y- of the other
        assert fwd["response"] == rev["other_response"]
        assert rev["response"] == fwd["other_response"]
        assert fwd["prompt"] != rev["prompt"]
        assert fwd["task"] == rev["task"]
    assert Counter(r["task"] for r in rows) == {"r1k/math": 58, "r1k/science": 6, "r1k/crossword": 6}


def test_r1k_fields_of_the_first_item() -> None:
    records = [json.loads(line) for line in open(r1k_path(), encoding="utf-8")]
    rows = load_r1k_pairs(r1k_path()).rows
    first_fwd = rows[0]
    (first_rev,) = [r for r in rows if r["item_id"] == first_fwd["item_id"] and r["direction"] == "reverse"]
    assert first_fwd["item_id"] == stable_item_id(records[0]["question"])
    assert first_fwd["task"] == "r1k/crossword"
    assert first_fwd["prompt"].endswith("Great dosh arranged for those looking after some kids? (9)")
    assert first_rev["prompt"] == records[0]["relevant-question"]
    assert (first_fwd["answer"], first_rev["answer"]) == ("GOATHERDS", "GREAT DOSH")
    assert sum(r["answer"] is not None for r in rows) >= 65


def test_r1k_is_the_default_and_the_load_rows_asset_name() -> None:
    assert r1k_asset_path().name == "r1k_sample_pairs.jsonl"
    if not r1k_asset_path().is_file():
        pytest.skip("asset not vendored yet")
    assert len(load_rows("r1k_sample").rows) == 70
    assert load_rows(f"r1k:{r1k_asset_path()}").rows == load_r1k_pairs().rows


def test_r1k_bad_records_name_the_source_fields(tmp_path: Path) -> None:
    rec = json.loads(open(r1k_path(), encoding="utf-8").readline())
    f = write_lines(
        tmp_path / "r1k.jsonl", [rec, {**rec, "sample_type": "weird", "worse-text": "plain text"}]
    )
    with pytest.raises(DataError) as info:
        load_r1k_pairs(f)
    assert [str(p) for p in info.value.problems] == [
        f"{f}:2: sample_type: expected 'original' or 'flipped', got 'weird'",
        f"{f}:2: worse-text: expected a ChatML string with user and assistant turns, got 'plain text'",
    ]
    report = load_r1k_pairs(f, skip_invalid=True)
    assert (len(report.rows), report.n_rejected) == (1, 1)


def test_chatml_turns_keeps_s1_markers_in_the_assistant_turn() -> None:
    text = (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>think\nhmm\n<|im_start|>answer\nAnswer: 4<|im_end|>\n"
    )
    assert chatml_turns(text) == {
        "system": "S",
        "user": "Q?",
        "assistant": "<|im_start|>think\nhmm\n<|im_start|>answer\nAnswer: 4",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("think \\boxed{1}\n<|im_start|>answer\nAnswer: so \\boxed{\\frac{a}{b}} done", "\\frac{a}{b}"),
        ("<|im_start|>think\n\\boxed{9}\n<|im_start|>answer\nAnswer: 12.", "12"),
        ("reasoning\n\n**Answer**: GOATHERDS", "GOATHERDS"),
        ("### Answer: GOATHERDS \n ### Explanation: anagram", "GOATHERDS"),
        ("**Answer:**  \n  x = 3\n", "x = 3"),
        ("The answer is seven", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_stable_item_id_is_pinned_and_whitespace_insensitive() -> None:
    # sha256("hello world") = b94d27b9934d3e08...
    assert stable_item_id("  hello \n world ") == "q-b94d27b9934d3e08"
    assert stable_item_id("hello world") == stable_item_id("hello\tworld")


# --------------------------------------------------------------------------------- HF datasets


def test_load_hf_local_jsonl_with_field_map_defaults_and_hashed_ids(tmp_path: Path) -> None:
    src = write_lines(
        tmp_path / "s1k.jsonl",
        [{"question": f"What is {i}+{i}?", "solution": f"It is {2 * i}.", "ans": 2 * i} for i in range(4)],
    )
    report = load_hf(
        src,
        field_map={"question": "prompt", "solution": "response", "ans": "answer"},
        defaults={"direction": "forward", "task": "s1k"},
        item_id_from="question",
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(report.rows) == 4
    assert report.rows[1] == {
        "item_id": stable_item_id("What is 1+1?"),
        "direction": "forward",
        "task": "s1k",
        "prompt": "What is 1+1?",
        "response": "It is 2.",
        "other_response": None,
        "answer": "2",
    }


def test_load_hf_problems_name_the_source_column(tmp_path: Path) -> None:
    src = write_lines(
        tmp_path / "d.jsonl",
        [{"id": "a", "q": "Q", "sol": "S"}, {"id": "b", "q": "Q2", "sol": ""}],
    )
    kw = {
        "field_map": {"id": "item_id", "q": "prompt", "sol": "response"},
        "defaults": {"direction": "reverse", "task": "t"},
        "cache_dir": str(tmp_path / "cache"),
    }
    with pytest.raises(DataError) as info:
        load_hf(src, **kw)
    assert [str(p) for p in info.value.problems] == [
        f"hf:{src}[train]:2: sol (as response): expected a non-empty string, got ''"
    ]
    report = load_hf(src, skip_invalid=True, **kw)
    assert [r["direction"] for r in report.rows] == ["reverse"] and report.n_rejected == 1


def test_load_hf_parquet_dir_and_save_to_disk(tmp_path: Path) -> None:
    import datasets

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist([good("a", direction=1)]), tmp_path / "pq" / "test.parquet")
    report = load_hf(str(tmp_path / "pq"), split="test", cache_dir=str(tmp_path / "cache"))
    assert report.rows[0]["direction"] == "reverse"  # 0/1 ints normalised to labels
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([good("a")]), "test": datasets.Dataset.from_list([good("b")])}
    ).save_to_disk(str(tmp_path / "disk"))
    assert load_hf(str(tmp_path / "disk"), split="test").rows == [good("b")]
    assert load_rows(f"hf:{tmp_path / 'disk'}").rows == [good("a")]
    with pytest.raises(DataError, match=r"split 'dev' not found; available: train, test"):
        load_hf(str(tmp_path / "disk"), split="dev")


def test_load_hf_rejects_bad_field_maps(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "d.jsonl", [good("a")])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['respones'\]; valid: item_id, direction"):
        load_hf(src, field_map={"response": "respones"})
    with pytest.raises(DataError, match=r"column\(s\) \['question'\] not in the dataset; columns: item_id"):
        load_hf(src, field_map={"question": "prompt"}, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"field_map targets \['prompt'\] already exist"):
        load_hf(src, field_map={"task": "prompt"}, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------- preference


def test_load_preference_strings_and_chat_lists(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "good"}]
    f = write_lines(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "Q1", "chosen": "A", "rejected": "B", "id": 7},
            {
                "prompt": chat[:1],
                "chosen": chat,
                "rejected": [*chat[:1], {"role": "assistant", "content": "bad"}],
                "direction": "reverse",
                "task": "hh",
            },
        ],
    )
    rows = load_preference(f).rows
    assert rows == [
        {
            "item_id": "7",
            "direction": "forward",
            "task": "prefs",
            "prompt": "Q1",
            "response": "A",
            "other_response": "B",
            "answer": None,
        },
        {
            "item_id": stable_item_id("Q2"),
            "direction": "reverse",
            "task": "hh",
            "prompt": "Q2",
            "response": "good",
            "other_response": "bad",
            "answer": None,
        },
    ]


def test_load_preference_names_missing_source_fields_and_duplicate_prompts(tmp_path: Path) -> None:
    f = write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q", "chosen": "A", "rejected": "B"},
            {"prompt": "Q", "rejected": "C"},
            {"prompt": "Q", "chosen": "D", "rejected": "E"},
        ],
    )
    with pytest.raises(DataError) as info:
        load_preference(f)
    assert [str(p) for p in info.value.problems] == [
        f"{f}:2: chosen: expected a non-empty string or chat message list; required field is missing",
        f"{f}:3: item_id: expected a unique (item_id, direction); ({stable_item_id('Q')!r}, 'forward') "
        "first appears on line 1",
    ]
    report = load_rows(f"preference:{f}", skip_invalid=True)
    assert (len(report.rows), report.n_rejected, report.n_read) == (1, 2, 3)


# ------------------------------------------------------------------------------------- dispatch


def test_load_rows_dispatches_on_suffix_and_prefix(tmp_path: Path) -> None:
    write_jsonl(ROWS, tmp_path / "r.jsonl")
    write_parquet(ROWS, tmp_path / "r.parquet")
    (tmp_path / "r.json").write_text(json.dumps(ROWS))
    for name in ("r.jsonl", "r.parquet", "r.json"):
        assert load_rows(str(tmp_path / name)).rows == ROWS
    with pytest.raises(ValueError, match=r"unknown data source 'r.csv'; expected one of: FILE.jsonl"):
        load_rows("r.csv")


def test_load_rows_synthetic_is_validated_and_deterministic() -> None:
    pytest.importorskip("revmix.platform.data.synthetic")
    a = load_rows("synthetic:affine_mod,string_ops", n=6, seed=3, require_pairs=True)
    b = load_rows("synthetic:affine_mod,string_ops", n=6, seed=3)
    assert a.rows == b.rows
    assert (len(a.rows), a.n_rejected) == (12, 0)
    assert Counter(r["task"] for r in a.rows) == {"synthetic/affine_mod": 6, "synthetic/string_ops": 6}
    with pytest.raises(ValueError, match="n=<rows>"):
        load_rows("synthetic:affine_mod")


def test_nothing_silently_dropped_across_sources(tmp_path: Path) -> None:
    f = bad_file(tmp_path)
    path = tmp_path / "mixed.parquet"
    rows = [good(str(i), task="" if i % 3 == 0 else "t") for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    for report in (load_jsonl(f, skip_invalid=True), load_parquet(path, skip_invalid=True)):
        assert_accounted(report)
        assert report.n_rejected > 0
    assert load_parquet(path, skip_invalid=True).n_rejected == 4  # i = 0, 3, 6, 9
