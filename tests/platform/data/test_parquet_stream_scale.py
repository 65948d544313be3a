"""A 1M-row tokenised corpus, written on disk by the test, streamed through 2 Ray workers that each read
the global order and keep their own slice: every row exactly once, each worker's slice the global
stream's, and the driver's and workers' memory bounded far below the corpus held as Python rows."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from revmix.platform.data.parquet_stream import ParquetDirectionStream
from revmix.platform.data.synthetic_parquet import write_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.heavy]

N = 1_000_000
WORLD = 2
MiB = 1 << 20


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` can carry the parent's RSS across fork and exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def read_slice(corpus: str, rank: int) -> tuple[np.ndarray, int, int]:
    """A worker: one epoch of the global stream, keeping positions ``rank::WORLD``; (row ids kept, peak
    RSS, RSS before reading), in bytes."""
    stream = ParquetDirectionStream(corpus, 11, "forward", shuffle_buffer=4096)
    before = rss_bytes()
    ids = np.empty(N // WORLD, dtype=np.int64)
    for k, row in enumerate(itertools.islice(stream, N)):
        if k % WORLD == rank:
            ids[k // WORLD] = row["row_index"]
    return ids, peak_rss_bytes(), before


class PeakRss:
    """The driver's highest RSS, sampled every 50 ms while the workers run."""

    def __init__(self) -> None:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_million_rows_stream_through_two_workers_in_bounded_memory(tmp_path, ray_local):
    corpus = write_corpus(tmp_path / "forward", N)  # random tokenised rows: ~40 + 55 + 55 tokens each
    task = ray_local.remote(num_cpus=1, max_calls=1)(read_slice)
    driver_before = rss_bytes()
    with PeakRss() as driver:
        results = ray_local.get([task.remote(str(corpus), rank) for rank in range(WORLD)])
    ids = [r[0] for r in results]
    assert np.array_equal(np.sort(np.concatenate(ids)), np.arange(N))  # every row once, across the workers
    head = [
        r["row_index"] for r in itertools.islice(ParquetDirectionStream(corpus, 11, "forward", 4096), 4000)
    ]
    for rank in range(WORLD):
        assert ids[rank][:2000].tolist() == head[rank::WORLD]  # each worker's slice of one global order
    # Held as Python rows the corpus would take about 4 GB (4.2 kB a row: a dict, three lists of ints);
    # a worker holds one window (4096+ rows of Arrow) and one chunk of Python rows.
    print(
        f"driver RSS grew {(driver.peak - driver_before) / MiB:.0f} MiB; workers' peak RSS / growth (MiB):",
        [(round(p / MiB), round((p - b) / MiB)) for _, p, b in results],
    )
    for rank, (_, peak, before) in enumerate(results):
        assert peak - before < 200 * MiB, f"worker {rank}: peak RSS grew {(peak - before) / MiB:.0f} MiB"
        assert peak < 1024 * MiB, f"worker {rank}: peak RSS {peak / MiB:.0f} MiB"
    assert driver.peak - driver_before < 100 * MiB, (
        f"driver RSS grew {(driver.peak - driver_before) / MiB:.0f} MiB"
    )
