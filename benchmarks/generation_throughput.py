"""Generated tokens/s of ``HFGenerator`` (batched, left-padded, KV cache) vs a naive one-prompt-at-a-time
``model.generate`` loop, and ALP scoring pairs/s of batched ``score`` vs one forward pass per pair.

Both generation paths decode the same chat-formatted synthetic-benchmark questions greedily with the same
``max_new_tokens`` on the same model; tokens are counted up to and including EOS, so the rates compare
like with like. Each timing is the best of ``--repeats`` runs (the machine is shared; the best run is the
least disturbed). The random tiny model never emits EOS, so every row runs the full budget.

    python benchmarks/generation_throughput.py --out benchmarks/results/generation_throughput.json
    python benchmarks/generation_throughput.py --device cuda --scale small --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from revmix.platform.evaluation.benchmarks import load_benchmark
from revmix.platform.generation.hf import HFGenerator
from revmix.platform.generation.protocol import SamplingParams, prepare_prompts
from revmix.platform.models import count_parameters, resolve_model_path


def best_of(repeats: int, fn):
    best, value = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        value = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, value


def naive_generate(gen: HFGenerator, prompts: list[str], max_new: int) -> int:
    """One prompt at a time, unpadded, straight through transformers; returns tokens generated."""
    total = 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([gen.tokenizer(p, add_special_tokens=False)["input_ids"]], device=gen.device)
            out = gen.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=gen.pad_id,
                eos_token_id=gen.eos_ids,
            )
            new = out[0, ids.shape[1] :].tolist()
            stop = next((j + 1 for j, t in enumerate(new) if t in gen.eos_ids), len(new))
            total += stop
    return total


def naive_score(gen: HFGenerator, prompts: list[str], completions: list[str]) -> None:
    with torch.inference_mode():
        for p, c in zip(prompts, completions):
            pi = gen.tokenizer(p, add_special_tokens=False)["input_ids"]
            ci = gen.tokenizer(c, add_special_tokens=False)["input_ids"]
            logits = gen.model(input_ids=torch.tensor([pi + ci], device=gen.device)).logits[0]
            logp = torch.log_softmax(logits[len(pi) - 1 : -1].float(), -1)
            logp.gather(-1, torch.tensor(ci, device=gen.device).unsqueeze(-1)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="tiny", help="tiny model scale (tiny, small, base)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8,16,32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results/generation_throughput.json")
    args = ap.parse_args()

    path = resolve_model_path(None, args.scale, 0)
    items = load_benchmark("synthetic", limit=args.prompts)
    base = HFGenerator(path, batch_size=1, device=args.device, dtype=args.dtype)
    prompts = prepare_prompts(base, [it.prompt for it in items])
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    result: dict = {
        "model": {"scale": args.scale, "parameters": count_parameters(base.model)[1], "dtype": args.dtype},
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "generation": {},
        "scoring": {},
    }
    best_of(1, lambda: base.generate(prompts[:4], params.replace(max_new_tokens=4)))  # warm-up

    seconds, tokens = best_of(args.repeats, lambda: naive_generate(base, prompts, args.max_new_tokens))
    naive_rate = tokens / seconds
    result["generation"]["naive_loop"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": naive_rate}
    print(f"naive loop: {tokens} tokens in {seconds:.2f} s = {naive_rate:.0f} tok/s", flush=True)
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        base.batch_size = bs
        seconds, out = best_of(args.repeats, lambda: base.generate_detailed(prompts, params))
        tokens = sum(c.n_tokens for row in out for c in row)
        rate = tokens / seconds
        result["generation"][f"hf_batch_{bs}"] = {
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": rate,
            "speedup_vs_naive": rate / naive_rate,
        }
        print(
            f"HFGenerator batch {bs}: {tokens} tokens in {seconds:.2f} s = {rate:.0f} tok/s ({rate / naive_rate:.2f}x)",
            flush=True,
        )

    # ALP scoring: y+ and y- of every item (2 pairs per item)
    pair_prompts = prepare_prompts(base, [it.prompt for it in items]) * 2
    completions = [it.response for it in items] + [it.other_response for it in items]
    seconds, _ = best_of(args.repeats, lambda: naive_score(base, pair_prompts, completions))
    result["scoring"]["naive_loop"] = {"seconds": seconds, "pairs_per_s": len(completions) / seconds}
    base.batch_size = 16
    b_seconds, _ = best_of(args.repeats, lambda: base.score(pair_prompts, completions))
    result["scoring"]["hf_batch_16"] = {
        "seconds": b_seconds,
        "pairs_per_s": len(completions) / b_seconds,
        "speedup_vs_naive": seconds / b_seconds,
    }
    print(
        f"scoring {len(completions)} pairs: naive {seconds:.2f} s, batched {b_seconds:.2f} s ({seconds / b_seconds:.2f}x)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
