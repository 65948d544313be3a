"""Wall time of revmix's evaluation (the runner behind ``revmix eval``) on 200 synthetic held-out items:
greedy generation, answer checking and ALP(y+), ALP(y−) for every item, on the tiny model.

    python benchmarks/eval_wall.py --items 200 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from revmix.platform.data.synthetic import generate_mix
from revmix.platform.evaluation.hooks import heldout_items
from revmix.platform.evaluation.runner import evaluate
from revmix.platform.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--scale", default="tiny")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_wall.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    items = heldout_items(generate_mix(["affine_mod", "arith_chain", "string_ops"], args.items // 2, seed=1))
    path = resolve_model_path(None, args.scale, 0)
    t0 = time.perf_counter()
    ev = evaluate(
        path, {"synthetic": items}, max_new_tokens=args.max_new_tokens, batch_size=32, progress=False
    )
    wall = time.perf_counter() - t0
    bench = ev["benchmarks"]["synthetic"]
    result = {
        "benchmark": "eval_wall",
        "scale": args.scale,
        "items": bench["n"],
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "wall_s": round(wall, 2),
        "accuracy": bench["accuracy"],
        "alp_items": sum(v["n"] for v in ev["alp"].values()),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
