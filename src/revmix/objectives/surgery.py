r"""Gradient surgery between direction groups and the direction-gradient cosine diagnostic.

"When Inverse Data Outperforms" (arXiv 2509.13079) explains the collapse of mixed forward+reverse SFT by
interference between the two directions' gradients. Two tools test that explanation directly:

* :func:`pcgrad` — PCGrad (Yu et al. 2020, arXiv 2001.06782, Algorithm 1): for each task gradient g_i,
  visit the other tasks j in random order and, whenever the (running) :math:`g_i^{PC} \cdot g_j < 0`,
  remove the conflicting component :math:`g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC}\cdot g_j}{\|g_j\|^2} g_j`
  (projections are always against the *original* g_j). The update is :math:`\sum_i g_i^{PC}`.
* :func:`direction_gradient_cosine` — cos(∇L_forward, ∇L_reverse) of any objective on one batch, which
  the training loop logs every N steps: negative values are the interference the paper posits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from revmix.objectives.base import Batch, Objective, Reference


def flat_grad(grads: Sequence[Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1).float() for g in grads])


def pcgrad(grads: list[list[Tensor]], generator: torch.Generator | None = None) -> list[Tensor]:
    """Project conflicting task gradients and sum them: one tensor per parameter.

    ``grads[i][p]`` is task i's gradient for parameter p (same shapes across tasks). The visiting order of
    the other tasks is a random permutation drawn from ``generator`` (it matters only with ≥ 3 tasks).
    """
    if not grads:
        raise ValueError("pcgrad: need at least one task gradient")
    n_params = len(grads[0])
    if any(len(g) != n_params for g in grads):
        raise ValueError(
            f"pcgrad: every task must give {n_params} parameter gradients, got {[len(g) for g in grads]}"
        )
    shapes = [g.shape for g in grads[0]]
    flat = [flat_grad(g) for g in grads]
    sq_norms = [float(f.dot(f)) for f in flat]
    projected: list[Tensor] = []
    for i, g_i in enumerate(flat):
        g_pc = g_i.clone()
        others = [j for j in range(len(flat)) if j != i]
        order = torch.randperm(len(others), generator=generator).tolist() if others else []
        for o in order:
            j = others[o]
            dot = g_pc.dot(flat[j])
            if dot < 0 and sq_norms[j] > 0:
                g_pc = g_pc - (dot / sq_norms[j]) * flat[j]
        projected.append(g_pc)
    total = torch.stack(projected).sum(0)
    out: list[Tensor] = []
    offset = 0
    for shape, like in zip(shapes, grads[0]):
        n = int(torch.Size(shape).numel())
        out.append(total[offset : offset + n].reshape(shape).to(like.dtype))
        offset += n
    return out


def trainable_parameters(policy: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]


def objective_gradient(
    policy: torch.nn.Module, objective: Objective, batch: Batch, ref: Reference | None
) -> list[Tensor]:
    """∇ of ``objective`` on ``batch`` w.r.t. the trainable parameters, leaving every ``.grad`` untouched.

    Works for objectives that back-propagate themselves (``grads_applied``): ``.grad`` is stashed, their
    contribution is read from a clean ``.grad`` and the stashed values are put back.
    """
    params = trainable_parameters(policy)
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        out = objective(policy, batch, ref)
        if out.grads_applied:
            return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
        raw = torch.autograd.grad(out.loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, raw)]
    finally:
        for p, s in zip(params, saved):
            p.grad = s


def direction_gradient_cosine(
    policy: torch.nn.Module, objective: Objective, batch: Batch, ref: Reference | None
) -> float | None:
    """cos(∇L(forward rows), ∇L(reverse rows)) over trainable parameters.

    ``None`` when the batch lacks one direction or either gradient is exactly zero (the cosine is then
    undefined). Leaves no gradients behind.
    """
    groups = []
    for code in (0, 1):
        idx = torch.nonzero(batch.direction == code, as_tuple=False).flatten()
        if idx.numel() == 0:
            return None
        groups.append(flat_grad(objective_gradient(policy, objective, batch.select(idx), ref)))
    return cosine(*groups)


def cosine(a: Tensor, b: Tensor) -> float | None:
    """cos(a, b) clamped to [-1, 1]; ``None`` when either vector is zero (the angle is undefined)."""
    denom = a.norm() * b.norm()
    if float(denom) == 0.0:
        return None
    return float(torch.clamp(a.dot(b) / denom, -1.0, 1.0))
