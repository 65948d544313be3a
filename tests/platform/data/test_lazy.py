"""Large local sources read lazily: counted cheaply, validated in the stream with the same FILE:LINE
problems as ``revmix data validate``, split by item hash, spooled, tokenised in Ray Data, cached by content.

Real pieces: JSONL and Parquet files on disk, the tiny model's tokenizer, the local Ray fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revmix.config import load_config
from revmix.platform.data import lazy
from revmix.platform.data.cache import builds
from revmix.platform.data.loaders import DataError, write_jsonl, write_parquet
from revmix.platform.data.prepare import prepare_data
from revmix.platform.data.schema import DIRECTIONS
from revmix.platform.data.synthetic import generate_mix
from revmix.platform.data.tokenize import ORIGIN_FILE, ORIGIN_LINE, tokenise_chunk
from revmix.platform.data.validate import validate_file
from revmix.platform.models import load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parents[3]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None, "tiny"))


def _rows(n_items: int = 12) -> list[dict]:
    return [dict(r) for r in generate_mix(["affine_mod"], n_items, seed=0)]


def _bad_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as JSONL with four bad lines in between: not JSON, a missing field, a duplicate, a
    blank line (not a row), and a row with an integer answer."""
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{not json")  # line 3
    missing = {k: v for k, v in rows[0].items() if k != "prompt"}
    lines.insert(5, json.dumps({**missing, "item_id": "other"}))  # line 6
    lines.insert(7, json.dumps(rows[1]))  # line 8: repeats line 2's (item_id, direction)
    lines.insert(9, "")  # line 10: blank
    lines.insert(11, json.dumps({**rows[0], "item_id": "x-int", "answer": 7}))  # line 12
    path.write_text("\n".join(lines) + "\n")
    return path


def test_count_rows_reads_footers_and_newlines(tmp_path):
    rows = _rows(5)
    write_parquet(rows, tmp_path / "a.parquet")
    assert lazy.count_rows(tmp_path / "a.parquet") == 10
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{"b": 2}')  # no final newline; a blank line counts
    assert lazy.count_rows(tmp_path / "a.jsonl") == 3
    (tmp_path / "b.jsonl").write_text("")
    assert lazy.count_rows(tmp_path / "b.jsonl") == 0


def test_only_local_jsonl_and_parquet_files_are_read_lazily(tmp_path):
    write_jsonl(_rows(2), tmp_path / "a.jsonl")
    assert lazy.lazy_source(str(tmp_path / "a.jsonl"), "canonical", {}) is not None
    for source in ("synthetic", "hf:x/y", "r1k_sample", str(tmp_path / "missing.jsonl"), "a.json"):
        assert lazy.lazy_source(source, "canonical", {}) is None, source


def test_the_hash_split_is_a_pure_function_of_the_id_and_seed():
    ids = [f"item-{i}" for i in range(4000)]
    held = [i for i in ids if lazy.is_test_item(i, 0, 0.2)]
    assert held == [i for i in ids if lazy.is_test_item(i, 0, 0.2)]
    assert 0.17 < len(held) / len(ids) < 0.23  # binomial(4000, 0.2): sd 0.0063, so 4.7 sd either side
    assert held != [i for i in ids if lazy.is_test_item(i, 1, 0.2)]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_the_stream_names_the_problems_validate_names_and_counts_every_row(tmp_path, suffix):
    rows = _rows(12)
    path = _bad_jsonl(tmp_path / "rows.jsonl", rows)
    if suffix == ".parquet":  # Parquet has no bad lines: a duplicate and a missing field at rows 3, 4
        bad = [rows[0], rows[1], {**rows[1], "prompt": None}, rows[1], *rows[2:]]
        path = tmp_path / "rows.parquet"
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(bad), path)
    src = lazy.LazySource(path)
    seen = lazy.scan(src)
    got = lazy.spool(src, seen, tmp_path / "spool", seed=0, test_fraction=0.2, pairs_needed_by=None)
    assert [str(p) for p in got.problems] == [str(p) for p in validate_file(path)]
    n_bad = 4 if suffix == ".jsonl" else 2
    assert got.n_rejected == n_bad and got.n_read == 24 + n_bad and seen.n_read == got.n_read
    # count in = count out + rejected
    assert got.n_read == sum(got.counts.values()) + len(got.test_rows) + got.n_rejected
    held = {r["item_id"] for r in rows if lazy.is_test_item(r["item_id"], 0, 0.2)}
    assert {r["item_id"] for r in got.test_rows} == held and len(got.test_rows) == 2 * len(held)
    import pyarrow.parquet as pq

    forward = pq.read_table(tmp_path / "spool" / "forward" / "part-0.parquet").to_pylist()
    assert [r["row_index"] for r in forward] == list(range(got.counts["forward"]))
    assert [r["item_id"] for r in forward] == [
        r["item_id"] for r in rows if r["direction"] == "forward" and r["item_id"] not in held
    ]
    assert all(r[ORIGIN_FILE] == str(path) for r in forward)


def test_a_pair_objective_names_rows_without_other_response(tmp_path):
    rows = _rows(3)
    rows[2] = {**rows[2], "other_response": None}
    write_jsonl(rows, tmp_path / "rows.jsonl")
    src = lazy.LazySource(tmp_path / "rows.jsonl")
    got = lazy.spool(src, lazy.scan(src), tmp_path / "spool", 0, 0.2, "stages.0.objective (dpo)")
    assert [(p.line, p.field) for p in got.problems] == [(3, "other_response")]
    assert "stages.0.objective (dpo) trains on response/other_response pairs" in got.problems[0].message


def _cfg(source: Path, cache: Path, *over: str):
    return load_config(
        SFT, [f"data.source={source}", f"data.cache_dir={cache}", "data.stream_threshold_rows=5", *over]
    ).data


def _expected(rows: list[dict], path: Path, tokenizer, max_length: int) -> dict[str, list[dict]]:
    """The hash split's training rows tokenised in this process, numbered as the lazy path numbers them."""
    train = [r for r in rows if not lazy.is_test_item(r["item_id"], 0, 0.2)]
    by_dir = {d: [r for r in train if r["direction"] == d] for d in DIRECTIONS}
    line = {(r["item_id"], r["direction"]): i for i, r in enumerate(rows, start=1)}
    out, index = {}, 0
    for d in DIRECTIONS:
        numbered = []
        for r in by_dir[d]:
            numbered.append(
                {**r, "row_index": index, ORIGIN_FILE: str(path), ORIGIN_LINE: line[r["item_id"], d]}
            )
            index += 1
        out[d], _ = tokenise_chunk(numbered, tokenizer, max_length, "truncate")
    return out


@pytest.mark.integration
def test_a_large_file_is_tokenised_in_ray_data_from_the_spool_and_reused(
    tmp_path, tokenizer, ray_local, capsys
):
    rows = _rows(12)
    source = tmp_path / "rows.jsonl"
    write_jsonl(rows, source)
    cache = tmp_path / "cache"
    first = prepare_data(_cfg(source, cache, "data.max_length=60"), tokenizer)
    second = prepare_data(_cfg(source, cache, "data.max_length=60"), tokenizer)
    assert first.streamed and (first.meta["cache"], second.meta["cache"]) == ("built", "reused")
    assert len(builds(cache)) == 1 and first.key == second.key
    expected = _expected(rows, source, tokenizer, 60)
    for d in DIRECTIONS:
        assert list(second.train[d]) == expected[d]
    held = sorted(r["item_id"] for r in rows if lazy.is_test_item(r["item_id"], 0, 0.2))
    assert sorted(r["item_id"] for r in second.test_rows) == held
    assert second.n_items == 12 - len(held) // 2 and second.rejected == 0
    assert second.meta["read"] == 24 == sum(second.meta["rows"].values()) + second.meta["test_rows"]
    assert sorted(p.name for p in (cache / first.key).iterdir()) == [
        "forward",
        "meta.json",
        "reverse",
        "test.parquet",
    ]
    out = capsys.readouterr().out
    assert "data: 24 source rows > data.stream_threshold_rows 5 (JSONL lines): read, validated" in out
    # editing one row's text changes the key and rebuilds
    write_jsonl(
        [{**rows[-1], "response": rows[-1]["response"] + " (edited)"} if r is rows[-1] else r for r in rows],
        source,
    )
    third = prepare_data(_cfg(source, cache, "data.max_length=60"), tokenizer)
    assert third.meta["cache"] == "built" and third.key != first.key and len(builds(cache)) == 2


@pytest.mark.integration
def test_bad_rows_fail_with_every_problem_or_are_counted_when_skipped(tmp_path, tokenizer, ray_local):
    rows = _rows(12)
    source = _bad_jsonl(tmp_path / "rows.jsonl", rows)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        prepare_data(_cfg(source, cache), tokenizer)
    assert [str(p) for p in info.value.problems] == [str(p) for p in validate_file(source)]
    assert "4 problem(s) in 4 of 28 rows; nothing was loaded" in str(info.value)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # nothing cached
    data = prepare_data(_cfg(source, cache, "data.skip_invalid=true"), tokenizer)
    assert data.rejected == 4 and data.meta["read"] == 28
    n_train = sum(len(data.train[d]) for d in DIRECTIONS)
    assert data.meta["read"] == n_train + len(data.test_rows) + data.rejected  # in = out + rejected
    assert n_train == sum(len(v) for v in _expected(rows, source, tokenizer, 256).values())
