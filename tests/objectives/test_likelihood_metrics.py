"""The likelihood metrics every preference objective (and unlikelihood) logs — token-mean log-probs of y+
and y− and the next-token entropy on their positions — checked against values computed by hand on a
policy whose logits at a position depend only on the token there (a bigram table)."""

from __future__ import annotations

import math

import pytest
import torch

from revmix.objectives.base import Batch, PolicyForward, build_objective, target_logps_and_entropy
from revmix.objectives.fixtures import pack

LN2, LN3 = math.log(2), math.log(3)
# Next-token logits after each token (vocabulary 3):
#   after 0: [0, 0, 0]          p = (1/3, 1/3, 1/3)   H0 = ln 3
#   after 1: [0, 0, ln 2]       p = (1/4, 1/4, 1/2)   H1 = 2·(1/4)·ln 4 + (1/2)·ln 2 = 1.5 ln 2
#   after 2: [0, ln 3, 0]       p = (1/5, 3/5, 1/5)   H2 = (2/5) ln 5 + (3/5) ln(5/3)
TABLE = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, LN2], [0.0, LN3, 0.0]])
H0, H1 = LN3, 1.5 * LN2
H2 = 0.4 * math.log(5) + 0.6 * math.log(5 / 3)


class Bigram(torch.nn.Module):
    """logits[b, t] = TABLE[input_ids[b, t]]: whatever the mask or positions, so sums are hand-computable."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(TABLE.clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        return self.table[input_ids]


def test_entropy_and_logp_of_a_tiny_logits_tensor():
    logits = TABLE[None].clone().requires_grad_()  # rows = the three distributions above
    logp, entropy = target_logps_and_entropy(logits, torch.tensor([[2, 0, 1]]))
    assert logp[0].tolist() == pytest.approx([math.log(1 / 3), math.log(1 / 4), math.log(3 / 5)])
    assert entropy[0].tolist() == pytest.approx([H0, H1, H2])
    logp.sum().backward()  # the entropy (a metric) adds no gradient: onehot − p per row
    assert logits.grad[0, 1].tolist() == pytest.approx([1 - 0.25, -0.25, -0.5])


def _batch(shared_prompt: bool) -> Batch:
    """Row 0 (forward): prompt [1], y+ [2, 0], y− [0, 0]; row 1 (reverse): prompt [1], y+ [1], y− [2, 2, 2]."""
    prompts = [[1], [1]]
    ids, mask, labels = pack(prompts, [[2, 0], [1]])
    o_ids, o_mask, o_labels = pack(prompts, [[0, 0], [2, 2, 2]])
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        direction=torch.tensor([0, 1]),
        other_input_ids=o_ids,
        other_attention_mask=o_mask,
        other_labels=o_labels,
        ref_chosen_logps=torch.zeros(2),
        ref_rejected_logps=torch.zeros(2),
        policy_forward=PolicyForward(shared_prompt=shared_prompt),
    )


# Per token (predicted from the token before it): y+ of row 0 is 2 after 1 (log 1/2, H1) and 0 after 2
# (log 1/5, H2); y− of row 0 is 0 after 1 (log 1/4, H1) and 0 after 0 (log 1/3, H0); y+ of row 1 is 1 after
# 1 (log 1/4, H1); y− of row 1 is 2 after 1 (log 1/2, H1), then 2 after 2 twice (log 1/5, H2).
EXPECTED = {
    "logps/chosen_per_token/forward": (math.log(1 / 2) + math.log(1 / 5)) / 2,
    "logps/chosen_per_token/reverse": math.log(1 / 4),
    "logps/chosen_per_token": (math.log(1 / 2) + math.log(1 / 5) + math.log(1 / 4)) / 3,
    "logps/rejected_per_token/forward": (math.log(1 / 4) + math.log(1 / 3)) / 2,
    "logps/rejected_per_token/reverse": (math.log(1 / 2) + 2 * math.log(1 / 5)) / 3,
    "entropy/chosen/forward": (H1 + H2) / 2,
    "entropy/chosen/reverse": H1,
    "entropy/chosen": (H1 + H2 + H1) / 3,  # a token mean over the micro-batch, not a mean of rows
    "entropy/rejected/forward": (H1 + H0) / 2,
    "entropy/rejected/reverse": (H1 + 2 * H2) / 3,
    "logps/chosen/forward": math.log(1 / 2) + math.log(1 / 5),  # the sums, as before
}


@pytest.mark.parametrize("shared_prompt", [True, False])
@pytest.mark.parametrize("name", ["dpo", "complementary_dpo", "simpo", "cpo", "orpo", "unlikelihood"])
def test_metrics_hand_computed(name, shared_prompt):
    out = build_objective({"name": name})(Bigram(), _batch(shared_prompt), None)
    for key, value in EXPECTED.items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-6), key


def test_entropy_switch_off_leaves_the_loss_and_gradients_alone():
    policy, batch = Bigram(), _batch(True)
    on = build_objective({"name": "dpo"})(policy, batch, None)
    on.loss.backward()
    grad_on = policy.table.grad.clone()
    policy.zero_grad()
    off = build_objective({"name": "dpo", "entropy_metrics": False})(policy, batch, None)
    off.loss.backward()
    assert float(on.loss.detach()) == float(off.loss.detach())
    assert torch.equal(grad_on, policy.table.grad)
    assert "entropy/chosen" not in off.metrics and "logps/chosen_per_token" in off.metrics
