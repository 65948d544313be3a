"""Tokens/s of revmix's SFT step (in-process worker) against a bare torch loop, measured in one run.

Same model (a tiny Qwen2 built from config, LoRA), same tokenised rows, batch, dtype and thread count.
The bare loop pre-collates its batches and does only forward → backward → AdamW; revmix's step adds the
Mixer, per-step collation, per-direction metrics, the LR schedule, clipping and metrics.jsonl. The
ratio is what matters; absolute numbers move with the machine's load.

    python benchmarks/train_throughput.py --scale small --steps 30 --out benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from revmix.config import load_config
from revmix.objectives.base import build_objective
from revmix.platform.data.prepare import prepare_data
from revmix.platform.data.tokenize import collate
from revmix.platform.models import LoraSpec, apply_lora, load_model, load_tokenizer, resolve_model_path
from revmix.platform.train import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(model_path: str, batches: list, steps: int, lora: LoraSpec, bf16: bool) -> list[float]:
    model = apply_lora(load_model(model_path), lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rates = []
    for i in range(steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(int(b.attention_mask.sum()) / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in both loops")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    over = [
        f"model.scale={args.scale}",
        f"stages.0.steps={args.steps}",
        f"stages.0.batch_size={args.batch}",
        "stages.0.checkpoint_every=0",
        f"runtime.torch_threads={args.threads}",
        f"runtime.precision={'bf16' if args.bf16 else 'fp32'}",
        "stages.0.log_every=1000",
    ]
    cfg = load_config(ROOT / "configs" / "runs" / "sft_tiny.yaml", over)
    path = resolve_model_path(None, args.scale, 0)
    tok = load_tokenizer(path)
    data = prepare_data(cfg.data, tok, path)
    rows = [r for pair in zip(data.train["forward"], data.train["reverse"]) for r in pair]
    batches = [
        collate(rows[i : i + args.batch], tok.pad_token_id, with_other=False)
        for i in range(0, args.batch * args.steps, args.batch)
    ]
    assert build_objective({"name": "sft"})  # same objective revmix runs
    lo = cfg.model.lora
    spec = LoraSpec(lo.r, lo.alpha, lo.dropout, tuple(lo.target_modules))

    def median_after_warmup(r: list[float]) -> float:
        return statistics.median(r[args.warmup :])

    bare_a = median_after_warmup(bare_loop(path, batches, args.steps, spec, args.bf16))
    with tempfile.TemporaryDirectory() as d:
        run_experiment(cfg, Path(d) / "run", evaluate=False)
        recs = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    revmix_rate = median_after_warmup([r["tokens_per_s"] for r in recs])
    bare_b = median_after_warmup(bare_loop(path, batches, args.steps, spec, args.bf16))
    bare = (bare_a + bare_b) / 2
    result = {
        "benchmark": "train_throughput",
        "scale": args.scale,
        "lora": True,
        "precision": "bf16-autocast" if args.bf16 else "fp32",
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "bare_tokens_per_s": [round(bare_a, 1), round(bare_b, 1)],
        "revmix_tokens_per_s": round(revmix_rate, 1),
        "ratio_revmix_over_bare": round(revmix_rate / bare, 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
