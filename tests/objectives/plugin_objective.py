r"""Plug-in objectives that live outside revmix, as a user's would: named in configs by import path.

:class:`DirectionWeightedSFT` is SFT whose reverse rows' tokens weigh ``alpha`` times a forward row's:

.. math::  \mathcal{L} = -\frac{\sum_{b,t} w_b m_{b,t} \log \pi_\theta(y_{b,t} \mid x_b, y_{b,<t})}
                              {\sum_{b,t} w_b m_{b,t}}, \qquad w_b = \alpha^{\mathrm{dir}_b}

(``dir`` 0 forward, 1 reverse; ``alpha = 1`` is plain SFT). :class:`InstalledWeightedSFT` is the same
objective as an installed package would declare it, under an entry-point name. :class:`UndeclaredRejected`
breaks the contract on purpose: it reads y− without declaring it in ``requires`` and reports no
per-direction metrics.
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
    policy_logits,
    token_logps,
)

NAME = "tests.objectives.plugin_objective:DirectionWeightedSFT"
BROKEN = "tests.objectives.plugin_objective:UndeclaredRejected"


class DirectionWeightedSFT(Objective):
    """SFT whose reverse rows count ``alpha`` times a forward row (alpha 1: plain SFT)."""

    name: Literal["tests.objectives.plugin_objective:DirectionWeightedSFT"] = (
        "tests.objectives.plugin_objective:DirectionWeightedSFT"
    )
    alpha: float = Field(0.5, ge=0.0, le=10.0, description="weight of a reverse row's tokens (forward: 1)")

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        logp, mask = token_logps(policy_logits(policy, batch.input_ids, batch.attention_mask), batch.labels)
        row_weight = torch.where(batch.direction == 1, self.alpha, 1.0).to(logp.dtype)
        weight = row_weight[:, None] * mask
        loss = -(logp * weight).sum() / weight.sum().clamp(min=1e-8)
        metrics = per_direction(-logp.sum(-1) / mask.sum(-1).clamp(min=1), batch.direction, "nll")
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss=loss, metrics=metrics)


class UndeclaredRejected(Objective):
    """Breaks the contract: reads y− without declaring ``other_response``; metrics have no direction."""

    name: Literal["tests.objectives.plugin_objective:UndeclaredRejected"] = (
        "tests.objectives.plugin_objective:UndeclaredRejected"
    )

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        logits = policy_logits(policy, batch.other_input_ids, batch.other_attention_mask)  # type: ignore[arg-type]
        logp, tokens = token_logps(logits, batch.other_labels)  # type: ignore[arg-type]
        loss = -logp.sum() / tokens.sum().clamp(min=1)
        return LossOutput(loss=loss, metrics={"loss": float(loss.detach())})


class InstalledWeightedSFT(DirectionWeightedSFT):
    """DirectionWeightedSFT as an installed package would declare it: under its entry-point name."""

    name: Literal["weighted_sft"] = "weighted_sft"  # type: ignore[assignment]
