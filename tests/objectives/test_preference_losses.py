"""Reference-free preference objectives (SimPO, CPO, ORPO) and the shared preference module: hand-computed
values, equality with TRL 1.16's experimental CPO/ORPO trainers, and the metrics every preference
objective reports."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from revmix.objectives.base import PolicyForward, build_objective
from revmix.objectives.preference import chosen_nll, policy_pair_logps, preference_metrics
from revmix.objectives.reference_free import cpo_loss, log1mexp, orpo_loss, simpo_loss
from tests.objectives.helpers import make_batch, tiny_lm

# --------------------------------------------------------------------------------------------------
# The pure losses, by hand
# --------------------------------------------------------------------------------------------------


def test_simpo_hand_computed():
    # β(c̄ − r̄) − γ with β = 2, γ = β·0.5 = 1: 2·1 − 1 = 1, 2·(−1) − 1 = −3, 2·0.5 − 1 = 0
    losses = simpo_loss(torch.tensor([-1.0, -3.0, -1.0]), torch.tensor([-2.0, -2.0, -1.5]), 2.0, 0.5)
    expected = [math.log1p(math.exp(-z)) for z in (1.0, -3.0, 0.0)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert losses.tolist() == pytest.approx([0.3132617, 3.0485874, math.log(2.0)], abs=1e-6)


def test_cpo_hand_computed():
    # −log σ(β(c − r)) on summed log-probs, β = 0.1: β(c − r) = 0.2, −0.4
    losses = cpo_loss(torch.tensor([-3.0, -9.0]), torch.tensor([-5.0, -5.0]), 0.1)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.4))], rel=1e-5)
    assert losses[0].item() == pytest.approx(0.5981389, abs=1e-6)


def test_orpo_hand_computed():
    # p(y+) = 0.5 (odds 1), p(y−) = 0.2 (odds 1/4): log odds ratio = log 4, log σ(log 4) = log 0.8
    losses = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), 0.1)
    assert losses.item() == pytest.approx(-0.1 * math.log(0.8), rel=1e-5)
    # p(y+) = 0.2, p(y−) = 0.5: log σ(−log 4) = log 0.2; λ = 0.5
    losses = orpo_loss(torch.tensor([math.log(0.2)]), torch.tensor([math.log(0.5)]), 0.5)
    assert losses.item() == pytest.approx(-0.5 * math.log(0.2), rel=1e-5)


def test_log1mexp_is_exact_on_both_branches():
    x = torch.tensor([-1e-6, -0.1, -0.6931, -0.7, -5.0, -40.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(expected, rel=1e-12)


def test_chosen_nll_is_a_token_mean_over_the_batch():
    # Σ log π = −2 over 1 token and −6 over 3 tokens: 8 / 4 = 2; over 1 and 2 tokens: 8 / 3, not the mean
    # of the row means (2 + 3) / 2
    assert chosen_nll(torch.tensor([-2.0, -6.0]), torch.tensor([1, 3])).item() == pytest.approx(2.0)
    assert chosen_nll(torch.tensor([-2.0, -6.0]), torch.tensor([1, 2])).item() == pytest.approx(8.0 / 3.0)


def test_preference_metrics_hand_computed():
    chosen = torch.tensor([-1.0, -4.0, -2.0, -3.0])
    rejected = torch.tensor([-3.0, -2.0, -2.0, -1.0])
    direction = torch.tensor([0, 1, 0, 1])
    losses = torch.tensor([0.1, 0.2, 0.3, 0.6])
    n_chosen = torch.tensor([1, 2, 3, 4])
    m = preference_metrics(chosen, rejected, direction, losses, nll_weight=0.5, n_chosen=n_chosen)
    assert m["logps/chosen"] == pytest.approx(-2.5)
    assert m["logps/chosen/forward"] == pytest.approx(-1.5)
    assert m["logps/rejected/reverse"] == pytest.approx(-1.5)
    assert m["logps/margin"] == pytest.approx(-0.5)  # margins 2, −2, 0, −2
    assert m["logps/margin/forward"] == pytest.approx(1.0)
    assert m["logps/margin/reverse"] == pytest.approx(-2.0)
    # NLL: token means 10/10, (1 + 2)/(1 + 3), (4 + 3)/(2 + 4)
    assert (m["nll"], m["nll/forward"], m["nll/reverse"]) == pytest.approx((1.0, 0.75, 7.0 / 6.0))
    assert m["loss"] == pytest.approx(0.3 + 0.5 * 1.0)
    assert m["loss/forward"] == pytest.approx(0.2 + 0.5 * 0.75)
    assert m["loss/reverse"] == pytest.approx(0.4 + 0.5 * 7.0 / 6.0)
    plain = preference_metrics(chosen, rejected, direction, losses)
    assert "nll" not in plain and plain["loss/reverse"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="nll_weight needs n_chosen"):
        preference_metrics(chosen, rejected, direction, losses, nll_weight=1.0)


def test_defaults_and_contract_attributes():
    simpo, cpo, orpo = (build_objective({"name": n}) for n in ("simpo", "cpo", "orpo"))
    assert (simpo.beta, simpo.gamma_beta_ratio, simpo.sft_weight) == (2.0, 0.5, 0.0)
    assert (cpo.beta, cpo.cpo_alpha) == (0.1, 1.0)
    assert orpo.beta == 0.1
    for objective in (simpo, cpo, orpo):
        assert not objective.needs_reference and not objective.needs_rollouts
        assert objective.requires == frozenset({"response", "other_response"})
    with pytest.raises(
        ValueError, match="objective.gamma_betta_ratio: unknown key .*did you mean 'gamma_beta_ratio'"
    ):
        build_objective({"name": "simpo", "gamma_betta_ratio": 0.3})
    with pytest.raises(ValueError, match="objective.beta: expected a number > 0"):
        build_objective({"name": "orpo", "beta": 0.0})


# --------------------------------------------------------------------------------------------------
# Equality with TRL 1.16 (trl.experimental.cpo / trl.experimental.orpo)
# --------------------------------------------------------------------------------------------------


def _trl_trainer(trainer_cls, **attrs):
    """The attributes TRL 1.16's ``get_batch_loss_metrics`` reads, with its own static and bound methods:
    ``concatenated_inputs`` pads chosen and rejected to one width, ``concatenated_forward`` runs one
    forward of ``[chosen; rejected]`` and ``get_batch_logps`` sums (or averages) the response tokens."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    ns = SimpleNamespace(accelerator=accelerator, is_encoder_decoder=False, aux_loss_enabled=False, **attrs)
    ns.concatenated_inputs = trainer_cls.concatenated_inputs
    ns.get_batch_logps = trainer_cls.get_batch_logps
    ns.concatenated_forward = functools.partial(trainer_cls.concatenated_forward, ns)
    return ns


def _trl_inputs(batch):
    return {
        "chosen_input_ids": batch.input_ids,
        "chosen_attention_mask": batch.attention_mask,
        "chosen_labels": batch.labels,
        "rejected_input_ids": batch.other_input_ids,
        "rejected_attention_mask": batch.other_attention_mask,
        "rejected_labels": batch.other_labels,
    }


def _trl_cpo(policy, batch, loss_type: str, beta: float, cpo_alpha: float, simpo_gamma: float = 0.5):
    """``CPOTrainer.get_batch_loss_metrics`` (trl/experimental/cpo/cpo_trainer.py, lines 865-917) unbound:
    ``cpo_loss`` (678-750; ``sigmoid`` and ``simpo`` = −log σ(β(Δ − γ/β)) on mean log-probs) plus
    ``cpo_alpha`` times the cross-entropy of the chosen half over its response tokens (826-846)."""
    from trl.experimental.cpo import CPOTrainer

    ns = _trl_trainer(
        CPOTrainer, pad_token_id=0, loss_type=loss_type, beta=beta, cpo_alpha=cpo_alpha,
        simpo_gamma=simpo_gamma, label_smoothing=0.0, alpha=0.0,
    )  # fmt: skip
    ns.cpo_loss = functools.partial(CPOTrainer.cpo_loss, ns)
    loss, metrics = CPOTrainer.get_batch_loss_metrics(ns, policy, _trl_inputs(batch), "train")
    return float(loss.detach()), metrics


def _trl_orpo(policy, batch, beta: float):
    """``ORPOTrainer.get_batch_loss_metrics`` (trl/experimental/orpo/orpo_trainer.py, lines 824-877) unbound:
    NLL − mean(β·log σ(log odds ratio)) from ``odds_ratio_loss`` (670-703) on mean log-probs."""
    from trl.experimental.orpo import ORPOTrainer

    ns = _trl_trainer(ORPOTrainer, padding_value=0, beta=beta)
    ns.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, ns)
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(ns, policy, _trl_inputs(batch), "train")
    return float(loss.detach()), metrics


@pytest.fixture(scope="module")
def setup():
    batch = make_batch(seed=3, batch_size=6)
    batch.policy_forward = PolicyForward(shared_prompt=True)  # the loop's decision for an sdpa model
    return tiny_lm(seed=0), batch


@pytest.mark.parametrize("shared_prompt", [True, False])
@pytest.mark.parametrize(("beta", "cpo_alpha"), [(0.1, 1.0), (0.3, 0.0), (0.5, 0.4)])
def test_cpo_equals_trl(setup, shared_prompt, beta, cpo_alpha):
    policy, batch = setup
    spec = {"name": "cpo", "beta": beta, "cpo_alpha": cpo_alpha, "shared_prompt": shared_prompt}
    out = build_objective(spec)(policy, batch, None)
    trl_loss, trl_metrics = _trl_cpo(policy, batch, "sigmoid", beta, cpo_alpha)
    assert float(out.loss.detach()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert out.metrics["loss"] == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    for key in ("logps/chosen", "logps/rejected"):  # summed log-probs in both
        assert out.metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-5), key
    if cpo_alpha:
        assert out.metrics["nll"] == pytest.approx(trl_metrics["nll_loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("shared_prompt", [True, False])
@pytest.mark.parametrize(
    "spec",
    [{}, {"beta": 2.5, "gamma_beta_ratio": 0.3}, {"beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.5}],
)
def test_simpo_equals_trl(setup, shared_prompt, spec):
    """TRL's ``simpo_gamma`` is γ itself; revmix's ``gamma_beta_ratio`` is γ/β (the SimPO authors' knob)."""
    policy, batch = setup
    objective = build_objective({"name": "simpo", "shared_prompt": shared_prompt, **spec})
    out = objective(policy, batch, None)
    gamma = objective.beta * objective.gamma_beta_ratio
    trl_loss, trl_metrics = _trl_cpo(policy, batch, "simpo", objective.beta, objective.sft_weight, gamma)
    assert float(out.loss.detach()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert out.metrics["loss"] == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    # TRL logs β·mean log-probs as rewards; revmix logs the summed log-probs, whose means per token they are.
    pair = policy_pair_logps(policy, batch, shared_prompt)
    assert out.metrics["logps/chosen"] == pytest.approx(float(pair.chosen.detach().mean()), rel=1e-6)
    chosen_mean, rejected_mean = pair.mean_per_token()
    assert float(objective.beta * chosen_mean.detach().mean()) == pytest.approx(
        trl_metrics["rewards/chosen"], rel=1e-5
    )
    assert float(objective.beta * rejected_mean.detach().mean()) == pytest.approx(
        trl_metrics["rewards/rejected"], rel=1e-5
    )


@pytest.mark.parametrize("shared_prompt", [True, False])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_odds_ratio_term_equals_trl(setup, shared_prompt, beta):
    """TRL 1.16's ORPO NLL covers prompt *and* response tokens (its ``concatenated_forward``, "orpo chosen
    nll loss is computed over the full prompt and response"); revmix's covers y+ only (module docstring).
    The odds-ratio term must agree exactly: loss − NLL in both."""
    policy, batch = setup
    out = build_objective({"name": "orpo", "beta": beta, "shared_prompt": shared_prompt})(policy, batch, None)
    trl_loss, trl_metrics = _trl_orpo(policy, batch, beta)
    ours = float(out.loss.detach()) - out.metrics["nll"]
    assert ours == pytest.approx(trl_loss - trl_metrics["nll_loss"], rel=1e-5, abs=1e-6)
    assert ours == pytest.approx(-beta * trl_metrics["log_odds_ratio"], rel=1e-5, abs=1e-6)
    assert out.metrics["nll"] != pytest.approx(trl_metrics["nll_loss"], rel=1e-3)  # the documented difference


# --------------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_loss_per_direction_is_the_loss_of_that_direction_alone(setup, name):
    policy, batch = setup
    objective = build_objective({"name": name, **({"sft_weight": 0.5} if name == "simpo" else {})})
    out = objective(policy, batch, None)
    for code, label in enumerate(("forward", "reverse")):
        rows = batch.select(torch.nonzero(batch.direction == code).flatten())
        alone = float(objective(policy, rows, None).loss.detach())
        assert out.metrics[f"loss/{label}"] == pytest.approx(alone, rel=1e-5, abs=1e-6), label
    assert {"logps/margin/forward", "logps/margin/reverse", "logps/chosen", "logps/rejected"} <= set(
        out.metrics
    )


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_one_forward_behind_one_prompt_copy(setup, name):
    """Reference-free objectives score each pair in one shared-prompt row where the loop allows it."""
    policy, batch = setup
    shapes = []
    handle = policy.register_forward_hook(
        lambda m, args, kwargs, out: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        shared = build_objective({"name": name})(policy, batch, None)
        plain = build_objective({"name": name, "shared_prompt": False})(policy, batch, None)
    finally:
        handle.remove()
    assert [s[0] for s in shapes] == [batch.size, 2 * batch.size]
    assert float(shared.loss) == pytest.approx(float(plain.loss), rel=1e-5, abs=1e-6)
