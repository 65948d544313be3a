"""RL variants of the ``ppo`` objective: RLOO advantages, loss aggregation (token / sequence / Dr. GRPO),
DAPO's clip-higher and dynamic sampling — against hand-computed numbers, and against TRL 1.16's GRPO loss
on the same tensors. Ray-free; the rollout step runs in-process with a scripted engine."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from revmix.config import StageConfig
from revmix.objectives.base import build_objective, policy_logits, token_stats
from revmix.objectives.ppo import (
    PPO,
    aggregate_loss,
    clipped_policy_loss,
    informative_rows,
    kl_k3,
    rloo_advantages,
)
from revmix.objectives.reference import FrozenCopyReference
from revmix.platform.rollout.step import ppo_step
from revmix.platform.step import StepContext
from tests.objectives.helpers import Frozen, make_batch, responses, row_token_logps, tiny_lm


def _rollout(obj: PPO, policy, ref, batch, scores, group):
    return obj.make_rollout(
        policy,
        Frozen(ref),
        batch.input_ids,
        batch.attention_mask,
        batch.labels,
        batch.direction,
        torch.tensor(scores),
        torch.tensor(group),
    )


# --------------------------------------------------------------------------------------------------
# Pure functions, hand-computed
# --------------------------------------------------------------------------------------------------


def test_rloo_advantages_hand_computed():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 2.0, -1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3])
    # group 0: 1 − (0+0+0)/3 = 1;  0 − (1+0+0)/3 = −1/3 (= 4/3 · (R − 0.25));  group 1 all equal: 0;
    # group 2 alone: 0 (nothing to compare with);  group 3: 2 − (−1) = 3, −1 − 2 = −3.
    expected = [1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, -3.0]
    assert rloo_advantages(scores, group).tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # Groups need not be contiguous, and the result is k/(k−1) times the centred score.
    s = torch.tensor([0.2, 0.9, 0.4, 0.7, 0.1])
    g = torch.tensor([5, 2, 5, 2, 5])
    mean5, mean2 = (0.2 + 0.4 + 0.1) / 3, (0.9 + 0.7) / 2
    want = [
        1.5 * (0.2 - mean5),
        2 * (0.9 - mean2),
        1.5 * (0.4 - mean5),
        2 * (0.7 - mean2),
        1.5 * (0.1 - mean5),
    ]
    assert rloo_advantages(s, g).tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_dynamic_sampling_keeps_exactly_the_groups_whose_scores_differ():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.25, 0.25, 0.75, 0.5, 1.5, 1.5])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 5, 6])
    # 0: mixed → kept; 1: all 1 → dropped; 2: all 0 → dropped; 3: one differs → kept; 4, 5, 6: one
    # response each, nothing differs → dropped (6 and 5 share a score but are different groups).
    keep = informative_rows(scores, group)
    assert keep.tolist() == [True, True, False, False, False, False, True, True, True, False, False, False]
    assert informative_rows(torch.zeros(4), torch.tensor([0, 0, 1, 1])).tolist() == [False] * 4
    # Dropped groups are exactly those whose group-baseline advantage is zero everywhere.
    assert torch.equal(rloo_advantages(scores, group)[~keep], torch.zeros(int((~keep).sum())))


def test_aggregate_loss_hand_computed():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # tokens: 1, 2, 3 (row 0), 4 (row 1); row 2 has none (still a row for sequence_mean and dr_grpo).
    assert aggregate_loss(per_token, mask, "token_mean", 5).item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "sequence_mean", 5).item() == pytest.approx(
        (6 / 3 + 4 / 1 + 0) / 3
    )
    assert aggregate_loss(per_token, mask, "dr_grpo", 5).item() == pytest.approx(10 / (3 * 5))
    with pytest.raises(ValueError, match="'mean' is not one of token_mean, sequence_mean, dr_grpo"):
        aggregate_loss(per_token, mask, "mean", 5)


def test_clip_higher_hand_computed():
    # ratios 1.5, 1.5, 0.5, 0.5, 1.25 with advantages +1, −1, +1, −1, +1; ε = 0.2, ε_high = 0.3:
    #   max(−1.5, −1.3) = −1.3 (clipped at 1.3)   max(1.5, 1.3) = 1.5
    #   max(−0.5, −0.8) = −0.5                     max(0.5, 0.8) = 0.8 (clipped at 0.8)
    #   1.25 ∈ [0.8, 1.3]: −1.25, unclipped (symmetric ε = 0.2 would clip it to −1.2)
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.25]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    high = clipped_policy_loss(ratio.log(), torch.zeros(1, 5), adv, mask, 0.2, 0.3)
    assert high.per_token.tolist()[0] == pytest.approx([-1.3, 1.5, -0.5, 0.8, -1.25], rel=1e-6)
    assert high.clipped.tolist() == [[True, False, False, True, False]]
    sym = clipped_policy_loss(ratio.log(), torch.zeros(1, 5), adv, mask, 0.2)
    assert sym.per_token[0, 4].item() == pytest.approx(-1.2) and bool(sym.clipped[0, 4])
    # The fifth token still gets a gradient with clip-higher (−ρ), none with the symmetric range.
    logp = ratio.log().requires_grad_(True)
    clipped_policy_loss(logp, torch.zeros(1, 5), adv, mask, 0.2, 0.3).per_token[0, 4].backward()
    assert logp.grad[0, 4].item() == pytest.approx(-1.25, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def test_config_validation_of_the_variants():
    assert build_objective({"name": "ppo", "baseline": "rloo"}).samples_per_prompt == 4
    with pytest.raises(ValueError, match="baseline 'rloo' needs group_size >= 2"):
        build_objective({"name": "ppo", "baseline": "rloo", "group_size": 1})
    with pytest.raises(ValueError, match="clip_eps_high=0.1 is below clip_eps=0.2"):
        build_objective({"name": "ppo", "clip_eps_high": 0.1})
    assert build_objective({"name": "ppo", "clip_eps_high": 0.2}).clip_eps_high == 0.2
    with pytest.raises(
        ValueError, match="dynamic_sampling .* needs baseline 'group' or 'rloo', got 'critic'"
    ):
        build_objective({"name": "ppo", "dynamic_sampling": True})
    with pytest.raises(ValueError, match="loss_aggregation: 'mean' is not one of token_mean, sequence_mean"):
        build_objective({"name": "ppo", "loss_aggregation": "mean"})
    with pytest.raises(ValueError, match="baseline 'rloo' has none"):
        build_objective({"name": "ppo", "baseline": "rloo", "scale_rewards": True})
    with pytest.raises(ValueError, match="'dr_grpo' removes GRPO's std normalisation"):
        build_objective(
            {"name": "ppo", "baseline": "group", "loss_aggregation": "dr_grpo", "scale_rewards": True}
        )
    # scale_rewards null: GRPO scales, except under dr_grpo; an explicit false is always allowed.
    assert build_objective({"name": "ppo", "baseline": "group"}).scales_group_rewards
    dr = build_objective({"name": "ppo", "baseline": "group", "loss_aggregation": "dr_grpo"})
    assert not dr.scales_group_rewards
    assert not build_objective(
        {"name": "ppo", "baseline": "group", "scale_rewards": False}
    ).scales_group_rewards
    # Defaults keep today's behaviour: token means, symmetric clipping, no filtering.
    default = PPO()
    assert (default.loss_aggregation, default.clip_eps_high, default.dynamic_sampling) == (
        "token_mean",
        None,
        False,
    )


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


def test_rloo_rollout_advantages_and_no_value_head():
    obj = PPO(baseline="rloo", group_size=2)
    policy, ref = tiny_lm(), tiny_lm(seed=1)
    assert obj.prepare_policy(policy) == []
    rollout, _ = _rollout(obj, policy, ref, make_batch(), [1.0, 0.0, 0.5, 0.5], [0, 0, 1, 1])
    # k = 2: A = R − the other response's score → 1, −1, 0, 0 on every response token.
    assert rollout.old_values is None and rollout.returns is None
    for i, a in enumerate([1.0, -1.0, 0.0, 0.0]):
        m = rollout.mask[i]
        assert rollout.advantages[i][m].tolist() == pytest.approx([a] * int(m.sum()))
        assert float(rollout.advantages[i][~m].abs().sum()) == 0.0


def test_dr_grpo_defaults_to_unscaled_group_advantages():
    obj = PPO(baseline="group", group_size=2, loss_aggregation="dr_grpo")
    rollout, _ = _rollout(obj, tiny_lm(), tiny_lm(seed=1), make_batch(), [1.0, 0.0, 3.0, 1.0], [0, 0, 1, 1])
    # R − group mean, no ÷ std: 0.5, −0.5, 1, −1.
    firsts = [rollout.advantages[i][rollout.mask[i]][0].item() for i in range(4)]
    assert firsts == pytest.approx([0.5, -0.5, 1.0, -1.0])


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "dr_grpo"])
def test_loss_aggregation_matches_per_row_hand_computation(mode):
    """First pass (ratio 1, nothing clipped): per-token loss −A_i + β·k3, reduced three ways; log-probs
    from one unpadded float64 forward pass per row."""
    obj = PPO(baseline="rloo", group_size=2, kl_coef=0.3, loss_aggregation=mode, max_new_tokens=16)
    policy, ref = tiny_lm(), tiny_lm(seed=1)
    batch = make_batch()
    scores, adv = [1.0, 0.0, 2.0, 0.5], [1.0, -1.0, 1.5, -1.5]  # RLOO with k = 2
    rollout, _ = _rollout(obj, policy, ref, batch, scores, [0, 0, 1, 1])
    out = obj.loss(policy, rollout)
    rows = []
    for a, p, r in zip(adv, batch.prompt_ids, responses(batch.labels)):
        lp, rl = row_token_logps(policy, p, r), row_token_logps(ref, p, r)
        rows.append([-a + 0.3 * (math.exp(b - x) - (b - x) - 1) for x, b in zip(lp, rl)])
    n_tok = sum(len(r) for r in rows)
    expected = {
        "token_mean": sum(map(sum, rows)) / n_tok,
        "sequence_mean": sum(sum(r) / len(r) for r in rows) / len(rows),
        "dr_grpo": sum(map(sum, rows)) / (len(rows) * 16),
    }[mode]
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert out.metrics["ppo/clip_fraction"] == 0.0


def test_dynamic_sampling_in_make_rollout():
    obj = PPO(baseline="group", group_size=2, dynamic_sampling=True)
    policy, ref = tiny_lm(), tiny_lm(seed=1)
    batch = make_batch()
    rollout, metrics = _rollout(obj, policy, ref, batch, [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
    assert rollout.size == 2 and rollout.group.tolist() == [0, 0]
    assert torch.equal(rollout.input_ids, batch.input_ids[:2])
    assert metrics["rollout/kept_groups_fraction"] == 0.5 and metrics["rollout/no_update"] == 0.0
    assert metrics["ppo/score"] == 0.75  # over every sampled response, kept or not
    assert obj.loss(policy, rollout).loss.requires_grad
    empty, metrics = _rollout(obj, policy, ref, batch, [1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1])
    assert empty.size == 0 and empty.old_logps.shape == (0, batch.input_ids.shape[1] - 1)
    assert metrics["rollout/kept_groups_fraction"] == 0.0 and metrics["rollout/no_update"] == 1.0
    assert "ppo/kl" not in metrics and metrics["ppo/score"] == 0.5
    # The plain-batch call (every row scores 1) keeps every row rather than dropping them all.
    assert torch.isfinite(obj(policy, batch, Frozen(ref)).loss)


# --------------------------------------------------------------------------------------------------
# Equality with TRL 1.16's GRPO loss
# --------------------------------------------------------------------------------------------------

TRL_LOSS_TYPE = {"token_mean": "bnpo", "sequence_mean": "grpo", "dr_grpo": "dr_grpo"}


def _trl_grpo_loss(
    logps, old, ref, adv_rows, mask, loss_type, beta, eps, eps_high, max_len, entropy=None, h=0.0
):
    """TRL 1.16's own GRPO loss through ``GRPOTrainer._compute_loss`` unbound, on the given tensors.

    Source: trl/trainer/grpo_trainer.py (trl 1.16.0), ``_compute_loss`` (lines 3020-3300): token-level
    ratio ``coef_1 = exp(logp − old)``, ``coef_2 = clamp(coef_1, 1 − epsilon_low, 1 + epsilon_high)``,
    ``−min(coef_1·A, coef_2·A)`` plus ``beta`` × k3, reduced by ``loss_type`` (grpo 3153, bnpo 3158,
    dr_grpo 3163-3164 with ``max_completion_length``); entropy bonus as a token mean (3187-3211). The log-
    prob pass is replaced by one returning ``logps`` (so the formula, not the model call, is compared); the
    attributes below are exactly those it reads in eval mode without accumulation.
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    b = logps.shape[0]
    ent = torch.zeros_like(logps) if entropy is None else entropy
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, ent, None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps,
        epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        use_vllm=False,
        model=SimpleNamespace(training=False),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        _entropy_bonus_enabled=bool(h),
        entropy_coef=h,
        use_adaptive_entropy=False,
        accelerator=SimpleNamespace(
            gather=lambda x: x, reduce=lambda x, reduction: x, gather_for_metrics=lambda x: x
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, mask.shape[1], dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv_rows,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "dr_grpo"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_pure_loss_equals_trl_on_the_same_tensors(mode, eps_high):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(7)
    b, t, max_len = 5, 9, 12
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    old = -torch.rand(b, t, generator=g) * 3
    logps = old + torch.randn(b, t, generator=g) * 0.3  # ratios around 1: both clip branches occur
    ref = old + torch.randn(b, t, generator=g) * 0.2
    adv_rows = torch.randn(b, generator=g)
    beta, eps = 0.04, 0.2
    ours_tok = clipped_policy_loss(logps, old, adv_rows[:, None] * mask, mask, eps, eps_high).per_token
    ours = aggregate_loss(ours_tok + beta * kl_k3(logps, ref), mask, mode, max_len)
    eh = eps if eps_high is None else eps_high
    theirs = _trl_grpo_loss(logps, old, ref, adv_rows, mask, TRL_LOSS_TYPE[mode], beta, eps, eh, max_len)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "dr_grpo"])
def test_objective_loss_equals_trl_grpo(mode):
    """``PPO.loss`` (group baseline, clip-higher, k3 KL, entropy bonus) after the policy moved away from the
    one that sampled, against TRL's loss on the same log-probs, advantages and reference."""
    pytest.importorskip("trl")
    kw = {"kl_coef": 0.1, "clip_eps": 0.2, "clip_eps_high": 0.3, "entropy_coef": 0.01, "max_new_tokens": 20}
    obj = PPO(baseline="group", group_size=2, loss_aggregation=mode, **kw)
    sampler, ref, policy = tiny_lm(), tiny_lm(seed=1), tiny_lm(seed=2)
    batch = make_batch()
    rollout, _ = _rollout(obj, sampler, ref, batch, [1.0, 0.0, 0.3, 0.9], [0, 0, 1, 1])
    out = obj.loss(policy, rollout)
    with torch.no_grad():
        stats = token_stats(policy_logits(policy, batch.input_ids, batch.attention_mask), batch.labels)
    adv_rows = rollout.advantages.sum(-1) / rollout.mask.sum(-1)
    theirs = _trl_grpo_loss(
        stats.logp,
        rollout.old_logps,
        rollout.ref_logps,
        adv_rows,
        rollout.mask,
        TRL_LOSS_TYPE[mode],
        0.1,
        0.2,
        0.3,
        20,
        entropy=stats.entropy,
        h=0.01,
    )
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    assert 0.0 < out.metrics["ppo/clip_fraction"] < 1.0  # both branches exercised


# --------------------------------------------------------------------------------------------------
# The rollout step with dynamic sampling (in-process, scripted rollouts)
# --------------------------------------------------------------------------------------------------


class _Tok:
    """A stand-in tokenizer: token 5 anywhere decodes to the right answer, anything else to nothing."""

    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return "Answer: 7" if 5 in ids else "no idea"


class _Scripted:
    def __init__(self, answers: dict[int, list[list[int]]]) -> None:
        self.answers = answers

    def generate(self, policy, prompt_ids, params):
        return [self.answers[p[0]] for p in prompt_ids]

    def close(self) -> None:
        pass


def _ctx(model, obj, world=1) -> StepContext:
    trainable = list(model.parameters())
    return StepContext(
        policy=model,
        train_model=model,
        ref=FrozenCopyReference(model),
        objective=obj,
        optimizer=torch.optim.SGD(trainable, lr=0.1),
        trainable=trainable,
        tokenizer=_Tok(),
        device=torch.device("cpu"),
        stage=StageConfig(batch_size=2, max_grad_norm=1.0),
        world=world,
        autocast=False,
        micro=2,
        with_other=False,
        seed=0,
    )


ROWS = [
    {"prompt_ids": [10, 11, 12], "direction": 0, "answer": "7", "task": "synthetic/t", "item_id": "a"},
    {"prompt_ids": [20, 21], "direction": 1, "answer": "7", "task": "synthetic/t", "item_id": "b"},
]


def test_ppo_step_with_dynamic_sampling_updates_on_kept_groups_and_skips_when_none():
    obj = build_objective({"name": "ppo", "baseline": "rloo", "group_size": 2, "dynamic_sampling": True})
    model = tiny_lm()
    ctx = _ctx(model, obj)
    before = [p.detach().clone() for p in model.parameters()]
    # Every response wrong in both groups: nothing to learn, no update, and the step says so.
    metrics, n_tokens = ppo_step(ctx, ROWS, 0, engine=_Scripted({10: [[3, 1], [4, 1]], 20: [[6, 1], [2, 1]]}))
    assert metrics["rollout/no_update"] == 1.0 and metrics["rollout/kept_groups_fraction"] == 0.0
    assert "loss" not in metrics and "grad_norm" not in metrics and n_tokens == 2 * 5 + 2 * 4
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # One group mixed (right and wrong), one all wrong: half the groups kept, and the weights move.
    metrics, _ = ppo_step(ctx, ROWS, 1, engine=_Scripted({10: [[5, 1], [4, 1]], 20: [[6, 1], [2, 1]]}))
    assert metrics["rollout/no_update"] == 0.0 and metrics["rollout/kept_groups_fraction"] == 0.5
    assert metrics["ppo/score"] == 0.25 and math.isfinite(metrics["loss"]) and "grad_norm" in metrics
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_ppo_step_refuses_dynamic_sampling_on_several_workers():
    obj = build_objective({"name": "ppo", "baseline": "group", "group_size": 2, "dynamic_sampling": True})
    with pytest.raises(ValueError, match="dynamic_sampling drops a different number of rows on each worker"):
        ppo_step(_ctx(tiny_lm(), obj, world=2), ROWS, 0, engine=_Scripted({}))
