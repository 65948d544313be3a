"""Benchmark loaders: shipped assets, GPQA from a CSV the test writes, JSONL files, the synthetic split."""

from __future__ import annotations

import csv
import json
import pathlib

import pytest

from revmix.assets import asset_names, asset_path
from revmix.platform.evaluation import benchmarks
from revmix.platform.evaluation.answers import extract_answer, is_equivalent, score_completion
from revmix.platform.evaluation.benchmarks import EvalItem, benchmark_names, load_benchmark

# ----------------------------------------------------------------------------------------------------------
# assets


def test_assets_are_packaged() -> None:
    expected = {
        "r1k_sample_pairs.jsonl": 70,
        "math500_test.jsonl": 500,
        "aime2024.jsonl": 30,
        "aime2025.jsonl": 30,
        "gsm8k_test.jsonl": 1319,
    }
    assert set(expected) | {"SOURCES.md"} <= set(asset_names())
    for name, rows in expected.items():
        path = asset_path(name)
        assert path.is_file() and "shared" not in path.parts
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == rows, name
        json.loads(lines[0])
    sources = asset_path("SOURCES.md").read_text(encoding="utf-8")
    assert "MIT" in sources and "Permission is hereby granted" in sources
    for name in expected:
        assert f"`{name}`" in sources


def test_asset_path_errors_list_assets() -> None:
    with pytest.raises(FileNotFoundError, match="math500_test.jsonl"):
        asset_path("nope.jsonl")
    with pytest.raises(FileNotFoundError, match="bare file name"):
        asset_path("../cli.py")


# ----------------------------------------------------------------------------------------------------------
# shipped benchmarks


@pytest.mark.parametrize(
    "name, rows, kind",
    [
        ("math500", 500, "math"),
        ("aime2024", 30, "integer"),
        ("aime2025", 30, "integer"),
        ("gsm8k", 1319, "math"),
    ],
)
def test_shipped_benchmark_counts_and_gold_self_score(name: str, rows: int, kind: str) -> None:
    items = load_benchmark(name)
    assert len(items) == rows
    assert len({it.id for it in items}) == rows
    for it in items:
        assert isinstance(it, EvalItem)
        assert it.kind == kind and it.task == name and it.direction is None
        assert it.prompt.endswith(benchmarks.MATH_PROMPT_SUFFIX) and len(it.prompt) > len(
            benchmarks.MATH_PROMPT_SUFFIX
        )
        assert extract_answer(f"Answer: {it.answer}") is not None, it.id
        assert score_completion(f"Reasoning with 17 steps.\nAnswer: {it.answer}", it.answer, kind), it.id
        assert score_completion(f"\\boxed{{{it.answer}}}", it.answer, kind), it.id


def test_math500_golds_verify_under_math_verify() -> None:
    """Every gold must parse and self-verify in math_verify itself (not just the string fast path),
    or model answers written in another form could never match it."""
    from revmix.platform.evaluation import answers

    failures = [it.answer for it in load_benchmark("math500") if not answers._mv_equal(it.answer, it.answer)]
    assert failures == []


def test_shipped_benchmark_known_rows() -> None:
    math500 = load_benchmark("math500", limit=3)
    assert [it.id for it in math500][0] == "math500/test/precalculus/807.json"
    assert math500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert math500[0].prompt.startswith("Convert the point $(0,3)$")
    aime24 = load_benchmark("aime2024")
    assert (aime24[0].id, aime24[0].answer) == ("aime2024/60", "204")
    assert aime24[7].answer == "025" and is_equivalent("25", aime24[7].answer, "integer")
    aime25 = load_benchmark("aime2025")
    assert [(it.id, it.answer) for it in (aime25[0], aime25[14], aime25[15], aime25[29])] == [
        ("aime2025/I-1", "70"),
        ("aime2025/I-15", "735"),
        ("aime2025/II-1", "468"),
        ("aime2025/II-15", "240"),
    ]
    gsm = load_benchmark("gsm8k")
    assert (gsm[0].id, gsm[0].answer) == ("gsm8k/0", "18")
    assert gsm[0].response is not None and gsm[0].response.endswith("#### 18")
    assert all("," not in it.answer for it in gsm)  # "2,125" is stored as "2125"
    assert any(it.response is not None and "#### 2,125" in it.response and it.answer == "2125" for it in gsm)


def test_limit_and_prompt_suffix_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(load_benchmark("gsm8k", limit=5)) == 5
    assert load_benchmark("gsm8k", limit=0) == []
    monkeypatch.setattr(benchmarks, "MATH_PROMPT_SUFFIX", "\nBox it.")
    item = load_benchmark("aime2025", limit=1)[0]
    assert item.prompt.endswith("$97_b.$\nBox it.")
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("gsm8k", limit=-1)


def test_unknown_benchmark_lists_valid_names() -> None:
    assert benchmark_names() == ["math500", "aime2024", "aime2025", "gsm8k", "gpqa", "jsonl", "synthetic"]
    with pytest.raises(ValueError, match="math500, aime2024, aime2025, gsm8k, gpqa, jsonl, synthetic"):
        load_benchmark("math501")
    with pytest.raises(ValueError, match="unknown benchmark 'math500:x'"):
        load_benchmark("math500:x")


# ----------------------------------------------------------------------------------------------------------
# GPQA (the test writes its own file in the official layout; the real one is never shipped)

GPQA_HEADER = [
    "Pre-Revision Question",
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
    "Explanation",
    "Record ID",
    "High-level domain",
]


def _write_gpqa(path: pathlib.Path, n: int) -> pathlib.Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(GPQA_HEADER)
        for i in range(n):
            writer.writerow(
                [
                    "old",
                    f"Question {i}: which is right, given a, b\nand c?",
                    f"right {i}",
                    f"wrong {i}.1",
                    f"wrong {i}.2",
                    f" wrong {i}.3 ",
                    "because",
                    f"rec{i:03d}",
                    "Physics",
                ]
            )
    return path


def test_gpqa_loader(tmp_path: pathlib.Path) -> None:
    path = _write_gpqa(tmp_path / "gpqa_diamond.csv", 12)
    items = load_benchmark("gpqa", path=str(path), seed=0)
    assert len(items) == 12
    for i, it in enumerate(items):
        assert (it.id, it.kind, it.task) == (f"gpqa/rec{i:03d}", "choice", "gpqa")
        assert it.answer in "ABCD" and len(it.answer) == 1
        assert it.prompt.startswith(f"Question {i}: which is right, given a, b\nand c?\n\n")
        assert it.prompt.endswith(benchmarks.CHOICE_PROMPT_SUFFIX)
        lines = [ln for ln in it.prompt.splitlines() if ln[:3] in ("A) ", "B) ", "C) ", "D) ")]
        assert [ln[0] for ln in lines] == list("ABCD")
        assert sorted(ln[3:] for ln in lines) == sorted(
            [f"right {i}", f"wrong {i}.1", f"wrong {i}.2", f"wrong {i}.3"]
        )
        assert f"{it.answer}) right {i}" in lines  # the gold letter points at the correct answer
        assert score_completion(f"Thinking...\nAnswer: ({it.answer.lower()})", it.answer, it.kind)
    letters = [it.answer for it in items]
    assert len(set(letters)) > 1  # the correct answer (first in the CSV) is really shuffled

    # deterministic by seed, independent of limit; another seed gives another order
    assert load_benchmark("gpqa", path=str(path), seed=0) == items
    assert load_benchmark(f"gpqa:{path}", limit=4, seed=0) == items[:4]
    assert [it.prompt for it in load_benchmark("gpqa", path=str(path), seed=1)] != [it.prompt for it in items]


def test_gpqa_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="never ships"):
        load_benchmark("gpqa")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_benchmark("gpqa", path=str(tmp_path / "missing.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2\nq,a,b,c\n", encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"bad.csv: missing GPQA column\(s\) \['Incorrect Answer 3'\]"):
        load_benchmark("gpqa", path=str(bad))
    empty = _write_gpqa(tmp_path / "empty.csv", 2)
    text = empty.read_text(encoding="utf-8").replace("wrong 1.2", "")
    empty.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty.csv:\d+: empty GPQA column 'Incorrect Answer 2'"):
        load_benchmark("gpqa", path=str(empty))


# ----------------------------------------------------------------------------------------------------------
# jsonl:<path>


def _write_lines(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_loader(tmp_path: pathlib.Path) -> None:
    path = _write_lines(
        tmp_path / "eval.jsonl",
        [
            json.dumps({"prompt": "1+1?", "answer": "2"}),
            "",
            json.dumps(
                {"id": "q7", "prompt": "AIME?", "answer": 25, "kind": "integer", "direction": "reverse"}
            ),
            json.dumps(
                {
                    "prompt": "Reverse 'abc'.",
                    "answer": "cba",
                    "kind": "exact",
                    "direction": "Forward",
                    "task": "strings",
                    "response": "Answer: cba",
                    "other_response": "Answer: abc",
                }
            ),
        ],
    )
    items = load_benchmark(f"jsonl:{path}")
    assert items == [
        EvalItem(id="eval/1", prompt="1+1?", answer="2", kind="math", task="jsonl/eval"),
        EvalItem(
            id="q7", prompt="AIME?", answer="25", kind="integer", direction="reverse", task="jsonl/eval"
        ),
        EvalItem(
            id="eval/4",
            prompt="Reverse 'abc'.",
            answer="cba",
            kind="exact",
            direction="forward",
            task="strings",
            response="Answer: cba",
            other_response="Answer: abc",
        ),
    ]
    assert load_benchmark("jsonl", path=str(path), limit=1) == items[:1]
    assert score_completion(items[2].response or "", items[2].answer, items[2].kind)
    assert not score_completion(items[2].other_response or "", items[2].answer, items[2].kind)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "answer": "1"}', "{not json"], r"bad.jsonl:2: invalid JSON"),
        (['{"prompt": "a", "answer": "1"}', '["a", "1"]'], r"bad.jsonl:2: expected a JSON object"),
        (['{"prompt": "a"}'], r"bad.jsonl:1: missing field 'answer'"),
        (['{"prompt": "", "answer": "1"}'], r"bad.jsonl:1: field 'prompt' must be a non-empty string"),
        (
            ['{"prompt": "a", "answer": "1", "kind": "fuzzy"}'],
            r"bad.jsonl:1: field 'kind' is 'fuzzy'; valid kinds: math",
        ),
        (['{"prompt": "a", "answer": "1", "direction": "sideways"}'], r"bad.jsonl:1: field 'direction'"),
        (
            ['{"prompt": "a", "answer": "1", "response": 3}'],
            r"bad.jsonl:1: field 'response' must be a string",
        ),
    ],
)
def test_jsonl_bad_file(tmp_path: pathlib.Path, lines: list[str], message: str) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_benchmark(f"jsonl:{path}")


def test_jsonl_missing_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="jsonl:<path>"):
        load_benchmark("jsonl")
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_benchmark(f"jsonl:{tmp_path / 'nothere.jsonl'}")
    with pytest.raises(ValueError, match="names a path"):
        load_benchmark(f"jsonl:{tmp_path / 'a.jsonl'}", path=str(tmp_path / "b.jsonl"))


# ----------------------------------------------------------------------------------------------------------
# synthetic held-out split


def test_synthetic_held_out_split() -> None:
    synthetic = pytest.importorskip("revmix.platform.data.synthetic")
    families = ["affine_mod", "string_ops"]
    items = load_benchmark(
        "synthetic", seed=3, synthetic_families=families, synthetic_n=50, synthetic_test_fraction=0.2
    )
    # 50 items, 20% held out = 10 items, each in both directions
    assert len(items) == 20
    rows = synthetic.generate_mix(families, 50, 3)
    train, test = synthetic.split_by_item(rows, 0.2, 3)
    assert [it.id for it in items] == [f"{r['item_id']}/{r['direction']}" for r in test]
    train_ids = {r["item_id"] for r in train}
    assert not train_ids & {it.id.rsplit("/", 1)[0] for it in items}
    assert {it.direction for it in items} == {"forward", "reverse"}
    assert {it.task for it in items} <= {"synthetic/affine_mod", "synthetic/string_ops"}
    for it in items:
        assert it.kind == "exact" and it.response and it.other_response
        assert score_completion(it.response, it.answer, it.kind)
    # y− (the twin's solution) ends with the other direction's answer
    assert sum(score_completion(it.other_response or "", it.answer, it.kind) for it in items) < len(items) / 2
    assert load_benchmark("synthetic", seed=3, synthetic_families=families, synthetic_n=50) == items
    assert len(load_benchmark("synthetic", synthetic_n=20)) == 8  # all families by default: 4 items x 2
    with pytest.raises(ValueError, match="synthetic_test_fraction"):
        load_benchmark("synthetic", synthetic_test_fraction=0.0)
