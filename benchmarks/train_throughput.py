"""Tokens/s of revmix's SFT step (in-process worker) against a bare torch loop and TRL's ``SFTTrainer``,
measured in one run per scale.

Same model (a tiny Qwen2 built from config, LoRA), same tokenised rows, batch, dtype and thread count.
The bare loop pre-collates its batches, each padded to its own longest row (not to ``max_length``), and
does only forward → backward → AdamW; revmix's step adds the Mixer, per-step collation, per-direction
metrics, the LR schedule, clipping and metrics.jsonl. TRL runs on the same rows pre-tokenised
(``input_ids`` + ``completion_mask``, loss on the response only, as revmix's SFT), in two settings:
``padded`` (its default collator) and ``padding_free`` (every batch flattened into one sequence with
restarted ``position_ids``; transformers' sdpa mask keeps the rows apart on CPU); ``best`` is the faster.
TRL's packing (``packing=True``, best-fit decreasing into ``max_length`` blocks) regroups rows across
batches, so it is not the same rows per step; its padding-free layout is what it would add here. The
ratios are what matter; absolute numbers move with the machine's load.

    python benchmarks/train_throughput.py --scales tiny,small,base --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import trl
from transformers import TrainerCallback

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


class _TimedSteps(TrainerCallback):
    """tokens/s of each optimizer step of a TRL trainer: wall time from step begin to step end, tokens
    counted by :func:`trl_rates`'s ``training_step``."""

    def __init__(self) -> None:
        self.tokens = 0
        self.rates: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tokens, self.t0 = 0, time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rates.append(self.tokens / (time.perf_counter() - self.t0))


def trl_rates(
    model_path: str, rows: list[dict], args: Any, lora: LoraSpec, padding_free: bool
) -> list[float]:
    """Per-step tokens/s of TRL's ``SFTTrainer`` on ``rows`` (pre-tokenised; loss on the response only)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    timer = _TimedSteps()

    class Timed(SFTTrainer):  # counts the real tokens of each micro-batch for the callback
        def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
            mask = inputs.get("attention_mask")
            timer.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    data = Dataset.from_list(
        [{"input_ids": r["prompt_ids"] + r["response_ids"],
          "completion_mask": [0] * len(r["prompt_ids"]) + [1] * len(r["response_ids"])} for r in rows]
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        config = SFTConfig(
            output_dir=d, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-3,
            lr_scheduler_type="constant", completion_only_loss=True, padding_free=padding_free,
            max_length=None, bf16=args.bf16, use_cpu=True, report_to=[], save_strategy="no",
            logging_steps=10_000, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )  # fmt: skip
        model = apply_lora(load_model(model_path), lora)
        trainer = Timed(model=model, args=config, train_dataset=data, callbacks=[timer])
        trainer.train()
    return timer.rates


def one_scale(scale: str, args: Any) -> dict[str, Any]:
    """revmix, the bare loop (before and after) and TRL's two settings on one scale's rows."""
    over = [
        f"model.scale={scale}",
        f"stages.0.steps={args.steps}",
        f"stages.0.batch_size={args.batch}",
        "stages.0.checkpoint_every=0",
        f"runtime.torch_threads={args.threads}",
        f"runtime.precision={'bf16' if args.bf16 else 'fp32'}",
        "stages.0.log_every=1000",
    ]
    cfg = load_config(ROOT / "configs" / "runs" / "sft_tiny.yaml", over)
    path = resolve_model_path(None, scale, 0)
    tok = load_tokenizer(path)
    data = prepare_data(cfg.data, tok, path)
    rows = [r for pair in zip(data.train["forward"], data.train["reverse"]) for r in pair]
    rows = rows[: args.batch * args.steps]
    batches = [
        collate(rows[i : i + args.batch], tok.pad_token_id, with_other=False)
        for i in range(0, len(rows), args.batch)
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
    trl_rate = {
        name: median_after_warmup(trl_rates(path, rows, args, spec, padding_free=name == "padding_free"))
        for name in ("padded", "padding_free")
    }
    bare_b = median_after_warmup(bare_loop(path, batches, args.steps, spec, args.bf16))
    bare = max(bare_a, bare_b)  # the best bare loop: the target is >= 0.95x of it
    trl_best = max(trl_rate.values())
    return {
        "scale": scale,
        "bare_tokens_per_s": [round(bare_a, 1), round(bare_b, 1)],
        "revmix_tokens_per_s": round(revmix_rate, 1),
        "trl_tokens_per_s": {k: round(v, 1) for k, v in trl_rate.items()},
        "ratio_revmix_over_best_bare": round(revmix_rate / bare, 3),
        "ratio_revmix_over_best_trl": round(revmix_rate / trl_best, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", default="tiny,small,base", help="comma-separated scales of the scales table")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in every loop")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for scale in args.scales.split(","):
        results.append(one_scale(scale, args))
        print(json.dumps(results[-1]), flush=True)
    result = {
        "benchmark": "train_throughput",
        "lora": True,
        "precision": "bf16-autocast" if args.bf16 else "fp32",
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "trl": trl.__version__,
        "load_avg_at_end": list(os.getloadavg()),
        "scales": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
