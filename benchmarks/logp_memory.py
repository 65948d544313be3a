"""Peak memory of response-token log-probs at a real vocabulary (Qwen2.5's 151,936 tokens), two comparisons:

* ``--from logits`` (default): the chunked ``token_logps`` against the plain computation it replaced (an
  fp32 ``log_softmax`` over the whole ``[B, T, V]`` logits, then a gather), on bf16 logits;
* ``--from hidden``: what ``runtime.logp_kernel`` chooses between, from the final hidden states ``[1, T, H]``
  and a frozen bf16 ``lm_head`` weight ``[V, H]`` (LoRA's case: no weight gradient): ``head+chunked`` (the
  model's ``lm_head`` call, then ``token_logps``) against ``cce`` (``fused_token_logps``: Cut Cross-Entropy,
  no logits); on CUDA also ``cce_filtered``, the library's default gradient filter (``filter_eps="high"``,
  which revmix does not use: ``revmix.objectives.base.CCE_FILTER_EPS``). Off CUDA ``cce`` is Cut
  Cross-Entropy's ``torch_compile`` implementation, which computes the logits: a check of that path, not of
  the kernel's memory.

The first eighth of the positions is masked as prompt; forward only and forward + backward; each case in its
own process after one warm-up call (CUDA: the same shapes, so Triton's autotuning is not timed; CPU: the last
64 positions, so ``torch.compile``'s compilation is not). Memory above the inputs: peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA. Written with the ratios against the first case.

    python benchmarks/logp_memory.py --tokens 4096
    python benchmarks/logp_memory.py --from hidden --tokens 16384 --hidden-size 3584 \
        --out benchmarks/results/logp_memory_hidden_h200.json   # Qwen2.5-7B's width, on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from revmix.objectives import base
from revmix.objectives.base import IGNORE_INDEX, fused_token_logps, token_logps

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151_936  # Qwen2.5's published vocab_size
CASES = {"logits": ("plain", "chunked"), "hidden": ("head+chunked", "cce", "cce_filtered")}


def plain_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The computation before chunking: fp32 log-softmax over every position, then the label's entry."""
    logp_all = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logp_all.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def _inputs(which: str, tokens: int, hidden_size: int, backward: bool, device: str) -> tuple[Callable, list]:
    """The call of case ``which`` and its inputs (seeded): logits, or hidden states and a frozen weight."""
    g = torch.Generator(device).manual_seed(0)
    labels = torch.randint(0, VOCAB, (1, tokens), generator=g, device=device)
    labels[:, : tokens // 8] = IGNORE_INDEX
    if which in CASES["logits"]:
        logits = torch.randn(1, tokens, VOCAB, generator=g, device=device, dtype=torch.bfloat16)
        fn = token_logps if which == "chunked" else plain_token_logps
        return fn, [logits.requires_grad_(backward), labels]
    hidden = torch.randn(1, tokens, hidden_size, generator=g, device=device, dtype=torch.bfloat16)
    weight = torch.randn(VOCAB, hidden_size, generator=g, device=device, dtype=torch.bfloat16).mul_(0.02)
    if which == "head+chunked":
        return lambda h, w, y: token_logps(h @ w.T, y), [hidden.requires_grad_(backward), weight, labels]
    if which == "cce_filtered":
        base.CCE_FILTER_EPS = "high"  # before the first call: the kernel is bound once per process
    return fused_token_logps, [hidden.requires_grad_(backward), weight, labels]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _last_positions(x: torch.Tensor, n: int) -> torch.Tensor:
    """A fresh copy of the last ``n`` positions of a ``[1, T, ...]`` input (the warm-up's, small enough not
    to move the peak RSS the case is measured by); the weight ``[V, H]`` as it is."""
    if x.shape[0] != 1:
        return x
    return x[:, -n:].detach().clone().requires_grad_(x.requires_grad)


def one_case(which: str, backward: bool, tokens: int, hidden_size: int, device: str) -> dict[str, float]:
    """Peak memory above the inputs (GiB) and wall seconds of one call (+ backward), after a warm-up."""
    torch.manual_seed(0)
    fn, args = _inputs(which, tokens, hidden_size, backward, device)
    warm = args if device == "cuda" else [_last_positions(a, 64) for a in args]
    logp, _ = fn(*warm)
    if backward:
        logp.sum().backward()
    for a in args:
        a.grad = None
    _synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    logp, _ = fn(*args)
    if backward:
        logp.sum().backward()
    _synchronize(device)
    wall = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "peak_gib": peak,
        "extra_gib": peak - before,
        "wall_s": wall,
        "logp_sum": float(logp.detach().sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--from", dest="source", choices=list(CASES), default="logits")
    ap.add_argument("--hidden-size", type=int, default=896, help="--from hidden: H (896: Qwen2.5-0.5B)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--out", help="default: benchmarks/results/logp_memory[_hidden].json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:
        which, mode = args.case.split(":")
        print(json.dumps(one_case(which, mode == "fwd+bwd", args.tokens, args.hidden_size, device)))
        return
    names = [c for c in CASES[args.source] if c != "cce_filtered" or device == "cuda"]
    if args.source == "hidden":
        usable, why = base.fused_available("cce" if device == "cuda" else "torch_compile")
        if not usable:
            sys.exit(f"--from hidden needs cut_cross_entropy (the gpu extra): {why}")
    cases: dict[str, dict[str, float]] = {}
    for mode in ("fwd", "fwd+bwd"):
        for which in names:
            cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--hidden-size",
                   str(args.hidden_size), "--case", f"{which}:{mode}"]  # fmt: skip
            cases[f"{which}/{mode}"] = json.loads(
                subprocess.check_output(cmd, text=True).strip().splitlines()[-1]
            )
    first = names[0]
    if device == "cuda":
        machine = torch.cuda.get_device_name(0)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    shape = {"batch": 1, "tokens": args.tokens, "vocab": VOCAB, "dtype": "bfloat16"}
    if args.source == "hidden":
        shape["hidden_size"] = args.hidden_size
    result = {
        "benchmark": "logp_memory",
        "from": args.source,
        "device": device,
        "machine": machine,
        "torch": torch.__version__,
        "shape": shape,
        "cases": cases,
        f"ratio_extra_over_{first}": {
            f"{which}/{mode}": cases[f"{which}/{mode}"]["extra_gib"] / cases[f"{first}/{mode}"]["extra_gib"]
            for mode in ("fwd", "fwd+bwd")
            for which in names[1:]
        },
    }
    suffix = "" if args.source == "logits" else "_hidden"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"logp_memory{suffix}.json")
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
