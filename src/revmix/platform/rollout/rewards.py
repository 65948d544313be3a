"""Reward functions for PPO rollouts: a small registry of scorers, combinable by weighted sum.

A reward maps one sampled completion (with the row it answers) to a float. Built-ins:

* ``correct`` — the answer verifier (``evaluation.answers.score_completion``): 1 if the completion's final
  answer matches the row's gold answer, else 0. ``kind`` ``auto`` compares synthetic tasks (``task`` starting
  ``synthetic/``) with ``exact`` and everything else with ``math``.
* ``format`` — 1 if the last non-empty line is a final ``Answer: <something>`` line (what every revmix
  solution ends with), else 0. Shapes early rollouts before the model gets answers right.
* ``direction`` — the paper's failure mode made into a penalty: a model trained on mixed directions may
  answer the *twin's* question (for "Given y = 3, find x" it writes the forward answer 3). The twin's
  answer is the final answer of the row's y− (``other_response``); a completion whose answer equals it (and
  differs from the gold answer, so fixed points x = f(x) are not punished) scores ``-penalty``, else 0.
  Rows without a twin score 0.
* ``sum`` — ``{name: sum, terms: [{name: correct, weight: 1}, {name: format, weight: 0.1}]}``.

A spec is a name (``"correct"``) or a mapping ``{name: ..., **params}``; ``build_reward`` checks names and
parameters and fails naming the config path and the valid choices.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from revmix.platform.evaluation.answers import KINDS, extract_answer, is_equivalent, score_completion


@dataclass(frozen=True)
class Sample:
    """One completion to reward and the row it answers (``other_answer``: the twin's final answer)."""

    completion: str
    answer: str | None
    task: str = ""
    direction: int = 0
    other_answer: str | None = None
    item_id: str = ""


RewardFn = Callable[[Sample], float]
_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Register a reward *factory* ``(**params) -> (Sample -> float)`` under ``name``."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = factory
        return factory

    return deco


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def answer_kind(kind: str, task: str) -> str:
    """Resolve ``auto``: ``exact`` for synthetic tasks (string answers), ``math`` otherwise."""
    if kind == "auto":
        return "exact" if task.startswith("synthetic/") else "math"
    return kind


def _check_kind(kind: str, path: str) -> None:
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"{path}.kind: {kind!r} is not one of auto, {', '.join(KINDS)}")


@register_reward("correct")
def correct(kind: str = "auto", path: str = "reward") -> RewardFn:
    _check_kind(kind, path)

    def fn(s: Sample) -> float:
        if s.answer is None:
            raise ValueError(
                f"{path}: reward 'correct' needs a gold answer, but row {s.item_id!r} ({s.task}) has none; "
                "use rows with an 'answer' field or another reward"
            )
        return float(score_completion(s.completion, s.answer, answer_kind(kind, s.task)))

    return fn


_ANSWER_LINE = re.compile(r"^\s*answer\s*:\s*\S", re.IGNORECASE)


def has_answer_line(text: str) -> bool:
    """Whether the last non-empty line of ``text`` is ``Answer: <something>``."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and _ANSWER_LINE.match(lines[-1]) is not None


@register_reward("format")
def format_(path: str = "reward") -> RewardFn:
    return lambda s: float(has_answer_line(s.completion))


@register_reward("direction")
def direction(penalty: float = 1.0, kind: str = "auto", path: str = "reward") -> RewardFn:
    _check_kind(kind, path)
    if penalty < 0:
        raise ValueError(f"{path}.penalty must be >= 0 (it is subtracted), got {penalty}")

    def fn(s: Sample) -> float:
        if not s.other_answer:
            return 0.0
        k = answer_kind(kind, s.task)
        pred = extract_answer(s.completion)
        if pred is None or not is_equivalent(pred, s.other_answer, k):
            return 0.0
        if s.answer is not None and is_equivalent(s.other_answer, s.answer, k):
            return 0.0  # a fixed point: the twin's answer is also this row's answer
        return -float(penalty)

    return fn


@register_reward("sum")
def weighted_sum(terms: list | None = None, path: str = "reward") -> RewardFn:
    if not terms or not isinstance(terms, list):
        raise ValueError(
            f"{path}.terms: reward 'sum' needs a non-empty list of terms, e.g. "
            "[{name: correct, weight: 1}, {name: format, weight: 0.1}]"
        )
    parts: list[tuple[float, RewardFn]] = []
    for i, term in enumerate(terms):
        where = f"{path}.terms.{i}"
        if isinstance(term, str):
            term = {"name": term}
        if not isinstance(term, dict):
            raise ValueError(f"{where}: expected a name or a mapping with 'name', got {term!r}")
        term = dict(term)
        weight = term.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"{where}.weight: expected a number, got {weight!r}")
        parts.append((float(weight), build_reward(term, where)))

    return lambda s: sum(w * f(s) for w, f in parts)


def build_reward(spec: str | dict[str, Any], path: str = "objective.reward") -> RewardFn:
    """A reward function from ``"name"`` or ``{name: ..., **params}``; errors name ``path`` and the choices."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"{path}: expected a reward name or a mapping with a 'name' key, got {spec!r}")
    name = spec["name"]
    if name not in _REGISTRY:
        raise ValueError(f"{path}.name: unknown reward {name!r}; valid rewards: {', '.join(reward_names())}")
    factory = _REGISTRY[name]
    params = {k: v for k, v in spec.items() if k != "name"}
    valid = [p for p in inspect.signature(factory).parameters if p != "path"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {unknown} for reward {name!r}; valid keys: {', '.join(valid) or '(none)'}"
        )
    return factory(**params, path=path)
