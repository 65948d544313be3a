r"""An example plug-in objective: focal loss on the response tokens (Lin et al. 2017, arXiv 1708.02002).

.. math::  \mathcal{L} = -\frac{1}{\sum_{b,t} m_{b,t}} \sum_{b,t} m_{b,t} (1 - p_{b,t})^{\gamma} \log p_{b,t},
           \qquad p_{b,t} = \pi_\theta(y_{b,t} \mid x_b, y_{b,<t})

``gamma = 0`` is plain SFT; a larger ``gamma`` down-weights tokens the model already predicts well.
Name it in a config by its import path (this directory on ``PYTHONPATH``; see docs/objectives.md):
``objective: {name: "my_objective:FocalSFT", gamma: 2.0}``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from revmix.objectives import Batch, LossOutput, Objective, Reference
from revmix.objectives.base import per_direction, policy_logits, token_logps


class FocalSFT(Objective):
    """Focal cross-entropy on y+ tokens: (1 - p)^gamma down-weights well-predicted tokens."""

    name: Literal["my_objective:FocalSFT"] = "my_objective:FocalSFT"
    gamma: float = Field(2.0, ge=0.0, le=10.0, description="focusing exponent (0: plain SFT)")

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        logp, mask = token_logps(policy_logits(policy, batch.input_ids, batch.attention_mask), batch.labels)
        token_loss = -((1 - logp.exp()) ** self.gamma) * logp * mask  # 0 off the response
        loss = token_loss.sum() / mask.sum().clamp(min=1)
        metrics = per_direction(token_loss.sum(-1) / mask.sum(-1).clamp(min=1), batch.direction, "focal")
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss=loss, metrics=metrics)
