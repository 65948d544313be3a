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

``requires`` / ``needs_reference`` / ``needs_rollouts`` are answered by the *instance*, from its routes;
on the class they give the default routes' values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import ConfigDict, Field, PrivateAttr
from torch import Tensor

from revmix.objectives.base import (
    DIRECTIONS,
    AnyObjective,
    Batch,
    DirectionName,
    LossOutput,
    Objective,
    Reference,
    register_objective,
)
from revmix.objectives.surgery import cosine, flat_grad, pcgrad, trainable_parameters
from revmix.validation import Strict

if TYPE_CHECKING:
    ObjectiveSpec = Objective
else:  # any objective, multitask and plug-ins included, looked up by `name` when a route is read
    ObjectiveSpec = AnyObjective

DEFAULT_ROUTES: tuple[dict[str, Any], ...] = (
    {"objective": {"name": "sft"}, "direction": "forward"},
    {"objective": {"name": "unlikelihood"}, "direction": "reverse"},
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


class RouteSpec(Strict):
    """One route of the config: which rows go to which objective, with what weight."""

    model_config = ConfigDict(frozen=True)

    objective: ObjectiveSpec = Field(description="the sub-objective (any objective, plug-ins included)")
    direction: DirectionName | None = Field(None, description="rows of this direction only (null: both)")
    task: str | None = Field(None, description="rows whose task starts with this prefix only (null: any)")
    weight: float = Field(1.0, ge=0.0, description="weight of this route's loss in the sum")


def parse_routes(routes: Sequence[RouteSpec]) -> tuple[Route, ...]:
    """The runtime routes: direction codes, and metric labels (a repeated objective name gets its index)."""
    names = [r.objective.name for r in routes]
    return tuple(
        Route(
            objective=r.objective,
            label=name if names.count(name) == 1 else f"{name}{i}",
            direction=None if r.direction is None else DIRECTIONS.index(r.direction),
            task=r.task,
            weight=r.weight,
        )
        for i, (r, name) in enumerate(zip(routes, names))
    )


def _with_direction(metrics: dict[str, float], direction: str) -> dict[str, float]:
    """Tag direction-free keys of a single-direction group's metrics with that direction."""
    suffixes = tuple(f"/{d}" for d in DIRECTIONS)
    return {(k if k.endswith(suffixes) else f"{k}/{direction}"): v for k, v in metrics.items()}


@register_objective
class MultiTask(Objective):
    """Weighted, routed sum of sub-objectives; ``gradient_surgery``: ``none`` | ``pcgrad``."""

    name: Literal["multitask"] = "multitask"
    routes: tuple[RouteSpec, ...] = Field(
        DEFAULT_ROUTES, min_length=1, validate_default=True, description="sub-objectives and their rows"
    )
    gradient_surgery: Literal["none", "pcgrad"] = Field(
        "none", description="pcgrad: project conflicting forward/reverse gradients (Yu et al. 2020)"
    )
    surgery_seed: int = Field(0, description="seed of PCGrad's visiting order (mixed with the batch)")

    requires: ClassVar = _derived(
        frozenset({"response", "other_response"}),
        lambda self: frozenset().union(*(r.objective.requires for r in self.routes)),
    )
    needs_reference: ClassVar = _derived(
        False, lambda self: any(r.objective.needs_reference for r in self.routes)
    )
    needs_rollouts: ClassVar = _derived(
        False, lambda self: any(r.objective.needs_rollouts for r in self.routes)
    )

    _routes: tuple[Route, ...] = PrivateAttr(default=())

    def model_post_init(self, context: Any) -> None:
        self._routes = parse_routes(self.routes)

    @property
    def parsed_routes(self) -> tuple[Route, ...]:
        return self._routes

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
        for code, name in enumerate(DIRECTIONS):
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
        if len(grads) == 2 and (cos := cosine(flat_grad(grads[0]), flat_grad(grads[1]))) is not None:
            metrics["pcgrad/cosine"] = cos
        if grads:
            for p, g, u in zip(params, pcgrad(grads, self._generator(batch)), used):
                if u:
                    p.grad = g if p.grad is None else p.grad + g
        metrics["loss"] = float(total)
        return LossOutput(loss=total, metrics=metrics, grads_applied=True)
