"""PCGrad on crafted gradients, and the direction-gradient cosine diagnostic."""

from __future__ import annotations

import itertools

import pytest
import torch

from revmix.objectives.base import build_objective
from revmix.objectives.surgery import direction_gradient_cosine, objective_gradient, pcgrad
from tests.objectives.helpers import make_batch, tiny_lm


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def test_conflicting_pair_is_projected_exactly():
    g1, g2 = _t(1.0, 0.0), _t(-1.0, 1.0)  # g1·g2 = -1 < 0
    (out,) = pcgrad([[g1], [g2]])
    # g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum = (0.5, 1.5)
    assert out.tolist() == pytest.approx([0.5, 1.5])
    assert float((_t(0.5, 0.5)).dot(g2)) == 0.0  # the projected g1 no longer conflicts with g2


def test_non_conflicting_pair_is_unchanged():
    (out,) = pcgrad([[_t(1.0, 0.0)], [_t(1.0, 1.0)]])
    assert out.tolist() == [2.0, 1.0]
    (out,) = pcgrad([[_t(1.0, 0.0)], [_t(0.0, 3.0)]])  # orthogonal: dot = 0 is not a conflict
    assert out.tolist() == [1.0, 3.0]


def test_projection_uses_all_parameters_jointly():
    # Same vectors as the conflicting pair, split across two parameters of different shapes.
    task1 = [_t(1.0), torch.zeros(1, 1)]
    task2 = [_t(-1.0), torch.ones(1, 1)]
    a, b = pcgrad([task1, task2])
    assert a.shape == (1,) and b.shape == (1, 1)
    assert a.tolist() == pytest.approx([0.5]) and b.flatten().tolist() == pytest.approx([1.5])


def _reference_pcgrad(gs: list[list[float]], orders: list[list[int]]) -> list[float]:
    """Algorithm 1 of Yu et al. 2020 in plain Python, with an explicit visiting order per task."""
    total = [0.0] * len(gs[0])
    for i, order in enumerate(orders):
        g = list(gs[i])
        for j in order:
            dot = sum(a * b for a, b in zip(g, gs[j]))
            if dot < 0:
                nj = sum(b * b for b in gs[j])
                g = [a - dot / nj * b for a, b in zip(g, gs[j])]
        total = [t + a for t, a in zip(total, g)]
    return total


def test_three_tasks_follow_a_seeded_random_order():
    gs = [[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-0.5, -1.0, 1.0]]
    candidates = []
    for perms in itertools.product(
        *[itertools.permutations([j for j in range(3) if j != i]) for i in range(3)]
    ):
        candidates.append(_reference_pcgrad(gs, [list(p) for p in perms]))
    distinct = {tuple(round(x, 5) for x in c) for c in candidates}
    assert len(distinct) > 1  # the order matters for this case
    seen = set()
    for seed in range(16):
        (out,) = pcgrad([[torch.tensor(g)] for g in gs], torch.Generator().manual_seed(seed))
        (again,) = pcgrad([[torch.tensor(g)] for g in gs], torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)
        key = tuple(round(x, 5) for x in out.tolist())
        assert key in distinct
        seen.add(key)
    assert len(seen) > 1  # different seeds visit in different orders


def test_shape_mismatch_is_loud():
    with pytest.raises(ValueError, match="every task must give"):
        pcgrad([[_t(1.0)], [_t(1.0), _t(2.0)]])


# --------------------------------------------------------------------------------------------------
# Direction-gradient cosine
# --------------------------------------------------------------------------------------------------


def _manual_cosine(model, objective, batch) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    flats = []
    for code in (0, 1):
        sub = batch.select(torch.nonzero(batch.direction == code).flatten())
        grads = torch.autograd.grad(objective(model, sub, None).loss, params, allow_unused=True)
        flats.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
        )
    return float(torch.nn.functional.cosine_similarity(flats[0], flats[1], dim=0))


def test_cosine_matches_manual_and_leaves_no_gradient():
    model, batch = tiny_lm(), make_batch()
    sft = build_objective({"name": "sft"})
    cos = direction_gradient_cosine(model, sft, batch, None)
    assert cos == pytest.approx(_manual_cosine(model, sft, batch), abs=1e-5)
    assert -1.0 <= cos <= 1.0
    assert all(p.grad is None for p in model.parameters())
    # Pre-existing gradients are left exactly as they were.
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    direction_gradient_cosine(model, sft, batch, None)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())


def test_cosine_of_identical_rows_is_one_and_none_without_a_direction():
    model, batch = tiny_lm(), make_batch()
    twin = batch.select(torch.tensor([0, 0]))
    twin.direction = torch.tensor([0, 1])
    assert direction_gradient_cosine(model, build_objective({"name": "sft"}), twin, None) == pytest.approx(
        1.0, abs=1e-5
    )
    forward_only = batch.select(torch.nonzero(batch.direction == 0).flatten())
    assert direction_gradient_cosine(model, build_objective({"name": "sft"}), forward_only, None) is None


def test_cosine_works_for_objectives_that_apply_their_own_gradients():
    model, batch = tiny_lm(), make_batch()
    pc = build_objective({"name": "multitask", "gradient_surgery": "pcgrad"})
    plain = build_objective({"name": "multitask"})
    g_pc = objective_gradient(model, pc, batch, None)
    assert all(p.grad is None for p in model.parameters())
    cos_pc = direction_gradient_cosine(model, pc, batch, None)
    cos_plain = direction_gradient_cosine(model, plain, batch, None)
    # On single-direction sub-batches PCGrad has one group, i.e. it is the plain gradient.
    assert cos_pc == pytest.approx(cos_plain, abs=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert any(float(g.abs().sum()) > 0 for g in g_pc)
