"""Peak memory and tokens/s of SFT and DPO steps at 512-4k tokens, with each memory switch on and off.

Models (random weights, built in memory from a config, LoRA as the project's configs use it, fp32, sdpa):

* ``base``: the 30M scale of the scales table (``SCALES["base"]``, 512-token vocabulary);
* ``qwen2.5-0.5b``: Qwen2.5-0.5B's published architecture (hidden 896, 24 layers, 14 heads / 2 kv heads,
  intermediate 4864, vocabulary 151,936, tied embeddings, rope theta 1e6); nothing is downloaded.

Rows follow the synthetic length mix of ``packing_throughput.py`` (prompts of 16-48 tokens, responses
log-uniform from 8 tokens) with the first row of every batch exactly ``L`` tokens wide, so a padded batch
is ``batch × L`` positions. DPO rows carry a rejected response drawn the same way (each of prompt + chosen
and prompt + rejected at most ``L`` tokens; DPO's shared-prompt layout, on by default, stays on).

Switches (what a run config sets), each case a set of them, everything else as shipped:

* ``ckpt``: ``runtime.activation_checkpointing=on`` (:func:`revmix.platform.models.apply_activation_checkpointing`);
* ``chunked``: the chunked log-probs of :func:`revmix.objectives.base.target_logps`. "Off" swaps in the
  computation they replaced (an fp32 ``log_softmax`` over the whole ``[B, T, V]``, then a gather);
* ``packing``: ``runtime.packing=true`` (SFT only: DPO does not pack);
* ``release`` / ``hold``: ``runtime.release_host_memory=on`` / ``off``; without either it is ``auto``, on
  with ``ckpt`` (:mod:`revmix.platform.host_memory`: glibc's mmap threshold fixed at 128 KiB, so freed
  blocks go back to the OS instead of staying in a fragmented heap). Applied before the model is built,
  as the stage worker does.

A step is revmix's own :func:`revmix.platform.step.supervised_step` (collation, the objective, backward,
clipping, AdamW) on a :class:`~revmix.platform.step.StepContext` built with the recipe's helpers. Every
case runs in a fresh process (peak RSS is per process): ``peak_gib`` is its peak resident memory,
``extra_gib`` the peak minus the resident memory once the model, reference and optimizer exist (what the
step itself adds). tokens/s counts real tokens (chosen + rejected for DPO), median of the measured steps
after one warm-up step (``--steps 0``: one timed step, no warm-up, first-step costs included);
``user_s`` / ``system_s`` are the process's CPU seconds per step (median; system time is where the page
faults of released memory show, and CPU time moves less with the machine's load than tokens/s). A thread
samples glibc's own count (``mallinfo2``) every 5 ms: ``heap_in_use_gib`` is the peak of the blocks in use
(the tensors, whatever the allocator does with freed space), ``heap_held_gib`` the peak of what glibc
holds (heap plus mapped blocks), both over the same baseline as ``extra_gib``. Ratios are
against the ``off`` case of the same model, objective and length. Batch: ``--batch`` rows for the base
model, one row for the 0.5B architecture (so packing is not run there).

    python benchmarks/memory_scaling.py           # the core cases; tens of minutes on 2 busy cores
    python benchmarks/memory_scaling.py --quick   # smoke: base model, 512 tokens, one step per case
    python benchmarks/memory_scaling.py --steps 0 --only base:sft:4096:off,base:sft:4096:ckpt+chunked
    python benchmarks/memory_scaling.py --steps 0 --only base:sft:4096:off+release,base:sft:4096:ckpt+chunked+hold
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import revmix.objectives.base as objectives_base
from revmix.config import LoraConfig, StageConfig
from revmix.objectives.base import build_objective
from revmix.objectives.buckets import LengthBucketedLM
from revmix.objectives.reference import AdapterDisabledReference
from revmix.platform.host_memory import heap_bytes, release_wanted, released_host_memory
from revmix.platform.models import SCALES, VOCAB_SIZE, LoraSpec, apply_activation_checkpointing, apply_lora
from revmix.platform.recipe import policy_forward
from revmix.platform.step import StepContext, supervised_step

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (512, 1024, 2048, 4096)
QWEN25_05B = {  # Qwen/Qwen2.5-0.5B config.json, published values
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151_936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}
CASES = {  # objective → case name → switches on
    "sft": {"off": (), "ckpt": ("ckpt",), "chunked": ("chunked",), "packing": ("packing",),
            "ckpt+chunked": ("ckpt", "chunked"), "all": ("ckpt", "chunked", "packing"),
            "off+release": ("release",), "ckpt+chunked+hold": ("ckpt", "chunked", "hold")},
    "dpo": {"off": (), "ckpt": ("ckpt",), "chunked": ("chunked",), "ckpt+chunked": ("ckpt", "chunked"),
            "off+release": ("release",), "ckpt+chunked+hold": ("ckpt", "chunked", "hold")},
}  # fmt: skip
LENGTH_BUCKETS = 2  # runtime.length_buckets default


def model_config(name: str, length: int) -> Qwen2Config:
    """The Qwen2 config of ``name`` with room for ``length`` positions."""
    if name == "base":
        shape: dict[str, Any] = {
            **SCALES["base"]._asdict(),
            "vocab_size": VOCAB_SIZE,
            "tie_word_embeddings": True,
        }
    elif name == "qwen2.5-0.5b":
        shape = dict(QWEN25_05B)
    else:
        raise ValueError(f"unknown model {name!r}; valid: base, qwen2.5-0.5b")
    config = Qwen2Config(max_position_embeddings=max(length, 512), use_sliding_window=False, **shape)
    config._attn_implementation = "sdpa"
    return config


class PlainTargetLogps:
    """The log-prob computation before chunking, behind the chunked function's ``apply`` signature: an fp32
    ``log_softmax`` over every position's whole vocabulary (kept for backward), then the target's entry."""

    @staticmethod
    def apply(
        logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int, stats: bool
    ) -> tuple:
        del chunk
        x = logits[:, : targets.shape[1]].float() / temperature
        logp_all = torch.log_softmax(x, dim=-1)
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
        if not stats:
            return (logp,)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy, logp_all.mean(-1)


def synthetic_rows(batch: int, length: int, pairs: bool, seed: int) -> list[dict]:
    """``batch`` tokenised rows of the length mix; the first is exactly ``length`` tokens wide."""
    rng = random.Random(seed)

    def response(p: int, widest: bool) -> list[int]:
        n = length - p if widest else int(math.exp(rng.uniform(math.log(8), math.log(length - p))))
        return [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]

    rows = []
    for i in range(batch):
        p = rng.randint(16, 48)
        rows.append(
            {
                "prompt_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(p)],
                "response_ids": response(p, i == 0),
                "other_ids": response(p, False) if pairs else [],
                "direction": i % 2,
                "task": "synthetic/length_mix",
                "answer": None,
                "item_id": str(i),
            }
        )
    return rows


def step_context(
    model_name: str, objective: str, length: int, switches: tuple[str, ...], batch: int
) -> StepContext:
    """A step context as the stage recipe builds it, for one case."""
    torch.manual_seed(0)
    model: Any = Qwen2ForCausalLM(model_config(model_name, length))
    apply_activation_checkpointing(model, "on" if "ckpt" in switches else "off", "cpu")
    lo = LoraConfig()
    policy = apply_lora(model, LoraSpec(lo.r, lo.alpha, lo.dropout, tuple(lo.target_modules)))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    stage = StageConfig(objective={"name": objective}, batch_size=batch, steps=10)
    return StepContext(
        policy=policy,
        train_model=LengthBucketedLM(policy, LENGTH_BUCKETS),
        ref=AdapterDisabledReference(policy, LENGTH_BUCKETS) if objective == "dpo" else None,
        objective=build_objective({"name": objective}),
        optimizer=torch.optim.AdamW(trainable, lr=1e-4),
        trainable=trainable,
        tokenizer=SimpleNamespace(pad_token_id=0),
        device=torch.device("cpu"),
        stage=stage,
        world=1,
        autocast=False,
        micro=batch,
        with_other=objective == "dpo",
        seed=0,
        policy_forward=policy_forward(policy, LENGTH_BUCKETS, 1, "packing" in switches),
    )


def rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release_setting(switches: tuple[str, ...]) -> bool:
    """``runtime.release_host_memory`` of a case, resolved as the stage worker resolves it on CPU."""
    setting = "on" if "release" in switches else "off" if "hold" in switches else "auto"
    return release_wanted(setting, "cpu", "ckpt" in switches)


class HeapPeaks:
    """Peaks of glibc's in-use and held bytes (``mallinfo2``), sampled every 5 ms by a thread while in
    the ``with`` block; zeros without glibc 2.33+."""

    def __init__(self) -> None:
        self.in_use = self.held = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            h = heap_bytes()
            if h is None:
                return
            self.in_use, self.held = max(self.in_use, h["in_use"]), max(self.held, h["held"])
            self._stop.wait(0.005)

    def __enter__(self) -> HeapPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_case(spec: str, batch: int, steps: int) -> dict[str, Any]:
    """Run ``model:objective:length:case`` in this process; its peak memory and tokens/s."""
    model_name, objective, length_s, case = spec.split(":")
    switches = CASES[objective][case]
    if "chunked" not in switches:
        objectives_base._ChunkedTargetLogps = PlainTargetLogps  # type: ignore[misc,assignment]
    release = release_setting(switches)
    with released_host_memory(release):
        ctx = step_context(model_name, objective, int(length_s), switches, batch)
        baseline, heap0 = rss_gib(), heap_bytes() or {"in_use": 0, "held": 0}
        rates, user, system = [], [], []
        with HeapPeaks() as heap:
            for step in range(steps + 1 if steps else 1):  # one warm-up step, unless only one is asked for
                rows = synthetic_rows(batch, int(length_s), objective == "dpo", seed=step)
                t0, c0 = time.perf_counter(), os.times()
                metrics, n_tokens = supervised_step(ctx, rows, step)
                t1, c1 = time.perf_counter(), os.times()
                if step or not steps:
                    rates.append(n_tokens / (t1 - t0))
                    user.append(c1.user - c0.user)
                    system.append(c1.system - c0.system)
        peak = rss_gib()
    return {
        "peak_gib": round(peak, 3),
        "baseline_gib": round(baseline, 3),
        "extra_gib": round(peak - baseline, 3),
        "heap_in_use_gib": round(max(0, heap.in_use - heap0["in_use"]) / 2**30, 3),
        "heap_held_gib": round(max(0, heap.held - heap0["held"]) / 2**30, 3),
        "release_host_memory": release,
        "tokens_per_s": round(statistics.median(rates), 1),
        "user_s": round(statistics.median(user), 2),
        "system_s": round(statistics.median(system), 2),
        "loss": metrics["loss"],
    }


CORE = {"sft": ("off", "ckpt+chunked", "packing", "all"), "dpo": ("off", "ckpt+chunked")}
"""The cases of the default run: the targets' comparisons (``--full`` adds each switch alone)."""


def plan(models: list[str], lengths: list[int], full: bool) -> list[tuple[str, str, int, str]]:
    """(model, objective, length, case) of every case to run. Batch-1 models skip packing (one row packs
    into itself)."""
    out = []
    for model in models:
        for length in lengths:
            for obj, cases in CASES.items():
                names = cases if full else CORE[obj]
                out += [
                    (model, obj, length, c) for c in names if not (model != "base" and "packing" in cases[c])
                ]
    return out


def run_case(case: tuple[str, str, int, str], batch: int, steps: int, threads: int) -> dict[str, Any]:
    """One case in a fresh process (its own peak RSS); a failure is recorded, not raised."""
    spec = ":".join(map(str, case))
    cmd = [sys.executable, __file__, "--case", spec, "--batch", str(batch), "--steps", str(steps),
           "--threads", str(threads)]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per case: extra memory and tokens/s over the ``off`` case of the same model, objective and length."""
    out: dict[str, dict[str, float]] = {}
    for key, r in results.items():
        off = results.get(key.rsplit(":", 1)[0] + ":off", {})
        if "error" in r or "error" in off or not off or key.endswith(":off"):
            continue
        out[key] = {
            "extra_over_off": round(r["extra_gib"] / off["extra_gib"], 3),
            "peak_over_off": round(r["peak_gib"] / off["peak_gib"], 3),
            "tokens_per_s_over_off": round(r["tokens_per_s"] / off["tokens_per_s"], 3),
        }
    return out


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "logical_cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "glibc": platform.libc_ver()[1], "load_avg_at_start": list(os.getloadavg())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke: base model, 512 tokens, one step")
    ap.add_argument("--full", action="store_true", help="also each switch alone (twice the cases)")
    ap.add_argument("--models", default="base,qwen2.5-0.5b")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--lengths-0.5b", dest="lengths_big", default="512",
                    help="lengths for qwen2.5-0.5b (2k/4k run, but take many minutes per case on 2 cores)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=2, help="rows per step for the base model")
    ap.add_argument(
        "--steps", type=int, default=1, help="measured steps after one warm-up (0: one step, no warm-up)"
    )
    ap.add_argument("--only", help="comma-separated cases model:objective:length:case, run in this order")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case in this process
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_scaling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(one_case(args.case, args.batch, args.steps)))
        return
    info = {"machine": machine(), "command": "python benchmarks/memory_scaling.py " + " ".join(sys.argv[1:])}
    results: dict[str, dict[str, Any]] = {}
    if args.quick:
        args.models, args.lengths, args.steps = "base", "512", 0
    todo = []
    for model in args.models.split(","):
        lengths = args.lengths if model == "base" else args.lengths_big
        todo += plan([model], [int(x) for x in lengths.split(",")], args.full)
    if args.only:
        todo = [(m, o, int(n), c) for m, o, n, c in (x.split(":") for x in args.only.split(","))]
    for case in todo:
        key = ":".join(map(str, case))
        batch = args.batch if case[0] == "base" else 1
        results[key] = {"batch": batch, **run_case(case, batch, args.steps, args.threads)}
        print(key, json.dumps(results[key]), flush=True)
        write(args, info, results)  # after every case: a long run interrupted keeps what it measured
    print(json.dumps(ratios(results), indent=1))


def write(args: argparse.Namespace, info: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """The JSON result file, with the ratios of the cases measured so far."""
    out = {
        "benchmark": "memory_scaling",
        "quick": args.quick,
        "full": args.full,
        "batch_base": args.batch,
        **info,
        "threads": args.threads,
        "lora": True,
        "precision": "fp32",
        "attn_implementation": "sdpa",
        "steps": args.steps,
        "load_avg_now": list(os.getloadavg()),
        "cases": results,
        "ratios": ratios(results),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
