"""ParquetDirectionStream: a global order that is a pure function of (seed, epoch), exact skips, rows as
dicts of token arrays and plain values, memory independent of the corpus size, and clear errors for what is not a corpus."""

from __future__ import annotations

import itertools
import os
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from revmix.platform.data.parquet_stream import CHUNK_ROWS, ParquetDirectionStream, table_rows
from revmix.platform.data.synthetic_parquet import random_tokenised_rows, write_corpus

N = 5000  # rows: files of 1200 in row groups of 300; the last file is one group of 200
BASE = random_tokenised_rows(37, seed=3)
TOKEN_FIELDS = ("prompt_ids", "response_ids", "other_ids")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(
        tmp_path_factory.mktemp("c") / "forward", N, BASE, rows_per_group=300, rows_per_file=1200
    )


def ids(stream: ParquetDirectionStream, n: int) -> list[int]:
    return [r["row_index"] for r in itertools.islice(stream, n)]


def test_same_seed_same_order_and_every_row_once_per_epoch(corpus):
    a = ids(ParquetDirectionStream(corpus, 7, "forward", shuffle_buffer=700), 2 * N)
    b = ids(ParquetDirectionStream(corpus, 7, "forward", shuffle_buffer=700), 2 * N)
    assert a == b
    assert sorted(a[:N]) == list(range(N)) and sorted(a[N:]) == list(range(N))
    assert a[:N] != a[N:]  # a fresh order every epoch
    assert a[:N] != ids(ParquetDirectionStream(corpus, 8, "forward", shuffle_buffer=700), N)
    assert a[:N] != ids(ParquetDirectionStream(corpus, 7, "reverse", shuffle_buffer=700), N)


def test_order_is_shuffled_across_blocks(corpus):
    first = ids(ParquetDirectionStream(corpus, 7, "forward", shuffle_buffer=700), 700)
    assert first != sorted(first)
    assert len({i // 300 for i in first}) >= 3  # one window mixes at least three row groups


def test_without_a_buffer_each_row_group_is_read_whole(corpus):
    # shuffle_buffer=1: every window is one row group, so the output is the row groups one after another
    # (each shuffled): 17 groups, 4 per file of 1200 rows and rows 4800..4999 as one group of 200.
    order = ids(ParquetDirectionStream(corpus, 1, "forward", shuffle_buffer=1), N)
    groups, k = [], 0
    while k < N:
        g = order[k] // 300
        size = 200 if g == 16 else 300
        assert {i // 300 for i in order[k : k + size]} == {g}
        groups.append(g)
        k += size
    assert sorted(groups) == list(range(17))


@pytest.mark.parametrize("n", [0, 1, 299, 300, 701, 4999, 5000, 5001, 12345])
def test_skip_then_next_is_the_next_row_of_a_fresh_stream(corpus, n):
    full = ids(ParquetDirectionStream(corpus, 5, "forward", shuffle_buffer=700), n + 3)
    s = ParquetDirectionStream(corpus, 5, "forward", shuffle_buffer=700)
    s.skip(n)
    assert s.position == n
    assert ids(s, 3) == full[n:]
    assert s.position == n + 3


def settled(reads: list) -> list:
    """``reads`` once the read-ahead thread has finished what it was given (it runs one job at a time)."""
    from revmix.platform.data.parquet_stream import read_ahead_pool

    read_ahead_pool().submit(lambda: None).result()
    return reads


def counting_reads(monkeypatch) -> list:
    """The blocks read from now on, in the order their reads began (read-ahead ones included)."""
    import revmix.platform.data.parquet_stream as ps

    reads: list = settled([])  # nothing an earlier stream asked for is counted
    real = ps.read_block
    monkeypatch.setattr(ps, "read_block", lambda b: reads.append(b) or real(b))
    return reads


def test_skip_reads_only_the_window_it_lands_in(corpus, monkeypatch):
    reads = counting_reads(monkeypatch)
    s = ParquetDirectionStream(corpus, 5, "forward", shuffle_buffer=700, read_ahead=False)
    s.skip(3 * N + 2500)
    next(s)
    assert 1 <= len(settled(reads)) <= 3  # one window: >= 700 rows of whole 300-row groups (or a short last)


def test_read_ahead_adds_the_next_window_only_and_reads_each_block_once_per_epoch(corpus, monkeypatch):
    reads = counting_reads(monkeypatch)
    s = ParquetDirectionStream(corpus, 5, "forward", shuffle_buffer=700)
    s.skip(3 * N + 2500)
    next(s)
    landed = settled(reads)[:]
    assert 2 <= len(landed) <= 6 and len(set(landed)) == len(landed)  # this window and the next
    reads.clear()
    s = ParquetDirectionStream(corpus, 5, "forward", shuffle_buffer=700)
    ids(s, 2 * N)
    blocks = len(s.blocks)
    assert 2 * blocks < len(settled(reads)) <= 2 * blocks + 3  # two epochs, then one window ahead
    key = lambda b: (b.file.name, b.group)  # noqa: E731
    assert sorted(map(key, reads[:blocks])) == sorted(map(key, s.blocks))  # epoch 0: each block once


@pytest.mark.parametrize("skips", [[], [0, 4321, 7], [N - 1, 1, 2 * N + 350]])
def test_read_ahead_does_not_change_a_row(corpus, skips):
    def walk(read_ahead: bool) -> list:
        s = ParquetDirectionStream(corpus, 9, "reverse", shuffle_buffer=700, read_ahead=read_ahead)
        got = []
        for n in skips + [0]:
            s.skip(n)
            got += [as_lists(r) for r in itertools.islice(s, 1500)]
        return got

    assert walk(True) == walk(False)


def test_a_forked_child_reads_ahead_with_its_own_thread(corpus):
    # The parent's read-ahead thread has run; a child forked now must not queue reads for it (it would
    # wait forever for a thread that does not exist in the child).
    expected = ids(ParquetDirectionStream(corpus, 4, "forward", shuffle_buffer=700), 3000)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only when it streamed the same rows past several windows
        signal.alarm(120)  # a child waiting on the parent's thread is killed, not left to hang the suite
        try:
            got = ids(ParquetDirectionStream(corpus, 4, "forward", shuffle_buffer=700), 3000)
            os._exit(0 if got == expected else 1)
        except BaseException:
            os._exit(2)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def as_lists(row: dict) -> dict:
    """A streamed row with its token arrays as lists, to compare with the rows written."""
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in row.items()}


def test_rows_are_token_arrays_and_plain_values_equal_to_the_written_rows(corpus):
    s = ParquetDirectionStream(corpus, 2, "forward", shuffle_buffer=700)
    for row in itertools.islice(s, CHUNK_ROWS + 10):  # crosses a chunk boundary
        i = row["row_index"]
        assert as_lists(row) == {**BASE[i % len(BASE)], "row_index": i, "item_id": f"x{i}"}
        assert type(row["row_index"]) is int and type(row["item_id"]) is str
        assert all(isinstance(row[k], np.ndarray) and row[k].dtype.kind == "i" for k in TOKEN_FIELDS)


def test_the_order_is_the_one_earlier_versions_drew(corpus):
    # Pinned from the version that permuted each window with Arrow's take before converting it: how rows
    # are converted may change, the order (which a resumed run relies on) may not.
    got = ids(ParquetDirectionStream(corpus, 7, "forward", shuffle_buffer=700), 2 * N)
    assert got[:8] == [2810, 0, 2740, 2998, 2316, 2329, 1, 2806]
    assert got[N - 3 : N + 3] == [4786, 3996, 4178, 2326, 2086, 1200]
    assert got[-3:] == [2895, 2466, 2551]
    assert sum(k * i for k, i in enumerate(got)) == 131497887462


def test_columns_of_every_kind_become_the_python_values_arrow_gives():
    table = pa.table(
        {
            "ids": pa.array([[1, 300], [], [70000]]),  # picked from the shared int table
            "wide": pa.array([[-1, 5], [1 << 40], []]),  # outside it: converted as they are
            "null_list": pa.array([[1], None, [2]]),
            "null_item": pa.array([[1, None], [2], []]),
            "n": pa.array([1, 2, 3]),
            "n_null": pa.array([1, None, 3]),
            "s": pa.array(["a", None, "c"]),
            "none": pa.array([None, None, None], pa.null()),
            "f": pa.array([0.5, 1.5, None]),
        }
    )
    expected = [
        {"ids": [1, 300], "wide": [-1, 5], "null_list": [1], "null_item": [1, None], "n": 1, "n_null": 1,
         "s": "a", "none": None, "f": 0.5},
        {"ids": [], "wide": [1 << 40], "null_list": None, "null_item": [2], "n": 2, "n_null": None,
         "s": None, "none": None, "f": 1.5},
        {"ids": [70000], "wide": [], "null_list": [2], "null_item": [], "n": 3, "n_null": 3,
         "s": "c", "none": None, "f": None},
    ]  # fmt: skip
    rows = table_rows(table)
    assert rows == expected
    assert table_rows(table.slice(1)) == expected[1:]  # sliced arrays: offsets into the unsliced values
    assert [type(v) for v in (*rows[0]["ids"], *rows[1]["wide"], rows[0]["n"])] == [int] * 4
    assert rows[0]["ids"][1] is table_rows(table)[0]["ids"][1]  # one shared object, not a new int


def test_blocks_with_a_null_typed_column_mix_with_typed_ones(tmp_path):
    # Ray Data writes a block whose answers are all None with a null-typed column.
    rows = random_tokenised_rows(20)
    pq.write_table(pa.Table.from_pylist([{**r, "answer": None} for r in rows[:10]]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), tmp_path / "b.parquet")
    assert pq.read_schema(tmp_path / "a.parquet").field("answer").type == pa.null()
    got = {
        r["row_index"]: r["answer"] for r in itertools.islice(ParquetDirectionStream(tmp_path, 0, "f"), 20)
    }
    assert got == {i: (None if i < 10 else str(i % 97)) for i in range(20)}


def test_no_rows_is_valid_until_asked(tmp_path):
    s = ParquetDirectionStream(tmp_path, 0, "reverse")
    s.skip(5)
    with pytest.raises(ValueError, match=r"no training rows for direction 'reverse' in .*has none"):
        next(s)


def test_bad_paths_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: no such file or directory \(expected a Parquet"):
        ParquetDirectionStream(tmp_path / "nope", 0, "forward")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: not a readable Parquet file"):
        ParquetDirectionStream(tmp_path, 0, "forward")
    with pytest.raises(ValueError, match=r"shuffle_buffer: expected a row count >= 1, got 0"):
        ParquetDirectionStream(tmp_path, 0, "forward", shuffle_buffer=0)


def test_files_with_different_columns_are_named(tmp_path):
    pq.write_table(pa.table({"row_index": [0], "prompt_ids": [[1]]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"row_index": [1], "ids": [[1]]}), tmp_path / "b.parquet")
    with pytest.raises(
        ValueError, match=r"b\.parquet: columns \['row_index', 'ids'\] differ from .* in .*a\.parquet"
    ):
        ParquetDirectionStream(tmp_path, 0, "forward")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth_streaming(path: Path, n: int) -> tuple[int, int]:
    """(peak Arrow bytes, peak RSS growth) held between rows while streaming ``n`` rows of ``path``."""
    arrow0, rss0 = pa.total_allocated_bytes(), rss_bytes()
    arrow, rss = 0, 0
    for k, _ in enumerate(
        itertools.islice(ParquetDirectionStream(path, 0, "forward", shuffle_buffer=2000), n)
    ):
        arrow = max(arrow, pa.total_allocated_bytes() - arrow0)
        if k % 512 == 0:
            rss = max(rss, rss_bytes() - rss0)
    return arrow, rss


def python_bytes_per_row(block: pa.Table) -> float:
    """What one row costs as Python objects (the materialised alternative)."""
    tracemalloc.start()
    rows = table_rows(block)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return held / len(rows)


def test_memory_is_bounded_by_the_window_not_the_corpus(tmp_path):
    small = [
        {**r, "prompt_ids": r["prompt_ids"][:4], "response_ids": r["response_ids"][:4], "other_ids": [5]}
        for r in BASE
    ]
    sizes = (20_000, 200_000)
    corpora = {
        n: write_corpus(tmp_path / str(n), n, small, rows_per_group=1000, rows_per_file=50_000) for n in sizes
    }
    (arrow_small, rss_small), (arrow_big, rss_big) = (peak_growth_streaming(corpora[n], n) for n in sizes)
    block = pq.ParquetFile(next(corpora[sizes[0]].glob("*.parquet"))).read_row_group(0)
    window_bytes = block.nbytes * 3  # a window: at least 2000 rows of whole 1000-row groups
    materialised = sizes[1] * python_bytes_per_row(block)
    # Between rows Arrow holds one shuffled window (plus what its pool keeps), Python one chunk of rows:
    # bounds set by the window, far below the corpus (200 row groups), the same for 20k and 200k rows.
    corpus_arrow = sizes[1] / block.num_rows * block.nbytes
    assert arrow_big <= 3 * window_bytes < corpus_arrow / 20, (arrow_small, arrow_big, window_bytes)
    assert rss_big <= max(1.5 * rss_small, 32 << 20), (rss_small, rss_big)
    assert rss_big < materialised / 4, (rss_big, materialised)


@pytest.mark.integration
def test_reads_back_a_tokenised_cache_entry_written_by_ray_data(tmp_path, ray_local):
    import pyarrow as pa
    import ray.data

    from revmix.platform.data.cache import tokenised_schema

    rows = [{**r, "answer": None if r["row_index"] % 3 else r["answer"]} for r in random_tokenised_rows(500)]
    table = pa.Table.from_pylist(rows, schema=tokenised_schema())
    ray.data.from_arrow(table).repartition(4).write_parquet(str(tmp_path / "forward"))
    got = list(itertools.islice(ParquetDirectionStream(tmp_path / "forward", 0, "forward", 64), 500))
    assert sorted(map(as_lists, got), key=lambda r: r["row_index"]) == rows
