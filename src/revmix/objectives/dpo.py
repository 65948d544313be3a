r"""Direct Preference Optimisation (Rafailov et al. 2023, arXiv 2305.18290) and IPO (Azar et al. 2023,
arXiv 2310.12036).

For a prompt x with preferred y_w (chosen) and dispreferred y_l (rejected), the implicit rewards are
r_w = β (log π_θ(y_w|x) − log π_ref(y_w|x)) and r_l likewise, and with the log-ratio margin

.. math::  h = \big(\log\pi_\theta(y_w|x) - \log\pi_\theta(y_l|x)\big)
              - \big(\log\pi_{ref}(y_w|x) - \log\pi_{ref}(y_l|x)\big)

* ``sigmoid`` (DPO, Eq. 7; conservative label smoothing ε as in cDPO / TRL ≤ 0.x):
  :math:`\ell = -(1-ε)\log\sigma(βh) - ε\log\sigma(-βh)`;
* ``ipo`` (IPO, Eq. 17, β plays the role of τ): :math:`\ell = (h - \tfrac{1}{2β})^2`.

In the paper's setting ("When Inverse Data Outperforms", arXiv 2509.13079, §4) a row's y+ (its own
direction's solution) is chosen and y− (the twin's solution) is rejected: prompt x_f prefers y_f over
y_r, and prompt x_r prefers y_r over y_f.

Length normalisation: with ``average_log_prob=True`` every log π is the *mean* response-token log-prob
(TRL's ``sigmoid_norm``). ``ipo`` is always length-normalised, as in TRL and as confirmed by the IPO
authors (the squared loss otherwise scales with completion length, so τ would mean something different
for every length); ``average_log_prob`` is then redundant.
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
    Objective,
    Reference,
    per_direction,
    policy_logits,
    register_objective,
    token_logps,
)
from revmix.objectives.prefix import (
    SharedPromptPairs,
    pack_shared_prompt,
    shared_prompt_logps,
)
from revmix.objectives.reference import concatenated_inputs, reference_logps
from revmix.validation import validate


def check_hyperparams(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Loud errors for values the maths does not allow: the :class:`DPO` fields' own checks."""
    validate(DPO, {"beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing}, "dpo")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example losses and the (detached) implicit rewards β·(log π_θ − log π_ref), all ``[B]``.

    Pure function of sequence log-probs (summed or averaged — the caller decides); see the module
    docstring for the maths.
    """
    check_hyperparams(beta, loss_type, label_smoothing)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@register_objective
class DPO(Objective):
    """DPO/IPO with y+ chosen and y− rejected; reference log-probs from the batch cache or ``ref``."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0, description="strength of the implicit KL to the reference (IPO's tau)")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid (DPO) or ipo (squared loss)")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="cDPO's epsilon: assumed rate of flipped preferences (sigmoid only)"
    )
    average_log_prob: bool = Field(False, description="mean instead of summed response log-probs")
    shared_prompt: bool = Field(
        True, description="score y+ and y- in one row behind one copy of the prompt, where attention allows"
    )

    requires: ClassVar[frozenset[str]] = frozenset({"response", "other_response"})
    needs_reference: ClassVar[bool] = True

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> DPO:
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only; set it to 0 for 'ipo'")
        return self

    @property
    def length_normalised(self) -> bool:
        return self.average_log_prob or self.loss_type == "ipo"

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        allowed = batch.policy_forward  # what the training loop allows of the policy's forward pass
        packed = pack_shared_prompt(batch) if self.shared_prompt and allowed.shared_prompt else None
        if packed is not None:
            forward = lambda i, m, p: policy_logits(policy, i, m, position_ids=p)  # noqa: E731
            chosen, rejected, n_c, n_r = shared_prompt_logps(forward, packed, allowed.length_groups)
        else:
            ids, mask, labels = concatenated_inputs(batch)
            logp, tok_mask = token_logps(policy_logits(policy, ids, mask), labels)
            logps, n_tok = logp.sum(-1), tok_mask.sum(-1)
            chosen, rejected = logps[: batch.size], logps[batch.size :]
            n_c, n_r = n_tok[: batch.size], n_tok[batch.size :]

        ref_chosen, ref_rejected = self._reference_logps(batch, ref, packed)
        if self.length_normalised:
            n_c, n_r = n_c.clamp(min=1), n_r.clamp(min=1)
            chosen, rejected = chosen / n_c, rejected / n_r
            ref_chosen, ref_rejected = ref_chosen / n_c, ref_rejected / n_r

        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing
        )
        loss = losses.mean()
        d = batch.direction
        metrics: dict[str, float] = {}
        metrics |= per_direction(chosen_rewards, d, "rewards/chosen")
        metrics |= per_direction(rejected_rewards, d, "rewards/rejected")
        metrics |= per_direction(chosen_rewards - rejected_rewards, d, "rewards/margin")
        metrics |= per_direction((chosen_rewards > rejected_rewards).float(), d, "rewards/accuracy")
        metrics |= per_direction(chosen, d, "logps/chosen")
        metrics |= per_direction(rejected, d, "logps/rejected")
        metrics |= per_direction(losses, d, "loss")
        return LossOutput(loss=loss, metrics=metrics)

    def _reference_logps(
        self, batch: Batch, ref: Reference | None, packed: SharedPromptPairs | None = None
    ) -> tuple[Tensor, Tensor]:
        """Summed reference log-probs: the batch's cached values when present, else one ``ref`` pass
        (over the shared-prompt rows when the reference takes position ids)."""
        cached_chosen, cached_rejected = batch.ref_chosen_logps, batch.ref_rejected_logps
        if cached_chosen is not None and cached_rejected is not None:
            device = batch.input_ids.device
            return cached_chosen.to(device).float(), cached_rejected.to(device).float()
        if (cached_chosen is None) != (cached_rejected is None):
            raise ValueError(
                "batch.ref_chosen_logps and batch.ref_rejected_logps must be both set or both None"
            )
        if ref is None:
            raise ValueError(
                "dpo needs reference log-probs: pass a Reference (AdapterDisabledReference, "
                "FrozenCopyReference) or attach cached ones (ReferenceLogpCache.attach)"
            )
        if packed is not None and ref.shared_prompt:
            with torch.no_grad():
                forward = lambda i, m, p: ref.logits(i, m, position_ids=p)  # noqa: E731
                chosen, rejected, _, _ = shared_prompt_logps(forward, packed, ref.length_groups)
            return chosen.float(), rejected.float()
        return reference_logps(ref, batch)
