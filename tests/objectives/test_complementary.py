"""Complementary DPO: the pure loss and its gradients by hand, its limits (DPO, no push below the
reference), the objective against DPO + RPO and against a float64 recomputation, and what training does."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from revmix.objectives.base import build_objective
from revmix.objectives.complementary import complementary_dpo_loss
from revmix.objectives.dpo import dpo_loss
from revmix.objectives.fixtures import FrozenCopy
from revmix.validation import ConfigError
from tests.objectives.helpers import (
    _complementary_dpo_value,
    make_batch,
    responses,
    row_token_logps,
    tiny_lm,
    train_steps,
)

# Rows: (policy chosen, policy rejected, ref chosen, ref rejected, |y−|) -> u+ = pc − rc, u− = pr − rr
PC = torch.tensor([-2.0, -2.0, -6.0])
PR = torch.tensor([-5.0, -10.0, -3.0])
RC = torch.tensor([-3.0, -3.0, -4.0])
RR = torch.tensor([-4.0, -4.0, -4.0])
N_REJECTED = torch.tensor([4, 4, 2])
# u+ = 1, 1, −2; u− = −1, −6, +1; at δ = 0.5 the floors −δ|y−| are −2, −2, −1.


def test_loss_hand_computed():
    losses, floored = complementary_dpo_loss(PC, PR, RC, RR, N_REJECTED, beta=1.0, rejected_floor=0.5)
    # row 0: u− = −1 above its floor −2: z = β(1 − (−1)) = 2, log(1 + e^−2) = 0.1269280
    # row 1: u− = −6 below its floor −2, so it counts as −2: z = 1 − (−2) = 3, log(1 + e^−3) = 0.0485874
    # row 2: u− = +1 above its floor −1: z = −2 − 1 = −3, log(1 + e^3) = 3.0485874
    assert losses.tolist() == pytest.approx([0.1269280, 0.0485874, 3.0485874], rel=1e-6)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-z)) for z in (2, 3, -3)], rel=1e-6)
    assert floored.tolist() == [False, True, False]


def test_gradients_hand_computed():
    """∂ℓ/∂log π(y+) = −βs and ∂ℓ/∂log π(y−) = βs above the floor, 0 at or below it; s = σ(−z)."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, _ = complementary_dpo_loss(pc, pr, RC, RR, N_REJECTED, beta=1.0, rejected_floor=0.5)
    losses.sum().backward()
    # s = σ(−2) = 0.1192029, σ(−3) = 0.0474259, σ(3) = 0.9525741
    assert pc.grad.tolist() == pytest.approx([-0.1192029, -0.0474259, -0.9525741], rel=1e-5)
    assert pr.grad.tolist() == pytest.approx([0.1192029, 0.0, 0.9525741], rel=1e-5)
    # Exactly at the floor (u− = −2 = −0.5·4) y− gets no push either: where(), not a half-shared maximum.
    at = torch.tensor([-6.0], requires_grad=True)
    loss, floored = complementary_dpo_loss(PC[:1], at, RC[:1], RR[:1], N_REJECTED[:1], 1.0, 0.5)
    loss.sum().backward()
    assert floored.tolist() == [True] and at.grad.tolist() == [0.0]


def test_limits():
    """δ → ∞ is DPO's sigmoid loss; δ = 0 never pushes y− below the reference."""
    far, floored = complementary_dpo_loss(PC, PR, RC, RR, N_REJECTED, beta=0.5, rejected_floor=1e9)
    assert not floored.any()
    assert far.tolist() == pytest.approx(dpo_loss(PC, PR, RC, RR, beta=0.5)[0].tolist(), rel=1e-6)
    zero, floored = complementary_dpo_loss(PC, PR, RC, RR, N_REJECTED, beta=1.0, rejected_floor=0.0)
    # rows 0 and 1: u− < 0 counts as 0, z = 1: log(1 + e^−1) = 0.3132617; row 2 as before (u− = +1 > 0)
    assert zero.tolist() == pytest.approx([0.3132617, 0.3132617, 3.0485874], rel=1e-6)
    assert floored.tolist() == [True, True, False]


def test_bad_hyperparameters_are_loud():
    with pytest.raises(ConfigError, match="complementary_dpo.beta: expected a number > 0, got 0.0"):
        complementary_dpo_loss(PC, PR, RC, RR, N_REJECTED, beta=0.0, rejected_floor=0.5)
    with pytest.raises(ConfigError, match="objective.rejected_floor: expected a number >= 0"):
        build_objective({"name": "complementary_dpo", "rejected_floor": -1.0})
    with pytest.raises(ConfigError, match="objective.sft_wieght: unknown key .*did you mean 'sft_weight'"):
        build_objective({"name": "complementary_dpo", "sft_wieght": 1.0})


def test_defaults_and_contract_attributes():
    objective = build_objective({"name": "complementary_dpo"})
    assert (objective.beta, objective.rejected_floor, objective.sft_weight) == (0.1, 0.5, 1.0)
    assert objective.needs_reference and not objective.needs_rollouts
    assert objective.requires == frozenset({"response", "other_response"})


# --------------------------------------------------------------------------------------------------
# The objective on a model
# --------------------------------------------------------------------------------------------------


def _rejected_logratios(policy, ref_model, batch) -> list[float]:
    """Summed log π(y−) − log π_ref(y−) per row, float64, unpadded."""
    return [
        sum(row_token_logps(policy, p, y)) - sum(row_token_logps(ref_model, p, y))
        for p, y in zip(batch.prompt_ids, responses(batch.other_labels))
    ]


def test_matches_float64_recomputation_on_both_sides_of_the_floor():
    """A floor between the rows' per-token log-ratios of y−, so some rows are floored and some not."""
    model, ref_model, batch = tiny_lm(), tiny_lm(seed=1), make_batch()
    per_token = sorted(
        u / len(y)
        for u, y in zip(_rejected_logratios(model, ref_model, batch), responses(batch.other_labels))
    )
    floor = -(per_token[1] + per_token[2]) / 2  # two rows below −δ|y−|, two above
    objective = build_objective({"name": "complementary_dpo", "beta": 0.5, "rejected_floor": floor})
    out = objective(model, batch, FrozenCopy(ref_model))
    assert out.metrics["floored"] == pytest.approx(0.5)
    expected = _complementary_dpo_value(model, batch, ref_model, beta=0.5, floor=floor)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_equals_dpo_with_rpo_anchor_when_the_floor_is_out_of_reach():
    """δ → ∞ with anchor α is DPO with RPO's NLL term α: the same loss and metrics."""
    model, batch, ref = tiny_lm(), make_batch(), FrozenCopy(tiny_lm(seed=1))
    ours = build_objective({"name": "complementary_dpo", "rejected_floor": 1e9, "sft_weight": 0.3})
    dpo = build_objective({"name": "dpo", "rpo_alpha": 0.3})
    a, b = ours(copy.deepcopy(model), batch, ref), dpo(copy.deepcopy(model), batch, ref)
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-6)
    assert a.metrics["floored"] == 0.0
    # differences (margins) of float32 sums carry round-off of the summands' size, not their own
    scale = max(1.0, *(abs(v) for v in b.metrics.values()))
    for key, value in b.metrics.items():
        assert a.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6 * scale), key


def test_training_bounds_the_fall_of_y_minus_and_keeps_y_plus_up():
    """Ten AdamW steps on one batch from the reference (every log-ratio starts at 0), β = 0.5. DPO drives y−
    about 2 nats/token below the reference (measured: −1.30 to −2.01 per row); the floor alone (δ = 0.5,
    no anchor) removes the push on y− once there, so it ends near the floor (measured −0.71 to −0.98: Adam's
    momentum and the parameters y− shares with y+ carry it past); the anchor then keeps y+ far more likely
    (summed log π(y+) −29.6 against DPO's −56.8 and −50.5 without the anchor)."""
    batch, ref_model = make_batch(), tiny_lm(seed=0)
    ref = FrozenCopy(ref_model)
    n_rejected = [len(y) for y in responses(batch.other_labels)]
    specs = {
        "dpo": {"name": "dpo", "beta": 0.5},
        "floor": {"name": "complementary_dpo", "beta": 0.5, "rejected_floor": 0.5, "sft_weight": 0.0},
        "floor+anchor": {"name": "complementary_dpo", "beta": 0.5, "rejected_floor": 0.5},
    }
    lowest, chosen = {}, {}
    for name, spec in specs.items():
        policy = tiny_lm(seed=0)
        train_steps(build_objective(spec), policy, batch, ref, steps=10, lr=1e-2)
        lowest[name] = min(u / n for u, n in zip(_rejected_logratios(policy, ref_model, batch), n_rejected))
        chosen[name] = sum(
            sum(row_token_logps(policy, p, y)) for p, y in zip(batch.prompt_ids, responses(batch.labels))
        )
    assert lowest["dpo"] < -1.5 and lowest["floor"] > lowest["dpo"] + 0.5
    assert chosen["floor+anchor"] > chosen["floor"] + 10 > chosen["dpo"] + 10
