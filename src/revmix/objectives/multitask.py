r"""Multi-task objective: a weighted sum of sub-objectives routed by direction and task, with optional
gradient surgery (PCGrad) between the direction groups.

.. math::  \mathcal{L} = \sum_r w_r \, \mathcal{L}_r\big(B_r\big), \qquad
           B_r = \{ i \in B : \mathrm{dir}_i \in D_r,\ \mathrm{task}_i \text{ starts with } T_r \}

where each route r names a registered objective, a direction filter D_r (``forward`` | ``reverse`` |
``null`` = both) and a task prefix T_r (``null`` = any); each :math:`\mathcal{L}_r` is that objective's
own (mean) loss on its sub-batch, and an empty :math:`B_r` contributes 0. The default — SFT on forward rows
plus unlikelihood on reverse rows — is one answer to the paper's finding that naive mixing collapses the
model's ability to tell the directions apart ("When Inverse Data Outperforms", arXiv 2509.13079).

``gradient_surgery: pcgrad`` (Yu et al. 2020, arXiv 2001.06782) splits the batch into direction groups
g ∈ {forward, reverse}, computes :math:`\nabla \mathcal{L}(B_g)` for each (the multitask loss on that
group's rows, with ``torch.autograd.grad`` over the trainable parameters), projects conflicting pairs
(:func:`revmix.objectives.surgery.pcgrad`), sums them and accumulates the result into ``.grad``; the
returned :class:`LossOutput` has ``grads_applied=True`` and the training loop skips ``backward()``. The
reported loss is then :math:`\sum_g \mathcal{L}(B_g)` — equal to the plain loss when every route is
direction-specific (as in the default), and a per-direction re-weighting of direction-agnostic routes
otherwise. The visiting order of PCGrad is drawn from a generator seeded by (``surgery_seed``, the
batch's token ids): deterministic per step and replayed exactly by a resumed run, with no hidden state.

``requires`` / ``needs_reference`` / ``needs_rollouts`` are derived from the routed sub-objectives and are
answered by the *instance* (``objective.needs_reference``). The class attributes give the values of the
default routes, for code that only has the class.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from revmix.objectives.base import (
    DIRECTION_NAMES,
    Batch,
    LossOutput,
    Objective,
    Reference,
    build_objective,
    register_objective,
)
from revmix.objectives.surgery import flat_grad, pcgrad, trainable_parameters

SURGERY_CHOICES: tuple[str, ...] = ("none", "pcgrad")
ROUTE_KEYS: tuple[str, ...] = ("objective", "direction", "task", "weight")

DEFAULT_ROUTES: tuple[Mapping[str, Any], ...] = (
    {"objective": {"name": "sft"}, "direction": "forward", "task": None, "weight": 1.0},
    {"objective": {"name": "unlikelihood"}, "direction": "reverse", "task": None, "weight": 1.0},
)

T = TypeVar("T")


class _derived(Generic[T]):
    """A class attribute (``default``) that the instance answers from its routes (``compute(self)``)."""

    def __init__(self, default: T, compute: Callable[[Any], T]) -> None:
        self.default, self.compute = default, compute

    def __get__(self, obj: Any, owner: type | None = None) -> T:
        return self.default if obj is None else self.compute(obj)


@dataclass(frozen=True)
class Route:
    """One parsed route: which rows go to which objective, with what weight."""

    objective: Objective
    label: str
    direction: int | None
    task: str | None
    weight: float

    def rows(self, batch: Batch) -> Tensor:
        """Row indices of ``batch`` that this route takes (1-D long tensor, possibly empty)."""
        keep = torch.ones(batch.size, dtype=torch.bool, device=batch.direction.device)
        if self.direction is not None:
            keep &= batch.direction == self.direction
        if self.task is not None:
            if len(batch.task) != batch.size:
                raise ValueError(
                    f"multitask route {self.label!r} filters on task={self.task!r} but batch.task has "
                    f"{len(batch.task)} entries for {batch.size} rows; collate the task field"
                )
            by_task = torch.tensor([t.startswith(self.task) for t in batch.task], dtype=torch.bool)
            keep &= by_task.to(keep.device)
        return torch.nonzero(keep, as_tuple=False).flatten()


def parse_routes(routes: Sequence[Mapping[str, Any]]) -> tuple[Route, ...]:
    """Validate route specs (errors name ``routes[i].<key>``) and build their sub-objectives."""
    if isinstance(routes, Mapping) or not isinstance(routes, Sequence) or not routes:
        raise ValueError(f"routes: expected a non-empty list of route mappings, got {routes!r}")
    parsed: list[Route] = []
    names = []
    for i, spec in enumerate(routes):
        where = f"routes[{i}]"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys {', '.join(ROUTE_KEYS)}, got {spec!r}")
        unknown = sorted(set(spec) - set(ROUTE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(ROUTE_KEYS)}")
        if "objective" not in spec:
            raise ValueError(f"{where}.objective: missing (a mapping like {{name: sft}})")
        objective = build_objective(dict(spec["objective"]), path=f"{where}.objective")
        direction = spec.get("direction")
        if direction is not None and direction not in DIRECTION_NAMES:
            raise ValueError(
                f"{where}.direction: {direction!r} is not valid; valid: {', '.join(DIRECTION_NAMES)}, null"
            )
        task = spec.get("task")
        if task is not None and not isinstance(task, str):
            raise ValueError(f"{where}.task: expected a task-name prefix string or null, got {task!r}")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < float("inf"):
            raise ValueError(f"{where}.weight: expected a finite number >= 0, got {weight!r}")
        names.append(type(objective).name)  # type: ignore[attr-defined]
        parsed.append(
            Route(
                objective=objective,
                label="",
                direction=None if direction is None else DIRECTION_NAMES.index(direction),
                task=task,
                weight=float(weight),
            )
        )
    labels = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
    return tuple(Route(r.objective, label, r.direction, r.task, r.weight) for r, label in zip(parsed, labels))


def _with_direction(metrics: dict[str, float], direction: str) -> dict[str, float]:
    """Tag direction-free keys of a single-direction group's metrics with that direction."""
    suffixes = tuple(f"/{d}" for d in DIRECTION_NAMES)
    return {(k if k.endswith(suffixes) else f"{k}/{direction}"): v for k, v in metrics.items()}


@register_objective("multitask")
@dataclass(frozen=True)
class MultiTask:
    """Weighted, routed sum of sub-objectives; ``gradient_surgery``: ``none`` | ``pcgrad``."""

    routes: tuple[Mapping[str, Any], ...] = DEFAULT_ROUTES
    gradient_surgery: str = "none"
    surgery_seed: int = 0

    requires = _derived(
        frozenset({"response", "other_response"}),
        lambda self: frozenset().union(*(r.objective.requires for r in self._routes)),
    )
    needs_reference = _derived(False, lambda self: any(r.objective.needs_reference for r in self._routes))
    needs_rollouts = _derived(False, lambda self: any(r.objective.needs_rollouts for r in self._routes))

    def __post_init__(self) -> None:
        if self.gradient_surgery not in SURGERY_CHOICES:
            raise ValueError(
                f"gradient_surgery: {self.gradient_surgery!r} is not valid; valid: {', '.join(SURGERY_CHOICES)}"
            )
        routes = tuple(dict(r) if isinstance(r, Mapping) else r for r in self.routes)
        object.__setattr__(self, "_routes", parse_routes(routes))
        object.__setattr__(self, "routes", routes)

    @property
    def parsed_routes(self) -> tuple[Route, ...]:
        return self._routes  # type: ignore[attr-defined]

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        if self.gradient_surgery == "none":
            loss, metrics = self.weighted_loss(policy, batch, ref)
            return LossOutput(loss=loss, metrics=metrics)
        return self._pcgrad(policy, batch, ref)

    def weighted_loss(
        self, policy: torch.nn.Module, batch: Batch, ref: Reference | None
    ) -> tuple[Tensor, dict[str, float]]:
        """Σ_r w_r L_r(B_r) and the sub-objectives' metrics, prefixed ``<objective>.`` (``sft.nll/forward``)."""
        total: Tensor | None = None
        metrics: dict[str, float] = {}
        for route in self.parsed_routes:
            idx = route.rows(batch)
            metrics[f"{route.label}.rows"] = float(idx.numel())
            if idx.numel() == 0:
                continue
            out = route.objective(policy, batch.select(idx), ref)
            if out.grads_applied:
                raise RuntimeError(
                    f"multitask route {route.label!r} applied its own gradients (nested gradient surgery); "
                    "set its gradient_surgery to 'none'"
                )
            term = route.weight * out.loss
            total = term if total is None else total + term
            metrics |= {f"{route.label}.{k}": v for k, v in out.metrics.items()}
        if total is None:  # every route empty: a zero that back-propagates to nothing
            total = torch.zeros((), device=batch.input_ids.device, requires_grad=True)
        metrics["loss"] = float(total.detach())
        return total, metrics

    def _generator(self, batch: Batch) -> torch.Generator:
        digest = hashlib.blake2b(batch.input_ids.detach().cpu().numpy().tobytes(), digest_size=8).digest()
        seed = (int.from_bytes(digest, "little") ^ self.surgery_seed) & ((1 << 63) - 1)
        return torch.Generator().manual_seed(seed)

    def _pcgrad(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None) -> LossOutput:
        params = trainable_parameters(policy)
        grads: list[list[Tensor]] = []
        used = [False] * len(params)  # params no group reaches keep .grad None, as after backward()
        total = torch.zeros((), device=batch.input_ids.device)
        metrics: dict[str, float] = {}
        for code, name in enumerate(DIRECTION_NAMES):
            idx = torch.nonzero(batch.direction == code, as_tuple=False).flatten()
            if idx.numel() == 0:
                continue
            loss, group_metrics = self.weighted_loss(policy, batch.select(idx), ref)
            metrics |= _with_direction(group_metrics, name)
            total = total + loss.detach()
            if loss.grad_fn is None:  # no route took these rows
                continue
            raw = torch.autograd.grad(loss, params, allow_unused=True)
            used = [u or g is not None for u, g in zip(used, raw)]
            grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, raw)])
        if len(grads) == 2:
            g_f, g_r = flat_grad(grads[0]), flat_grad(grads[1])
            denom = g_f.norm() * g_r.norm()
            if float(denom) > 0:
                metrics["pcgrad/cosine"] = float(g_f.dot(g_r) / denom)
        if grads:
            for p, g, u in zip(params, pcgrad(grads, self._generator(batch)), used):
                if u:
                    p.grad = g if p.grad is None else p.grad + g
        metrics["loss"] = float(total)
        return LossOutput(loss=total, metrics=metrics, grads_applied=True)
