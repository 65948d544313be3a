"""The issue's done-when run: a 1M-row JSONL corpus written by the test, prepared lazily (never loaded whole
by the driver), tokenised once in Ray Data, streamed to 2 Ray Train workers; the driver and the workers
stay under stated memory bounds, and a ``kill -9`` of ``revmix train`` then ``--resume`` trains on
exactly the per-step row ids of an uninterrupted run.

Three ``revmix train`` subprocesses share one tokenised cache: an uninterrupted reference run (which
builds the cache entry), a run killed after its step-3 checkpoint, and its ``--resume``. Rows per step
per worker come from ``runtime.trace`` (``stages/0/trace/rows.rank<r>.jsonl``; a replayed step appends
again and its last record counts). ``REVMIX_SCALE_ROWS`` shrinks the corpus for a quick look.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from revmix.platform.data.cache import builds

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[3]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"
N_ROWS = int(os.environ.get("REVMIX_SCALE_ROWS", 1_000_000))
STEPS = 8
MiB = 1 << 20
DRIVER_BOUND = 1500 * MiB  # the 1M rows as Python dicts alone would add ~700 MB on top of ~700 MB of imports
WORKER_BOUND = 2000 * MiB  # a Ray Train worker: torch, the tiny model, one Parquet window


def write_corpus(path: Path, n_rows: int) -> Path:
    """``n_rows`` canonical rows (forward and reverse twins of ``n_rows / 2`` items, short texts)."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_rows // 2):
            a, b = i % 97, (i * 7) % 89
            fwd = {"item_id": f"i{i}", "direction": "forward", "task": "add", "prompt": f"{a}+{b}=?"}
            rev = {"item_id": f"i{i}", "direction": "reverse", "task": "add", "prompt": f"?+{b}={a + b}"}
            fh.write(json.dumps({**fwd, "response": str(a + b), "answer": str(a + b)}) + "\n")
            fh.write(json.dumps({**rev, "response": str(a), "answer": str(a)}) + "\n")
    return path


def vm_hwm(pid: int) -> int | None:
    """A live process's peak RSS (``VmHWM``) in bytes, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else None


class PeakWatch:
    """Peak RSS of the driver and of every worker named in the trace folder, sampled every 0.2 s."""

    def __init__(self, driver_pid: int, trace: Path) -> None:
        self.driver_pid, self.trace = driver_pid, trace
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            pids = {"driver": self.driver_pid}
            for f in self.trace.glob("rank*.pid") if self.trace.exists() else []:
                pids[f.stem] = int(f.read_text())
            for name, pid in pids.items():
                peak = vm_hwm(pid)
                if peak is not None:
                    self.peaks[name] = max(self.peaks.get(name, 0), peak)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def per_step_rows(run: Path) -> dict[tuple[int, int], list[str]]:
    """``(step, rank) -> row ids`` from the trace; the last record of a replayed step counts."""
    out: dict[tuple[int, int], list[str]] = {}
    for f in sorted((run / "stages" / "0" / "trace").glob("rows.rank*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # the last line of a live run's trace may still be half written
                continue
            out[rec["step"], rec["rank"]] = rec["rows"]
    return out


def train_args(corpus: Path, cache: Path, out: Path) -> list[str]:
    over = [
        f"data.source={corpus}",
        f"data.cache_dir={cache}",
        "data.test_fraction=0.0002",  # held-out rows are kept in memory: about 200 of them
        "data.max_length=32",
        f"data.stream_threshold_rows={min(200_000, N_ROWS // 2)}",  # the default, or below a small corpus
        "model.lora.enabled=false",
        f"stages.0.steps={STEPS}",
        "stages.0.batch_size=8",
        "stages.0.checkpoint_every=3",
        "runtime.num_workers=2",
        "runtime.cpus_per_worker=0.5",
        "runtime.trace=true",
    ]
    return [sys.executable, "-m", "revmix.cli", "train", str(SFT), *over, "--out", str(out), "--no-eval"]


def run_watched(args: list[str], out: Path, log: Path) -> tuple[int, dict[str, int]]:
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        watch = PeakWatch(proc.pid, out / "stages" / "0" / "trace")
        rc = proc.wait(timeout=900)
    return rc, watch.stop()


def test_a_million_rows_stream_to_two_workers_and_a_killed_run_resumes_the_same_stream(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", N_ROWS)
    cache = tmp_path / "cache"
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    t0 = time.time()
    rc, peaks = run_watched(train_args(corpus, cache, ref), ref, tmp_path / "ref.log")
    log = (tmp_path / "ref.log").read_text()
    assert rc == 0, log[-3000:]
    assert f"{N_ROWS} source rows > data.stream_threshold_rows" in log  # the lazy path
    print(
        f"reference run (cache built): {time.time() - t0:.0f} s; peak RSS MiB:",
        {k: v // MiB for k, v in peaks.items()},
    )
    assert set(peaks) == {"driver", "rank0", "rank1"}
    assert peaks["driver"] < DRIVER_BOUND, f"driver peak RSS {peaks['driver'] // MiB} MiB"
    assert max(peaks["rank0"], peaks["rank1"]) < WORKER_BOUND, peaks

    args = train_args(corpus, cache, killed)
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while max((s for s, _ in per_step_rows(killed)), default=0) < 5:  # past the step-3 checkpoint
        assert proc.poll() is None and time.time() < deadline, "run ended before step 5"
        time.sleep(0.2)
    before_kill = per_step_rows(killed)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "stage0" / "step_000003" / "state.json").exists()
    t1 = time.time()
    rc, peaks = run_watched([*args, "--resume"], killed, tmp_path / "resume.log")
    assert rc == 0, (tmp_path / "resume.log").read_text()[-3000:]
    print(f"resumed run: {time.time() - t1:.0f} s; peak RSS MiB:", {k: v // MiB for k, v in peaks.items()})
    assert "tokenised cache reused" in (tmp_path / "resume.log").read_text()
    assert len(builds(cache)) == 1  # three runs, one tokenisation

    expected = per_step_rows(ref)
    assert sorted(expected) == [(s, r) for s in range(1, STEPS + 1) for r in range(2)]
    assert all(len(rows) == 4 for rows in expected.values())  # batch 8 over 2 workers
    assert {k: v for k, v in before_kill.items() if k[0] <= 5} == {
        k: expected[k] for k in before_kill if k[0] <= 5
    }
    assert per_step_rows(killed) == expected  # the resumed run replays 4-5 and trains 6-8 on the same rows
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == STEPS
