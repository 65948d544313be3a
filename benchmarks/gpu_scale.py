"""The paper's experiment shape on a GPU: tokens/s, MFU and peak memory of revmix's steps at real scale.

One short script (well under 8 minutes on one H100/H200), random weights built from published configs
(nothing downloaded), bf16, sdpa (or ``flash_attention_2`` when installed, as ``model.attn_implementation:
auto`` chooses), activation checkpointing on, revmix's own :func:`revmix.platform.step.supervised_step`:

* ``sft_lora_16k``: Qwen2.5-7B architecture, LoRA SFT on one row of 16,384 tokens;
* ``dpo_lora_2x8k``: the same model, DPO (adapter-disabled reference, shared prompt) on one pair whose
  chosen and rejected sequences are 8,192 tokens each;
* ``sft_lora_16k_cce``, ``dpo_lora_2x8k_noentropy`` and ``dpo_lora_2x8k_noentropy_cce``: the response
  log-probs chunked over the logits against Cut Cross-Entropy's fused kernel (``runtime.logp_kernel``; the
  gpu extra, else recorded as skipped), the same steps and rows — DPO without its entropy metrics, which
  read the logits and so keep the chunked path;
* ``fsdp_full_1.5b`` (only with >= 2 GPUs): full fine-tuning of the Qwen2.5-1.5B architecture through
  revmix's runtime (``runtime.strategy=fsdp``, one Ray Train worker per GPU) on the tiny synthetic rows.

MFU (model FLOPs utilisation) uses the PaLM convention (Chowdhery et al. 2022, appendix B), the one
torchtitan, Megatron and most published figures use::

    model FLOPs per step = 6 · N · D + 12 · L · d · S · D

with ``N`` the parameters other than the embedding table (the lm_head counts when untied), ``D`` the
tokens of the step, ``L`` layers, ``d`` the hidden size and ``S`` the sequence length (the attention
score and value matmuls, forward + backward, without the causal halving). MFU = model FLOPs / (step
seconds × the GPU's dense bf16 peak). Activation checkpointing's recomputation is not counted (that
would be hardware FLOPs utilisation). For LoRA the same 6·N·D is reported, as published LoRA figures do,
although no weight gradient of the frozen weights is computed (the real work is nearer 4·N·D):
``mfu_lora_4n`` states that variant beside it.

    python benchmarks/gpu_scale.py --out benchmarks/results/gpu_scale_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

ARCHITECTURES: dict[str, dict[str, Any]] = {  # the published config.json values of each Qwen2.5 base model
    "qwen2.5-0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151_936,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151_936,
                     "tie_word_embeddings": True},
    "qwen2.5-7b": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152_064,
                   "tie_word_embeddings": False},
}  # fmt: skip
COMMON = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "use_sliding_window": False}
PEAK_BF16_TFLOPS = {"H100": 989.5, "H200": 989.5, "H800": 989.5, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 peak (no sparsity) of the SXM parts, from NVIDIA's data sheets; matched in the device name."""


def config_values(arch: str, max_positions: int) -> dict[str, Any]:
    """The ``Qwen2Config`` fields of ``arch`` with room for ``max_positions``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    return {**ARCHITECTURES[arch], **COMMON, "max_position_embeddings": max(max_positions, 32_768)}


def parameter_count(values: dict[str, Any]) -> dict[str, int]:
    """Parameters of a Qwen2 model from its config values: ``total`` and ``non_embedding`` (what MFU's
    ``N`` counts: everything but the input embedding table; an untied lm_head is a matmul and counts)."""
    h, inter, layers = values["hidden_size"], values["intermediate_size"], values["num_hidden_layers"]
    kv = values["num_key_value_heads"] * (h // values["num_attention_heads"])
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h  # q, k, v with biases; o without
    layer = attention + 3 * h * inter + 2 * h  # gate, up, down; two RMSNorms
    embed = values["vocab_size"] * h
    head = 0 if values["tie_word_embeddings"] else embed
    body = layers * layer + h  # + the final norm
    return {"total": embed + body + head, "non_embedding": body + head, "lm_head": embed}


def step_flops(values: dict[str, Any], tokens: int, seq_len: int, weight_factor: int = 6) -> float:
    """Model FLOPs of one training step (module docstring): ``weight_factor · N · D + 12 · L · d · S · D``;
    the lm_head's matmul is in ``N`` whether or not it is tied to the embedding."""
    counts = parameter_count(values)
    n = counts["non_embedding"] + (counts["lm_head"] if values["tie_word_embeddings"] else 0)
    attention = 12 * values["num_hidden_layers"] * values["hidden_size"] * seq_len * tokens
    return float(weight_factor * n * tokens + attention)


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of a step of ``flops`` that took ``seconds`` on a GPU of ``peak_tflops``."""
    if seconds <= 0 or peak_tflops <= 0:
        raise ValueError(f"mfu: seconds ({seconds}) and peak_tflops ({peak_tflops}) must be positive")
    return flops / (seconds * peak_tflops * 1e12)


def peak_tflops_of(device_name: str, override: float | None) -> float:
    """The dense bf16 peak of the GPU named ``device_name`` (``--peak-tflops`` overrides)."""
    if override:
        return override
    for part, tflops in PEAK_BF16_TFLOPS.items():
        if part in device_name:
            return tflops
    raise ValueError(
        f"no bf16 peak known for {device_name!r} (known: {', '.join(PEAK_BF16_TFLOPS)}); pass --peak-tflops"
    )


def pair_rows(prompt: int, response: int, pairs: bool, vocab: int) -> list[dict]:
    """One tokenised row of ``prompt`` + ``response`` random tokens (and a rejected response for DPO)."""
    import torch

    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    row = {"prompt_ids": ids(prompt), "response_ids": ids(response), "other_ids": ids(response) if pairs else [],
           "direction": 0, "task": "synthetic/long", "answer": None, "item_id": "0"}  # fmt: skip
    return [row]


def build_policy(arch: str, max_positions: int, device: Any) -> Any:
    """A random-weight bf16 model of ``arch`` on ``device``, the attention kernel ``auto`` picks,
    activation checkpointing on, a LoRA adapter as the project's configs set it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from revmix.config import LoraConfig
    from revmix.platform.models import (
        LoraSpec,
        apply_activation_checkpointing,
        apply_lora,
        choose_attn_implementation,
    )

    config = Qwen2Config(**config_values(arch, max_positions))
    config._attn_implementation = choose_attn_implementation("auto", device)[0]
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    apply_activation_checkpointing(model, "on", device)
    lo = LoraConfig()
    return apply_lora(model, LoraSpec(lo.r, lo.alpha, lo.dropout, tuple(lo.target_modules)))


def lora_case(
    policy: Any, objective: str | dict[str, Any], rows: list[dict], steps: int, logp_kernel: str = "chunked"
) -> dict[str, Any]:
    """``steps`` timed revmix steps (after one warm-up) of ``objective`` (a name, or its spec) on ``rows``
    with the response log-probs of ``logp_kernel`` (``runtime.logp_kernel``); seconds and memory."""
    import torch

    from revmix.config import StageConfig
    from revmix.objectives.base import build_objective
    from revmix.objectives.reference import AdapterDisabledReference
    from revmix.platform.recipe import policy_forward
    from revmix.platform.step import StepContext, supervised_step

    spec = {"name": objective} if isinstance(objective, str) else objective
    dpo = spec["name"] == "dpo"
    trainable = [p for p in policy.parameters() if p.requires_grad]
    ctx = StepContext(
        policy=policy, train_model=policy,
        ref=AdapterDisabledReference(policy, 1) if dpo else None,
        objective=build_objective(spec), optimizer=torch.optim.AdamW(trainable, lr=1e-5),
        trainable=trainable, tokenizer=SimpleNamespace(pad_token_id=0), device=torch.device("cuda"),
        stage=StageConfig(objective=spec, batch_size=len(rows), steps=steps + 1),
        world=1, autocast=True, micro=len(rows), with_other=dpo, seed=0,
        policy_forward=policy_forward(policy, 1, 1, logp_kernel=logp_kernel),
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for step in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics, tokens = supervised_step(ctx, rows, step)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    per_step = sorted(seconds[1:])[len(seconds[1:]) // 2]
    return {"tokens": tokens, "step_s": round(per_step, 3), "tokens_per_s": round(tokens / per_step, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss": metrics["loss"]}  # fmt: skip


def add_mfu(result: dict[str, Any], values: dict[str, Any], seq_len: int, peak: float) -> dict[str, Any]:
    """``result`` with its MFU (6·N) and the LoRA variant (4·N) beside it."""
    for name, factor in (("mfu", 6), ("mfu_lora_4n", 4)):
        flops = step_flops(values, result["tokens"], seq_len, factor)
        result[name] = round(mfu(flops, result["step_s"], peak), 4)
    return result


def fsdp_case(gpus: int, steps: int) -> dict[str, Any]:
    """Full fine-tuning of the 1.5B architecture through revmix's runtime, FSDP2 over ``gpus`` workers."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from revmix.config import load_config
    from revmix.platform.models import build_tokenizer
    from revmix.platform.train import run_experiment

    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d) / "qwen2.5-1.5b-random"
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**config_values("qwen2.5-1.5b", 4096))).save_pretrained(model_dir)
        build_tokenizer().save_pretrained(model_dir)  # ids < 512: valid in the 151,936-token vocabulary
        over = [f"model.name_or_path={model_dir}", "model.lora.enabled=false", "runtime.strategy=fsdp",
                f"runtime.num_workers={gpus}", "runtime.use_gpu=true", "runtime.cpus_per_worker=2",
                f"stages.0.steps={steps}", "stages.0.batch_size=16", "stages.0.lr=1e-5"]  # fmt: skip
        cfg = load_config(ROOT / "configs" / "runs" / "sft_tiny.yaml", over)
        t0 = time.perf_counter()
        run_experiment(cfg, Path(d) / "run", evaluate=False)
        recs = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tokens_per_s"] for r in recs[1:] if "tokens_per_s" in r)
    return {"gpus": gpus, "steps": steps, "wall_s": round(time.perf_counter() - t0, 1),
            "median_tokens_per_s": rates[len(rates) // 2] if rates else None,
            "rows": "the tiny synthetic rows of configs/runs/sft_tiny.yaml (short): a scale check, not a throughput figure"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case, after one warm-up")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when its name is not known")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_scale.json"))
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit(
            "gpu_scale.py needs a CUDA GPU (none visible here): run it on a GPU node; nothing was measured"
        )
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops_of(name, args.peak_tflops)
    result: dict[str, Any] = {"benchmark": "gpu_scale", "gpu": name, "gpus": torch.cuda.device_count(),
                              "peak_bf16_tflops": peak, "torch": torch.__version__, "cases": {}}  # fmt: skip
    values = config_values("qwen2.5-7b", 16_384)
    policy = build_policy("qwen2.5-7b", 16_384, "cuda")
    result["attn_implementation"] = policy.config._attn_implementation
    vocab = values["vocab_size"]
    sft_rows = pair_rows(512, 16_384 - 512, False, vocab)
    sft = lora_case(policy, "sft", sft_rows, args.steps)
    result["cases"]["sft_lora_16k"] = add_mfu(sft, values, 16_384, peak)
    print(json.dumps(result["cases"]["sft_lora_16k"]), flush=True)
    dpo_rows = pair_rows(512, 8_192 - 512, True, vocab)
    dpo = lora_case(policy, "dpo", dpo_rows, args.steps)
    # shared prompt: one sequence of 512 + 2 × 7,680 tokens; MFU against that length
    result["cases"]["dpo_lora_2x8k"] = add_mfu(dpo, values, 512 + 2 * 7_680, peak)
    print(json.dumps(result["cases"]["dpo_lora_2x8k"]), flush=True)
    # Chunked against fused log-probs (runtime.logp_kernel), same model and rows. DPO's entropy metrics read
    # the logits (they keep the chunked path), so both DPO runs here go without them.
    from revmix.objectives.base import fused_available

    usable, why = fused_available("cce")
    no_entropy = {"name": "dpo", "entropy_metrics": False}
    kernel_cases = {
        "sft_lora_16k_cce": ("sft", sft_rows, "cce", 16_384),
        "dpo_lora_2x8k_noentropy": (no_entropy, dpo_rows, "chunked", 512 + 2 * 7_680),
        "dpo_lora_2x8k_noentropy_cce": (no_entropy, dpo_rows, "cce", 512 + 2 * 7_680),
    }
    for name, (spec, rows, kernel, seq_len) in kernel_cases.items():
        if kernel == "cce" and not usable:
            result["cases"][name] = {"skipped": f"{why} (install the gpu extra: pip install 'revmix[gpu]')"}
            continue
        result["cases"][name] = add_mfu(
            lora_case(policy, spec, rows, args.steps, kernel), values, seq_len, peak
        )
        print(json.dumps({name: result["cases"][name]}), flush=True)
    del policy
    torch.cuda.empty_cache()
    if torch.cuda.device_count() >= 2:
        result["cases"]["fsdp_full_1.5b"] = fsdp_case(torch.cuda.device_count(), args.steps + 2)
    else:
        result["cases"]["fsdp_full_1.5b"] = {"skipped": "needs >= 2 GPUs"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
