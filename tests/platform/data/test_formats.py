"""data.format / data.columns: s1K and r1k layouts, local files and hf: sources, row problems (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from revmix.config import ConfigError, build_config
from revmix.platform.data.formats import load_formatted, render_s1_response
from revmix.platform.data.loaders import DataError, load_r1k_pairs, r1k_asset_path, stable_item_id
from revmix.platform.data.prepare import load_source

# Two records in simplescaling/s1K's column layout (trajectories: a list of strings, as s1K holds them).
S1K = [
    {
        "question": "What is 2 + 3?",
        "solution": "2 + 3 = \\boxed{5}",
        "cot_type": "math",
        "source_type": "toy/add",
        "metadata": "{}",
        "cot": None,
        "thinking_trajectories": ["Add two and three.", "That gives five."],
        "attempt": "The sum is 5.",
    },
    {
        "question": "Crossword: a pet that barks (3)",
        "solution": "### Answer: DOG \n ### Explanation: a pet",
        "cot_type": "crossword",
        "source_type": "toy/xword",
        "metadata": "{}",
        "cot": None,
        "thinking_trajectories": ["A barking pet is a dog."],
        "attempt": "Answer: DOG",
    },
]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_parquet(path: Path, records: list[dict[str, Any]]) -> str:
    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def data_cfg(**data: Any) -> Any:
    return build_config({"data": data, "stages": [{"steps": 1}]}).data


def test_s1_rendering_is_s1s_own() -> None:
    # s1's data/tokenization.py: "<|im_start|>think\n" + "\n".join(traj).strip() + "\n<|im_start|>answer\n"
    # + ("Answer: " + attempt unless it holds "Answer:").strip()
    assert render_s1_response([" a", "b "], "x") == "<|im_start|>think\na\nb\n<|im_start|>answer\nAnswer: x"
    assert render_s1_response("t", "Answer: y ") == "<|im_start|>think\nt\n<|im_start|>answer\nAnswer: y"


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet], ids=["jsonl", "parquet"])
def test_s1k_layout_becomes_forward_rows(tmp_path: Path, writer: Any) -> None:
    src = writer(tmp_path / f"s1k.{'jsonl' if writer is write_jsonl else 'parquet'}", S1K)
    report = load_source(data_cfg(source=src, format="s1k"))
    assert report.rows == [
        {
            "item_id": stable_item_id("What is 2 + 3?"),
            "direction": "forward",
            "task": "s1k/math",
            "prompt": "What is 2 + 3?",
            "response": "<|im_start|>think\nAdd two and three.\nThat gives five.\n"
            "<|im_start|>answer\nAnswer: The sum is 5.",
            "other_response": None,
            "answer": "5",  # the solution's \boxed{} wins over the attempt
        },
        {
            "item_id": stable_item_id("Crossword: a pet that barks (3)"),
            "direction": "forward",
            "task": "s1k/crossword",
            "prompt": "Crossword: a pet that barks (3)",
            "response": "<|im_start|>think\nA barking pet is a dog.\n<|im_start|>answer\nAnswer: DOG",
            "other_response": None,
            "answer": "DOG",  # the solution's "### Answer:" line
        },
    ]


def test_s1k_columns_map_s1k_1_1_names_and_an_id_column(tmp_path: Path) -> None:
    # s1K-1.1 keeps one trace as a string under deepseek_* names.
    recs = [
        {
            "question": "Q1",
            "deepseek_thinking_trajectory": "think",
            "deepseek_attempt": "\\boxed{7}",
            "uid": 11,
        }
    ]
    cols = {
        "thinking_trajectories": "deepseek_thinking_trajectory",
        "attempt": "deepseek_attempt",
        "item_id": "uid",
    }
    report = load_source(data_cfg(source=write_jsonl(tmp_path / "a.jsonl", recs), format="s1k", columns=cols))
    (row,) = report.rows
    assert row["item_id"] == "11" and row["task"] == "s1k" and row["answer"] == "7"
    assert row["response"] == "<|im_start|>think\nthink\n<|im_start|>answer\nAnswer: \\boxed{7}"


def test_s1k_missing_column_names_file_line_and_the_columns_found(tmp_path: Path) -> None:
    bad = [S1K[0], {k: v for k, v in S1K[1].items() if k != "attempt"}]
    src = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError) as err:
        load_formatted(src, "s1k")
    text = str(err.value)
    assert f"{src}:2: attempt: required column missing; columns found: question, solution, cot_type" in text
    assert f"{src}:1" not in text
    report = load_formatted(src, "s1k", skip_invalid=True)
    assert len(report.rows) == 1 and report.n_rejected == 1


def test_s1k_bad_trace_value_is_named_by_its_source_column(tmp_path: Path) -> None:
    recs = [{"question": "Q", "trace": [], "attempt": "a"}]
    src = write_parquet(tmp_path / "t.parquet", recs)
    with pytest.raises(
        DataError, match=r"t.parquet:1: trace: expected a string or list of strings, got list"
    ):
        load_formatted(src, "s1k", {"thinking_trajectories": "trace"})


def test_r1k_layout_gives_forward_and_reverse_twins(tmp_path: Path) -> None:
    recs = [json.loads(line) for line in r1k_asset_path().read_text().splitlines()]
    src = write_parquet(tmp_path / "r1k.parquet", recs)
    rows = load_source(data_cfg(source=src, format="r1k")).rows
    assert rows == load_r1k_pairs(r1k_asset_path()).rows  # the same converter as r1k:PATH
    by_item: dict[str, list[str]] = {}
    for r in rows:
        by_item.setdefault(r["item_id"], []).append(r["direction"])
    assert len(rows) == 70 and len(by_item) == 35  # twins share the id of the forward question
    assert all(sorted(d) == ["forward", "reverse"] for d in by_item.values())
    first = recs[0]
    assert rows[0]["prompt"].split() == first["question"].split()  # the user turn: x_f, up to whitespace


def test_r1k_missing_column_lists_the_columns(tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "r.jsonl", [{"question": "q", "sample_type": "original", "cot_type": "math"}]
    )
    with pytest.raises(
        DataError, match=r"r.jsonl:1: text: required column missing; columns found: question, "
    ):
        load_formatted(src, "r1k")


def test_canonical_columns_rename_and_item_id_from_the_row_index(tmp_path: Path) -> None:
    recs = [
        {"q": "p1", "a": "r1", "direction": 0, "task": "t"},
        {"q": "p2", "a": "r2", "direction": 0, "task": "t"},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    rows = load_source(data_cfg(source=src, columns={"prompt": "q", "response": "a"})).rows
    assert [(r["item_id"], r["prompt"], r["response"], r["direction"]) for r in rows] == [
        ("row-1", "p1", "r1", "forward"),
        ("row-2", "p2", "r2", "forward"),
    ]


def test_hf_save_to_disk_dir_loads_offline_with_split(tmp_path: Path) -> None:
    import datasets

    ds = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(S1K[:1]), "test": datasets.Dataset.from_list(S1K[1:])}
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = load_source(data_cfg(source=f"hf:{tmp_path / 'ds'}", format="s1k", split="test")).rows
    assert [r["prompt"] for r in rows] == [S1K[1]["question"]]


def test_hf_dataset_missing_a_column_fails_once_listing_its_columns(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"question": "q", "attempt": "a"}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError) as err:
        load_formatted(f"hf:{tmp_path / 'ds'}", "s1k")
    assert "column(s) ['thinking_trajectories'] not in the dataset; columns found: question, attempt" in str(
        err.value
    )


def test_hf_name_not_available_offline_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError) as err:
        load_formatted("hf:nobody/no-such-dataset-revmix", "s1k")
    text = str(err.value)
    assert "'nobody/no-such-dataset-revmix' is not a local directory or file" in text
    assert "(offline, or no such dataset)" in text and "save_to_disk" in text


def test_columns_must_be_fields_of_the_layout() -> None:
    with pytest.raises(
        ConfigError,
        match=r"data: columns: \['respones'\] are not fields of the s1k layout; valid keys: question",
    ):
        data_cfg(source="x.jsonl", format="s1k", columns={"respones": "r"})
    with pytest.raises(ConfigError, match="'s1K' is not one of canonical, s1k, r1k"):
        data_cfg(source="x.jsonl", format="s1K")


def test_data_convert_cli_writes_canonical_rows_from_s1k(tmp_path: Path) -> None:
    from revmix.cli import main

    src = write_jsonl(tmp_path / "s1k.jsonl", S1K)
    out = tmp_path / "rows.jsonl"
    assert main(["data", "convert", src, "--format", "s1k", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["5", "DOG"] and {r["direction"] for r in rows} == {"forward"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    assert main(["data", "convert", bad, "--format", "s1k", "--out", str(out)]) == 1
