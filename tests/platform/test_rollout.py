"""PPO's training step: the rollout engine samples the live weights, scoring, optimizer steps, errors;
a seeded slow test that PPO raises the reward of an SFT'd tiny model and that kl_coef bounds the KL."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from revmix.config import StageConfig
from revmix.objectives.base import build_objective, policy_logits, token_logps
from revmix.objectives.ppo import get_value_head
from revmix.objectives.reference import FrozenCopyReference
from revmix.platform.data import synthetic
from revmix.platform.data.tokenize import collate, tokenise_rows
from revmix.platform.generation.protocol import SamplingParams
from revmix.platform.models import load_model
from revmix.platform.rollout.engines import HFRolloutEngine, RolloutEngine
from revmix.platform.rollout.step import ppo_step
from revmix.platform.step import StepContext


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models run 5-10x slower when two threads fight other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_ctx(model, tok, objective, lr=1e-3, device="cpu", autocast=False, **stage) -> StepContext:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return StepContext(
        policy=model,
        train_model=model,
        ref=FrozenCopyReference(model),
        objective=objective,
        optimizer=torch.optim.AdamW(trainable, lr=lr),
        trainable=trainable,
        tokenizer=tok,
        device=torch.device(device),
        stage=StageConfig(**{"batch_size": 4, "max_grad_norm": 1.0, **stage}),
        world=1,
        autocast=autocast,
        micro=4,
        with_other=False,
        seed=0,
    )


class Scripted:
    """A RolloutEngine answering each prompt with its row's own solution (correct) and a wrong one."""

    def __init__(self, rows: list[dict], wrong: list[int]) -> None:
        self.by_prompt = {tuple(r["prompt_ids"]): r["response_ids"] for r in rows}
        self.wrong = wrong
        self.calls: list[SamplingParams] = []

    def generate(self, policy, prompt_ids, params):
        self.calls.append(params)
        return [[list(self.by_prompt[tuple(p)]), list(self.wrong)][: params.n] for p in prompt_ids]

    def close(self) -> None:
        pass


def test_hf_engine_samples_the_current_weights(tiny):
    path, tok, rows = tiny
    model = load_model(path)
    engine = HFRolloutEngine.for_policy(model, tok)
    assert isinstance(engine, RolloutEngine)
    prompts = [r["prompt_ids"] for r in rows[:3]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=5)
    rng_before = torch.random.get_rng_state()
    first = engine.generate(model, prompts, params)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # sampling never moves the training RNG
    assert engine.generate(model, prompts, params) == first  # same weights + seed: same samples
    assert [len(x) for x in first] == [2, 2, 2]
    for outs in first:
        for o in outs:
            assert 1 <= len(o) <= 12 and all(t not in engine.eos_ids for t in o[:-1])
    original = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.model.norm.weight.mul_(torch.linspace(0.2, 3.0, model.model.norm.weight.numel()))
    assert engine.generate(model, prompts, params) != first  # changed weights → different rollouts
    model.load_state_dict(original)
    assert engine.generate(model, prompts, params) == first
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    assert engine.generate(model, prompts, greedy) == engine.generate(model, prompts, greedy.replace(seed=9))


def test_hf_engine_samples_a_chunk_by_its_place(tiny):
    """A chunk's samples depend on its prompts and its first prompt's index only: two workers sampling
    their halves of a batch (the second seeded ``seed + 2``) get what one worker gets for the whole batch
    with the same chunk size — the sampling half of PPO's multi-worker equality."""
    path, tok, rows = tiny
    model = load_model(path)
    engine = HFRolloutEngine.for_policy(model, tok, batch_size=2)
    prompts = [r["prompt_ids"] for r in rows[:4]]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=11)
    whole = engine.generate(model, prompts, params)
    halves = engine.generate(model, prompts[:2], params) + engine.generate(
        model, prompts[2:], params.replace(seed=13)
    )
    assert halves == whole
    assert engine.generate(model, prompts[2:], params) != whole[2:]  # the place, not only the prompts


def test_ppo_step_scores_trains_and_reports_per_direction(tiny):
    path, tok, rows = tiny
    model = load_model(path).train()
    obj = build_objective(
        {
            "name": "ppo",
            "group_size": 2,
            "ppo_epochs": 3,
            "num_mini_batches": 2,
            "kl_coef": 0.0,
            "temperature": 0.7,
            "lam": 1.0,  # with V = 0 every token's advantage is then its row's score (before whitening)
        }
    )
    ctx = make_ctx(model, tok, obj, lr=3e-3)
    wrong = tok("7 + 1 = 5\nAnswer: 99", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch_rows = rows[:4]  # two forward, two reverse
    engine = Scripted(batch_rows, wrong)
    b = collate(batch_rows, tok.pad_token_id, with_other=False)
    bad = collate([{**r, "response_ids": wrong} for r in batch_rows], tok.pad_token_id, with_other=False)

    def logps(batch):
        with torch.no_grad():
            lp, m = token_logps(policy_logits(model, batch.input_ids, batch.attention_mask), batch.labels)
        return lp.sum(-1) / m.sum(-1)

    margin_before = logps(b) - logps(bad)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        ctx.optimizer, lambda s: 0.5
    )  # built before, as in the loop
    metrics, n_tokens = ppo_step(ctx, batch_rows, step=3, engine=engine)
    scheduler.step()  # still one param group: the head's LR is scheduled too

    assert (
        engine.calls[0].n == 2 and engine.calls[0].temperature == 0.7 and engine.calls[0].max_new_tokens == 64
    )
    assert metrics["ppo/accuracy/forward"] == metrics["ppo/accuracy/reverse"] == 0.5
    assert metrics["ppo/format"] == 1.0 and metrics["ppo/score"] == 0.5
    lengths = [len(r["response_ids"]) for r in batch_rows] + [len(wrong)] * 4
    assert metrics["ppo/response_length"] == pytest.approx(sum(lengths) / 8)
    assert n_tokens == sum(len(r["prompt_ids"]) for r in batch_rows) * 2 + sum(lengths)
    for key in ("reward", "kl", "clip_fraction", "value_loss", "entropy", "response_length", "accuracy"):
        assert f"ppo/{key}/forward" in metrics and f"ppo/{key}/reverse" in metrics, key
    assert all(
        f"ppo/time/{k}_s" in metrics for k in ("rollout", "scoring", "reference", "old_logps", "optimisation")
    )
    # The value head was created, handed to the optimizer, and stepped ppo_epochs × num_mini_batches times.
    head = get_value_head(model)
    assert head is not None and len(ctx.optimizer.param_groups) == 1  # the LR scheduler's one group
    assert all(any(p is q for q in ctx.optimizer.param_groups[0]["params"]) for p in head.parameters())
    assert all(any(p is q for q in ctx.trainable) for p in head.parameters())
    assert int(ctx.optimizer.state[head.summary.weight]["step"]) == 6
    assert torch.count_nonzero(head.summary.weight) > 0
    assert model.training  # dropout was off for the step only
    # The rewarded (correct) responses gained log-probability relative to the wrong one.
    assert bool(((logps(b) - logps(bad)) > margin_before).all())
    # A second step reuses the head and its param group.
    n_params = len(ctx.optimizer.param_groups[0]["params"])
    ppo_step(ctx, batch_rows, step=4, engine=engine)
    assert len(ctx.optimizer.param_groups[0]["params"]) == n_params


def test_ppo_step_group_baseline_with_the_hf_engine(tiny):
    path, tok, rows = tiny
    model = load_model(path)
    obj = build_objective(
        {"name": "ppo", "baseline": "group", "group_size": 3, "max_new_tokens": 8, "ppo_epochs": 1}
    )
    ctx = make_ctx(model, tok, obj)
    before = [p.detach().clone() for p in ctx.trainable]
    metrics, _ = ppo_step(ctx, rows[:2], step=0)
    assert get_value_head(model) is None and len(ctx.optimizer.param_groups) == 1
    assert "ppo/kl_k3/forward" in metrics and "ppo/value_loss" not in metrics
    assert metrics["ppo/kl"] == pytest.approx(0.0, abs=1e-6)  # first step: policy == reference
    assert metrics["ppo/response_length"] <= 8
    # Random-model rewards are all 0 → zero advantages, zero KL: the update is a no-op or tiny, but runs.
    assert all(torch.isfinite(p).all() for p in ctx.trainable) and len(before) == len(ctx.trainable)


def test_ppo_step_errors(tiny):
    path, tok, rows = tiny
    model = load_model(path)
    ctx = make_ctx(model, tok, build_objective({"name": "ppo", "num_mini_batches": 9}))
    with pytest.raises(ValueError, match="num_mini_batches=9 exceeds the rollout batch of 2"):
        ppo_step(ctx, rows[:2], 0, engine=Scripted(rows, [2]))
    ctx.ref_cache = object()
    with pytest.raises(ValueError, match="reference: 'cache'"):
        ppo_step(ctx, rows[:2], 0)
    ctx.ref_cache, ctx.ref = None, None
    with pytest.raises(ValueError, match="ctx.ref is None"):
        ppo_step(ctx, rows[:2], 0)
    ctx.objective = build_objective({"name": "sft"})
    with pytest.raises(TypeError, match="ppo_step: objective SFT does not implement RolloutObjective"):
        ppo_step(ctx, rows[:2], 0)
    bad = make_ctx(model, tok, build_objective({"name": "ppo", "reward": "accuracy"}))
    with pytest.raises(ValueError, match="unknown reward 'accuracy'; valid rewards: correct"):
        ppo_step(bad, rows[:2], 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("baseline", ["critic", "group"])
def test_ppo_step_on_gpu_with_bf16_autocast(tiny, baseline):
    path, tok, rows = tiny
    model = load_model(path, device="cuda")
    obj = build_objective({"name": "ppo", "baseline": baseline, "group_size": 2, "max_new_tokens": 16})
    ctx = make_ctx(model, tok, obj, device="cuda", autocast=True)
    for step in range(2):
        metrics, n = ppo_step(ctx, rows[:4], step)
    assert n > 0 and all(v == v for v in metrics.values())  # no NaN
    head = get_value_head(model)
    assert (head is None) == (baseline == "group")
    if head is not None:
        assert head.summary.weight.device.type == "cuda" and head.summary.weight.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Slow: PPO learns, and kl_coef holds the policy near the reference
# --------------------------------------------------------------------------------------------------

REWARD = {"name": "sum", "terms": [{"name": "correct", "weight": 1.0}, {"name": "format", "weight": 0.5}]}


@pytest.fixture(scope="module")
def sft_model(tiny):
    """The tiny model after a brief seeded SFT on affine_mod: it ends with 'Answer:' ~15% of the time."""
    path, tok, _ = tiny
    torch.manual_seed(0)
    model = load_model(path)
    rows, _ = tokenise_rows(synthetic.generate("affine_mod", 200, seed=0), tok, 256)
    sft = build_objective({"name": "sft"})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(120):
        out = sft(model, collate(rng.sample(rows, 16), tok.pad_token_id, with_other=False), None)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return copy.deepcopy(model.state_dict()), rows


def _run_ppo(tiny, sft_model, steps: int, **objective) -> list[dict]:
    path, tok, _ = tiny
    state, rows = sft_model
    model = load_model(path)
    model.load_state_dict(state)
    model.train()
    obj = build_objective(
        {"name": "ppo", "group_size": 4, "max_new_tokens": 48, "reward": REWARD, **objective}
    )
    ctx = make_ctx(model, tok, obj, lr=1e-3, batch_size=8)
    rng = random.Random(1)
    return [ppo_step(ctx, rng.sample(rows, 8), step)[0] for step in range(steps)]


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["group", "critic"])
def test_ppo_raises_reward_of_sft_model(tiny, sft_model, baseline):
    recs = _run_ppo(tiny, sft_model, 12, baseline=baseline, kl_coef=0.01)
    first = sum(r["ppo/score"] for r in recs[:4]) / 4
    last = sum(r["ppo/score"] for r in recs[-4:]) / 4
    assert first < 0.5  # clearly below the maximum 1.5 (correct + format)
    assert last > first + 0.1, [round(r["ppo/score"], 3) for r in recs]
    assert recs[-1]["ppo/format"] > recs[0]["ppo/format"]


@pytest.mark.slow
def test_larger_kl_coef_keeps_policy_closer_to_reference(tiny, sft_model):
    kl = {}
    for coef in (0.01, 0.5):
        recs = _run_ppo(tiny, sft_model, 8, kl_coef=coef)
        kl[coef] = sum(r["ppo/kl"] for r in recs[2:]) / len(recs[2:])
    assert kl[0.5] < 0.7 * kl[0.01], kl
