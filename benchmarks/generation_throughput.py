"""Generated tokens/s of ``HFGenerator`` (batched, left-padded, KV cache) vs a naive one-prompt-at-a-time
``model.generate`` loop, and ALP scoring pairs/s of batched ``score`` vs one forward pass per pair.

Both generation paths decode the same chat-formatted synthetic-benchmark questions greedily with the same
``max_new_tokens`` on the same model; tokens are counted up to and including EOS, so the rates compare
like with like. Each timing is the best of ``--repeats`` runs (the machine is shared; the best run is the
least disturbed; repeats are interleaved across methods). On CPU torch runs one thread by default:
two-thread torch collapses whenever another process holds a core, which swamps the comparison on a
shared 2-core machine. The random tiny model never emits EOS, so every row runs the full budget.

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
    ap.add_argument("--batch-sizes", default="8,16,32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (CPU); 1 is robust on a shared machine"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results/generation_throughput.json")
    args = ap.parse_args()

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
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

    # Repeats are interleaved (naive, then every batch size, then again) so that a burst of load from
    # other processes hits all methods alike; each method keeps its best run.
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs: dict[str, list[tuple[float, int]]] = {}
    for _ in range(args.repeats):
        seconds, tokens = best_of(1, lambda: naive_generate(base, prompts, args.max_new_tokens))
        runs.setdefault("naive_loop", []).append((seconds, tokens))
        for bs in sizes:
            base.batch_size = bs
            seconds, out = best_of(1, lambda: base.generate_detailed(prompts, params))
            runs.setdefault(f"hf_batch_{bs}", []).append(
                (seconds, sum(c.n_tokens for row in out for c in row))
            )
    naive_s, naive_tokens = min(runs["naive_loop"])
    naive_rate = naive_tokens / naive_s
    for name, values in runs.items():
        seconds, tokens = min(values)
        rate = tokens / seconds
        entry = {
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": rate,
            "all_seconds": [v[0] for v in values],
        }
        if name != "naive_loop":
            entry["speedup_vs_naive"] = rate / naive_rate
        result["generation"][name] = entry
        print(
            f"{name}: {tokens} tokens in {seconds:.2f} s = {rate:.0f} tok/s ({rate / naive_rate:.2f}x)",
            flush=True,
        )

    # ALP scoring: y+ and y- of every item (2 pairs per item)
    pair_prompts = prepare_prompts(base, [it.prompt for it in items]) * 2
    completions = [it.response for it in items] + [it.other_response for it in items]
    base.batch_size = 16
    naive_s, batched_s = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, best of each
        naive_s = min(naive_s, best_of(1, lambda: naive_score(base, pair_prompts, completions))[0])
        batched_s = min(batched_s, best_of(1, lambda: base.score(pair_prompts, completions))[0])
    result["scoring"]["naive_loop"] = {"seconds": naive_s, "pairs_per_s": len(completions) / naive_s}
    result["scoring"]["hf_batch_16"] = {
        "seconds": batched_s,
        "pairs_per_s": len(completions) / batched_s,
        "speedup_vs_naive": naive_s / batched_s,
    }
    print(
        f"scoring {len(completions)} pairs: naive {naive_s:.2f} s, batched {batched_s:.2f} s ({naive_s / batched_s:.2f}x)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
