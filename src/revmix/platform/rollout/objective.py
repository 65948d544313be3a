"""What the rollout step needs from an objective that learns from its own samples.

An objective with ``needs_rollouts`` is trained by :func:`revmix.platform.rollout.step.ppo_step` (see
there for how it uses each member) instead of the supervised step. :class:`~revmix.objectives.ppo.PPO`
implements it; the stage recipe checks the contract once, when it builds the objective.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from revmix.objectives.base import LossOutput, Reference
from revmix.objectives.ppo import Rollout


@runtime_checkable
class RolloutObjective(Protocol):
    """Sampling settings, a reward spec, and the two phases of an update (see the module docstring)."""

    @property
    def samples_per_prompt(self) -> int: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def reward(self) -> str | dict[str, Any]: ...
    @property
    def rollout_backend(self) -> str: ...  # auto | hf | vllm
    @property
    def vllm_engine(self) -> dict[str, Any] | None: ...  # vLLM options of a vllm backend
    @property
    def ppo_epochs(self) -> int: ...
    @property
    def num_mini_batches(self) -> int: ...
    @property
    def dynamic_sampling(self) -> bool: ...  # may drop rows (even all) from a rollout: one worker only

    def prepare_policy(self, policy: torch.nn.Module) -> list[torch.nn.Parameter]: ...

    def make_rollout(
        self,
        policy: torch.nn.Module,
        ref: Reference,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        direction: Tensor,
        scores: Tensor,
        group: Tensor | None = None,
    ) -> tuple[Rollout, dict[str, float]]: ...

    def loss(self, policy: torch.nn.Module, rb: Rollout) -> LossOutput: ...


def check_rollout_objective(objective: object, where: str) -> RolloutObjective:
    """``objective`` as a :class:`RolloutObjective`; a loud error naming ``where`` when it is not one."""
    if not isinstance(objective, RolloutObjective):
        raise TypeError(
            f"{where}: objective {type(objective).__name__} does not implement RolloutObjective, which the "
            "rollout step needs (samples_per_prompt, max_new_tokens, temperature, top_p, reward, "
            "rollout_backend, vllm_engine, ppo_epochs, num_mini_batches, dynamic_sampling, prepare_policy, "
            "make_rollout, loss); use an objective that samples, such as 'ppo'"
        )
    return objective
