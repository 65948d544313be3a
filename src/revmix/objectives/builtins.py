"""Imports every built-in objective so that it registers itself."""

from revmix.objectives import sft  # noqa: F401
