"""Streaming tokenised rows from Parquet against an in-process loop: rows/s, start-up and peak RSS at 10k,
100k and 1M rows (10M with ``--with-10m``), in one run.

For each size the benchmark writes a corpus to disk as Parquet (real tokenised rows of the tiny model,
replicated with distinct ``row_index`` / ``item_id``; files of 131,072 rows in row groups of 8,192), then
measures, each in a fresh process so that peak RSS belongs to that size alone:

- ``in_process``: the rows as a Python list (what ``num_workers=0`` holds), iterated and collated in
  batches; above ``--baseline-cap`` rows the list holds the first cap rows (its rate does not depend on n);
  above ``--stream-cap`` rows the streams below read the first cap rows of their epoch (``rows_measured``);
- ``driver``: a :class:`ParquetDirectionStream` over the corpus in a plain process, collated the same way;
- ``worker``: the same inside a Ray task (``max_calls=1``: its own worker process);
- ``paired``: the throughput ratio, measured with the list and the stream taking turns in one process
  (:func:`paired`; in a fresh process, again without read-ahead, and in a Ray task). The solo runs above
  give RSS and start-up; their rates come from different seconds of a machine whose speed swings about
  2x within seconds, so their ratio is reported but not judged.

Start-up is construction to first row (footers read, first window loaded); ``task_start_s`` is the Ray
task's submission to its first line (scheduling and a fresh worker process); imports are timed in
neither. Targets (issue 13): driver and worker peak RSS within 1.5x from 100k rows to the largest size;
paired stream rows/s >= 0.9x in-process from 100k; start-up <= 5 s.

    python benchmarks/data_throughput.py                     # 10k, 100k, 1M
    python benchmarks/data_throughput.py --with-10m --stream-cap 200000 --baseline-cap 100000
                    # + 10M rows (about 0.7 GB on disk, written in about a minute), each stream
                    # timed over the first 200k rows of its epoch: the results JSON's run
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_ROWS = 1000  # distinct tokenised rows a corpus cycles through
TOKEN_COLUMNS = ("prompt_ids", "response_ids", "other_ids")
PAIR_SLICE = 1024  # rows per turn in the paired measurement: about 10 ms, shorter than the machine's swings


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``: unlike ``ru_maxrss``, not inherited from the parent's RSS
    across fork and exec, so a fresh process's peak is its own)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def collate_all(open_rows: Any, n: int, batch: int, pad: int) -> dict[str, float]:
    """Collate ``n`` rows of the iterable ``open_rows()`` returns, in batches. ``startup_s``: seconds to the
    first row from the call of ``open_rows``; ``rows_per_s``: all ``n`` rows over the wall time, start-up
    included; ``rows_per_cpu_s``: the same over this process's CPU time (all its threads), which other jobs
    on a shared machine disturb far less than the wall clock."""
    from revmix.platform.data.tokenize import collate

    t0, c0 = time.perf_counter(), time.process_time()
    it = iter(open_rows())
    first = next(it)
    startup = time.perf_counter() - t0
    rest = itertools.chain([first], itertools.islice(it, n - 1))
    while chunk := list(itertools.islice(rest, batch)):
        collate(chunk, pad)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"rows_per_s": n / wall, "rows_per_cpu_s": n / cpu, "startup_s": startup}


def stream_rows(corpus: str, n: int, batch: int, pad: int, buffer: int) -> dict[str, float]:
    """One epoch of the corpus through the stream, collated: what a reading process costs. ``rss_before_mb``
    is the peak after the imports (torch's included), so ``peak_rss_mb`` minus it is what reading added."""
    import pandas  # noqa: F401 (pyarrow imports it at its first to_numpy; in_process_rows has, Ray Data has)

    from revmix.platform.data.parquet_stream import ParquetDirectionStream
    from revmix.platform.data.tokenize import collate  # noqa: F401 (imported before rss_before_mb)

    rss0 = peak_rss_mb()
    rates = collate_all(
        lambda: ParquetDirectionStream(corpus, 0, "forward", shuffle_buffer=buffer), n, batch, pad
    )
    return {**rates, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0}


def worker_stream(corpus: str, n: int, batch: int, pad: int, buffer: int) -> dict[str, float]:
    """:func:`stream_rows` in a Ray task, with the time it began (to measure scheduling and start-up)."""
    began = time.time()
    return {**stream_rows(corpus, n, batch, pad, buffer), "task_began": began}


def in_process_rows(corpus: str, n: int, batch: int, pad: int) -> dict[str, float]:
    """The corpus's rows as one Python list, looped; every row has its own token lists (about 4 kB a row),
    as a real tokenised list has."""
    from revmix.platform.data.parquet_stream import table_rows  # noqa: F401 (imported before rss_before_mb)
    from revmix.platform.data.tokenize import collate  # noqa: F401 (the same)

    rss0 = peak_rss_mb()
    rows = _list_rows(corpus, n)
    rates = collate_all(lambda: rows, n, batch, pad)
    del rates["startup_s"]
    return {**rates, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0}


def paired(
    corpus: str, n: int, batch: int, pad: int, buffer: int, read_ahead: bool = True
) -> dict[str, float]:
    """The in-process list and the stream consumed in alternating slices of ``PAIR_SLICE`` rows, ``n``
    rows each: both see the same machine speed, which on a shared VM swings about 2x within seconds
    (a fixed Python loop took 16 ms or 31 ms by turns), far more than the difference measured. The
    stream's read-ahead thread keeps reading during the list's slices, as it does during training steps;
    ``read_ahead=False`` measures the stream without it, in the same process."""
    import pandas  # noqa: F401 (see stream_rows)

    from revmix.platform.data.parquet_stream import ParquetDirectionStream
    from revmix.platform.data.tokenize import collate

    n = -(-n // PAIR_SLICE) * PAIR_SLICE
    rows = iter(_list_rows(corpus, n))
    stream = iter(ParquetDirectionStream(corpus, 0, "forward", shuffle_buffer=buffer, read_ahead=read_ahead))
    spent = {"in_process": 0.0, "stream": 0.0}
    for _ in range(n // PAIR_SLICE):
        for who, it in (("in_process", rows), ("stream", stream)):
            t0 = time.perf_counter()
            for _ in range(PAIR_SLICE // batch):
                collate(list(itertools.islice(it, batch)), pad)
            spent[who] += time.perf_counter() - t0
    return {
        "in_process_rows_per_s": n / spent["in_process"],
        "stream_rows_per_s": n / spent["stream"],
        "stream_over_in_process": spent["in_process"] / spent["stream"],
    }


def _list_rows(corpus: str, n: int) -> list[dict[str, Any]]:
    """``n`` rows as the in-process baseline holds them: copies of the corpus's first rows."""
    import pyarrow.parquet as pq

    from revmix.platform.data.parquet_stream import table_rows

    first = sorted(Path(corpus).glob("*.parquet"))[0]
    base = table_rows(pq.ParquetFile(first).read_row_group(0).slice(0, BASE_ROWS))
    return [_own_lists(base[i % len(base)], i) for i in range(n)]


def worker_paired(corpus: str, n: int, batch: int, pad: int, buffer: int) -> dict[str, float]:
    """:func:`paired` in a Ray task (its own worker process)."""
    return paired(corpus, n, batch, pad, buffer)


def _own_lists(row: dict[str, Any], i: int) -> dict[str, Any]:
    """Row ``i``: a copy of ``row`` with its own token lists, as a real tokenised list holds (rows sharing
    a few base rows' lists would stay in the CPU cache and flatter the baseline's collate)."""
    return {**row, **{k: list(row[k]) for k in TOKEN_COLUMNS}, "row_index": i, "item_id": f"x{i}"}


def in_fresh_process(mode: str, corpus: Path, n: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--one", mode, "--corpus", str(corpus), "--rows", str(n)]
    cmd += ["--batch", str(args.batch), "--pad", str(args.pad), "--shuffle-buffer", str(args.shuffle_buffer)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def in_ray_worker(corpus: Path, n: int, args: argparse.Namespace) -> dict[str, float]:
    import ray

    task = ray.remote(num_cpus=1, max_calls=1)(worker_stream)
    t0 = time.time()
    result = ray.get(task.remote(str(corpus), n, args.batch, args.pad, args.shuffle_buffer))
    result["task_start_s"] = result.pop("task_began") - t0
    return result


def paired_runs(corpus: Path, n: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """:func:`paired` in a fresh process (with and without read-ahead) and in a Ray task."""
    import ray

    task = ray.remote(num_cpus=1, max_calls=1)(worker_paired)
    return {
        "driver": in_fresh_process("paired", corpus, n, args),
        "driver_no_read_ahead": in_fresh_process("paired_no_read_ahead", corpus, n, args),
        "worker": ray.get(task.remote(str(corpus), n, args.batch, args.pad, args.shuffle_buffer)),
    }


def measure(n: int, corpus: Path, args: argparse.Namespace) -> dict[str, Any]:
    base_n, stream_n = min(n, args.baseline_cap), min(n, args.stream_cap or n)
    local = in_fresh_process("in_process", corpus, base_n, args)
    driver = in_fresh_process("driver", corpus, stream_n, args)
    worker = in_ray_worker(corpus, stream_n, args)
    pairs = paired_runs(corpus, base_n, args)
    r2 = {k: round(v, 3) for k, v in local.items()}
    return {
        "rows": n,
        "paired": {who: {k: round(v, 3) for k, v in r.items()} for who, r in pairs.items()},
        "in_process": {**r2, "rows_measured": base_n},
        "driver": {**{k: round(v, 3) for k, v in driver.items()}, "rows_measured": stream_n},
        "worker": {**{k: round(v, 3) for k, v in worker.items()}, "rows_measured": stream_n},
        **{
            f"{who}_over_in_process{cpu}": round(res[f"rows_per{cpu}_s"] / local[f"rows_per{cpu}_s"], 3)
            for cpu in ("", "_cpu")
            for who, res in (("driver", driver), ("worker", worker))
        },
    }


def targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 13's targets, read off the results (from 100k rows on)."""
    big = [r for r in results if r["rows"] >= 100_000]
    if not big:
        return {}
    rss = {w: big[-1][w]["peak_rss_mb"] / big[0][w]["peak_rss_mb"] for w in ("driver", "worker")}
    speed = min(min(r["paired"][w]["stream_over_in_process"] for w in ("driver", "worker")) for r in big)
    solo, cpu_speed = (
        min(min(r[f"driver_over_in_process{c}"], r[f"worker_over_in_process{c}"]) for r in big)
        for c in ("", "_cpu")
    )
    startup = max(max(r["driver"]["startup_s"], r["worker"]["startup_s"]) for r in results)
    return {
        "peak_rss_ratio_100k_to_largest": {w: round(v, 3) for w, v in rss.items()},
        "rss_flat_within_1_5x": all(v <= 1.5 for v in rss.values()),
        "min_throughput_ratio_from_100k": speed,
        "throughput_at_least_0_9x": speed >= 0.9,
        "min_solo_throughput_ratio_from_100k": solo,
        "min_cpu_throughput_ratio_from_100k": cpu_speed,
        "cpu_throughput_at_least_0_9x": cpu_speed >= 0.9,
        "max_startup_s": round(startup, 3),
        "startup_at_most_5s": startup <= 5,
    }


def one(args: argparse.Namespace) -> None:
    """``--one MODE``: a single measurement in this (fresh) process, printed as one JSON line."""
    if args.one == "in_process":
        result = in_process_rows(args.corpus, args.rows, args.batch, args.pad)
    elif args.one.startswith("paired"):
        ahead = args.one == "paired"
        result = paired(args.corpus, args.rows, args.batch, args.pad, args.shuffle_buffer, read_ahead=ahead)
    else:
        result = stream_rows(args.corpus, args.rows, args.batch, args.pad, args.shuffle_buffer)
    print(json.dumps(result))


def corpus_for(n: int, workdir: Path, base: list[dict[str, Any]]) -> tuple[Path, float]:
    from revmix.platform.data.synthetic_parquet import write_corpus

    t0 = time.perf_counter()
    path = write_corpus(workdir / f"rows_{n}", n, base)
    return path, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--with-10m", action="store_true", help="also 10,000,000 rows (about 0.7 GB on disk)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shuffle-buffer", type=int, default=4096)
    ap.add_argument("--baseline-cap", type=int, default=200_000, help="most rows the in-process list holds")
    ap.add_argument(
        "--stream-cap",
        type=int,
        help="most rows streamed per size (default: a whole epoch); the first rows of the epoch's seeded "
        "order, drawn from row groups all over the corpus, so footers, windows and RSS are the full size's",
    )
    ap.add_argument("--workdir", help="where corpora are written (default: a temporary directory, removed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_throughput.json"))
    ap.add_argument(
        "--one", choices=["in_process", "driver", "paired", "paired_no_read_ahead"], help=argparse.SUPPRESS
    )
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pad", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    sizes = args.sizes + ([10_000_000] if args.with_10m else [])
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = run(sizes, Path(tmp), args)
    out = {
        "benchmark": "data_throughput",
        "batch": args.batch,
        "shuffle_buffer": args.shuffle_buffer,
        "stream_cap": args.stream_cap,
        "baseline_cap": args.baseline_cap,
        "results": results,
        "targets": targets(results),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["targets"]), flush=True)


def run(sizes: list[int], workdir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray

    from revmix.platform.data.synthetic import generate_mix
    from revmix.platform.data.tokenize import tokenise_rows
    from revmix.platform.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(None, "tiny", 0))
    args.pad = tok.pad_token_id
    base, _ = tokenise_rows(
        generate_mix(["affine_mod", "arith_chain", "string_ops"], BASE_ROWS // 2, 0), tok, 256
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for n in sizes:
            corpus, write_s = corpus_for(n, workdir, base)
            results.append({**measure(n, corpus, args), "corpus_write_s": round(write_s, 1)})
            print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()
    return results


if __name__ == "__main__":
    main()
