"""Tokens/s of SFT steps with rows packed several per sequence (``runtime.packing``) against padded rows.

One model (the ``base`` scale of the scales table: a 30M Qwen2, randomly initialised in memory, LoRA as
the project's configs use it, fp32, sdpa), one synthetic length mix (prompts of 16-48 tokens, responses
log-uniform from 8 tokens up to ``--max-len``), three forwards of the same SFT objective, alternating
step by step so machine load hits them alike:

* ``padded``: one right-padded pass over the micro-batch (``runtime.length_buckets=1``);
* ``bucketed``: two length groups (``LengthBucketedLM``, the default ``runtime.length_buckets=2``);
* ``packed``: first-fit into sequences as wide as the longest row, block-diagonal 4-D mask (the sdpa
  layout of :mod:`revmix.objectives.packing`).

A step is collation (the loop's ``collate``), the objective's forward, backward and AdamW. tokens/s counts
real tokens (``attention_mask``), as the training loop does; ``positions`` is what the forward computed
(rows × width, summed over passes). Median over steps after ``--warmup``.

    python benchmarks/packing_throughput.py            # ~10 min on one CPU thread
    python benchmarks/packing_throughput.py --quick    # < 2 min, noisier
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from revmix.config import LoraConfig
from revmix.objectives.base import PolicyForward, build_objective
from revmix.objectives.buckets import LengthBucketedLM, length_buckets
from revmix.objectives.packing import pack_padded
from revmix.platform.data.tokenize import collate
from revmix.platform.models import MAX_POSITION_EMBEDDINGS, SCALES, VOCAB_SIZE, LoraSpec, apply_lora

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("padded", "bucketed", "packed")


def length_mix(n: int, max_len: int, seed: int) -> list[dict]:
    """Tokenised rows (random ids) whose lengths follow the mix in the module docstring."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = rng.randint(16, 48)
        r = int(math.exp(rng.uniform(math.log(8), math.log(max_len - p))))
        rows.append(
            {
                "prompt_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(p)],
                "response_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(r)],
                "other_ids": [],
                "direction": i % 2,
                "task": "synthetic/length_mix",
                "answer": None,
                "item_id": str(i),
            }
        )
    return rows


def positions(batch_mask: torch.Tensor, variant: str) -> int:
    """Positions the forward computes (rows × width, summed over passes)."""
    lengths = batch_mask.sum(-1).tolist()
    if variant == "padded":
        return len(lengths) * max(lengths)
    if variant == "bucketed":
        return sum(len(g) * max(lengths[i] for i in g) for g in length_buckets(lengths, 2))
    ids = torch.zeros_like(batch_mask)
    return int(pack_padded(ids, batch_mask, ids, "mask").input_ids.numel())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small batch, short rows, few steps (< 2 min)")
    ap.add_argument("--scale", default="base")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--steps", type=int, default=8, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "packing_throughput.json"))
    args = ap.parse_args()
    if args.quick:
        args.batch, args.max_len, args.steps, args.warmup = 8, 160, 3, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = Qwen2Config(
        vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITION_EMBEDDINGS, tie_word_embeddings=True,
        use_sliding_window=False, **SCALES[args.scale]._asdict(),
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    lo = LoraConfig()
    model = apply_lora(
        Qwen2ForCausalLM(config), LoraSpec(lo.r, lo.alpha, lo.dropout, tuple(lo.target_modules))
    )
    model.train()
    models = {"padded": model, "bucketed": LengthBucketedLM(model, 2), "packed": model}
    forwards = {v: PolicyForward(packing="mask" if v == "packed" else "off") for v in VARIANTS}
    objective = build_objective({"name": "sft"})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = length_mix(args.batch * (args.steps + args.warmup), args.max_len, seed=0)

    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    computed: dict[str, int] = dict.fromkeys(VARIANTS, 0)
    real = 0
    for step in range(args.steps + args.warmup):
        chunk = rows[step * args.batch : (step + 1) * args.batch]
        for variant in VARIANTS:  # the same rows through each variant, alternating
            t0 = time.perf_counter()
            batch = dataclasses.replace(collate(chunk, 0, with_other=False), policy_forward=forwards[variant])
            objective(models[variant], batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            n = int(batch.attention_mask.sum())
            if step >= args.warmup:
                rates[variant].append(n / (time.perf_counter() - t0))
                computed[variant] += positions(batch.attention_mask, variant)
        if step >= args.warmup:
            real += n
    med = {v: statistics.median(r) for v, r in rates.items()}
    result = {
        "benchmark": "packing_throughput",
        "quick": args.quick,
        "scale": args.scale,
        "lora": True,
        "precision": "fp32",
        "attn_implementation": "sdpa",
        "batch": args.batch,
        "max_len": args.max_len,
        "steps": args.steps,
        "threads": args.threads,
        "mean_row_tokens": round(real / (args.batch * args.steps), 1),
        "tokens_per_s": {v: round(r, 1) for v, r in med.items()},
        "computed_over_real_positions": {v: round(computed[v] / real, 3) for v in VARIANTS},
        "speedup_packed_over_padded": round(med["packed"] / med["padded"], 3),
        "speedup_packed_over_bucketed": round(med["packed"] / med["bucketed"], 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
