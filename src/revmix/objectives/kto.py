r"""Kahneman-Tversky Optimisation, unpaired (Ethayarajh et al. 2024, arXiv 2402.01306), as TRL 1.16's
``KTOTrainer`` with ``loss_type="kto"``.

KTO learns from single examples labelled desirable or undesirable. A canonical row gives two: (x, y+)
desirable and (x, y−) undesirable. The loss never pairs them — no term compares y+ with y− as DPO does
— so a batch of B rows is 2B independent examples that merely happen to share prompts. A user may
therefore train on forward and reverse rows without pairing them: each direction's y+ is a desirable
example and each y− an undesirable one, whatever else is in the batch.

With the implicit log-ratio :math:`r(x, y) = \log\pi_\theta(y|x) - \log\pi_{ref}(y|x)` (response-token
log-probs *summed*) and the reference point :math:`z_0` (below), each example's loss is the paper's
:math:`\lambda_y - v(x, y)` (§4), written as TRL writes it:

.. math::  \ell_D = \lambda_D\,\big(1 - \sigma(\beta(r - z_0))\big), \qquad
           \ell_U = \lambda_U\,\big(1 - \sigma(\beta(z_0 - r))\big)

and the batch loss is the plain mean of the 2B weighted terms (TRL: ``losses.nanmean()`` of
``cat(λ_D·ℓ_D, λ_U·ℓ_U)``). The paper suggests :math:`\lambda_D n_D / (\lambda_U n_U) \in [1, 4/3]`;
here :math:`n_D = n_U`, so the default weights 1, 1 are in range.

The reference point :math:`z_0` — exactly how it is estimated
--------------------------------------------------------------------
:math:`z_0 = \max\big(0, \tfrac{1}{2B}\sum_k r(x'_k, y'_k)\big)`, detached (no gradient), over 2B
mismatched pairs built as TRL builds its KL batch. The 2B examples are laid out in the order
:math:`e_k = (x_{k \bmod B}, y_k)` with :math:`y_k = y^+_k` for k < B and :math:`y^-_{k-B}` for k ≥ B;
TRL rotates completions by one within the batch (``KL_completion_ids = [c[-1]] + c[:-1]``), so pair k
is e_k's prompt with :math:`e_{k-1 \bmod 2B}`'s completion: prompt :math:`x_i` is scored with
:math:`y^+_{i-1}` and :math:`y^-_{i-1}` (indices mod B). Policy log-probs of the pairs come from a
no-gradient pass (TRL's ``_compute_kl_logps``), reference ones from ``ref``. This is TRL's estimate for a
per-device batch holding these 2B examples in this order; TRL then averages it over processes before
the clamp, while here each worker uses its own micro-batch's value (objectives never talk across
workers). The order matters: interleaving (x_i, y+_i), (x_i, y−_i) would rotate y+_i onto its own prompt.

Two cases have no mismatched pair to score, and use the *matched* estimate
:math:`z_0 = \max(0, \tfrac{1}{2B}\sum_k r(e_k))` over the batch's own examples instead (not TRL's: z0
then moves with the rewards it is compared with):

* B = 1: the rotation gives x_0 its own y− and y+, which *is* the matched estimate (TRL refuses a
  per-device batch of 1 for this reason; here a small micro-batch or a multitask route may hand one row,
  so it is allowed and computed without the extra passes).
* Cached reference log-probs and no ``ref``: the cache (``stages.*.reference: cache``) holds π_ref of the
  matched examples only, and the mismatched pairs depend on which rows share a micro-batch, so they
  cannot be cached. The training loop always passes the live reference — in ``cache`` mode too, having
  filled the cache from it — so there KTO reads matched values from the cache and runs ``ref`` over the
  2B mismatched pairs only, and gives the same numbers as in every other mode. Only a caller outside the
  loop that hands cached log-probs without ``ref`` gets the matched estimate.

Metrics (overall and per direction; the ``logps/*`` and ``loss`` keys from
:func:`~revmix.objectives.preference.preference_metrics`): ``logps/chosen``, ``logps/rejected`` (summed policy log-probs of y+
and y−), ``logps/margin`` (their difference), ``rewards/chosen``, ``rewards/rejected`` (β·r, as TRL),
``loss`` (a row's (ℓ_D + ℓ_U)/2, whose mean is the batch loss); ``kl`` is z0, one value per batch.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from revmix.objectives.base import (
    IGNORE_INDEX,
    Batch,
    LossOutput,
    Objective,
    Reference,
    forward_token_logps,
    per_direction,
    register_objective,
    sequence_logps,
)
from revmix.objectives.preference import preference_metrics, reference_pair_logps
from revmix.objectives.reference import concatenated_inputs


def kto_losses(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    z0: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Each example's weighted loss λ_D(1 − σ(β(r − z0))) or λ_U(1 − σ(β(z0 − r))) and its detached
    reward β·r, with r = ``policy_logps − ref_logps`` (see the module docstring).

    Unpaired: every example's term depends on its own log-probs, its label and z0 only.

    Args:
        policy_logps: ``[N]`` summed response log-probs under the policy.
        ref_logps: ``[N]`` the same under the reference.
        desirable: ``[N]`` bool, True for a desirable example.
        z0: the reference point, a scalar (detached by the caller).
    """
    logratios = policy_logps - ref_logps
    gain = torch.where(desirable, logratios - z0, z0 - logratios)
    weight = torch.full_like(logratios, undesirable_weight).masked_fill(desirable, desirable_weight)
    return weight * (1 - torch.sigmoid(beta * gain)), beta * logratios.detach()


def reference_point(policy_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """z0 = max(0, mean(policy − ref)), detached: TRL's clamped KL estimate.

    Args:
        policy_logps: ``[M]`` summed log-probs of the estimate's pairs under the policy.
        ref_logps: ``[M]`` the same under the reference.
    """
    return (policy_logps - ref_logps).detach().mean().clamp(min=0)


def _split(ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(prompt ids, response-span ids, response-span labels) of one right-padded row."""
    where = (labels != IGNORE_INDEX).nonzero().flatten()
    if where.numel() == 0:
        raise ValueError("kto: a row has no response tokens (labels are all -100); drop it before collating")
    first, last = int(where[0]), int(where[-1]) + 1
    return ids[:first], ids[first:last], labels[first:last]


def mismatched_pairs(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's KL sequences ``(input_ids, attention_mask, labels)``, ``[2B, W]`` right-padded: example k's
    prompt followed by example (k − 1 mod 2B)'s completion, examples ordered y+ rows then y− rows."""
    ids, _, labels = concatenated_inputs(batch)
    parts = [_split(ids[k], labels[k]) for k in range(ids.shape[0])]
    rows = []
    for k, (prompt, _, _) in enumerate(parts):
        _, response, response_labels = parts[k - 1]  # k = 0 takes the last example's completion
        fill = torch.full_like(prompt, IGNORE_INDEX)
        rows.append((torch.cat([prompt, response]), torch.cat([fill, response_labels])))
    width = max(len(r) for r, _ in rows)
    out_ids = ids.new_zeros(len(rows), width)
    out_mask = ids.new_zeros(len(rows), width)
    out_labels = ids.new_full((len(rows), width), IGNORE_INDEX)
    for k, (row_ids, row_labels) in enumerate(rows):
        out_ids[k, : len(row_ids)], out_mask[k, : len(row_ids)] = row_ids, 1
        out_labels[k, : len(row_ids)] = row_labels
    return out_ids, out_mask, out_labels


@register_objective
class KTO(Objective):
    """KTO with (x, y+) desirable and (x, y−) undesirable, unpaired; z0 from mismatched pairs."""

    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0.0, description="strength of the implicit KL to the reference")
    desirable_weight: float = Field(
        1.0, ge=0.0, description="lambda_D: weight of each desirable (x, y+) loss"
    )
    undesirable_weight: float = Field(
        1.0, ge=0.0, description="lambda_U: weight of each undesirable (x, y-) loss"
    )

    requires: ClassVar[frozenset[str]] = frozenset({"response", "other_response"})
    needs_reference: ClassVar[bool] = True

    @model_validator(mode="after")
    def _some_weight(self) -> KTO:
        if not (self.desirable_weight or self.undesirable_weight):
            raise ValueError(
                "desirable_weight and undesirable_weight are both 0: the loss would be 0; set one > 0"
            )
        return self

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        ids, mask, labels = concatenated_inputs(batch)
        kernel = batch.policy_forward.logp_kernel
        logps = forward_token_logps(policy, ids, mask, labels, kernel)[0].sum(-1)  # [2B]: y+ rows, then y−
        ref_logps = torch.cat(reference_pair_logps(batch, ref, None, "kto")).float()  # cache, else ref
        z0 = self._reference_point(policy, batch, ref, logps, ref_logps)
        b = batch.size
        desirable = torch.arange(2 * b, device=logps.device) < b
        losses, rewards = kto_losses(
            logps, ref_logps, desirable, z0, self.beta, self.desirable_weight, self.undesirable_weight
        )
        d = batch.direction
        row_losses = (losses[:b] + losses[b:]) / 2  # their mean over rows is the batch loss
        metrics = preference_metrics(logps[:b], logps[b:], d, row_losses)
        metrics |= per_direction(rewards[:b], d, "rewards/chosen")
        metrics |= per_direction(rewards[b:], d, "rewards/rejected")
        metrics["kl"] = float(z0)
        return LossOutput(loss=losses.mean(), metrics=metrics)

    @staticmethod
    def _reference_point(
        policy: torch.nn.Module, batch: Batch, ref: Reference | None, logps: Tensor, ref_logps: Tensor
    ) -> Tensor:
        """z0 from TRL's mismatched pairs; the matched estimate for one row or without ``ref``."""
        if batch.size == 1 or ref is None:
            return reference_point(logps, ref_logps)
        ids, mask, labels = mismatched_pairs(batch)
        kernel = batch.policy_forward.logp_kernel
        with torch.no_grad():  # z0 is a constant of the loss: no graph for these passes (as TRL)
            policy_kl = forward_token_logps(policy, ids, mask, labels, kernel)[0].sum(-1)
            ref_kl = sequence_logps(ref.logits(ids, mask), labels)
        return reference_point(policy_kl, ref_kl)
