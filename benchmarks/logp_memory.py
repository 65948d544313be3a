"""Peak memory of response-token log-probs at a real vocabulary: the chunked ``token_logps`` against the
plain computation it replaced (an fp32 ``log_softmax`` over the whole ``[B, T, V]`` logits, then a gather).

Each case runs in its own process (peak RSS is per process), on bf16 logits of Qwen2.5's vocabulary
(151,936 tokens) with the first eighth of the positions masked as prompt, forward only and forward +
backward. Written to ``benchmarks/results/logp_memory.json`` with the ratios new / plain.

    python benchmarks/logp_memory.py --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from revmix.objectives.base import IGNORE_INDEX, token_logps

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151_936  # Qwen2.5's published vocab_size


def plain_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The computation before chunking: fp32 log-softmax over every position, then the label's entry."""
    logp_all = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logp_all.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def one_case(which: str, backward: bool, tokens: int) -> dict[str, float]:
    """Peak RSS above the logits themselves (GiB) and wall seconds of one call (+ backward)."""
    torch.manual_seed(0)
    logits = torch.randn(1, tokens, VOCAB, dtype=torch.bfloat16).requires_grad_(backward)
    labels = torch.randint(0, VOCAB, (1, tokens))
    labels[:, : tokens // 8] = IGNORE_INDEX
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    logp, _ = (token_logps if which == "chunked" else plain_token_logps)(logits, labels)
    if backward:
        logp.sum().backward()
    wall = time.perf_counter() - t0
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
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "logp_memory.json"))
    args = ap.parse_args()
    if args.case:
        which, mode = args.case.split(":")
        print(json.dumps(one_case(which, mode == "fwd+bwd", args.tokens)))
        return
    cases: dict[str, dict[str, float]] = {}
    for mode in ("fwd", "fwd+bwd"):
        for which in ("plain", "chunked"):
            cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--case", f"{which}:{mode}"]
            cases[f"{which}/{mode}"] = json.loads(
                subprocess.check_output(cmd, text=True).strip().splitlines()[-1]
            )
    result = {
        "benchmark": "logp_memory",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "shape": {"batch": 1, "tokens": args.tokens, "vocab": VOCAB, "dtype": "bfloat16"},
        "cases": cases,
        "ratio_extra_chunked_over_plain": {
            mode: cases[f"chunked/{mode}"]["extra_gib"] / cases[f"plain/{mode}"]["extra_gib"]
            for mode in ("fwd", "fwd+bwd")
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
