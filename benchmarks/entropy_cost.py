"""What the preference objectives' ``entropy_metrics`` costs: the next-token entropy on y+ and y− tokens
(``entropy/chosen``, ``entropy/rejected``) against the log-probs alone.

Two measurements, each the median over ``--reps`` timed repeats after one warm-up, alternating on/off so
that a loaded machine slows both alike:

* ``logp_pass``: the chunked log-prob pass alone (:func:`~revmix.objectives.base.target_logps` against
  :func:`~revmix.objectives.base.target_logps_and_entropy`, the entropy detached), forward + backward of
  the summed log-probs on fp32 logits ``[1, tokens, V]``, at the tiny models' vocabulary (512) and at
  Qwen2.5's (151,936);
* ``dpo_step``: one DPO micro-batch, forward + backward, on a randomly initialised model of a tiny scale
  (the shape :data:`revmix.platform.models.SCALES` builds; 512-token vocabulary), ``--pairs`` pairs with
  ``--prompt``/``--response`` tokens each, shared-prompt rows, reference log-probs cached on the batch
  (as the training loop does by default), ``entropy_metrics`` true against false.

Written to ``benchmarks/results/entropy_cost.json`` with the ratios on / off.

    OMP_NUM_THREADS=1 python benchmarks/entropy_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from revmix.objectives.base import (
    Batch,
    PolicyForward,
    build_objective,
    target_logps,
    target_logps_and_entropy,
)
from revmix.objectives.fixtures import pack
from revmix.platform.models import SCALES, VOCAB_SIZE

ROOT = Path(__file__).resolve().parents[1]
QWEN_VOCAB = 151_936


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(runs: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median wall milliseconds of each callable, the callables interleaved, one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(reps):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t))
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def logp_pass(vocab: int, tokens: int, reps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, tokens + 1, vocab, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens), generator=g)

    def off() -> None:
        logits.grad = None
        target_logps(logits, targets).sum().backward()

    def on() -> None:
        logits.grad = None
        logp, entropy = target_logps_and_entropy(logits, targets)
        logp.sum().backward()
        float(entropy.detach().sum())

    out = median_ms({"off": off, "on": on}, reps)
    return {"vocab": vocab, "tokens": tokens, "off_ms": out["off"], "on_ms": out["on"]}


def dpo_batch(pairs: int, prompt: int, response: int) -> Batch:
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist()

    prompts = [rand(prompt) for _ in range(pairs)]
    ids, mask, labels = pack(prompts, [rand(response) for _ in range(pairs)])
    o_ids, o_mask, o_labels = pack(prompts, [rand(response) for _ in range(pairs)])
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        direction=torch.tensor([i % 2 for i in range(pairs)]),
        other_input_ids=o_ids,
        other_attention_mask=o_mask,
        other_labels=o_labels,
        ref_chosen_logps=torch.full((pairs,), -float(response) * 6),
        ref_rejected_logps=torch.full((pairs,), -float(response) * 6),
        policy_forward=PolicyForward(shared_prompt=True),
    )


def dpo_step(scale: str, pairs: int, prompt: int, response: int, reps: int) -> dict[str, object]:
    s = SCALES[scale]
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        intermediate_size=s.intermediate_size,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(cfg)
    batch = dpo_batch(pairs, prompt, response)
    objectives = {flag: build_objective({"name": "dpo", "entropy_metrics": flag}) for flag in (False, True)}

    def step(flag: bool) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            objectives[flag](model, batch).loss.backward()

        return run

    out = median_ms({"off": step(False), "on": step(True)}, reps)
    return {"scale": scale, "pairs": pairs, "prompt": prompt, "response": response, **_ms(out)}


def _ms(out: dict[str, float]) -> dict[str, float]:
    return {"off_ms": out["off"], "on_ms": out["on"], "on_over_off": round(out["on"] / out["off"], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--tokens", type=int, default=512, help="scored positions of the log-prob pass")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--prompt", type=int, default=48)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "entropy_cost.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    passes = []
    for vocab in (VOCAB_SIZE, QWEN_VOCAB):
        r = logp_pass(vocab, args.tokens, args.reps)
        passes.append({**r, "on_over_off": round(r["on_ms"] / r["off_ms"], 3)})
        print(json.dumps(passes[-1]))
    steps = []
    for scale in ("tiny", "small"):
        steps.append(dpo_step(scale, args.pairs, args.prompt, args.response, args.reps))
        print(json.dumps(steps[-1]))
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} thread(s)",
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes sharing the cores
        "torch": torch.__version__,
        "command": f"python benchmarks/entropy_cost.py --threads {args.threads} --reps {args.reps}",
        "logp_pass": passes,
        "dpo_step": steps,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
