"""Multitask: routing, weights, empty routes, derived requires/needs_reference, PCGrad, a short training run."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from revmix.objectives.base import Batch, build_objective, objective_class
from revmix.objectives.reference import FrozenCopyReference
from revmix.objectives.surgery import direction_gradient_cosine
from tests.objectives.helpers import _pack, make_batch, tiny_lm


def _rows(batch, rows):
    return batch.select(torch.tensor(rows))


def _objective(name, **hyper):
    return build_objective({"name": name, **hyper})


def _loss(spec, model, batch, ref=None) -> float:
    return float(build_objective(spec)(model, batch, ref).loss.detach())


def test_default_routes_are_sft_forward_plus_unlikelihood_reverse():
    model, batch = tiny_lm(), make_batch()  # directions 0, 1, 0, 1
    out = build_objective({"name": "multitask"})(model, batch, None)
    expected = _loss({"name": "sft"}, model, _rows(batch, [0, 2])) + _loss(
        {"name": "unlikelihood"}, model, _rows(batch, [1, 3])
    )
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert out.metrics["sft.rows"] == 2.0 and out.metrics["unlikelihood.rows"] == 2.0
    assert "sft.nll/forward" in out.metrics and "unlikelihood.nll/reverse" in out.metrics


def test_task_prefix_direction_and_weights():
    model, ref_model, batch = tiny_lm(), tiny_lm(seed=1), make_batch()
    batch.task = ["synthetic/a", "gsm8k", "synthetic/b", "synthetic/c"]
    spec = {
        "name": "multitask",
        "routes": [
            {"objective": {"name": "sft"}, "task": "synthetic/", "weight": 2.0},
            {"objective": {"name": "dpo", "beta": 0.2}, "direction": "reverse", "weight": 0.5},
        ],
    }
    objective = build_objective(spec)
    assert objective.needs_reference is True
    assert objective.requires == frozenset({"response", "other_response"})
    ref = FrozenCopyReference(ref_model)
    out = objective(model, batch, ref)
    expected = 2.0 * _loss({"name": "sft"}, model, _rows(batch, [0, 2, 3])) + 0.5 * _loss(
        {"name": "dpo", "beta": 0.2}, model, _rows(batch, [1, 3]), ref
    )
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert out.metrics["sft.rows"] == 3.0 and out.metrics["dpo.rows"] == 2.0


def test_requires_and_needs_reference_are_answered_by_the_instance():
    cls = objective_class("multitask")
    assert cls.needs_reference is False and cls.needs_rollouts is False  # the default routes' values
    assert cls.requires == frozenset({"response", "other_response"})
    sft_only = build_objective({"name": "multitask", "routes": [{"objective": {"name": "sft"}}]})
    assert sft_only.requires == frozenset({"response"}) and sft_only.needs_reference is False
    # sft on every row + sft on reverse rows again: duplicate names get an index in metric keys.
    twice = build_objective(
        {
            "name": "multitask",
            "routes": [
                {"objective": {"name": "sft"}},
                {"objective": {"name": "sft"}, "direction": "reverse"},
            ],
        }
    )
    out = twice(tiny_lm(), make_batch(with_other=False), None)
    assert out.metrics["sft0.rows"] == 4.0 and out.metrics["sft1.rows"] == 2.0


def test_empty_routes_contribute_zero():
    model, batch = tiny_lm(), make_batch()
    reverse_only = _rows(batch, [1, 3])
    out = build_objective({"name": "multitask"})(model, reverse_only, None)
    assert out.metrics["sft.rows"] == 0.0
    assert float(out.loss.detach()) == pytest.approx(
        _loss({"name": "unlikelihood"}, model, reverse_only), rel=1e-5, abs=1e-6
    )
    # Every route empty: a zero loss that back-propagates to nothing.
    none = build_objective({"name": "multitask", "routes": [{"objective": {"name": "sft"}, "task": "nope"}]})
    out = none(model, batch, None)
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            {"routes": [{"objective": {"name": "sft"}, "dir": "forward"}]},
            r"routes\.0\.dir: unknown key 'dir' at objective\.routes\.0; valid keys: objective, direction",
        ),
        (
            {"routes": [{"objective": {"name": "sft"}, "direction": "sideways"}]},
            r"routes\.0\.direction: 'sideways' is not one of forward, reverse",
        ),
        (
            {"routes": [{"objective": {"name": "nope"}}]},
            r"routes\.0\.objective\.name: 'nope' is not one of (\w+, )*dpo, (\w+, )*sft, (\w+, )*unlikelihood",
        ),
        (
            {"routes": [{"objective": {"name": "sft"}, "weight": -1}]},
            r"routes\.0\.weight: expected a number >= 0, got -1",
        ),
        ({"routes": [{"direction": "forward"}]}, r"routes\.0\.objective: required key missing"),
        ({"routes": []}, r"objective\.routes: expected a non-empty list, got \[\]"),
        ({"gradient_surgery": "mgda"}, "gradient_surgery: 'mgda' is not one of none, pcgrad"),
    ],
)
def test_bad_specs_are_loud(spec, match):
    with pytest.raises(ValueError, match=match):
        build_objective({"name": "multitask", **spec})


def _twin_batch() -> Batch:
    """A forward row and its reverse twin on one prompt: y+ of one is y− of the other (strong conflict)."""
    prompt, a, b = [3, 9, 14], [20, 21, 22, 23], [30, 31, 32]
    ids, mask, labels = _pack([prompt, prompt], [a, b])
    o_ids, o_mask, o_labels = _pack([prompt, prompt], [b, a])
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        direction=torch.tensor([0, 1]),
        task=["synthetic/t"] * 2,
        other_input_ids=o_ids,
        other_attention_mask=o_mask,
        other_labels=o_labels,
        prompt_ids=[prompt, prompt],
        item_id=["x", "x"],
    )


CONFLICT_ROUTES = [
    {"objective": {"name": "sft"}, "direction": "forward"},
    {"objective": {"name": "unlikelihood", "alpha": 20.0}, "direction": "reverse"},
]


def test_pcgrad_accumulates_the_projected_sum():
    model, batch = tiny_lm(), _twin_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    g_f = flat(torch.autograd.grad(_objective("sft")(model, _rows(batch, [0]), None).loss, params))
    g_r = flat(
        torch.autograd.grad(
            _objective("unlikelihood", alpha=20.0)(model, _rows(batch, [1]), None).loss, params
        )
    )
    dot = g_f.dot(g_r)
    assert dot < 0  # SFT raises p(a | x); unlikelihood on the twin lowers it
    # Yu et al. 2020, Algorithm 1 for two tasks, written out.
    expected = (g_f - dot / g_r.dot(g_r) * g_r) + (g_r - dot / g_f.dot(g_f) * g_f)
    assert (expected - (g_f + g_r)).norm() > 0.1 * (g_f + g_r).norm()  # surgery changes the update

    objective = build_objective(
        {"name": "multitask", "routes": CONFLICT_ROUTES, "gradient_surgery": "pcgrad"}
    )
    out = objective(model, batch, None)
    assert out.grads_applied
    assert torch.allclose(flat([p.grad for p in params]), expected, atol=1e-5)
    plain = build_objective({"name": "multitask", "routes": CONFLICT_ROUTES})(model, batch, None)
    assert float(out.loss) == pytest.approx(float(plain.loss.detach()), rel=1e-5, abs=1e-6)
    cos = float(dot / (g_f.norm() * g_r.norm()))
    assert out.metrics["pcgrad/cosine"] == pytest.approx(cos, abs=1e-5)
    assert {"sft.nll/forward", "unlikelihood.unlikelihood/reverse", "loss"} <= set(out.metrics)
    # A second call accumulates, as loss.backward() would.
    objective(model, batch, None)
    assert torch.allclose(flat([p.grad for p in params]), 2 * expected, atol=1e-5)


def test_pcgrad_without_conflict_is_the_plain_gradient():
    """Forward and reverse rows made identical: g_f·g_r > 0, so PCGrad changes nothing."""
    model, batch = tiny_lm(), make_batch()
    twin = _rows(batch, [0, 0])
    twin.direction = torch.tensor([0, 1])
    routes = [{"objective": {"name": "sft"}}]
    out = build_objective({"name": "multitask", "routes": routes, "gradient_surgery": "pcgrad"})(
        model, twin, None
    )
    assert out.metrics["pcgrad/cosine"] == pytest.approx(1.0, abs=1e-5)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    plain = build_objective({"name": "multitask", "routes": routes})(model, _rows(twin, [0]), None)
    (2 * plain.loss).backward()  # L(B_forward) + L(B_reverse) = 2 L(row 0)
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_short_pcgrad_training_run():
    """20 AdamW steps with PCGrad on a batch with both directions: the loss falls; the cosine is finite."""
    torch.manual_seed(0)
    model, batch = tiny_lm(), make_batch(seed=11, batch_size=6)
    model.get_input_embeddings().weight.requires_grad_(False)  # a frozen part, as with LoRA
    objective = build_objective({"name": "multitask", "gradient_surgery": "pcgrad"})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses, cosines = [], []
    for step in range(20):
        if step % 5 == 0:
            cosines.append(direction_gradient_cosine(model, objective, batch, None))
        opt.zero_grad(set_to_none=True)
        out = objective(model, batch, None)
        assert out.grads_applied and model.get_input_embeddings().weight.grad is None
        opt.step()
        losses.append(out.metrics["loss"])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(c is not None and math.isfinite(c) and -1.0 <= c <= 1.0 for c in cosines), cosines


def test_objectives_pickle_and_compare_by_config():
    """Ray ships objectives to workers by pickle; the parsed routes and derived attributes must survive."""
    spec = {
        "name": "multitask",
        "routes": CONFLICT_ROUTES + [{"objective": {"name": "dpo"}}],
        "gradient_surgery": "pcgrad",
    }
    objective = build_objective(spec)
    clone = pickle.loads(pickle.dumps(objective))
    assert clone == objective == build_objective(spec)
    assert clone.needs_reference is True and [r.label for r in clone.parsed_routes] == [
        "sft",
        "unlikelihood",
        "dpo",
    ]
    assert clone.parsed_routes[1].objective.alpha == 20.0
