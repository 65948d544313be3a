"""DPO pairs/s of revmix against TRL's ``DPOTrainer``, and peak memory of revmix SFT vs DPO, in one run.

Both trainers get the same tiny Qwen2 (``scale``, local, built from config), the same synthetic train
rows (prompt → chosen = this direction's solution y+, rejected = the twin's y−), the same LoRA (r, alpha,
targets from ``configs/runs/dpo_tiny.yaml``), batch, fp32, AdamW, clipping at 1.0 and thread count; each
uses its own adapter-disabled reference. revmix runs through ``run_experiment`` (the full loop: Mixer,
collation, metrics.jsonl) with a single DPO stage; TRL through ``trainer.train()`` with gradient
checkpointing off (its default is on, revmix has none) and plain ``adamw_torch``. Three revmix DPO
variants run alternately with TRL: the default (shared prompt + length groups), ``padded``
(``runtime.length_buckets=1``) and ``plain`` (also ``shared_prompt: false``: the 2B padded rows TRL runs).

Step time is the interval between consecutive step-end timestamps (revmix: ``on_report``; TRL: a
``TrainerCallback.on_step_end``), so setup, data preparation and the final model save are excluded;
the first ``--warmup`` steps are dropped and pairs/s = batch / median step time.

Each trainer runs in its own subprocess so ``ru_maxrss`` (peak RSS of that process) is its own. Every
worker imports the same libraries (torch, ray, transformers, peft, trl) and loads the model once before
recording ``baseline_mb``, so ``peak_mb - baseline_mb`` is what training added. The SFT workers run the
same stage with ``objective: sft``: ``lora_ref_overhead_vs_sft`` compares DPO's peak with SFT's at the
same batch (B rows, while DPO forwards 2B sequences: chosen and rejected, so its activations are larger
for reasons other than the reference); ``..._same_sequences`` compares with SFT at 2B rows, which leaves
the reference's no-grad pass and the DPO loss as the difference.

    python benchmarks/dpo_throughput.py --steps 20 --warmup 3 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "runs" / "dpo_tiny.yaml"
BETA = 0.1
LR = 2.0e-3
MODES = ("revmix_sft", "revmix_sft_2x", "revmix_dpo", "revmix_dpo_padded", "revmix_dpo_plain", "trl_dpo")
# revmix_dpo_padded: runtime.length_buckets=1 (one padded forward per batch), prompt still shared;
# revmix_dpo_plain: also shared_prompt=false — chosen and rejected as 2B padded rows, as TRL does


def _rss_mb() -> dict[str, float]:
    """Peak (``ru_maxrss``, KiB on Linux) and current (VmRSS) resident memory of this process, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cur = float("nan")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
    return {"peak": round(peak, 1), "current": round(cur, 1)}


def _experiment(
    args: argparse.Namespace, objective: str, buckets: int | None = None, shared_prompt: bool = True
) -> Any:
    """``dpo_tiny.yaml`` reduced to one stage (no SFT warm start) at the benchmark's scale/batch/steps."""
    from revmix.config import build_config
    from revmix.validation import load_raw

    raw = load_raw(CONFIG)
    dpo = next(s for s in raw["stages"] if s["objective"]["name"] == "dpo")
    stage = {
        "name": objective,
        "objective": (
            {**dpo["objective"], "beta": BETA, "shared_prompt": shared_prompt}
            if objective == "dpo"
            else {"name": "sft"}
        ),
        "lora": True,
        "mix": {"reverse_fraction": 0.5},
        "steps": args.warmup + args.steps,
        "batch_size": args.batch,
        "lr": LR,
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "checkpoint_every": 0,
        "log_every": 1000,
    }
    if objective == "dpo":
        stage["reference"] = "adapter"
    raw["model"]["scale"] = args.scale
    raw["data"]["n_items"] = args.n_items
    raw["stages"] = [stage]
    raw["runtime"] = {"num_workers": 0, "torch_threads": args.threads, "precision": "fp32"}
    if buckets is not None:
        raw["runtime"]["length_buckets"] = buckets
    return build_config(raw)


def _baseline(args: argparse.Namespace) -> dict[str, float]:
    """Import every library any worker uses and load the model once, then read RSS: the common floor."""
    import peft  # noqa: F401
    import ray  # noqa: F401
    import torch
    import trl  # noqa: F401

    import revmix.platform.train  # noqa: F401
    from revmix.platform.models import load_model, resolve_model_path

    torch.set_num_threads(args.threads)
    model = load_model(resolve_model_path(None, args.scale, 0))
    del model
    return _rss_mb()


def worker_revmix(
    args: argparse.Namespace, objective: str, buckets: int | None = None, shared_prompt: bool = True
) -> dict[str, Any]:
    from revmix.platform.train import run_experiment

    cfg = _experiment(args, objective, buckets, shared_prompt)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        run_experiment(
            cfg, Path(d) / "run", evaluate=False, on_report=lambda _r: stamps.append(time.perf_counter())
        )
    lo = cfg.model.lora
    return {
        "step_ends": stamps,
        "lora": {"r": lo.r, "alpha": lo.alpha, "targets": list(lo.target_modules)},
        "length_buckets": cfg.runtime.length_buckets,
    }


def _trl_dataset(args: argparse.Namespace, tokenizer: Any) -> Any:
    """revmix's train rows (same source, items and split) as TRL's standard prompt/chosen/rejected format.

    The prompt is the chat-templated text revmix tokenises (``chat_prompt_ids``); TRL appends EOS to
    chosen/rejected, as revmix does to y+/y−.
    """
    import datasets

    from revmix.platform.data.prepare import load_canonical_rows, split_rows

    cfg = _experiment(args, "dpo")
    rows, _ = load_canonical_rows(cfg.data)
    train, _ = split_rows(rows, cfg.data)
    train = [r for r in train if r.get("other_response")]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        for r in train
    ]
    return datasets.Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [r["response"] for r in train],
            "rejected": [r["other_response"] for r in train],
        }
    )


def worker_trl(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from revmix.platform.models import load_model, load_tokenizer, resolve_model_path

    cfg = _experiment(args, "dpo")
    path = resolve_model_path(None, args.scale, 0)
    tok = load_tokenizer(path)
    ds = _trl_dataset(args, tok)
    lo = cfg.model.lora
    lora = peft.LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.target_modules),
        bias="none",
        task_type=peft.TaskType.CAUSAL_LM,
    )
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, _args, _state, _control, **_kw) -> None:  # noqa: ANN001
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as d:
        dcfg = DPOConfig(
            output_dir=d,
            beta=BETA,
            loss_type=["sigmoid"],
            per_device_train_batch_size=args.batch,
            max_steps=args.warmup + args.steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            optim="adamw_torch",
            gradient_checkpointing=False,
            report_to=[],
            logging_steps=1000,
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            bf16=False,
            seed=0,
        )
        torch.set_num_threads(args.threads)
        trainer = DPOTrainer(
            model=load_model(path),
            ref_model=None,
            args=dcfg,
            train_dataset=ds,
            processing_class=tok,
            peft_config=lora,
            callbacks=[Stamp()],
        )
        torch.set_num_threads(args.threads)
        trainer.train()
    return {"step_ends": stamps, "rows": len(ds)}


def run_worker(args: argparse.Namespace) -> None:
    base = _baseline(args)
    t0 = time.perf_counter()
    if args.worker == "revmix_sft_2x":  # as many sequences per step as DPO's chosen + rejected
        args.batch *= 2
    if args.worker == "trl_dpo":
        out = worker_trl(args)
    else:
        buckets = 1 if args.worker in ("revmix_dpo_padded", "revmix_dpo_plain") else None
        out = worker_revmix(args, args.worker.split("_")[1], buckets, args.worker != "revmix_dpo_plain")
    out.update({"mode": args.worker, "rss_baseline_mb": base, "rss_end_mb": _rss_mb()})
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", mode]
    for k in ("scale", "steps", "warmup", "batch", "threads", "n_items"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(
            f"worker {mode} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        )
    res = json.loads(lines[-1][len("RESULT ") :])
    stamps = res.pop("step_ends")
    expected = args.warmup + args.steps
    if len(stamps) != expected:
        raise RuntimeError(f"worker {mode}: {len(stamps)} step ends recorded, expected {expected}")
    dts = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1 if args.warmup else 0 :]
    res["median_step_s"] = round(statistics.median(dts), 4)
    batch = 2 * args.batch if mode == "revmix_sft_2x" else args.batch
    res["pairs_or_rows_per_s"] = round(batch / statistics.median(dts), 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="small")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="pairs (DPO) / rows (SFT) per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-items", dest="n_items", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2, help="alternating revmix/TRL DPO runs each")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dpo_throughput.json"))
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return

    # The two DPO trainers alternate (revmix, TRL, revmix, TRL, ...) so load drift on a shared machine
    # hits both; the SFT workers run once, for memory.
    runs: dict[str, dict[str, Any]] = {}
    rates: dict[str, list[float]] = {
        m: [] for m in ("revmix_dpo", "revmix_dpo_padded", "revmix_dpo_plain", "trl_dpo")
    }
    for m in MODES:
        if m not in rates:
            runs[m] = _spawn(args, m)
    for _ in range(args.repeats):
        for m in rates:
            r = _spawn(args, m)
            rates[m].append(r["pairs_or_rows_per_s"])
            if m not in runs or r["rss_end_mb"]["peak"] > runs[m]["rss_end_mb"]["peak"]:
                runs[m] = r
    peak = {m: r["rss_end_mb"]["peak"] for m, r in runs.items()}
    base = {m: r["rss_baseline_mb"]["peak"] for m, r in runs.items()}
    delta = {m: round(peak[m] - base[m], 1) for m in MODES}
    rv, tr = statistics.mean(rates["revmix_dpo"]), statistics.mean(rates["trl_dpo"])
    result = {
        "benchmark": "dpo_throughput",
        "scale": args.scale,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "precision": "fp32",
        "lora": runs["revmix_dpo"]["lora"],
        "reference": "adapter-disabled (both)",
        "repeats": args.repeats,
        "revmix_pairs_per_s": round(rv, 2),
        "trl_pairs_per_s": round(tr, 2),
        "pairs_per_s_each_repeat": rates,
        "ratio": round(rv / tr, 3),
        "revmix_padded_pairs_per_s": round(statistics.mean(rates["revmix_dpo_padded"]), 2),
        "length_grouping_speedup": round(rv / statistics.mean(rates["revmix_dpo_padded"]), 3),
        "revmix_plain_pairs_per_s": round(statistics.mean(rates["revmix_dpo_plain"]), 2),
        "speedup_over_plain": round(rv / statistics.mean(rates["revmix_dpo_plain"]), 3),
        "plain_vs_trl": round(statistics.mean(rates["revmix_dpo_plain"]) / tr, 3),
        "length_buckets": runs["revmix_dpo"]["length_buckets"],
        "revmix_sft_rows_per_s": runs["revmix_sft"]["pairs_or_rows_per_s"],
        "peak_rss_mb": peak,
        "baseline_rss_mb": base,
        "peak_minus_baseline_mb": delta,
        # Same batch B: DPO forwards 2B sequences (chosen + rejected) against SFT's B.
        "lora_ref_overhead_vs_sft": round(peak["revmix_dpo"] / peak["revmix_sft"] - 1, 4),
        # Same sequences (SFT at 2B rows): what is left is the reference pass and the DPO loss.
        "lora_ref_overhead_vs_sft_same_sequences": round(peak["revmix_dpo"] / peak["revmix_sft_2x"] - 1, 4),
        "target_le_5pct_same_batch": peak["revmix_dpo"] <= 1.05 * peak["revmix_sft"],
        "target_le_5pct_same_sequences": peak["revmix_dpo"] <= 1.05 * peak["revmix_sft_2x"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
