r"""Unlikelihood training (Welleck et al. 2019, arXiv 1908.04319): likelihood on y+, unlikelihood on y−.

With y+ tokens :math:`\mathcal{P}` and the penalised y− tokens :math:`\mathcal{N}` (teacher-forced on
y−'s own prefix, as in the sequence-level objective of the paper, Eq. 8):

.. math::  \mathcal{L} = -\frac{1}{|\mathcal{P}|}\sum_{t\in\mathcal{P}} \log p_\theta(y^+_t \mid x, y^+_{<t})
           \;+\; \alpha\,\frac{1}{|\mathcal{N}|}\sum_{t\in\mathcal{N}} -\log\big(1 - p_\theta(y^-_t \mid x, y^-_{<t})\big)

The second term is 0 when :math:`\mathcal{N}` is empty. :math:`1-p` is computed as ``-expm1(log p)``
(exact for small p) and clamped to ``≥ eps`` so the loss stays finite as p → 1 (the reference
implementation clamps the same way; the gradient through a clamped position is then zero).

In "When Inverse Data Outperforms" (arXiv 2509.13079) y− is the twin's solution: the model should learn
the row's own direction without putting mass on the other direction's answer.

Response-position alignment (``only_differing``)
------------------------------------------------
Twins share many tokens (numbers, formulae, boilerplate); penalising a shared token also pushes down the
correct answer. With ``only_differing`` a y− token is penalised only where it differs from y+ *at the same
response position*. Response position k of a row is the index of a token among that row's response
tokens (``labels != -100``): k = 0 is the first response token, whatever the prompt length or padding
side. y−'s token at position k is "shared" iff y+ has a token at position k and it is the same id; y−
tokens at positions ≥ len(y+) are always penalised. (This is positional, not an alignment of
insertions/deletions: after the first differing-length edit, later tokens count as differing.)

The y+ and y− rows are independent in the forward pass (their pairing only enters the loss), so they are
packed several per sequence when the loop says so (``runtime.packing``, :mod:`revmix.objectives.packing`).
"""

from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from revmix.objectives.base import (
    IGNORE_INDEX,
    Batch,
    LossOutput,
    Objective,
    Reference,
    per_direction,
    register_objective,
    token_logps,
)
from revmix.objectives.packing import response_logps, response_stats
from revmix.objectives.preference import PairLogps, likelihood_metrics
from revmix.objectives.reference import concatenated_inputs


class UnlikelihoodTerms(NamedTuple):
    """``loss`` = ``nll`` + α·``penalty`` (scalars); ``row_*`` are per-row means for metrics, ``[B]``."""

    loss: Tensor
    nll: Tensor
    penalty: Tensor
    row_nll: Tensor
    row_penalty: Tensor
    penalised_tokens: Tensor


def response_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(targets, mask, position)`` after the causal shift, each ``[B, T-1]``.

    ``position[b, t]`` is the response position (0-based index among row b's response tokens) of the
    target at t; it is only meaningful where ``mask`` is true.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    position = mask.long().cumsum(-1) - 1
    return targets, mask, position


def differing_mask(labels: Tensor, negative_labels: Tensor) -> Tensor:
    """``[B, T-1]`` bool over ``negative_labels``' shifted targets: y− response tokens that differ from y+
    at the same response position (see the module docstring)."""
    pos_t, pos_m, pos_k = response_positions(labels)
    neg_t, neg_m, neg_k = response_positions(negative_labels)
    batch = labels.shape[0]
    width = int(max(int(pos_m.sum(-1).max()) if pos_m.numel() else 0, 1))
    # y+ tokens laid out by response position; -1 where y+ has no token at that position.
    by_position = torch.full((batch, width), -1, dtype=pos_t.dtype, device=labels.device)
    rows = torch.arange(batch, device=labels.device).unsqueeze(1).expand_as(pos_m)
    by_position[rows[pos_m], pos_k[pos_m]] = pos_t[pos_m]
    k = neg_k.clamp(min=0, max=width - 1)
    positive_here = by_position.gather(1, k)
    positive_here = positive_here.masked_fill(neg_k >= width, -1)
    return neg_m & (neg_t != positive_here)


def unlikelihood_loss(
    logits: Tensor,
    labels: Tensor,
    negative_logits: Tensor,
    negative_labels: Tensor,
    alpha: float,
    only_differing: bool = False,
    eps: float = 1e-6,
) -> UnlikelihoodTerms:
    """Mean NLL over y+ tokens plus α · mean over penalised y− tokens of −log(1 − p).

    ``logits``/``labels`` score prompt + y+, ``negative_logits``/``negative_labels`` prompt + y−; labels
    are aligned with the inputs (``-100`` off the response) and shifted here, as in :func:`token_logps`.
    """
    pos_logp, pos_mask = token_logps(logits, labels)
    neg_logp, neg_mask = token_logps(negative_logits, negative_labels)
    return unlikelihood_terms(
        pos_logp, pos_mask, neg_logp, neg_mask, labels, negative_labels, alpha, only_differing, eps
    )


def unlikelihood_terms(
    pos_logp: Tensor,
    pos_mask: Tensor,
    neg_logp: Tensor,
    neg_mask: Tensor,
    labels: Tensor,
    negative_labels: Tensor,
    alpha: float,
    only_differing: bool = False,
    eps: float = 1e-6,
) -> UnlikelihoodTerms:
    """:func:`unlikelihood_loss` from per-token log-probs and response masks (``[B, T-1]`` each, as
    :func:`~revmix.objectives.base.token_logps` returns them) of y+ and y−; ``labels`` and
    ``negative_labels`` (``[B, T]``) locate the response positions for ``only_differing``."""
    if only_differing:
        neg_mask = neg_mask & differing_mask(labels, negative_labels)
    # log(1 - p) = log(-expm1(log p)), clamped: p -> 1 gives log(eps), not -inf.
    one_minus_p = torch.clamp(-torch.expm1(neg_logp), min=eps)
    neg_terms = -torch.log(one_minus_p) * neg_mask

    n_pos = pos_mask.sum()
    n_neg = neg_mask.sum()
    nll = -pos_logp.sum() / n_pos.clamp(min=1)
    penalty = neg_terms.sum() / n_neg.clamp(min=1)
    row_nll = (-pos_logp.sum(-1) / pos_mask.sum(-1).clamp(min=1)).detach()
    row_penalty = (neg_terms.sum(-1) / neg_mask.sum(-1).clamp(min=1)).detach()
    return UnlikelihoodTerms(nll + alpha * penalty, nll, penalty, row_nll, row_penalty, n_neg)


@register_objective
class Unlikelihood(Objective):
    """Likelihood on y+ plus α · unlikelihood on y− (only where y− differs from y+, by default)."""

    name: Literal["unlikelihood"] = "unlikelihood"
    alpha: float = Field(1.0, ge=0.0, description="weight of the unlikelihood term on y- tokens")
    only_differing: bool = Field(
        True, description="penalise only y- tokens that differ from y+ at the same response position"
    )
    eps: float = Field(1e-6, gt=0.0, lt=1.0, description="floor of 1 - p, so the loss stays finite as p -> 1")
    entropy_metrics: bool = Field(
        True,
        description="log entropy/chosen and entropy/rejected, the next-token entropy on y+ and y- tokens "
        "(forward-only cost: one exp per vocabulary row)",
    )

    requires: ClassVar[frozenset[str]] = frozenset({"response", "other_response"})

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        ids, mask, labels = concatenated_inputs(batch)
        packing = batch.policy_forward.packing
        entropy: Tensor | None = None
        if self.entropy_metrics:
            logp, resp, entropy, _ = response_stats(policy, ids, mask, labels, packing)
        else:  # log-probs alone: the fused kernel when the loop chose it
            logp, resp = response_logps(policy, ids, mask, labels, packing, batch.policy_forward.logp_kernel)
        b = batch.size
        terms = unlikelihood_terms(
            logp[:b], resp[:b], logp[b:], resp[b:], labels[:b], labels[b:],
            self.alpha, self.only_differing, self.eps,
        )  # fmt: skip
        d = batch.direction
        metrics = per_direction(terms.row_nll, d, "nll")
        metrics |= per_direction(terms.row_penalty, d, "unlikelihood")
        metrics["loss"] = float(terms.loss.detach())
        metrics["penalised_tokens"] = float(terms.penalised_tokens)
        # The same likelihood metrics as the preference objectives, so the report compares them.
        sums, counts = logp.detach().sum(-1), resp.sum(-1)
        pair = PairLogps(sums[:b], sums[b:], counts[:b], counts[b:], None)
        if entropy is not None:
            row_entropy = entropy.detach().sum(-1)
            pair.entropy_chosen, pair.entropy_rejected = row_entropy[:b], row_entropy[b:]
        metrics |= per_direction(pair.chosen, d, "logps/chosen")
        metrics |= per_direction(pair.rejected, d, "logps/rejected")
        metrics |= per_direction(pair.chosen - pair.rejected, d, "logps/margin")
        metrics |= likelihood_metrics(pair, d)
        return LossOutput(loss=terms.loss, metrics=metrics)
