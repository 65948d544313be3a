"""The contract every registered objective must pass.

Finite loss; gradients reach trainable parameters only; masked (prompt / padding) tokens get zero
gradient; per-direction metrics present; the default loss matches an independent hand computation
(``REFERENCE_VALUES`` in helpers.py); ``requires`` is honest about ``other_response``; the optional
policy hooks add and release only what they say; a reference that takes shared-prompt rows gives the loss
of one that does not. Objectives that need a reference (asked of the *instance*: a multitask objective
derives it from its routes) get a frozen copy.
"""

from __future__ import annotations

import copy

import pytest
import torch

from revmix.objectives.base import (
    Objective,
    PolicyForward,
    Reference,
    build_objective,
    objective_class,
    objective_names,
    policy_logits,
)
from tests.objectives.helpers import REFERENCE_VALUES, make_batch, tiny_lm


class FrozenCopy:
    """A reference written against the ``Reference`` protocol alone (no revmix reference class)."""

    length_groups = 1

    def __init__(self, model: torch.nn.Module, shared_prompt: bool = False) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.shared_prompt = shared_prompt
        self.shared_prompt_calls = 0

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, position_ids=None):
        if position_ids is None:
            return policy_logits(self.model, input_ids, attention_mask)
        self.shared_prompt_calls += 1
        return policy_logits(self.model, input_ids, attention_mask, position_ids=position_ids)


def _setup(name: str, with_other: bool = True):
    objective = build_objective({"name": name})
    # The registry's class attributes exist for every objective; the instance has the final say.
    assert isinstance(objective_class(name).needs_reference, bool)
    model = tiny_lm()
    # Freeze the embeddings: gradient must not reach a frozen parameter.
    model.get_input_embeddings().weight.requires_grad_(False)
    ref = FrozenCopy(tiny_lm(seed=1)) if objective.needs_reference else None
    batch = make_batch(with_other=with_other)
    return objective, model, batch, ref


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


@pytest.mark.parametrize("name", objective_names())
def test_matches_hand_computed_value(name):
    """The default loss equals an independent per-row, unpadded, float64 recomputation (helpers.py)."""
    if name not in REFERENCE_VALUES:
        pytest.skip(
            f"no hand-computed value for {name!r}: add one to REFERENCE_VALUES in tests/objectives/helpers.py"
        )
    objective, model, batch, ref = _setup(name)
    got = float(objective(model, batch, ref).loss.detach())
    expected = REFERENCE_VALUES[name](model, batch, ref.model if ref is not None else None)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", objective_names())
def test_requires_declares_other_response(name):
    """An objective reads y− only if ``requires`` says so, and says so loudly when it is missing."""
    objective, model, batch, ref = _setup(name, with_other=False)
    if "other_response" in objective.requires:
        with pytest.raises(ValueError, match="other_"):
            objective(model, batch, ref)
    else:
        assert torch.isfinite(objective(model, batch, ref).loss)


@pytest.mark.parametrize("name", objective_names())
def test_length_bucketed_forward_changes_nothing(name):
    """The training loop forwards through ``LengthBucketedLM`` (runtime.length_buckets): every objective's
    loss and gradients must be those of the plain model."""
    from revmix.objectives.buckets import LengthBucketedLM

    objective, model, batch, ref = _setup(name)
    if objective.needs_rollouts:
        pytest.skip("the loop never wraps a rollout objective's model (PPO reads its value head)")
    twin = copy.deepcopy(model)
    plain = _run(objective, model, batch, ref)
    bucketed = _run(objective, LengthBucketedLM(twin, 3), batch, ref)
    assert float(bucketed.loss) == pytest.approx(float(plain.loss), rel=1e-5, abs=1e-5)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), n


def test_optional_hooks_default_to_no_ops():
    """The base's ``prepare_policy`` adds nothing and its ``release_policy`` releases nothing."""
    model = tiny_lm()
    names = [n for n, _ in model.named_parameters()]
    objective = build_objective({"name": objective_names()[0]})
    assert Objective.prepare_policy(objective, model) == []
    assert Objective.release_policy(objective, model) is None
    assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.parametrize("name", objective_names())
def test_prepare_and_release_policy_round_trip(name):
    """``prepare_policy`` returns exactly the parameters it added (once: a second call adds none) and
    ``release_policy`` takes them out again, leaving the policy as it was."""
    objective, model, _, _ = _setup(name)
    before = {n: id(p) for n, p in model.named_parameters()}
    created = objective.prepare_policy(model)
    added = [p for n, p in model.named_parameters() if n not in before]
    assert {id(p) for p in created} == {id(p) for p in added}
    assert objective.prepare_policy(model) == []
    released = objective.release_policy(model)
    assert {n: id(p) for n, p in model.named_parameters()} == before
    if created:
        assert released is not None and {id(p) for p in released.parameters()} == {id(p) for p in created}
    else:
        assert released is None
    if name == "ppo":  # the default critic baseline trains a value head next to the policy
        assert created


@pytest.mark.parametrize("name", objective_names())
def test_shared_prompt_reference_gives_the_same_loss(name):
    """With the loop's shared-prompt decision on the batch, a reference that takes shared-prompt rows and
    one that does not give the same loss (objectives read ``Reference.shared_prompt``, never the model)."""
    objective = build_objective({"name": name})
    if not objective.needs_reference:
        pytest.skip(f"{name} needs no reference")
    model, ref_model, batch = tiny_lm(), tiny_lm(seed=1), make_batch()
    batch.policy_forward = PolicyForward(shared_prompt=True)
    shared, concatenated = FrozenCopy(ref_model, shared_prompt=True), FrozenCopy(ref_model)
    assert isinstance(shared, Reference) and isinstance(concatenated, Reference)
    with_shared = objective(copy.deepcopy(model), batch, shared)
    without = objective(copy.deepcopy(model), batch, concatenated)
    assert float(with_shared.loss) == pytest.approx(float(without.loss), rel=1e-5, abs=1e-6)
    assert concatenated.shared_prompt_calls == 0  # never handed rows it did not declare it takes
    if name == "dpo":  # the objective that packs pairs behind one prompt takes the shared path
        assert shared.shared_prompt_calls == 1


@pytest.mark.parametrize("name", objective_names())
def test_objectives_that_need_rollouts_implement_the_rollout_step_contract(name):
    """``needs_rollouts`` sends an objective to the rollout step, which drives it through
    ``RolloutObjective``; an objective that does not need rollouts does not pretend to implement it."""
    from revmix.platform.rollout.objective import RolloutObjective

    objective = build_objective({"name": name})
    assert isinstance(objective, RolloutObjective) == objective.needs_rollouts
