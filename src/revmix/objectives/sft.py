r"""Supervised fine-tuning (SFT): token-level cross-entropy on response tokens only.

.. math::  \mathcal{L}_{SFT} = -\frac{1}{\sum_{b,t} m_{b,t}} \sum_{b,t} m_{b,t} \log \pi_\theta(y_{b,t} \mid x_b, y_{b,<t})

where ``m`` masks prompt and padding tokens. This is the objective of the forward-only, reverse-only and
mixed SFT runs of "When Inverse Data Outperforms" (arXiv 2509.13079, §3). Rows are packed several per
sequence when the loop says so (``runtime.packing``, :mod:`revmix.objectives.packing`); the mean above is
unchanged. Without label smoothing the log-probs come from the kernel the loop chose
(``runtime.logp_kernel``: chunked, or Cut Cross-Entropy's fused one); label smoothing needs the mean over the
whole vocabulary, so it always takes the chunked path.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from revmix.objectives.base import (
    Batch,
    LossOutput,
    Objective,
    Reference,
    per_direction,
    register_objective,
)
from revmix.objectives.packing import response_logps, response_stats


@register_objective
class SFT(Objective):
    """Cross-entropy on y+ tokens; ``label_smoothing`` as in ``torch.nn.functional.cross_entropy``."""

    name: Literal["sft"] = "sft"
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="mass spread uniformly over the vocabulary (0: plain cross-entropy)"
    )

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        rows = (policy, batch.input_ids, batch.attention_mask, batch.labels, batch.policy_forward.packing)
        if self.label_smoothing:  # the vocabulary-mean log-prob too, chunked (no fp32 [B, T, V])
            logp, mask, _, mean_logp = response_stats(*rows)
            n_tok = mask.sum().clamp(min=1)
            smooth = -mean_logp.sum() / n_tok
            loss = (1 - self.label_smoothing) * (-logp.sum() / n_tok) + self.label_smoothing * smooth
        else:  # log-probs alone: the fused kernel when the loop chose it (no [B, T, V] logits)
            logp, mask = response_logps(*rows, batch.policy_forward.logp_kernel)
            n_tok = mask.sum().clamp(min=1)
            loss = -logp.sum() / n_tok
        row_nll = -logp.sum(-1) / mask.sum(-1).clamp(min=1)
        metrics = per_direction(row_nll, batch.direction, "nll")
        metrics["loss"] = float(loss.detach())
        metrics["tokens"] = float(mask.sum())
        return LossOutput(loss=loss, metrics=metrics)
