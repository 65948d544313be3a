"""Rows/s of the Ray Data path against an in-process loop, at 1k, 10k and 100k rows, in one run.

Both paths start from the same tokenised rows (revmix tokenises once on the driver). In-process: iterate
the list and collate batches (what ``num_workers=0`` does). Ray Data: ``from_items → materialize`` (what
``to_ray_datasets`` does for small sets), then a streaming-split shard iterated by a Ray Train-style
consumer (``iter_rows``), collated the same way. The growth of the ratio with size is what to read.

    python benchmarks/data_throughput.py --sizes 1000 10000 100000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from revmix.platform.data.synthetic import generate_mix
from revmix.platform.data.tokenize import collate, tokenise_rows
from revmix.platform.models import load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def rows_of(n: int, tokenizer) -> list[dict]:
    base, _ = tokenise_rows(generate_mix(["affine_mod", "arith_chain", "string_ops"], 500, 0), tokenizer, 256)
    return [{**base[i % len(base)], "row_index": i, "item_id": f"x{i}"} for i in range(n)]


def in_process(rows: list[dict], pad: int, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        collate(rows[i : i + batch], pad)
    return len(rows) / (time.perf_counter() - t0)


def ray_data(rows: list[dict], pad: int, batch: int) -> float:
    import ray.data

    t0 = time.perf_counter()
    ds = ray.data.from_items(rows).materialize()
    (shard,) = ds.streaming_split(1)
    buf = []
    for r in shard.iter_rows():
        buf.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()})
        if len(buf) == batch:
            collate(buf, pad)
            buf = []
    return len(rows) / (time.perf_counter() - t0)


def main() -> None:
    import ray

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_throughput.json"))
    args = ap.parse_args()
    tok = load_tokenizer(resolve_model_path(None, "tiny", 0))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    try:
        for n in args.sizes:
            rows = rows_of(n, tok)
            local = in_process(rows, tok.pad_token_id, args.batch)
            remote = ray_data(rows, tok.pad_token_id, args.batch)
            results.append(
                {
                    "rows": n,
                    "in_process_rows_per_s": round(local),
                    "ray_data_rows_per_s": round(remote),
                    "ray_data_over_in_process": round(remote / local, 3),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()
    out = {"benchmark": "data_throughput", "batch": args.batch, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
