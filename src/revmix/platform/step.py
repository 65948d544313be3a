"""One optimisation step on the dataset's rows, and what every step function shares.

The stage recipe (:mod:`revmix.platform.recipe`) calls a step function once per optimizer step with a
:class:`StepContext` and the Mixer's rows, and gets ``(metrics, n_tokens)`` back: :func:`supervised_step`
for objectives that learn from the dataset's responses, :func:`revmix.platform.rollout.step.ppo_step` for
objectives that learn from their own samples. :class:`MetricMeans` averages a step's metrics over its
micro-batches; :func:`mean_over_workers` averages them over the Ray Train workers.

A step whose loss or gradient norm is not finite never reaches the optimizer: it raises
:class:`NonFiniteStep` (``runtime.on_nonfinite: stop``) or is skipped and marked with :data:`SKIPPED`
(``skip_step``). Every worker takes the same decision, so workers never disagree about a step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from revmix.config import StageConfig
from revmix.objectives.base import Objective, PolicyForward, Reference
from revmix.objectives.reference import ReferenceLogpCache
from revmix.platform.data.tokenize import collate

SKIPPED = "nonfinite_skipped"  # metric: 1.0 on a step skipped for a non-finite loss or gradient norm
CHECKED = ("loss", "grad_norm")  # the values a step must keep finite


class NonFiniteStep(ArithmeticError):
    """A step's loss or gradient norm is not finite (``runtime.on_nonfinite: stop``)."""

    def __init__(self, values: Mapping[str, float]) -> None:
        super().__init__(", ".join(f"{k} {v}" for k, v in values.items()))
        self.values = dict(values)


def nonfinite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The checked values (:data:`CHECKED`) of ``metrics`` that are not finite numbers."""
    return {k: float(metrics[k]) for k in CHECKED if k in metrics and not math.isfinite(float(metrics[k]))}


@dataclass
class StepContext:
    """Everything one optimisation step needs; the PPO step (``platform/rollout/step.py``) takes the same."""

    policy: torch.nn.Module  # the (PEFT) model itself
    train_model: torch.nn.Module  # what forward passes go through (length-bucketed, DDP-wrapped, …)
    ref: Reference | None
    objective: Objective
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    tokenizer: Any  # a Hugging Face tokenizer
    device: torch.device
    stage: StageConfig
    world: int
    autocast: bool
    micro: int
    with_other: bool
    seed: int  # the run's, without the rank: what a step samples depends on its global rows only
    rank: int = 0  # this worker's rank: its rows are the rank-th slice of the step's global rows
    on_nonfinite: Literal["stop", "skip_step"] = "stop"  # runtime.on_nonfinite
    ref_cache: ReferenceLogpCache | None = None  # when stages.*.reference is "cache"
    policy_forward: PolicyForward = field(default_factory=PolicyForward)  # handed to objectives on the batch


class MetricMeans:
    """Means of float metrics over the values added so far, per key (a key may be absent from some adds)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] = self._counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: total / self._counts[key] for key, total in self._sums.items()}


def mean_over_workers(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the Ray Train workers that report it (unchanged without a process group).

    Workers may report different keys (a per-direction metric of a direction absent from one worker's
    rows), so the dicts are gathered whole rather than all-reduced key by key.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return metrics
    gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)
    means = MetricMeans()
    for worker_metrics in gathered:
        means.add(worker_metrics or {})
    return means.means()


def _mean_grads(params: list[torch.nn.Parameter], micro_batches: int) -> None:
    """Gradients summed over ``micro_batches`` (and the Ray Train workers, if any) → their mean."""
    import torch.distributed as dist

    workers = dist.is_available() and dist.is_initialized()
    for p in params:
        if p.grad is not None:
            if workers:
                dist.all_reduce(p.grad)
            p.grad /= micro_batches * (dist.get_world_size() if workers else 1)


def _any_worker(flag: bool, device: torch.device) -> bool:
    """``flag`` or'ed over the Ray Train workers (unchanged without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)  # on the device the process group's backend serves
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gradient_norm(ctx: StepContext) -> float:
    """The trainable parameters' gradient norm, clipped to ``max_grad_norm`` when that is set (not 0)."""
    from revmix.platform.fsdp import local_value  # the norm of FSDP shards is a DTensor

    if ctx.stage.max_grad_norm:
        return float(local_value(torch.nn.utils.clip_grad_norm_(ctx.trainable, ctx.stage.max_grad_norm)))
    grads = [p.grad for p in ctx.trainable if p.grad is not None]
    return float(local_value(torch.nn.utils.get_total_norm(grads))) if grads else 0.0


def apply_update(ctx: StepContext, loss: float) -> tuple[float, bool]:
    """Clip and take the optimizer step unless ``loss`` or the gradient norm is not finite.

    Returns (gradient norm, whether the step was skipped); raises :class:`NonFiniteStep` on ``stop``.
    """
    grad_norm = gradient_norm(ctx)
    bad = nonfinite({"loss": loss, "grad_norm": grad_norm})
    if _any_worker(bool(bad), ctx.device):
        if ctx.on_nonfinite == "stop":
            raise NonFiniteStep(bad or {"loss or grad_norm on another worker": math.nan})
        ctx.optimizer.zero_grad(set_to_none=True)
        return grad_norm, True
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return grad_norm, False


def _count_tokens(ctx: StepContext, batch: Any) -> int:
    n = int(batch.attention_mask.sum())
    if ctx.with_other and batch.other_attention_mask is not None:
        n += int(batch.other_attention_mask.sum())
    return n


def supervised_step(ctx: StepContext, batch_rows: list[dict], step: int) -> tuple[dict[str, float], int]:
    """Gradient accumulation over micro-batches, clipping and one AdamW step; returns (metrics, tokens)."""
    stage = ctx.stage
    ctx.train_model.train()
    means = MetricMeans()
    n_tokens = 0
    loss_sum = 0.0
    grads_applied = False
    for k in range(stage.grad_accum):
        rows = batch_rows[k * ctx.micro : (k + 1) * ctx.micro]
        mb = collate(rows, ctx.tokenizer.pad_token_id, with_other=ctx.with_other)
        mb.policy_forward = ctx.policy_forward
        mb = mb.to(ctx.device)
        if ctx.ref_cache is not None and not ctx.ref_cache.attach(mb):
            raise RuntimeError("reference cache miss: a training row has no cached reference log-probs")
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
            out = ctx.objective(ctx.train_model, mb, ctx.ref)
        loss_sum += float(out.loss.detach())
        if not out.grads_applied:
            (out.loss / stage.grad_accum).backward()
        grads_applied = grads_applied or out.grads_applied
        n_tokens += _count_tokens(ctx, mb)
        means.add(out.metrics)
    if grads_applied:  # the objective wrote .grad itself (PCGrad): average micro-batches and workers
        _mean_grads(ctx.trainable, stage.grad_accum)
    grad_norm, skipped = apply_update(ctx, loss_sum / stage.grad_accum)
    metrics = means.means()
    metrics["grad_norm"] = grad_norm
    if skipped:
        metrics[SKIPPED] = 1.0
    return metrics, n_tokens
