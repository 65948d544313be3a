"""PPO / GRPO maths against hand-computed numbers, the value head, and the objective's rollout + loss."""

from __future__ import annotations

import math

import pytest
import torch

from revmix.objectives.base import build_objective, policy_logits, token_logps
from revmix.objectives.ppo import (
    PPO,
    Rollout,
    ValueHead,
    attach_value_head,
    clipped_policy_loss,
    clipped_value_loss,
    detach_value_head,
    gae,
    get_value_head,
    group_advantages,
    kl_k3,
    kl_penalty,
    whiten,
)
from tests.objectives.helpers import Frozen, make_batch, responses, row_token_logps, row_values, tiny_lm

# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def test_gae_hand_computed():
    # γ = 0.9, λ = 0.8, one episode of 3 tokens; the value after the last token is 0.
    # δ2 = 1 + 0 − 0.1 = 0.9                  A2 = 0.9
    # δ1 = 0 + 0.9·0.1 − 0.2 = −0.11          A1 = −0.11 + 0.72·0.9 = 0.538
    # δ0 = 0 + 0.9·0.2 − 0.5 = −0.32          A0 = −0.32 + 0.72·0.538 = 0.06736
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), 0.9, 0.8)
    assert adv.tolist()[0] == pytest.approx([0.06736, 0.538, 0.9], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.56736, 0.738, 1.0], abs=1e-6)


def test_gae_skips_masked_positions():
    """Prompt and padding positions (anything, anywhere) neither enter the recursion nor get advantages."""
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 7.0], [5.0, 5.0, 0.0, 2.0, 3.0]])
    values = torch.tensor([[4.0, 0.5, 0.2, 0.1, -3.0], [1.0, 1.0, 0.3, 0.0, 8.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx([0.0, 0.06736, 0.538, 0.9, 0.0], abs=1e-6)
    # Row 2 is a single token: A = r − V = 0 − 0.3.
    assert adv[1].tolist() == pytest.approx([0.0, 0.0, -0.3, 0.0, 0.0], abs=1e-6)
    assert ret[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-6)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 4), 1.0, 1.0)
    to_go = [1.2, 1.1, 1.3, 1.0]
    assert adv[0].tolist() == pytest.approx([g - v for g, v in zip(to_go, [0.4, 0.3, 0.2, 0.1])], abs=1e-6)
    assert ret[0].tolist() == pytest.approx(to_go, abs=1e-6)


def test_whiten_hand_computed_and_masked():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    # mean 2.5, unbiased variance 5/3 → (x − 2.5)/√(5/3)
    s = math.sqrt(5 / 3)
    out = whiten(x, mask)
    assert out.tolist() == [
        pytest.approx([-1.5 / s, -0.5 / s, 0.0], abs=1e-6),
        pytest.approx([0.5 / s, 1.5 / s, 0.0], abs=1e-6),
    ]
    kept = whiten(x, mask, shift_mean=False)
    assert kept[0, 0].item() == pytest.approx(-1.5 / s + 2.5, abs=1e-6)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref).item() == pytest.approx(math.log(2), abs=1e-6)
    # k3 with r = log(ref/π) = log 0.5: e^r − r − 1 = 0.5 + log 2 − 1
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert kl_k3(logp, logp).item() == 0.0


def test_clipped_policy_loss_hand_computed():
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, −1, +1, −1 and ε = 0.2:
    #   max(−1.5, −1.2) = −1.2 (clipped)   max(1.5, 1.2) = 1.5
    #   max(−0.5, −0.8) = −0.5             max(0.5, 0.8) = 0.8 (clipped)
    # A fifth, masked token with an absurd ratio must not count.
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 50.0]])
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    out = clipped_policy_loss(ratio.log(), old, adv, mask, 0.2)
    assert out.loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, abs=1e-6)
    assert out.clipped.tolist() == [[True, False, False, True, False]]


def test_clipped_policy_loss_gradient_vanishes_when_clipped():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    adv = torch.ones(1, 2)
    clipped_policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2, dtype=torch.bool), 0.2).loss.backward()
    # d/dlogp of −A·ρ/2 = −ρ/2 where unclipped; 0 where the clipped branch is active.
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -1.1 / 2], abs=1e-6)


def test_clipped_value_loss_hand_computed():
    # token 1: V_old 0, V 0.5, G 1, ε 0.2 → clipped V 0.2: max(0.25, 0.64)/2 = 0.32 (clipped branch)
    # token 2: V_old 0, V 0.1, G 0 → within ε: 0.01/2 = 0.005
    v = torch.tensor([[0.5, 0.1, 9.0]])
    old = torch.zeros(1, 3)
    ret = torch.tensor([[1.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    out = clipped_value_loss(v, old, ret, mask, 0.2)
    assert out.loss.item() == pytest.approx((0.32 + 0.005) / 2, abs=1e-6)
    assert out.clipped.tolist() == [[True, False, False]]


def test_group_advantages_hand_computed():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    # group 0: mean 0.25, unbiased std √((0.75² + 3·0.25²)/3) = 0.5; group 1 all equal; group 2 alone.
    adv = group_advantages(scores, group)
    expected = [0.75 / 0.5001] + [-0.25 / 0.5001] * 3 + [0.0] * 5
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(scores, group, scale=False).tolist()[:4] == pytest.approx(
        [0.75, -0.25, -0.25, -0.25]
    )


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def test_config_errors_are_loud():
    with pytest.raises(ValueError, match="objective.baseline: 'value' is not one of critic, group, rloo"):
        build_objective({"name": "ppo", "baseline": "value"})
    with pytest.raises(ValueError, match="baseline 'group' needs group_size >= 2"):
        build_objective({"name": "ppo", "baseline": "group", "group_size": 1})
    with pytest.raises(
        ValueError,
        match="clip_eps: expected a number > 0, got 0; .*ppo_epochs: expected an integer >= 1, got 0",
    ):
        build_objective({"name": "ppo", "clip_eps": 0, "ppo_epochs": 0})
    with pytest.raises(
        ValueError, match="objective.beta: unknown key 'beta' for objective 'ppo'; valid keys: .*baseline"
    ):
        build_objective({"name": "ppo", "beta": 0.1})
    assert build_objective({"name": "ppo"}).samples_per_prompt == 1
    assert build_objective({"name": "ppo", "baseline": "group"}).samples_per_prompt == 4


# --------------------------------------------------------------------------------------------------
# Value head
# --------------------------------------------------------------------------------------------------


def test_value_head_attaches_once_is_registered_and_detaches():
    model = tiny_lm()
    n_before = sum(1 for _ in model.parameters())
    head, created = attach_value_head(model)
    assert created and isinstance(head, ValueHead)
    assert torch.count_nonzero(head.summary.weight) == 0 and head.summary.bias.item() == 0.0
    assert sum(1 for _ in model.parameters()) == n_before + 2  # weight and bias, seen by optimizers
    assert "v_head.summary.weight" in model.state_dict()  # and by a full fine-tune's checkpoint
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(torch.randn(2, 3, 32, dtype=torch.bfloat16)).dtype == torch.float32
    again, created = attach_value_head(model)
    assert again is head and not created
    assert PPO().prepare_policy(model) == []  # nothing new to add to an optimizer
    assert PPO(baseline="group").prepare_policy(tiny_lm()) == []
    assert detach_value_head(model) is head and get_value_head(model) is None
    assert "v_head.summary.weight" not in model.state_dict()
    attach_value_head(model)
    assert isinstance(PPO().release_policy(model), ValueHead) and PPO().release_policy(model) is None


def test_critic_without_value_head_says_how_to_fix():
    obj = PPO()
    batch = make_batch()
    with pytest.raises(RuntimeError, match="prepare_policy"):
        obj.loss(tiny_lm(), _rollout_stub(batch))


def _rollout_stub(batch) -> Rollout:
    z = torch.zeros(batch.size, batch.input_ids.shape[1] - 1)
    return Rollout(
        batch.input_ids,
        batch.attention_mask,
        batch.labels,
        batch.direction,
        torch.arange(batch.size),
        torch.ones(batch.size),
        batch.labels[:, 1:] != -100,
        z,
        z,
        z,
        z,
        z,
    )


# --------------------------------------------------------------------------------------------------
# Rollout and loss
# --------------------------------------------------------------------------------------------------


def _random_head(model: torch.nn.Module, seed: int = 3) -> None:
    attach_value_head(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.v_head.summary.weight.copy_(torch.randn(model.v_head.summary.weight.shape, generator=g) * 0.5)
        model.v_head.summary.bias.fill_(0.2)


def test_make_rollout_matches_per_row_hand_computation():
    """Score on the last response token, k1 KL penalty on every token, GAE with a (non-zero) value head."""
    obj = PPO(kl_coef=0.3, gamma=0.95, lam=0.9, whiten_advantages=False)
    policy, ref = tiny_lm(), tiny_lm(seed=1)
    _random_head(policy)
    batch = make_batch()
    scores = torch.tensor([1.0, 0.0, 0.5, -1.0])
    rollout, metrics = obj.make_rollout(
        policy, Frozen(ref), batch.input_ids, batch.attention_mask, batch.labels, batch.direction, scores
    )
    for i, (p, r) in enumerate(zip(batch.prompt_ids, responses(batch.labels))):
        lp, rl, v = row_token_logps(policy, p, r), row_token_logps(ref, p, r), row_values(policy, p, r)
        rew = [-0.3 * (a - b) for a, b in zip(lp, rl)]
        rew[-1] += float(scores[i])
        adv, last, nxt = [0.0] * len(r), 0.0, 0.0
        for k in reversed(range(len(r))):
            last = rew[k] + 0.95 * nxt - v[k] + 0.95 * 0.9 * last
            adv[k], nxt = last, v[k]
        m = rollout.mask[i]
        assert rollout.token_rewards[i][m].tolist() == pytest.approx(rew, rel=1e-5, abs=1e-5)
        assert rollout.advantages[i][m].tolist() == pytest.approx(adv, rel=1e-5, abs=1e-5)
        assert rollout.returns[i][m].tolist() == pytest.approx(
            [a + b for a, b in zip(adv, v)], rel=1e-5, abs=1e-5
        )
        assert rollout.old_values[i][m].tolist() == pytest.approx(v, rel=1e-5, abs=1e-5)
        assert float(rollout.advantages[i][~m].abs().sum()) == 0.0
    kl_rows = [
        sum(row_token_logps(policy, p, r)) - sum(row_token_logps(ref, p, r))
        for p, r in zip(batch.prompt_ids, responses(batch.labels))
    ]
    assert metrics["ppo/kl/forward"] == pytest.approx((kl_rows[0] + kl_rows[2]) / 2, rel=1e-5, abs=1e-4)
    assert metrics["ppo/score/reverse"] == pytest.approx(-0.5)


def test_temperature_divides_logits_for_every_log_prob():
    obj = PPO(temperature=0.5, whiten_advantages=False)
    policy, ref = tiny_lm(), tiny_lm(seed=1)
    attach_value_head(policy)
    batch = make_batch()
    rollout, _ = obj.make_rollout(
        policy,
        Frozen(ref),
        batch.input_ids,
        batch.attention_mask,
        batch.labels,
        batch.direction,
        torch.ones(batch.size),
    )
    with torch.no_grad():
        expected, _ = token_logps(
            policy_logits(policy, batch.input_ids, batch.attention_mask) / 0.5, batch.labels
        )
        expected_ref, _ = token_logps(
            policy_logits(ref, batch.input_ids, batch.attention_mask) / 0.5, batch.labels
        )
    assert torch.allclose(rollout.old_logps, expected, atol=1e-5)
    assert torch.allclose(rollout.ref_logps, expected_ref, atol=1e-5)


def test_first_pass_has_ratio_one_and_later_passes_clip():
    obj = PPO(clip_eps=0.05)
    policy, ref = tiny_lm(), tiny_lm(seed=1)
    attach_value_head(policy)
    batch = make_batch()
    rollout, _ = obj.make_rollout(
        policy,
        Frozen(ref),
        batch.input_ids,
        batch.attention_mask,
        batch.labels,
        batch.direction,
        torch.tensor([1.0, 0.0, 1.0, 0.0]),
    )
    out = obj.loss(policy, rollout)
    assert out.metrics["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-10)
    assert out.metrics["ppo/clip_fraction"] == 0.0
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        obj.loss(policy, rollout).loss.backward()
        opt.step()
    later = obj.loss(policy, rollout)
    assert later.metrics["ppo/approx_kl"] > 0 and later.metrics["ppo/clip_fraction"] > 0


def test_ppo_updates_raise_rewarded_and_lower_unrewarded_responses():
    """A few optimisation passes move log-probability towards the response with the higher score."""
    obj = PPO(kl_coef=0.0)
    policy, ref = tiny_lm(), tiny_lm()
    attach_value_head(policy)
    batch = make_batch()
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    rollout, _ = obj.make_rollout(
        policy, Frozen(ref), batch.input_ids, batch.attention_mask, batch.labels, batch.direction, scores
    )
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        obj.loss(policy, rollout).loss.backward()
        opt.step()
    with torch.no_grad():
        after, mask = token_logps(policy_logits(policy, batch.input_ids, batch.attention_mask), batch.labels)
    gain = ((after - rollout.old_logps) * mask).sum(-1) / mask.sum(-1)
    assert gain[0] > 0 and gain[2] > 0 and gain[1] < 0 and gain[3] < 0, gain


def test_group_baseline_uses_no_value_head_and_k3_kl_loss():
    obj = PPO(baseline="group", group_size=2, kl_coef=0.5)
    policy, ref = tiny_lm(), tiny_lm(seed=1)
    assert obj.prepare_policy(policy) == [] and get_value_head(policy) is None
    batch = make_batch()
    group = torch.tensor([0, 0, 1, 1])
    rollout, _ = obj.make_rollout(
        policy,
        Frozen(ref),
        batch.input_ids,
        batch.attention_mask,
        batch.labels,
        batch.direction,
        torch.tensor([1.0, 1.0, 0.0, 0.0]),
        group,  # equal scores in each group: zero advantage
    )
    assert rollout.old_values is None and rollout.returns is None
    assert float(rollout.advantages.abs().sum()) == 0.0
    out = obj.loss(policy, rollout)
    # Policy term is 0; the loss is β · mean over response tokens of k3(π, π_ref).
    k3 = []
    for p, r in zip(batch.prompt_ids, responses(batch.labels)):
        for a, b in zip(row_token_logps(policy, p, r), row_token_logps(ref, p, r)):
            k3.append(math.exp(b - a) - (b - a) - 1)
    assert out.loss.item() == pytest.approx(0.5 * sum(k3) / len(k3), rel=1e-5)
    assert "ppo/value_loss" not in out.metrics and "ppo/kl_k3/forward" in out.metrics


def test_select_trims_shared_padding():
    obj = PPO()
    policy, ref = tiny_lm(), tiny_lm(seed=1)
    attach_value_head(policy)
    batch = make_batch()
    rollout, _ = obj.make_rollout(
        policy,
        Frozen(ref),
        batch.input_ids,
        batch.attention_mask,
        batch.labels,
        batch.direction,
        torch.ones(batch.size),
    )
    short = int(batch.attention_mask.sum(-1).argmin())
    sub = rollout.select(torch.tensor([short]))
    width = int(batch.attention_mask[short].sum())
    assert sub.input_ids.shape == (1, width) and sub.old_logps.shape == (1, width - 1)
    full = obj.loss(policy, rollout.select(torch.tensor([short, short])))
    assert obj.loss(policy, sub).loss.item() == pytest.approx(full.loss.item(), rel=1e-5, abs=1e-6)
