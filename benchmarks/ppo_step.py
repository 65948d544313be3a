"""Where a PPO step's time goes: rollout (sampling), scoring (decode + reward), reference forward, old
log-probs/values forward, and optimisation (ppo_epochs × num_mini_batches optimizer steps).

Runs ``revmix.platform.rollout.ppo_step`` — the function the training loop calls — on the locally built
tiny model and synthetic affine_mod prompts, for both baselines. The random model rarely emits EOS, so
most rollouts run the full ``--max-new-tokens`` budget (a worst case for the rollout share). The first
step of each configuration is a warm-up and is not counted; the JSON holds every timed step, the mean and
the median (on a shared machine, or a GPU's first shapes, single steps can be far off).

``--rollout-backends hf,vllm`` times the same steps with each rollout engine (vLLM needs
``.venv-vllm`` on CPU, VLLM_CPU.md); a vLLM rollout includes pushing the policy's weights into the
engine, timed apart as ``weight_sync``. The JSON's ``rollout_ratio`` is vllm's rollout time over hf's.

    python benchmarks/ppo_step.py --out benchmarks/results/ppo_step.json
    .venv-vllm/bin/python benchmarks/ppo_step.py --rollout-backends hf,vllm --out benchmarks/results/ppo_step_vllm.json
    python benchmarks/ppo_step.py --device cuda --scale small --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
from pathlib import Path

import torch

from revmix.config import StageConfig
from revmix.objectives.base import build_objective
from revmix.objectives.reference import AdapterDisabledReference, FrozenCopyReference
from revmix.platform.data import synthetic
from revmix.platform.data.tokenize import tokenise_rows
from revmix.platform.models import (
    LoraSpec,
    apply_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from revmix.platform.rollout.engines import eos_token_ids
from revmix.platform.rollout.step import ppo_step
from revmix.platform.step import StepContext

PARTS = ("rollout", "scoring", "reference", "old_logps", "optimisation")


def run(args: argparse.Namespace, baseline: str, backend: str, rows: list[dict], tok, path: str) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = load_model(path, dtype=args.dtype, device=device)
    if args.lora:
        model = apply_lora(model, LoraSpec(r=16, alpha=32))
        ref = AdapterDisabledReference(model)
    else:
        ref = FrozenCopyReference(model)
    obj = build_objective(
        {
            "name": "ppo",
            "baseline": baseline,
            "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens,
            "ppo_epochs": args.ppo_epochs,
            "num_mini_batches": args.num_mini_batches,
        }
    )
    obj.prepare_policy(model)  # what the training loop should do before building its optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    ctx = StepContext(
        policy=model,
        train_model=model,
        ref=ref,
        objective=obj,
        optimizer=torch.optim.AdamW(trainable, lr=1e-4),
        trainable=trainable,
        tokenizer=tok,
        device=device,
        stage=StageConfig(batch_size=args.batch_size, max_grad_norm=1.0),
        world=1,
        autocast=args.autocast,
        micro=args.batch_size,
        with_other=False,
        seed=0,
    )
    engine = None
    if backend == "vllm":
        from revmix.platform.rollout.vllm_engine import VLLMRolloutEngine

        engine = VLLMRolloutEngine(path, eos_token_ids(model, tok), placement="local", seed=0)
    rng = random.Random(0)
    steps = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        synced = engine.sync_seconds if engine is not None else 0.0
        m, n_tokens = ppo_step(ctx, rng.sample(rows, args.batch_size), step, engine=engine)
        if step == 0:
            continue  # warm-up
        split = {p: m[f"ppo/time/{p}_s"] for p in PARTS}
        split["weight_sync"] = engine.sync_seconds - synced if engine is not None else 0.0
        steps.append(
            {
                **split,
                "total": sum(v for k, v in split.items() if k in PARTS),
                "tokens": n_tokens,
                "response_length": m["ppo/response_length"],
            }
        )
        print(
            f"{baseline}/{backend} step {step}: " + ", ".join(f"{k} {v:.3f}s" for k, v in split.items()),
            flush=True,
        )
    if engine is not None:
        engine.close()
    keys = (*PARTS, "weight_sync", "total", "response_length")
    mean = {k: sum(s[k] for s in steps) / len(steps) for k in keys}
    median = {k: statistics.median(s[k] for s in steps) for k in keys}
    return {
        "steps": steps,
        "mean_s": mean,
        "median_s": median,
        "fraction": {p: mean[p] / mean["total"] for p in PARTS},
        "sequences_per_step": args.batch_size * obj.samples_per_prompt,
        "optimizer_steps_per_step": obj.ppo_epochs * obj.num_mini_batches,
        "trainable_parameters": count_parameters(model)[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="tiny", help="tiny model scale (tiny, small, base)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=4, help="responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--num-mini-batches", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per baseline (after one warm-up)")
    ap.add_argument("--baselines", default="critic,group")
    ap.add_argument("--rollout-backends", default="hf", help="comma-separated: hf, vllm")
    ap.add_argument("--lora", action="store_true", help="train a LoRA adapter (reference = adapter disabled)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--out", default="benchmarks/results/ppo_step.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model_path(None, args.scale, 0)
    tok = load_tokenizer(path)
    rows, _ = tokenise_rows(synthetic.generate("affine_mod", 64, seed=0), tok, 256)
    result: dict = {
        "model": {"scale": args.scale, "dtype": args.dtype, "lora": args.lora},
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "runs": {},
    }
    backends = args.rollout_backends.split(",")
    for baseline in args.baselines.split(","):
        for backend in backends:
            result["runs"][f"{baseline}/{backend}"] = run(args, baseline, backend, rows, tok, path)
        if {"hf", "vllm"} <= set(backends):
            hf, vl = (result["runs"][f"{baseline}/{b}"]["mean_s"]["rollout"] for b in ("hf", "vllm"))
            result.setdefault("rollout_ratio", {})[baseline] = vl / hf
    result["load_avg_at_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for b, r in result["runs"].items():
        print(
            b,
            {k: f"{v:.3f}s ({r['fraction'].get(k, 1.0):.0%})" for k, v in r["mean_s"].items() if k in PARTS},
        )


if __name__ == "__main__":
    main()
