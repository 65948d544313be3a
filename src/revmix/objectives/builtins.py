"""Registers every built-in objective (importing its module runs its ``@register_objective``)."""

from revmix.objectives.complementary import ComplementaryDPO
from revmix.objectives.dpo import DPO
from revmix.objectives.kto import KTO
from revmix.objectives.multitask import MultiTask
from revmix.objectives.ppo import PPO
from revmix.objectives.reference_free import CPO, ORPO, SimPO
from revmix.objectives.sft import SFT
from revmix.objectives.unlikelihood import Unlikelihood

BUILTINS = (ComplementaryDPO, CPO, DPO, KTO, MultiTask, ORPO, PPO, SFT, SimPO, Unlikelihood)
