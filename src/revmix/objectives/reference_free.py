r"""Reference-free preference objectives: SimPO, CPO and ORPO (no π_ref, no reference pass).

With y_w = y+ (chosen) and y_l = y− (rejected), :math:`\log\pi(y)` the summed response log-probs and
:math:`\overline{\log\pi}(y) = \log\pi(y)/|y|` their mean per token:

* ``simpo`` (SimPO, Meng et al. 2024, arXiv 2405.14734: reward β·mean log-prob, target margin γ), with
  γ = β·``gamma_beta_ratio``:
  :math:`\ell = -\log\sigma\big(β\,\overline{\log\pi}(y_w) - β\,\overline{\log\pi}(y_l) - γ\big)`, plus
  ``sft_weight``·NLL(y_w) (CPO-SimPO). TRL 1.16's ``CPOTrainer`` with ``loss_type="simpo"``,
  ``simpo_gamma`` = γ and ``cpo_alpha`` = ``sft_weight``; the field names are the SimPO authors'.
* ``cpo`` (CPO, Xu et al. 2024, arXiv 2401.08417, Eq. 3 plus the NLL term):
  :math:`\ell = -\log\sigma\big(β(\log\pi(y_w) - \log\pi(y_l))\big) + α\,\mathrm{NLL}(y_w)`, on summed
  log-probs; TRL 1.16's ``CPOTrainer`` with ``loss_type="sigmoid"``, ``cpo_alpha`` = α.
* ``orpo`` (ORPO, Hong et al. 2024, arXiv 2403.07691: L_SFT + λ·L_OR, the odds ratio of Eqs. 4 and 7), with
  the odds :math:`\mathrm{odds}(y) = p/(1-p)` of the mean-per-token probability
  :math:`p = \exp\overline{\log\pi}(y)`:
  :math:`\ell = \mathrm{NLL}(y_w) - λ\log\sigma\big(\log\mathrm{odds}(y_w) - \log\mathrm{odds}(y_l)\big)`;
  TRL 1.16's ``ORPOTrainer`` with ``beta`` = λ, except that TRL's NLL also covers the prompt tokens;
  revmix's covers y_w only, like the paper's L_SFT (the NLL of the chosen response) and every other NLL
  here, so an ORPO stage does not also language-model its prompts.

NLL(y_w) is the token mean over the micro-batch's y_w tokens
(:func:`revmix.objectives.preference.chosen_nll`); the losses are averaged over the batch. All three read
y+ and y− (``requires``) and score them as every preference objective does
(:mod:`revmix.objectives.preference`), with its metrics.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from revmix.objectives.base import Batch, LossOutput, Reference, register_objective
from revmix.objectives.preference import PairedObjective, preference_output


def simpo_loss(chosen_mean: Tensor, rejected_mean: Tensor, beta: float, gamma_beta_ratio: float) -> Tensor:
    """SimPO's per-pair loss −log σ(β(c̄ − r̄ − γ/β)) (module docstring), ``[B]``.

    Args:
        chosen_mean: ``[B]`` mean response-token log-probs of y+.
        rejected_mean: ``[B]`` the same for y−.
    """
    return -F.logsigmoid(beta * (chosen_mean - rejected_mean - gamma_beta_ratio))


def cpo_loss(chosen: Tensor, rejected: Tensor, beta: float) -> Tensor:
    """CPO's per-pair preference loss −log σ(β(log π(y+) − log π(y−))) on summed log-probs, ``[B]``.

    Args:
        chosen: ``[B]`` summed response log-probs of y+.
        rejected: ``[B]`` the same for y−.
    """
    return -F.logsigmoid(beta * (chosen - rejected))


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0 without cancellation (Mächler 2012): log1p(−eˣ) below −log 2, log(−expm1 x)
    above."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean: Tensor, rejected_mean: Tensor, beta: float) -> Tensor:
    """ORPO's per-pair odds-ratio term −λ·log σ(log odds(y+) − log odds(y−)) (module docstring), ``[B]``.

    Args:
        chosen_mean: ``[B]`` mean response-token log-probs of y+ (< 0: a probability below 1).
        rejected_mean: ``[B]`` the same for y−.
    """
    c, r = chosen_mean.float(), rejected_mean.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return -beta * F.logsigmoid(log_odds)


@register_objective
class SimPO(PairedObjective):
    """SimPO: a length-normalised, reference-free margin loss with target margin γ."""

    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0.0, description="reward scale on mean per-token log-probs (SimPO's beta)")
    gamma_beta_ratio: float = Field(
        0.5,
        ge=0.0,
        description="target margin gamma / beta (0.5: the SimPO authors' Llama-3-Base recipe, beta 2, gamma 1)",
    )
    sft_weight: float = Field(0.0, ge=0.0, description="weight of the NLL anchor on y+ (CPO-SimPO; 0: SimPO)")

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        pair = self.policy_logps(policy, batch)
        losses = simpo_loss(*pair.mean_per_token(), self.beta, self.gamma_beta_ratio)
        return preference_output(pair, batch.direction, losses, self.sft_weight)


@register_objective
class CPO(PairedObjective):
    """CPO: DPO without the reference (its β → 0 limit) plus an NLL anchor on y+."""

    name: Literal["cpo"] = "cpo"
    beta: float = Field(0.1, gt=0.0, description="temperature of the preference term on summed log-probs")
    cpo_alpha: float = Field(1.0, ge=0.0, description="weight of the NLL anchor on y+")

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        pair = self.policy_logps(policy, batch)
        losses = cpo_loss(pair.chosen, pair.rejected, self.beta)
        return preference_output(pair, batch.direction, losses, self.cpo_alpha)


@register_objective
class ORPO(PairedObjective):
    """ORPO: NLL on y+ plus an odds-ratio preference term, in one stage with no reference."""

    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0.0, description="weight lambda of the odds-ratio term against the NLL")

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        pair = self.policy_logps(policy, batch)
        losses = orpo_loss(*pair.mean_per_token(), self.beta)
        return preference_output(pair, batch.direction, losses, 1.0)
