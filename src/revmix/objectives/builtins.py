"""Registers every built-in objective (importing its module runs its ``@register_objective``), then types
multitask's routes over all of them (a route may hold any registered objective)."""

from revmix.objectives.base import objective_union
from revmix.objectives.dpo import DPO
from revmix.objectives.multitask import MultiTask, type_routes
from revmix.objectives.ppo import PPO
from revmix.objectives.sft import SFT
from revmix.objectives.unlikelihood import Unlikelihood

BUILTINS = (DPO, MultiTask, PPO, SFT, Unlikelihood)
type_routes(objective_union())
