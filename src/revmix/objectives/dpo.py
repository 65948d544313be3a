r"""Direct Preference Optimisation (Rafailov et al. 2023, arXiv 2305.18290) and its pairwise variants.

For a prompt x with preferred y_w (chosen) and dispreferred y_l (rejected), the log-ratios are
:math:`u_w = \log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x)` and :math:`u_l` likewise, the implicit rewards
:math:`r_w = βu_w`, :math:`r_l = βu_l`, and the margin :math:`h = u_w - u_l`. ``loss_type`` follows TRL 1.16
(``DPOTrainer._compute_loss``):

* ``sigmoid`` (DPO, Eq. 7; conservative label smoothing ε as in cDPO, Mitchell 2023 / TRL ≤ 0.x):
  :math:`\ell = -(1-ε)\log\sigma(βh) - ε\log\sigma(-βh)`;
* ``ipo`` (IPO, Azar et al. 2023, arXiv 2310.12036, Eq. 17, β plays the role of τ):
  :math:`\ell = (h - \tfrac{1}{2β})^2`;
* ``hinge`` (SLiC-HF, Zhao et al. 2023, arXiv 2305.10425; the calibration hinge on the reference-relative
  margin, as in TRL):
  :math:`\ell = \max(0, 1 - βh)`;
* ``robust`` (rDPO, Chowdhury et al. 2024, arXiv 2403.00409; ε = ``label_smoothing`` is the rate of flipped
  preferences, corrected for without bias rather than conservatively):
  :math:`\ell = \big(-(1-ε)\log\sigma(βh) + ε\log\sigma(-βh)\big) / (1 - 2ε)`;
* ``apo_zero`` / ``apo_down`` (Anchored Preference Optimization, D'Oosterlinck et al. 2024,
  arXiv 2408.06266, Eqs. 7 and 8): :math:`\ell = 1 - \sigma(βu_w) + \sigma(βu_l)` (push y_w up and y_l down:
  the chosen outputs are better than the model's own) and :math:`\ell = \sigma(βu_w) + 1 - \sigma(βh)`
  (push both down, y_l more: the chosen outputs are worse than the model's own).

Two additions, both off by default:

* ``dpop_lambda`` λ (DPO-Positive / Smaug, Pal et al. 2024, arXiv 2402.13228, Eq. 3; ``sigmoid`` only):
  :math:`\ell = -\log\sigma\big(β(h - λ\max(0, -u_w))\big)`, so lowering log π(y_w) below the reference is
  penalised even while the margin grows;
* ``rpo_alpha`` α (RPO, Pang et al. 2024, arXiv 2404.19733, the DPO+NLL loss): adds α·NLL(y_w), the token
  mean over the micro-batch's y_w tokens (:func:`revmix.objectives.preference.chosen_nll`) — TRL 1.16's
  ``loss_type=["<type>", "sft"]`` with ``loss_weights=[1, α]``. (The paper normalises each row's NLL by
  that row's length; TRL, and so revmix, takes one token mean.)

In the paper's setting ("When Inverse Data Outperforms", arXiv 2509.13079, §4) a row's y+ (its own
direction's solution) is chosen and y− (the twin's solution) is rejected: prompt x_f prefers y_f over
y_r, and prompt x_r prefers y_r over y_f.

Length normalisation: with ``average_log_prob=True`` every log π is the *mean* response-token log-prob
(TRL's ``sigmoid_norm`` for ``sigmoid``). ``ipo`` is always length-normalised, as in TRL and as confirmed by
the IPO authors (the squared loss otherwise scales with completion length, so τ would mean something
different for every length); ``average_log_prob`` is then redundant. The NLL anchor and the logged
rewards and log-probs use summed log-probs whatever the normalisation (TRL's convention).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from revmix.objectives.base import (
    Batch,
    LossOutput,
    Reference,
    register_objective,
)
from revmix.objectives.preference import (
    PairedObjective,
    preference_output,
    reference_pair_logps,
    reward_metrics,
)
from revmix.validation import validate

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down"]
SMOOTHED = ("sigmoid", "robust")  # the loss types that read label_smoothing


def check_hyperparams(beta: float, loss_type: str, label_smoothing: float, dpop_lambda: float = 0.0) -> None:
    """Loud errors for values the maths does not allow: the :class:`DPO` fields' own checks."""
    spec = {
        "beta": beta,
        "loss_type": loss_type,
        "label_smoothing": label_smoothing,
        "dpop_lambda": dpop_lambda,
    }
    validate(DPO, spec, "dpo")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example losses and the (detached) implicit rewards β·(log π_θ − log π_ref), all ``[B]``.

    Pure function of sequence log-probs (summed or averaged — the caller decides); see the module
    docstring for the maths of each ``loss_type`` and of ``dpop_lambda``.

    Args:
        policy_chosen_logps: ``[B]`` log π_θ(y_w|x).
        policy_rejected_logps: ``[B]`` log π_θ(y_l|x).
        ref_chosen_logps: ``[B]`` log π_ref(y_w|x).
        ref_rejected_logps: ``[B]`` log π_ref(y_l|x).
    """
    check_hyperparams(beta, loss_type, label_smoothing, dpop_lambda)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        if dpop_lambda:  # DPOP: the penalty is zero while log π(y_w) stays at or above the reference
            h = h - dpop_lambda * torch.relu(-chosen_logratios)
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    else:  # apo_down (check_hyperparams admits no other value)
        losses = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@register_objective
class DPO(PairedObjective):
    """DPO and its variants, y+ chosen and y− rejected; reference log-probs from the batch cache or ref."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0, description="strength of the implicit KL to the reference (IPO's tau)")
    loss_type: LossType = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO), apo_zero or apo_down (APO)"
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="assumed rate of flipped preferences (cDPO for sigmoid, rDPO for robust)",
    )
    average_log_prob: bool = Field(False, description="mean instead of summed response log-probs")
    rpo_alpha: float = Field(0.0, ge=0.0, description="weight of RPO's NLL anchor on y+ (0: none)")
    dpop_lambda: float = Field(
        0.0, ge=0.0, description="DPOP's penalty on log pi(y+) falling below the reference (0: none; sigmoid)"
    )

    needs_reference: ClassVar[bool] = True

    @model_validator(mode="after")
    def _terms_fit_the_loss_type(self) -> DPO:
        if self.label_smoothing and self.loss_type not in SMOOTHED:
            raise ValueError(
                f"label_smoothing applies to loss_type {' or '.join(repr(t) for t in SMOOTHED)} only; "
                f"set it to 0 for {self.loss_type!r}"
            )
        if self.dpop_lambda and self.loss_type != "sigmoid":
            raise ValueError(
                f"dpop_lambda applies to loss_type 'sigmoid' only; set it to 0 for {self.loss_type!r}"
            )
        return self

    @property
    def length_normalised(self) -> bool:
        return self.average_log_prob or self.loss_type == "ipo"

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        pair = self.policy_logps(policy, batch)
        ref_chosen, ref_rejected = reference_pair_logps(batch, ref, pair.packed, "dpo")
        chosen, rejected, ref_c, ref_r = pair.chosen, pair.rejected, ref_chosen, ref_rejected
        if self.length_normalised:
            n_c, n_r = pair.n_chosen.clamp(min=1), pair.n_rejected.clamp(min=1)
            chosen, rejected, ref_c, ref_r = chosen / n_c, rejected / n_r, ref_c / n_c, ref_r / n_r
        losses, _, _ = dpo_loss(
            chosen, rejected, ref_c, ref_r, self.beta, self.loss_type, self.label_smoothing, self.dpop_lambda
        )
        out = preference_output(pair, batch.direction, losses, self.rpo_alpha)
        # Rewards on summed log-probs whatever the normalisation, as TRL logs them.
        chosen_rewards = self.beta * (pair.chosen - ref_chosen).detach()
        rejected_rewards = self.beta * (pair.rejected - ref_rejected).detach()
        out.metrics |= reward_metrics(chosen_rewards, rejected_rewards, batch.direction)
        return out
