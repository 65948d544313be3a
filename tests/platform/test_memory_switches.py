"""Memory switches of the recipe's model setup, on CPU without Ray: activation checkpointing (same loss and
gradients as without, full fine-tuning and LoRA), the attention kernel choice, and the shared-prompt
decision it drives."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from revmix.config import build_config
from revmix.objectives.base import build_objective
from revmix.platform import models as M
from revmix.platform.data import synthetic
from revmix.platform.data.tokenize import collate, tokenise_rows
from revmix.platform.recipe import _build_policy, policy_forward


@pytest.fixture(scope="module")
def tiny() -> tuple[str, object]:
    path = M.resolve_model_path(None, "tiny")
    return path, M.load_tokenizer(path)


def _sft_step(path: str, tok: object, lora: bool, checkpointing: str) -> tuple[float, dict, int]:
    """One SFT forward + backward: (loss, trainable gradients, calls into the first decoder layer's MLP —
    inside the checkpointed forward, so recomputation in backward enters it again; a pre-hook, because
    the recomputation stops, mid-MLP, once it has what backward needs)."""
    model = M.load_model(path)
    assert M.apply_activation_checkpointing(model, checkpointing, "cpu") == (checkpointing == "on")
    if lora:
        torch.manual_seed(0)  # the same random A in both runs
        model = M.apply_lora(model, M.LoraSpec(r=4, alpha=8))
    model.train()
    rows, _ = tokenise_rows(synthetic.generate("affine_mod", 4, seed=0), tok, 256)
    batch = collate(rows, tok.pad_token_id, with_other=False)
    layer = next(m for m in model.modules() if type(m).__name__ == "Qwen2DecoderLayer").mlp
    calls = []
    handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = build_objective({"name": "sft"})(model, batch)
        out.loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss.detach()), grads, len(calls)


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_on_gives_the_same_loss_and_gradients_as_off(tiny, lora):
    path, tok = tiny
    loss_off, grads_off, calls_off = _sft_step(path, tok, lora, "off")
    loss_on, grads_on, calls_on = _sft_step(path, tok, lora, "on")
    assert (calls_off, calls_on) == (1, 2)  # on: each layer runs again in backward (recomputed)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 0
    assert any(float(g.abs().max()) > 0 for g in grads_off.values())
    for name, g in grads_off.items():  # LoRA's A gets exactly 0 at the start (B is initialised to 0)
        scale = float(g.abs().max())
        assert float((grads_on[name] - g).abs().max()) <= 1e-5 * scale, name


def test_checkpointing_auto_is_on_for_gpu_only_and_bad_values_list_the_choices(tiny):
    model = M.load_model(tiny[0])
    assert M.apply_activation_checkpointing(model, "auto", "cpu") is False
    assert not model.is_activation_checkpointing
    assert M.apply_activation_checkpointing(model, "auto", "cuda") is True  # only sets the flag
    assert model.is_activation_checkpointing
    with pytest.raises(ValueError, match="unknown activation_checkpointing 'yes'; valid: auto, on, off"):
        M.apply_activation_checkpointing(model, "yes", "cpu")


def test_attention_choice(monkeypatch):
    assert M.choose_attn_implementation("auto", "cpu")[0] == "sdpa"
    assert M.choose_attn_implementation("eager", "cuda") == ("eager", "set by model.attn_implementation")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` raise ImportError
    choice, why = M.choose_attn_implementation("auto", "cuda")
    assert choice == "sdpa" and "flash_attn does not import (ModuleNotFoundError" in why
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert M.choose_attn_implementation("auto", "cuda")[0] == "flash_attention_2"
    with pytest.raises(ValueError, match="valid: auto, sdpa, eager, flash_attention_2, flex_attention"):
        M.choose_attn_implementation("flash", "cpu")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_load_model_passes_the_attention_kernel(tiny, attn):
    assert M.load_model(tiny[0], attn_implementation=attn).config._attn_implementation == attn


def test_shared_prompt_only_with_a_mask_aware_kernel(tiny):
    """flash_attention_2 ignores a 4-D mask: the loop then asks DPO for concatenated pairs."""
    model = M.apply_lora(M.load_model(tiny[0], attn_implementation="sdpa"), M.LoraSpec())
    assert policy_forward(model, length_groups=2, world=1).shared_prompt is True
    assert policy_forward(model, length_groups=2, world=1).length_groups == 2
    assert policy_forward(model, length_groups=2, world=2).length_groups == 1  # DDP: one forward call
    model.config._attn_implementation = "flash_attention_2"
    assert policy_forward(model, length_groups=2, world=1).shared_prompt is False


def test_recipe_policy_setup_applies_both_switches_and_logs_one_line(tiny, capsys):
    cfg = build_config(
        {"stages": [{"steps": 1}]},
        ["runtime.activation_checkpointing=on", "model.attn_implementation=eager"],
    )
    model, _ = _build_policy(cfg, tiny[0], torch.device("cpu"), lora=True, log=True)
    assert model.config._attn_implementation == "eager" and model.is_activation_checkpointing
    assert capsys.readouterr().out.splitlines() == [
        "attention: eager (set by model.attn_implementation); activation checkpointing: on"
    ]
    off = build_config({"stages": [{"steps": 1}], "runtime": {"activation_checkpointing": False}})
    assert off.runtime.activation_checkpointing == "off"  # YAML's bare `off` is a boolean
    default = build_config({"stages": [{"steps": 1}]})
    model, _ = _build_policy(default, tiny[0], torch.device("cpu"), lora=False, log=True)
    assert model.config._attn_implementation == "sdpa" and not model.is_activation_checkpointing
    assert "attention: sdpa (auto: not on a CUDA device" in capsys.readouterr().out


def test_length_groups_reach_sdpa_without_a_mask_and_checkpointing_recomputes_each_layer(tiny, monkeypatch):
    """What attention costs in memory on CPU: a row trimmed to its own length (one row per length group
    here) reaches sdpa with no mask (``is_causal``: O(T) flash kernel, GQA inside it); a padded batch
    brings a 4-D boolean mask, with which torch's CPU sdpa still picks its flash kernel (no [B, H, T, T]
    scores). With checkpointing each layer's attention runs again, with gradients, in backward."""
    from revmix.objectives.buckets import LengthBucketedLM

    calls: list[tuple[tuple[int, ...] | None, bool, str, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        backend = torch._fused_sdp_choice(
            q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
        kernel = {int(torch.nn.attention.SDPBackend.FLASH_ATTENTION): "flash"}.get(int(backend), str(backend))
        mask = None if attn_mask is None else tuple(attn_mask.shape)
        calls.append((mask, is_causal, kernel, torch.is_grad_enabled()))
        return sdpa(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    model = M.load_model(tiny[0], attn_implementation="sdpa")
    M.apply_activation_checkpointing(model, "on", "cpu")
    model = M.apply_lora(model, M.LoraSpec(r=4, alpha=8)).train()
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 100, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 9:] = 0
    LengthBucketedLM(model, 2)(ids, mask).logits.sum().backward()
    # Two groups of one unpadded row: every call maskless and causal, forward and recomputation.
    assert calls == [(None, True, "flash", True)] * (4 * layers)
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # one padded pass: a boolean mask, still flash
    assert calls == [((2, 1, 24, 24), False, "flash", False)] * layers
