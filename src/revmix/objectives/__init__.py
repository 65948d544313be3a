"""Training objectives (torch only — never imports ray or vllm)."""

from revmix.objectives.base import (
    Batch,
    LossOutput,
    Objective,
    Reference,
    build_objective,
    objective_class,
    objective_names,
    register_objective,
)

__all__ = [
    "Batch",
    "LossOutput",
    "Objective",
    "Reference",
    "build_objective",
    "objective_class",
    "objective_names",
    "register_objective",
]
