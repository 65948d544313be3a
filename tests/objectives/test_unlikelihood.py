"""Unlikelihood: hand-computed values on a 4-token vocabulary, the p → 1 clamp, and only_differing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from revmix.objectives.base import build_objective
from revmix.objectives.unlikelihood import differing_mask, unlikelihood_loss
from tests.objectives.helpers import make_batch, tiny_lm

X = -100


def _logits(*rows: list[float]) -> torch.Tensor:
    """[1, T, V] logits whose softmax is exactly the given probability rows (last position unused)."""
    probs = torch.tensor(list(rows) + [[0.25] * 4], dtype=torch.float64)
    return probs.log().unsqueeze(0).float()


# y+ = [2, 1]: p(2) = 0.5 at the first response position, p(1) = 0.25 at the second.
POS_LOGITS = _logits([0.1, 0.2, 0.5, 0.2], [0.25, 0.25, 0.25, 0.25])
POS_LABELS = torch.tensor([[X, 2, 1]])
# y− = [3, 1]: p(3) = 0.2 (differs from y+'s 2), p(1) = 0.6 (shared with y+ at response position 1).
NEG_LOGITS = _logits([0.1, 0.2, 0.5, 0.2], [0.1, 0.6, 0.1, 0.2])
NEG_LABELS = torch.tensor([[X, 3, 1]])
NLL = -(math.log(0.5) + math.log(0.25)) / 2  # 1.0397208


def test_hand_computed_all_negative_tokens():
    t = unlikelihood_loss(POS_LOGITS, POS_LABELS, NEG_LOGITS, NEG_LABELS, alpha=0.5)
    penalty = -(math.log(1 - 0.2) + math.log(1 - 0.6)) / 2  # 0.5697171
    assert t.nll.item() == pytest.approx(NLL, abs=1e-6)
    assert t.nll.item() == pytest.approx(1.0397208, abs=1e-6)
    assert t.penalty.item() == pytest.approx(penalty, abs=1e-6)
    assert t.penalty.item() == pytest.approx(0.5697171, abs=1e-6)
    assert t.loss.item() == pytest.approx(NLL + 0.5 * penalty, abs=1e-6)
    assert int(t.penalised_tokens) == 2


def test_only_differing_masks_the_shared_token():
    t = unlikelihood_loss(POS_LOGITS, POS_LABELS, NEG_LOGITS, NEG_LABELS, alpha=0.5, only_differing=True)
    assert int(t.penalised_tokens) == 1
    assert t.penalty.item() == pytest.approx(-math.log(0.8), abs=1e-6)  # 0.2231436
    assert t.loss.item() == pytest.approx(NLL + 0.5 * 0.2231436, abs=1e-6)


def test_clamp_keeps_p_near_one_finite():
    # p(3) = softmax([0, 0, 0, 60])[3] = 1 - 3e^-60 in float64, exactly 1.0 in float32.
    neg_logits = torch.tensor([[[0.0, 0.0, 0.0, 60.0], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    neg_labels = torch.tensor([[X, 3]])
    pos_logits = torch.zeros(1, 2, 4, requires_grad=True)
    t = unlikelihood_loss(pos_logits, torch.tensor([[X, 0]]), neg_logits, neg_labels, alpha=1.0, eps=1e-6)
    assert torch.isfinite(t.loss)
    assert t.penalty.item() == pytest.approx(-math.log(1e-6), rel=1e-6)  # 13.8155106
    t.loss.backward()
    assert torch.isfinite(neg_logits.grad).all() and torch.isfinite(pos_logits.grad).all()


def test_log_one_minus_p_is_accurate_for_tiny_p():
    # p = softmax([-40, 0, 0, 0])[0] ≈ e^-40 / 3: -log(1 - p) ≈ p, far below float32's 1 - p resolution.
    neg_logits = torch.tensor([[[-40.0, 0.0, 0.0, 0.0], [0.0] * 4]])
    t = unlikelihood_loss(
        torch.zeros(1, 2, 4), torch.tensor([[X, 1]]), neg_logits, torch.tensor([[X, 0]]), 1.0
    )
    p = math.exp(-40) / (math.exp(-40) + 3)
    assert t.penalty.item() == pytest.approx(p, rel=1e-4)


def test_response_position_alignment_ignores_prompt_length_and_padding():
    # y+ (prompt of 2) = [5, 6, 7]; y− (prompt of 4, right padding) = [5, 9, 7, 8].
    pos = torch.tensor([[X, X, 5, 6, 7, X, X, X, X]])
    neg = torch.tensor([[X, X, X, X, 5, 9, 7, 8, X]])
    mask = differing_mask(pos, neg)
    # Shifted targets of y− sit at t = 3..6; 5 and 7 are shared (positions 0 and 2), 9 differs, and 8 lies
    # beyond y+'s length, so it is always penalised.
    assert mask.tolist() == [[False, False, False, False, True, False, True, False]]


def test_objective_on_identical_twins_is_sft():
    """With y− == y+ every y− token is shared: no penalty, and the loss is plain SFT."""
    model, batch = tiny_lm(), make_batch()
    twin = copy.copy(batch)
    twin.other_input_ids, twin.other_attention_mask, twin.other_labels = (
        batch.input_ids.clone(),
        batch.attention_mask.clone(),
        batch.labels.clone(),
    )
    ul = build_objective({"name": "unlikelihood", "alpha": 3.0})(model, twin, None)
    sft = build_objective({"name": "sft"})(model, batch, None)
    assert ul.metrics["penalised_tokens"] == 0.0
    assert float(ul.loss.detach()) == pytest.approx(float(sft.loss.detach()), rel=1e-5, abs=1e-6)
    full = build_objective({"name": "unlikelihood", "only_differing": False})(model, twin, None)
    assert full.metrics["penalised_tokens"] == float(batch.labels.ne(X).sum())


def test_bad_alpha_is_loud():
    with pytest.raises(ValueError, match="objective.alpha: expected a number >= 0, got -1.0"):
        build_objective({"name": "unlikelihood", "alpha": -1.0})


def test_training_lowers_y_minus_probability():
    model, batch = tiny_lm(), make_batch(seed=7)
    objective = build_objective({"name": "unlikelihood", "alpha": 1.0})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    history = []
    for _ in range(10):
        out = objective(model, batch, None)
        history.append(out.metrics)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    # −log(1 − p) falls as p(y−) falls; the NLL on y+ falls too.
    assert history[-1]["unlikelihood"] < 0.5 * history[0]["unlikelihood"]
    assert history[-1]["nll"] < history[0]["nll"]
    assert {"nll/forward", "nll/reverse", "unlikelihood/forward", "unlikelihood/reverse"} <= set(history[0])
