"""The content-keyed tokenised cache and the reference log-prob cache: built once, rebuilt on any change.

Real pieces throughout: the tiny model's tokenizer, JSONL files on disk, ``prepare_data``, the recipe's
``_reference_cache`` with a frozen copy of the tiny model, and real processes racing for one entry.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from revmix.config import load_config
from revmix.objectives.reference import FrozenCopyReference
from revmix.platform.data import cache as cache_module
from revmix.platform.data import prepare as prepare_module
from revmix.platform.data.cache import BUILDS_LOG, build_once, builds, read_direction, write_direction
from revmix.platform.data.lazy import is_test_item
from revmix.platform.data.loaders import DataError, write_jsonl
from revmix.platform.data.prepare import prepare_data
from revmix.platform.data.schema import DIRECTIONS
from revmix.platform.data.synthetic import generate_mix
from revmix.platform.models import load_model, load_tokenizer, resolve_model_path
from revmix.platform.recipe import _reference_cache

ROOT = Path(__file__).resolve().parents[3]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"
SYSTEM_TURN = "{{- '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None, "tiny"))


def _source(tmp_path: Path, n_items: int = 12) -> tuple[Path, list[dict]]:
    rows = generate_mix(["affine_mod"], n_items, seed=0)
    path = tmp_path / "rows.jsonl"
    write_jsonl(rows, path)
    return path, rows


def _data_cfg(source: Path, cache: Path, *overrides: str):
    return load_config(SFT, [f"data.source={source}", f"data.cache_dir={cache}", *overrides]).data


def test_a_second_preparation_reuses_the_entry_it_built(tmp_path, tokenizer, capsys):
    source, _ = _source(tmp_path)
    cache = tmp_path / "cache"
    first = prepare_data(_data_cfg(source, cache), tokenizer)
    second = prepare_data(_data_cfg(source, cache), tokenizer)
    assert (first.meta["cache"], second.meta["cache"]) == ("built", "reused")
    assert [b["key"] for b in builds(cache)] == [first.key] and second.key == first.key
    assert second.train == first.train  # read back from Parquet == just tokenised
    # 12 items, test_fraction 0.2: floor(2.4 + 0.5) = 2 held out, 10 items x 2 directions train
    assert [len(second.train[d]) for d in DIRECTIONS] == [10, 10] and second.n_items == 10
    assert [r["row_index"] for d in DIRECTIONS for r in second.train[d]] == list(range(20))
    entry = cache / first.key
    assert sorted(p.name for p in entry.iterdir()) == ["forward", "meta.json", "reverse"]
    assert sorted(p.name for p in (entry / "forward").iterdir()) == ["_done", "part-00000.parquet"]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "tokenised cache" in ln]
    assert lines == [
        f"data: 20 training rows <= data.stream_threshold_rows 200000: tokenised in this process, "
        f"materialised; tokenised cache {how}: {entry}"
        for how in ("built", "reused")
    ]


def _edit_first_training_response(source: Path, rows: list[dict], item_id: str) -> None:
    write_jsonl(
        [
            dict(r, response=r["response"] + " (edited)")
            if (r["item_id"], r["direction"]) == (item_id, "forward")
            else r
            for r in rows
        ],
        source,
    )


def _ref_cache_path(data, tokenizer, tmp_path: Path, monkeypatch) -> Path:
    """The recipe's reference cache for ``data``'s rows (a frozen copy of the tiny model)."""
    monkeypatch.setattr(cache_module, "cache_root", lambda: tmp_path / "refcache")
    path = resolve_model_path(None, "tiny")
    ref = FrozenCopyReference(load_model(path, dtype="float32", device=torch.device("cpu")))
    return _reference_cache(ref, data.train, tokenizer, path, torch.device("cpu")).path


@pytest.mark.parametrize("change", ["edit_one_row", "max_length", "chat_template"])
def test_what_the_tokens_depend_on_rebuilds_both_caches(tmp_path, tokenizer, monkeypatch, change):
    source, rows = _source(tmp_path)
    cache = tmp_path / "cache"
    base = prepare_data(_data_cfg(source, cache), tokenizer)
    base_ref = _ref_cache_path(base, tokenizer, tmp_path, monkeypatch)
    item = base.train["forward"][0]["item_id"]
    tok, overrides = tokenizer, []
    if change == "edit_one_row":
        _edit_first_training_response(source, rows, item)
    elif change == "max_length":
        overrides = ["data.max_length=60"]  # prompts are 40-45 tokens, responses 28-41: every one is cut
    else:
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = SYSTEM_TURN + tokenizer.chat_template
    other = prepare_data(_data_cfg(source, cache, *overrides), tok)
    assert other.key != base.key and other.meta["cache"] == "built"
    assert len(builds(cache)) == 2
    changed = [
        i
        for i, (a, b) in enumerate(zip(base.train["forward"], other.train["forward"], strict=True))
        if a != b
    ]
    if change == "edit_one_row":
        assert changed == [0]  # exactly the edited row's tokens moved
        assert other.train["forward"][0]["response_ids"] != base.train["forward"][0]["response_ids"]
    else:
        assert changed == list(range(10))
    other_ref = _ref_cache_path(other, tok, tmp_path, monkeypatch)
    assert other_ref != base_ref and other_ref.exists() and base_ref.exists()
    mtime = base_ref.stat().st_mtime_ns  # the unchanged rows find their reference cache and keep it
    assert _ref_cache_path(base, tokenizer, tmp_path, monkeypatch) == base_ref
    assert base_ref.stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "refcache" / "ref_logps").iterdir())) == 2


def test_a_failed_build_leaves_nothing_and_a_killed_one_is_cleaned_up(tmp_path):
    def fail(tmp: Path) -> dict:
        write_direction(tmp / "forward", [])
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        build_once(tmp_path, "k1", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k1.lock"]  # no entry, no temporary folder
    (tmp_path / ".k1.dead.tmp").mkdir()  # what a kill -9 during a build leaves
    entry, built = build_once(tmp_path, "k1", lambda tmp: {"ok": 1})
    assert built and sorted(p.name for p in tmp_path.iterdir()) == [".k1.lock", BUILDS_LOG, "k1"]
    assert json.loads((entry / "meta.json").read_text()) == {"ok": 1}
    (tmp_path / "k2").mkdir()  # a folder this cache did not write is never overwritten
    with pytest.raises(FileExistsError, match="holds no meta.json"):
        build_once(tmp_path, "k2", lambda tmp: {})


def _slow_build(tmp: Path) -> dict:
    """Slow enough that a second process reaches the lock before the first one finishes."""
    time.sleep(1.0)
    rows = [
        {
            "row_index": i,
            "item_id": f"i{i}",
            "direction": 0,
            "task": "t",
            "answer": None,
            "prompt_ids": [1],
            "response_ids": [2],
            "other_ids": [],
        }
        for i in range(5)
    ]
    write_direction(tmp / "forward", rows)
    return {"rows": 5}


def _race_build_once(root: str, barrier) -> None:
    barrier.wait()
    build_once(Path(root), "shared", _slow_build)


def _race_prepare(source: str, cache: str, results, barrier) -> None:
    tok = load_tokenizer(resolve_model_path(None, "tiny"))
    cfg = _data_cfg(Path(source), Path(cache))
    barrier.wait()
    data = prepare_data(cfg, tok)
    results.put((data.key, data.meta["cache"]))


def _run_two(target, *args) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=target, args=(*args, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_processes_building_one_entry_write_one_copy(tmp_path):
    _run_two(_race_build_once, str(tmp_path))
    assert len(builds(tmp_path)) == 1
    assert [r["row_index"] for r in read_direction(tmp_path / "shared" / "forward")] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared.lock", BUILDS_LOG, "shared"]


@pytest.mark.slow  # two fresh interpreters importing torch: about 90 s on 2 busy cores
@pytest.mark.heavy
def test_two_runs_preparing_the_same_data_share_one_copy_of_each_row(tmp_path):
    source, _ = _source(tmp_path, n_items=150)
    cache = tmp_path / "cache"
    results = multiprocessing.get_context("spawn").Queue()
    _run_two(_race_prepare, str(source), str(cache), results)
    got = sorted(results.get(timeout=5) for _ in range(2))
    key = got[0][0]
    assert got == [(key, "built"), (key, "reused")] and len(builds(cache)) == 1
    # 150 items, 30 held out: 120 forward rows and 120 reverse rows, each once
    indexes = [
        i
        for d in DIRECTIONS
        for f in sorted((cache / key / d).glob("*.parquet"))
        for i in pq.read_table(f, columns=["row_index"]).column("row_index").to_pylist()
    ]
    assert sorted(indexes) == list(range(240))
    assert {p.name for p in cache.iterdir()} == {f".{key}.lock", BUILDS_LOG, key}


@pytest.mark.integration
def test_ray_data_tokenises_large_data_exactly_as_the_process_does(tmp_path, tokenizer, ray_local, capsys):
    """A large file goes the lazy way (hash split, spool, Ray Data); its tokens are the in-process ones
    of the same training rows: the rows of the small path's entry for a file holding just those rows."""
    source, rows = _source(tmp_path)
    cut = ["data.max_length=60"]  # every forward response is cut (prompts 40-45 tokens, responses 28-41)
    large = prepare_data(_data_cfg(source, tmp_path / "b", *cut, "data.stream_threshold_rows=0"), tokenizer)
    train = [r for r in rows if not is_test_item(r["item_id"], 0, 0.2)]
    n_fwd = sum(r["direction"] == "forward" for r in train)
    only_train = tmp_path / "train.jsonl"
    write_jsonl(train, only_train)
    small = prepare_data(_data_cfg(only_train, tmp_path / "a", *cut, "data.test_fraction=1e-9"), tokenizer)
    assert large.streamed and not small.streamed and large.meta["tokenised_in"] == "ray_data"
    for d in DIRECTIONS:
        assert len(large.train[d]) == len(small.train[d]) == n_fwd
        assert list(large.train[d]) == small.train[d]
    assert (large.truncated, large.dropped) == (small.truncated, small.dropped)
    assert large.n_items == small.n_items == n_fwd and large.truncated["forward"]["rows"] == n_fwd
    out = capsys.readouterr().out
    assert "data: 24 source rows > data.stream_threshold_rows 0 (JSONL lines): read, validated" in out
    datasets = prepare_module.to_ray_datasets(large, _data_cfg(source, tmp_path / "b"))
    assert {d: ds.count() for d, ds in datasets.items()} == {"forward": n_fwd, "reverse": n_fwd}
    assert {p.name for p in (tmp_path / "b").iterdir()} == {f".{large.key}.lock", BUILDS_LOG, large.key}


@pytest.mark.integration
def test_ray_data_names_every_row_over_max_length_and_caches_nothing(tmp_path, tokenizer, ray_local):
    source, rows = _source(tmp_path)
    cache = tmp_path / "cache"
    cfg = _data_cfg(
        source, cache, "data.max_length=60", "data.truncation=error", "data.stream_threshold_rows=0"
    )
    with pytest.raises(DataError) as info:
        prepare_data(cfg, tokenizer)
    train_ids = {r["item_id"] for r in rows if not is_test_item(r["item_id"], 0, 0.2)}  # the lazy split
    # every training row: prompts of 40-45 tokens leave 15-20 for responses of 28+ tokens
    expected = [(str(source), i + 1, "response") for i, r in enumerate(rows) if r["item_id"] in train_ids]
    assert len(expected) == 2 * len(train_ids) >= 16
    assert [(p.file, p.line, p.field) for p in info.value.problems] == expected
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
