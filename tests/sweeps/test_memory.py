"""The --dry-run memory estimate against hand-computed numbers (no GPU, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from revmix.config import build_config
from revmix.sweeps.memory import (
    GIB,
    LOGP_CHUNK_TOKENS,
    QWEN25,
    Architecture,
    architecture,
    estimate,
    fit_line,
    lora_param_count,
    param_count,
)
from revmix.sweeps.plan import describe_plan
from revmix.sweeps.spec import SweepError, load_sweep, parse_sweep
from tests.sweeps.helpers import ROOT, sweep_raw

ARCH = Architecture(hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2, vocab=512, tied=False)


def test_logp_chunk_matches_the_objectives_constant() -> None:
    from revmix.objectives.base import LOGP_CHUNK_TOKENS as USED

    assert LOGP_CHUNK_TOKENS == USED


@pytest.mark.parametrize("name", list(QWEN25))
def test_param_count_equals_the_built_model(name: str) -> None:
    a = QWEN25[name]
    config = Qwen2Config(
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        intermediate_size=a.intermediate,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        vocab_size=a.vocab,
        tie_word_embeddings=a.tied,
    )
    with torch.device("meta"):  # shapes only: no memory for 14B parameters
        model = Qwen2ForCausalLM(config)
    built = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert param_count(a) == built


def test_param_count_by_hand() -> None:
    # d = 16, kv = 32: attention 2·64² + 2·64·32 + 64 + 2·32 = 12,416; MLP 3·64·160 = 30,720; norms 128
    per_layer = 12_416 + 30_720 + 128
    assert param_count(ARCH) == 2 * per_layer + 2 * 512 * 64 + 64


def test_lora_param_count_by_hand() -> None:
    # r = 4: q (64+64), k (64+32), v (64+32), o (64+64), gate/up (64+160) each, down (160+64)
    per_layer = 4 * (128 + 96 + 96 + 128 + 224 + 224 + 224)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_param_count(ARCH, 4, targets) == 2 * per_layer
    with pytest.raises(ValueError, match="valid: q_proj"):
        lora_param_count(ARCH, 4, ["qkv"])


def cfg(**stage: object) -> object:
    st = {"name": "s", "steps": 1, "batch_size": 8, "grad_accum": 2, **stage}
    raw = {"data": {"max_length": 100}, "model": {"lora": {"r": 4}}, "stages": [st]}
    return build_config(raw)


def test_estimate_lora_sft_with_checkpointing_by_hand() -> None:
    e = estimate(cfg(), ARCH)  # LoRA on, bf16 weights and activations, checkpointing (auto: on)
    p = param_count(ARCH)
    adapter = lora_param_count(
        ARCH, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tokens = (8 // 2) * 100  # 4 rows per micro-batch, one sequence each
    layer = tokens * (12 * 64 + 4 * 160) * 2
    assert e.tokens == tokens and e.lora and e.checkpointing
    assert e.weights == p * 2 + adapter * 4
    assert e.grads_optimizer == adapter * 12
    assert e.activations == 2 * tokens * 64 * 2 + layer
    assert e.logits == 2 * tokens * 512 * 2 + 2 * LOGP_CHUNK_TOKENS * 512 * 4
    assert e.total == pytest.approx(e.weights + e.grads_optimizer + e.activations + e.logits)


def test_estimate_full_dpo_without_checkpointing_by_hand() -> None:
    c = cfg(lora=False, objective={"name": "dpo"}, reference="copy")
    c = build_config(
        c.model_dump(mode="json"), ["runtime.activation_checkpointing=off", "model.dtype=float32"]
    )
    e = estimate(c, ARCH)
    p = param_count(ARCH)
    tokens = 4 * 2 * 100  # pairs: response and other_response
    assert e.weights == 2 * p * 4  # policy + frozen copy, float32
    assert e.grads_optimizer == p * 3 * 4
    assert e.activations == 2 * tokens * (12 * 64 + 4 * 160) * 2


def test_fit_line_verdicts() -> None:
    c = build_config({"model": {"name_or_path": "Qwen/Qwen2.5-7B-Instruct"}, "stages": [{"steps": 1}]})
    gib = estimate(c, QWEN25["Qwen/Qwen2.5-7B-Instruct"]).total / GIB
    assert " fits H100 80 GiB" in fit_line(c, 80, "H100")
    assert " fits " in fit_line(c, gib / 0.9 * 1.01)  # usable: 90% of the GPU
    assert "does NOT fit" in fit_line(c, gib / 0.9 * 0.99)
    assert "no GPU memory given" in fit_line(c, None)
    unknown = build_config({"model": {"name_or_path": "nobody/unknown-model"}, "stages": [{"steps": 1}]})
    assert "unknown architecture for 'nobody/unknown-model'" in fit_line(unknown, 80)


def test_architecture_reads_a_local_config(tmp_path: Path) -> None:
    Qwen2Config(
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=300,
        tie_word_embeddings=True,
    ).save_pretrained(tmp_path)
    assert architecture(str(tmp_path), "tiny") == Architecture(64, 3, 96, 4, 1, 300, True)
    assert architecture(None, "tiny") == Architecture(128, 4, 512, 4, 2, 512, True)  # models.SCALES["tiny"]


def test_dry_run_prints_each_point_against_its_gpu() -> None:
    text = describe_plan(load_sweep(ROOT / "configs" / "sweeps" / "paper_scales.yaml"))
    points = [line for line in text.splitlines() if line.strip().startswith("memory:")]
    assert len(points) == 9
    assert "A100-80G 80 GiB" in points[0] and "H100 80 GiB" in points[1] and "H200 141 GiB" in points[2]
    assert all(" fits " in line for line in points)


def test_per_point_when_must_name_a_swept_path() -> None:
    base = {"stages": [{"steps": 1}]}
    raw = sweep_raw(resources={"per_point": [{"when": {"model.name": "x"}, "gpu_memory_gb": 24}]})
    with pytest.raises(
        SweepError, match=r"resources.per_point.0.when: 'model.name' is not swept; swept: stages"
    ):
        parse_sweep(raw, "s.yaml", base_raw=base)
