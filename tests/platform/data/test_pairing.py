"""``data.pairing``: twins keep today's rows; independent trains each item in one direction only, from
disjoint halves of equal size, the same for every run with the same seed; the held-out rows never change.

Real pieces: generated rows, the tiny model's tokenizer, JSONL files on disk, the local Ray fixture (lazy).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from revmix.config import load_config
from revmix.platform.data import lazy
from revmix.platform.data.loaders import write_jsonl
from revmix.platform.data.pairing import forward_items, item_fraction, keeps_row, paired_rows
from revmix.platform.data.prepare import load_canonical_rows, prepare_data, split_rows
from revmix.platform.data.schema import DIRECTIONS
from revmix.platform.data.synthetic import generate_mix
from revmix.platform.models import load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parents[3]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None, "tiny"))


def _rows(n_items: int) -> list[dict]:
    return [dict(r) for r in generate_mix(["affine_mod"], n_items, seed=0)]


def _items(rows, direction: str) -> set[str]:
    return {r["item_id"] for r in rows if r["direction"] == direction}


def test_twins_keeps_every_row():
    rows = _rows(10)
    assert paired_rows(rows, "twins", seed=0) is rows


@pytest.mark.parametrize("n_items", [40, 41])
def test_independent_draws_the_directions_from_disjoint_halves(n_items):
    rows = _rows(n_items)
    kept = paired_rows(rows, "independent", seed=0)
    forward, reverse = _items(kept, "forward"), _items(kept, "reverse")
    assert not forward & reverse  # no item, so no fact, in both directions
    assert forward | reverse == {r["item_id"] for r in rows}  # every item trains, once
    assert (len(forward), len(reverse)) == ((n_items + 1) // 2, n_items // 2)  # 20/20, 21/20
    assert len(kept) == n_items  # one row per item: half of the twins' 2n
    assert kept == [r for r in rows if r in kept]  # source order kept
    assert forward == forward_items([r["item_id"] for r in rows], 0)


def test_independent_is_a_pure_function_of_the_ids_and_seed():
    rows = _rows(40)
    first = paired_rows(rows, "independent", seed=0)
    assert paired_rows(list(reversed(rows)), "independent", seed=0) == list(reversed(first))
    assert _items(paired_rows(rows, "independent", seed=1), "forward") != _items(first, "forward")
    with pytest.raises(ValueError, match="data.pairing: expected one of twins, independent, got 'halves'"):
        paired_rows(rows, "halves", seed=0)  # type: ignore[arg-type]


def test_the_lazy_test_keeps_one_direction_of_each_item_and_halves_them():
    ids = [f"item-{i}" for i in range(4000)]
    forward = [i for i in ids if keeps_row(i, "forward", "independent", 0)]
    assert all(keeps_row(i, "reverse", "independent", 0) != (i in set(forward)) for i in ids)
    assert 0.47 < len(forward) / len(ids) < 0.53  # binomial(4000, 1/2): sd 0.0079, so 3.8 sd either side
    assert set(forward) == {i for i in ids if item_fraction(i, 0) < 0.5}
    assert all(keeps_row(i, d, "twins", 0) for i in ids[:50] for d in DIRECTIONS)


def _data_cfg(cache: Path, *over: str):
    return load_config(SFT, ["data.n_items=40", f"data.cache_dir={cache}", *over]).data


def test_prepare_data_trains_on_disjoint_halves_and_keeps_the_held_out_rows(tmp_path, tokenizer, capsys):
    twins = prepare_data(_data_cfg(tmp_path), tokenizer)
    independent = prepare_data(_data_cfg(tmp_path, "data.pairing=independent"), tokenizer)
    assert independent.test_rows == twins.test_rows  # evaluation unchanged
    train_items = {r["item_id"] for d in DIRECTIONS for r in twins.train[d]}
    assert len(train_items) == 32 and all(len(twins.train[d]) == 32 for d in DIRECTIONS)  # 40 − 8 held out
    forward = {r["item_id"] for r in independent.train["forward"]}
    reverse = {r["item_id"] for r in independent.train["reverse"]}
    assert not forward & reverse and forward | reverse == train_items
    assert (len(forward), len(reverse)) == (16, 16) and independent.n_items == 32
    assert independent.key != twins.key  # a separate cache entry
    # the same rows as the pure function picks from the same split, tokenised the same way
    cfg = _data_cfg(tmp_path)
    train, _ = split_rows(load_canonical_rows(cfg)[0], cfg)
    assert forward == forward_items([r["item_id"] for r in train], 0)
    assert "data: pairing independent: forward rows from 16 items, reverse rows from 16 other items; " in (
        capsys.readouterr().out
    )


def test_the_spool_leaves_out_the_other_half_and_counts_it(tmp_path):
    rows = _rows(30)
    path = tmp_path / "rows.jsonl"
    write_jsonl(rows, path)
    src = lazy.LazySource(path)
    twins = lazy.spool(src, lazy.scan(src), tmp_path / "twins", 0, 0.2, None)
    got = lazy.spool(src, lazy.scan(src), tmp_path / "independent", 0, 0.2, None, "independent")
    assert got.test_rows == twins.test_rows and got.n_rejected == 0
    assert got.n_read == sum(got.counts.values()) + len(got.test_rows) + got.unpaired  # every row counted
    assert got.unpaired == sum(twins.counts.values()) // 2  # one row of each training item left out
    spooled = {
        d: {r["item_id"] for r in pq.read_table(tmp_path / "independent" / d / "part-0.parquet").to_pylist()}
        for d in DIRECTIONS
    }
    assert not spooled["forward"] & spooled["reverse"]
    assert all(item_fraction(i, 0) < 0.5 for i in spooled["forward"])
    assert all(item_fraction(i, 0) >= 0.5 for i in spooled["reverse"])


@pytest.mark.integration
def test_a_lazily_read_file_pairs_independently_in_its_own_cache_entry(
    tmp_path, tokenizer, ray_local, capsys
):
    """One Ray Data build (the twins' entry is the lazy tests' own): the hash split's held-out rows, and the
    training items split by :func:`keeps_row`."""
    rows = _rows(12)
    source = tmp_path / "rows.jsonl"
    write_jsonl(rows, source)
    over = [f"data.source={source}", "data.stream_threshold_rows=5", "data.pairing=independent"]
    data = prepare_data(_data_cfg(tmp_path / "cache", *over), tokenizer)
    held = {r["item_id"] for r in rows if lazy.is_test_item(r["item_id"], 0, 0.2)}
    assert (
        data.streamed
        and {r["item_id"] for r in data.test_rows} == held
        and len(data.test_rows) == 2 * len(held)
    )
    items = {d: {r["item_id"] for r in data.train[d]} for d in DIRECTIONS}
    assert not items["forward"] & items["reverse"]
    assert items["forward"] | items["reverse"] == {r["item_id"] for r in rows} - held
    assert items["forward"] == {i for i in items["forward"] | items["reverse"] if item_fraction(i, 0) < 0.5}
    assert data.meta["unpaired"] == 12 - len(held)  # one row of each training item
    out = capsys.readouterr().out
    assert "data: pairing independent: forward and reverse rows from disjoint item halves" in out
