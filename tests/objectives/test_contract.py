"""The contract every registered objective must pass: one test per check of
:mod:`revmix.objectives.contract` × registered name (a plug-in runs the same checks with
``revmix objectives check``), plus what only the built-ins have: a default loss equal to an independent
hand computation (``REFERENCE_VALUES`` in helpers.py) and the objective-specific expectations below.
"""

from __future__ import annotations

import copy

import pytest
import torch

from revmix.objectives.base import LossOutput, Objective, PolicyForward, build_objective, objective_names
from revmix.objectives.contract import CHECKS, NotApplicable, fixtures_for
from revmix.objectives.fixtures import FrozenCopy
from tests.objectives.helpers import REFERENCE_VALUES, make_batch, tiny_lm


@pytest.mark.parametrize("name", objective_names())
@pytest.mark.parametrize("check", list(CHECKS))
def test_contract(check, name):
    try:
        CHECKS[check](build_objective({"name": name}))
    except NotApplicable as e:
        pytest.skip(f"{name}: {e}")


@pytest.mark.parametrize("name", objective_names())
def test_matches_hand_computed_value(name):
    """The default loss equals an independent per-row, unpadded, float64 recomputation (helpers.py)."""
    if name not in REFERENCE_VALUES:
        pytest.skip(
            f"no hand-computed value for {name!r}: add one to REFERENCE_VALUES in tests/objectives/helpers.py"
        )
    objective = build_objective({"name": name})
    model, batch, ref = fixtures_for(objective)
    got = float(objective(model, batch, ref).loss.detach())
    expected = REFERENCE_VALUES[name](model, batch, ref.model if isinstance(ref, FrozenCopy) else None)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_optional_hooks_default_to_no_ops():
    """The base's ``prepare_policy`` adds nothing and its ``release_policy`` releases nothing."""
    model = tiny_lm()
    names = [n for n, _ in model.named_parameters()]
    objective = build_objective({"name": objective_names()[0]})
    assert Objective.prepare_policy(objective, model) == []
    assert Objective.release_policy(objective, model) is None
    assert [n for n, _ in model.named_parameters()] == names


def test_ppo_trains_a_value_head():
    """The default critic baseline adds the value head's parameters to the policy (and the round trip
    check above takes them out again)."""
    model = tiny_lm()
    created = build_objective({"name": "ppo"}).prepare_policy(model)
    assert created and all(p.requires_grad for p in created)


def test_dpo_takes_the_shared_prompt_path():
    """DPO packs each pair behind one copy of the prompt when the loop and the reference allow it."""
    batch = make_batch()
    batch.policy_forward = PolicyForward(shared_prompt=True)
    shared = FrozenCopy(tiny_lm(seed=1), shared_prompt=True)
    build_objective({"name": "dpo"})(copy.deepcopy(tiny_lm()), batch, shared)
    assert shared.shared_prompt_calls == 1


def test_checks_fail_with_their_message():
    """A check raises AssertionError naming what broke: a loss that reads padding fails the padding check."""

    class ReadsPadding(Objective):
        """Averages the logits over every position, padding included (a bug)."""

        name: str = "reads_padding"

        def __call__(self, policy, batch, ref=None):
            logits = policy(input_ids=batch.input_ids, attention_mask=torch.ones_like(batch.attention_mask))
            loss = logits.logits.float().logsumexp(-1).mean()
            return LossOutput(loss=loss)

    with pytest.raises(AssertionError, match="when only padded tokens changed"):
        CHECKS["masked_tokens_get_zero_gradient"](ReadsPadding())
