"""Training objectives (torch only — never imports ray or vllm).

Importing the package registers the built-in objectives (:mod:`revmix.objectives.builtins`); a config may
also name an installed or importable plug-in (:mod:`revmix.objectives.plugins`).
"""

from revmix.objectives.base import (
    AnyObjective,
    Batch,
    LossOutput,
    Objective,
    Reference,
    build_objective,
    known_objective_names,
    objective_class,
    objective_names,
    register_objective,
)
from revmix.objectives.builtins import BUILTINS

__all__ = [
    "BUILTINS",
    "AnyObjective",
    "Batch",
    "LossOutput",
    "Objective",
    "Reference",
    "build_objective",
    "known_objective_names",
    "objective_class",
    "objective_names",
    "register_objective",
]
