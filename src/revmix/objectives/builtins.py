"""Imports every built-in objective so that it registers itself."""

from revmix.objectives import dpo, multitask, ppo, sft, unlikelihood  # noqa: F401
