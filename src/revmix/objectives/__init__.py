"""Training objectives (torch only — never imports ray or vllm).

Importing the package registers the built-in objectives (:mod:`revmix.objectives.builtins`).
"""

from revmix.objectives.base import (
    Batch,
    LossOutput,
    Objective,
    Reference,
    build_objective,
    objective_class,
    objective_names,
    objective_union,
    register_objective,
)
from revmix.objectives.builtins import BUILTINS

__all__ = [
    "BUILTINS",
    "Batch",
    "LossOutput",
    "Objective",
    "Reference",
    "build_objective",
    "objective_class",
    "objective_names",
    "objective_union",
    "register_objective",
]
