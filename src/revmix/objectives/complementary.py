r"""Complementary DPO: a preference loss for pairs whose rejected response is a *complementary* path, not
a wrong one.

Why DPO needs changing here
---------------------------
In the paper's pairs ("When Inverse Data Outperforms", arXiv 2509.13079, §4) prompt x_f prefers its own
solution y_f over its twin's y_r, and x_r the reverse. The rejected y− is not an error: it is the correct
solution of the twin question and states the same facts and operations as y+ in the other order. The paper
asks how DPO should change when forward and reverse paths are complementary rather than strict negatives.
DPO's gradient (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) lowers log π(y−|x) for as long as the pair is
not separated by much more than 1/β, with no bound on how far y− falls; and since y+ and y− share most of
their tokens, lowering y− drags y+ down with it — *likelihood displacement*, which grows with the similarity
of chosen and rejected (Razin et al. 2024, arXiv 2410.08847; Pal et al. 2024, arXiv 2402.13228, §3, for
pairs a few tokens apart). Twins are as similar as pairs get.

The loss
--------
With summed response log-probs, the log-ratios :math:`u_+ = \log\pi_\theta(y^+|x) - \log\pi_{ref}(y^+|x)`,
:math:`u_- = \log\pi_\theta(y^-|x) - \log\pi_{ref}(y^-|x)` and the per-token floor δ (``rejected_floor``):

.. math::  \tilde u_- = \max\big(u_-,\; -δ\,|y^-|\big), \qquad
           \ell = -\log\sigma\big(β(u_+ - \tilde u_-)\big) + α\,\mathrm{NLL}(y^+)

averaged over the pairs, with NLL(y+) the token mean over the micro-batch's y+ tokens
(:func:`revmix.objectives.preference.chosen_nll`, RPO's anchor, Pang et al. 2024, arXiv 2404.19733) and
α = ``sft_weight``. Per pair, with :math:`s = σ(-β(u_+ - \tilde u_-))`:

.. math::  \frac{\partial\ell}{\partial\log\pi(y^+)} = -βs, \qquad
           \frac{\partial\ell}{\partial\log\pi(y^-)} = \begin{cases} βs & u_- > -δ|y^-| \\
           0 & \text{otherwise} \end{cases}

for the preference term (divided by B, the mean), and the anchor adds :math:`-α/\sum_b|y^+_b|` to the
derivative by each y+ token's log-prob.

Two changes to DPO, one per failure:

* **The floor** bounds the suppression of y−: it is pushed down until its mean per-token log-prob is δ nats
  below the reference's (its per-token probability e^{−δ} times the reference's; 0.61 at the default 0.5)
  and no further — enough to rank y+ above it for x, not enough to unlearn a valid path. Past the floor the
  preference term keeps raising y+ only. δ = 0 never pushes y− below the reference; δ → ∞ is DPO. The
  floor removes the loss's own push on y−, not the pull of the parameters y− shares with y+: raising y+
  (and the anchor, whose softmax lowers every token it does not raise) can still carry y− past the floor.
  Measured on the test fixture (tests/objectives/test_complementary.py, ten AdamW steps from the
  reference, β 0.5): DPO ends with y− 1.3 to 2.0 nats/token below the reference, the floor alone at 0.7
  to 1.0, and with the anchor y+'s summed log-prob is −29.6 against DPO's −56.8.
* **The anchor** keeps y+'s own likelihood from falling while the margin grows (the paper's third
  mechanism): NLL(y+) pulls it up whatever y− does.

With δ → ∞ and α = 0 the loss is DPO's ``sigmoid`` exactly (a test checks it).

Why this variant and not the others the paper's question suggests: DPO restricted to "the tokens where y+
and y− differ" is already what DPO computes for their common prefix — behind one prompt those tokens have
the same context, so their log-probs cancel in u_+ − u_- — and past the first difference the "same" token
sits in a different context, so restricting further needs an alignment the data does not define. A
margin cap (stop once u_+ − u_- ≥ m) bounds the margin but not which side moves: the margin may still be
reached by lowering y− alone. A per-direction β rescales the push without bounding it. The floor bounds
exactly the quantity that makes a complementary path a poor negative — how far y− falls.

Length: the floor scales with |y−| so that δ means the same for every response length; the loss itself
uses summed log-probs (DPO's Eq. 7). Reference log-probs come from the batch cache or the reference, as for
``dpo`` (:func:`~revmix.objectives.preference.reference_pair_logps`), so every reference mode works.

Metrics: every preference objective's (:mod:`revmix.objectives.preference`; ``loss`` includes the anchor),
DPO's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy`` (β·u on summed
log-probs, unfloored), and ``floored`` — the fraction of pairs whose y− is at the floor (no push on it) —
each overall and per direction.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from revmix.objectives.base import Batch, LossOutput, Reference, per_direction, register_objective
from revmix.objectives.preference import (
    PairedObjective,
    preference_output,
    reference_pair_logps,
    reward_metrics,
)
from revmix.validation import validate


def complementary_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    n_rejected: Tensor,
    beta: float,
    rejected_floor: float,
) -> tuple[Tensor, Tensor]:
    """Per-pair preference losses −log σ(β(u+ − max(u−, −δ|y−|))) and whether y− is at the floor, ``[B]``
    each (module docstring; the NLL anchor is added by the caller).

    Args:
        policy_chosen_logps: ``[B]`` summed log π_θ(y+|x).
        policy_rejected_logps: ``[B]`` summed log π_θ(y−|x).
        ref_chosen_logps: ``[B]`` summed log π_ref(y+|x).
        ref_rejected_logps: ``[B]`` summed log π_ref(y−|x).
        n_rejected: ``[B]`` response-token counts |y−|.
        beta: β > 0, the strength of the implicit KL to the reference.
        rejected_floor: δ ≥ 0, how many nats per token y− may fall below the reference.
    """
    validate(ComplementaryDPO, {"beta": beta, "rejected_floor": rejected_floor}, "complementary_dpo")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    floor = -rejected_floor * n_rejected.to(rejected_logratios.dtype)
    floored = rejected_logratios <= floor
    # where(), not maximum(): at the floor itself the gradient on y− is 0, not shared half and half.
    bounded = torch.where(floored, floor, rejected_logratios)
    return -F.logsigmoid(beta * (chosen_logratios - bounded)), floored


@register_objective
class ComplementaryDPO(PairedObjective):
    """DPO for complementary pairs: a floor on how far y− falls below the reference, an NLL anchor on y+."""

    name: Literal["complementary_dpo"] = "complementary_dpo"
    beta: float = Field(0.1, gt=0.0, description="strength of the implicit KL to the reference (DPO's beta)")
    rejected_floor: float = Field(
        0.5,
        ge=0.0,
        description="nats per token y- may fall below the reference before the loss stops pushing it (0.5: "
        "its per-token probability keeps >= 0.61 of the reference's)",
    )
    sft_weight: float = Field(
        1.0, ge=0.0, description="weight of the NLL anchor on y+ (keeps its likelihood up; 0: none)"
    )

    needs_reference: ClassVar[bool] = True

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        pair = self.policy_logps(policy, batch)
        ref_chosen, ref_rejected = reference_pair_logps(batch, ref, pair.packed, "complementary_dpo")
        losses, floored = complementary_dpo_loss(
            pair.chosen,
            pair.rejected,
            ref_chosen,
            ref_rejected,
            pair.n_rejected,
            self.beta,
            self.rejected_floor,
        )
        out = preference_output(pair, batch.direction, losses, self.sft_weight)
        chosen_rewards = self.beta * (pair.chosen - ref_chosen).detach()
        rejected_rewards = self.beta * (pair.rejected - ref_rejected).detach()
        out.metrics |= reward_metrics(chosen_rewards, rejected_rewards, batch.direction)
        out.metrics |= per_direction(floored.float(), batch.direction, "floored")
        return out
