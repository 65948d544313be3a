"""The contract every registered objective must pass (DESIGN §5).

Finite loss; gradients reach trainable parameters only; masked (prompt / padding) tokens get zero
gradient; per-direction metrics present. Objectives that need a reference get a frozen copy.
"""

from __future__ import annotations

import copy

import pytest
import torch

from revmix.objectives.base import build_objective, objective_class, objective_names, policy_logits
from tests.objectives.helpers import make_batch, tiny_lm


class FrozenCopy:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, input_ids, attention_mask):
        return policy_logits(self.model, input_ids, attention_mask)


def _setup(name: str):
    cls = objective_class(name)
    model = tiny_lm()
    # Freeze the embeddings: gradient must not reach a frozen parameter.
    model.get_input_embeddings().weight.requires_grad_(False)
    ref = FrozenCopy(tiny_lm(seed=1)) if cls.needs_reference else None
    batch = make_batch(with_other=True)
    return build_objective({"name": name}), model, batch, ref


def _run(objective, model, batch, ref):
    out = objective(model, batch, ref)
    if not out.grads_applied:
        out.loss.backward()
    return out


@pytest.mark.parametrize("name", objective_names())
def test_finite_loss_and_direction_metrics(name):
    objective, model, batch, ref = _setup(name)
    out = _run(objective, model, batch, ref)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert any(k.endswith("/forward") for k in out.metrics), out.metrics
    assert any(k.endswith("/reverse") for k in out.metrics), out.metrics
    assert all(isinstance(v, float) for v in out.metrics.values())


@pytest.mark.parametrize("name", objective_names())
def test_gradients_reach_trainable_params_only(name):
    objective, model, batch, ref = _setup(name)
    _run(objective, model, batch, ref)
    assert model.get_input_embeddings().weight.grad is None
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("name", objective_names())
def test_masked_tokens_get_zero_gradient(name):
    """Changing padding tokens (masked in attention and labels) must not change the loss."""
    objective, model, batch, ref = _setup(name)
    base = objective(model, batch, ref).loss.detach()
    altered = copy.deepcopy(batch)
    for ids, mask in ((altered.input_ids, altered.attention_mask),) + (
        ((altered.other_input_ids, altered.other_attention_mask),)
        if altered.other_input_ids is not None
        else ()
    ):
        ids[mask == 0] = 7
    again = objective(model, altered, ref).loss.detach()
    assert torch.allclose(base, again, atol=1e-5)
    # Gradient w.r.t. the one-hot of a padded position is zero: check via embedding gradient.
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    model.zero_grad()
    out = objective(model, batch, ref)
    if not out.grads_applied:
        out.loss.backward()
    pad_only = set(batch.input_ids[batch.attention_mask == 0].tolist()) - set(
        batch.input_ids[batch.attention_mask == 1].tolist()
    )
    if batch.other_input_ids is not None:
        pad_only -= set(batch.other_input_ids[batch.other_attention_mask == 1].tolist())
    for tok in pad_only:
        assert torch.all(emb.grad[tok] == 0)
