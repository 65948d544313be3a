"""configs/runs/paper_qwen2.5-7b.yaml end to end on CPU: a random Qwen2 model of tiny width, r1k-layout data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from revmix.cli import main
from revmix.platform.models import build_tokenizer

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "configs" / "runs" / "paper_qwen2.5-7b.yaml"
SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
)


def chatml(user: str, assistant: str) -> str:
    return f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>"


def r1k_records(n: int) -> list[dict[str, str]]:
    """``n`` items in the paper's pair layout (s1K columns + text / worse-text / sample_type): one original
    (forward) and one flipped (reverse) record each, with s1-style think / answer traces."""
    out = []
    for i in range(n):
        fwd_q, rev_q = f"What is {i} + 3?", f"A number plus 3 is {i + 3}. What is the number?"
        fwd = f"<|im_start|>think\n{i} plus 3.\n<|im_start|>answer\nAnswer: \\boxed{{{i + 3}}}"
        rev = f"<|im_start|>think\n{i + 3} minus 3.\n<|im_start|>answer\nAnswer: \\boxed{{{i}}}"
        common = {
            "question": fwd_q,
            "solution": f"\\boxed{{{i + 3}}}",
            "cot_type": "math",
            "source_type": "toy",
        }
        out.append(
            {
                **common,
                "sample_type": "original",
                "text": chatml(fwd_q, fwd),
                "worse-text": chatml(fwd_q, rev),
            }
        )
        out.append(
            {**common, "sample_type": "flipped", "text": chatml(rev_q, rev), "worse-text": chatml(rev_q, fwd)}
        )
    return out


def tiny_qwen25(path: Path) -> str:
    """A random-weight model with Qwen2.5-7B's architecture choices (GQA 2:1, untied embeddings, q/k/v
    biases, SwiGLU) at tiny widths, and the locally built tokenizer, saved like a hub checkpoint."""
    tok = build_tokenizer(512)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_paper_recipe_trains_end_to_end_on_cpu(tmp_path: Path) -> None:
    model = tiny_qwen25(tmp_path / "model")
    data = tmp_path / "r1k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in r1k_records(8)))
    over = [
        f"model.name_or_path={model}",
        f"data.source={data}",
        "data.max_length=96",
        "data.test_fraction=0.25",
    ]
    over += ["model.dtype=float32", "model.lora.r=4", "model.lora.alpha=8", "runtime.use_gpu=false"]
    over += ["runtime.precision=fp32", "runtime.activation_checkpointing=off"]
    for i in (0, 1):
        over += [f"stages.{i}.steps=2", f"stages.{i}.batch_size=4", f"stages.{i}.grad_accum=1"]
        over += [f"stages.{i}.warmup_steps=0"]
    out = tmp_path / "run"
    assert main(["train", str(RECIPE), *over, "--out", str(out), "--no-eval"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["steps"] for s in summary["stages"]] == [2, 2]
    assert (out / "stages" / "1" / "adapter").exists()  # LoRA stages keep their adapters
