"""GPU paths of the training step: bf16 autocast SFT and DPO (adapter-disabled reference) on CUDA.

Runs the same ``supervised_step`` the Ray Train loop runs, without Ray, so it can run on a bare GPU box.
Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from revmix.config import StageConfig
from revmix.objectives.base import build_objective
from revmix.platform.data.synthetic import generate_mix
from revmix.platform.data.tokenize import collate, tokenise_rows
from revmix.platform.step import StepContext, supervised_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _setup(objective: dict, lora: bool, lr: float = 3e-3):
    from revmix.objectives.reference import AdapterDisabledReference
    from revmix.platform.models import LoraSpec, apply_lora, load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(None, "tiny", 0)
    tok = load_tokenizer(path)
    model = load_model(path, dtype="float32", device="cuda")
    if lora:
        model = apply_lora(model, LoraSpec(8, 16, 0.0, ("q_proj", "v_proj", "o_proj")))
    obj = build_objective(objective)
    rows, _ = tokenise_rows(generate_mix(["affine_mod", "arith_chain"], 40, seed=0), tok, 256)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ctx = StepContext(
        policy=model,
        train_model=model,
        ref=AdapterDisabledReference(model) if obj.needs_reference else None,
        objective=obj,
        optimizer=torch.optim.AdamW(trainable, lr=lr),
        trainable=trainable,
        tokenizer=tok,
        device=torch.device("cuda"),
        stage=StageConfig(batch_size=16, steps=1),
        world=1,
        autocast=True,
        micro=16,
        with_other="other_response" in obj.requires,
        seed=0,
    )
    return ctx, rows


def test_sft_bf16_autocast_on_cuda_learns():
    ctx, rows = _setup({"name": "sft"}, lora=False)
    losses = [supervised_step(ctx, rows[(i * 16) % 64 : (i * 16) % 64 + 16], i)[0]["loss"] for i in range(40)]
    print(f"bf16 SFT on CUDA: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.7 * losses[0]


def test_dpo_bf16_matches_fp32_on_cuda():
    ctx, rows = _setup({"name": "dpo", "beta": 0.1}, lora=True)
    with torch.no_grad():
        for name, p in ctx.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = collate(rows[:16], ctx.tokenizer.pad_token_id).to("cuda")
    with torch.no_grad():
        fp32 = ctx.objective(ctx.policy, batch, ctx.ref).loss.item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = ctx.objective(ctx.policy, batch, ctx.ref).loss.item()
    print(f"DPO loss on CUDA: fp32 {fp32:.5f}, bf16 autocast {bf16:.5f}")
    assert abs(fp32 - bf16) < 0.03
    m, n_tokens = supervised_step(ctx, rows[:16], 0)
    assert n_tokens > 0 and m["rewards/accuracy"] >= 0.0 and torch.isfinite(torch.tensor(m["loss"]))
