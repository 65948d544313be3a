"""Small torch-only fixtures for objective tests: a random tiny causal LM and a hand-made batch."""

from __future__ import annotations

import math

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from revmix.objectives.base import IGNORE_INDEX, Batch

VOCAB = 48


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg)
    model.eval()  # no dropout: deterministic losses
    return model


def _pack(prompts: list[list[int]], responses: list[list[int]], pad: int = 0):
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(r)
    return ids, mask, labels


def make_batch(seed: int = 0, batch_size: int = 4, with_other: bool = True) -> Batch:
    """A batch with both directions, different prompt/response lengths and padding."""
    g = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    prompts = [rand(3 + i % 3) for i in range(batch_size)]
    responses = [rand(4 + (i * 2) % 5) for i in range(batch_size)]
    others = [rand(3 + (i * 3) % 4) for i in range(batch_size)]
    ids, mask, labels = _pack(prompts, responses)
    batch = Batch(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        direction=torch.tensor([i % 2 for i in range(batch_size)]),
        task=["synthetic/test"] * batch_size,
        prompt_ids=prompts,
        answer=[str(i) for i in range(batch_size)],
        item_id=[f"item-{i // 2}" for i in range(batch_size)],
    )
    if with_other:
        o_ids, o_mask, o_labels = _pack(prompts, others)
        batch.other_input_ids, batch.other_attention_mask, batch.other_labels = o_ids, o_mask, o_labels
    return batch


# --------------------------------------------------------------------------------------------------
# Hand-computed reference values for the contract suite
# --------------------------------------------------------------------------------------------------
# Each entry recomputes an objective's default loss from scratch, independently of the objective's code:
# one *unpadded* forward pass per row and sequence (so padding and pair concatenation are checked too),
# log-softmax in float64, and plain Python loops and `math` for the formula in the objective's paper.
# Signature: (policy, batch, reference model or None) -> float.


def responses(labels: torch.Tensor) -> list[list[int]]:
    """Each row's response tokens (labels != -100), in order."""
    return [row[row != IGNORE_INDEX].tolist() for row in labels]


@torch.no_grad()
def row_token_logps(model: torch.nn.Module, prompt: list[int], response: list[int]) -> list[float]:
    """log p(response[k] | prompt, response[:k]) for each k, from one unpadded forward pass."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return [float(logp[len(prompt) + k - 1, tok]) for k, tok in enumerate(response)]


def _sft_value(policy, batch, ref_model) -> float:
    lps = [
        lp for p, r in zip(batch.prompt_ids, responses(batch.labels)) for lp in row_token_logps(policy, p, r)
    ]
    return -sum(lps) / len(lps)


def _dpo_value(policy, batch, ref_model, beta: float = 0.1) -> float:
    """Rafailov et al. 2023, Eq. 7: mean of -log σ(β[(πc - πr) - (ref_c - ref_r)]), summed log-probs."""
    losses = []
    for p, yc, yr in zip(batch.prompt_ids, responses(batch.labels), responses(batch.other_labels)):
        pc, pr = sum(row_token_logps(policy, p, yc)), sum(row_token_logps(policy, p, yr))
        rc, rr = sum(row_token_logps(ref_model, p, yc)), sum(row_token_logps(ref_model, p, yr))
        h = (pc - pr) - (rc - rr)
        losses.append(math.log1p(math.exp(-beta * h)))
    return sum(losses) / len(losses)


def _unlikelihood_value(policy, batch, ref_model, alpha: float = 1.0, eps: float = 1e-6) -> float:
    """Welleck et al. 2019: mean NLL(y+) + α·mean over differing y− tokens of −log(1 − p)."""
    nll, penalty = [], []
    for p, yp, yn in zip(batch.prompt_ids, responses(batch.labels), responses(batch.other_labels)):
        nll += [-lp for lp in row_token_logps(policy, p, yp)]
        for k, lp in enumerate(row_token_logps(policy, p, yn)):
            if k >= len(yp) or yn[k] != yp[k]:  # only_differing=True (response-position alignment)
                penalty.append(-math.log(max(1.0 - math.exp(lp), eps)))
    return sum(nll) / len(nll) + alpha * (sum(penalty) / len(penalty) if penalty else 0.0)


def _multitask_value(policy, batch, ref_model) -> float:
    """Default routes: SFT on forward rows + unlikelihood on reverse rows, weights 1."""
    total = 0.0
    for code, fn in ((0, _sft_value), (1, _unlikelihood_value)):
        idx = torch.nonzero(batch.direction == code).flatten()
        if idx.numel():
            total += fn(policy, batch.select(idx), ref_model)
    return total


@torch.no_grad()
def row_values(model: torch.nn.Module, prompt: list[int], response: list[int]) -> list[float]:
    """The policy's value head (``model.v_head``) at each response token's state, float64, unpadded."""
    ids = torch.tensor([prompt + response])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double()
    lin = model.v_head.summary
    v = hidden @ lin.weight.double()[0] + lin.bias.double()[0]
    return [float(v[len(prompt) + k - 1]) for k in range(len(response))]


def _ppo_value(
    policy,
    batch,
    ref_model,
    kl_coef: float = 0.05,
    gamma: float = 1.0,
    lam: float = 0.95,
    vf_coef: float = 0.1,
) -> float:
    """Schulman et al. 2017 on a plain batch (revmix.objectives.ppo): y+ is a rollout with score 1, first pass.

    Per token r_k = −β(log π − log π_ref), plus 1 on the last token; GAE(γ, λ) with the value head's V;
    advantages whitened over all response tokens (unbiased variance); ratio 1, so the clipped surrogate is
    mean(−Â); the value loss is ½ mean((V − G)²) since V = V_old. Loss = L_clip + c_v · L_V.
    """
    advs, sq = [], []
    for p, r in zip(batch.prompt_ids, responses(batch.labels)):
        lp, rl, v = row_token_logps(policy, p, r), row_token_logps(ref_model, p, r), row_values(policy, p, r)
        rewards = [-kl_coef * (a - b) for a, b in zip(lp, rl)]
        rewards[-1] += 1.0
        adv, last, next_v = [0.0] * len(r), 0.0, 0.0
        for k in reversed(range(len(r))):
            last = rewards[k] + gamma * next_v - v[k] + gamma * lam * last
            adv[k], next_v = last, v[k]
        advs += adv
        sq += [0.5 * (v[k] - (adv[k] + v[k])) ** 2 for k in range(len(r))]
    mean = sum(advs) / len(advs)
    var = sum((a - mean) ** 2 for a in advs) / (len(advs) - 1)
    whitened = [(a - mean) / math.sqrt(var + 1e-8) for a in advs]
    policy_loss = sum(-w for w in whitened) / len(whitened)
    return policy_loss + vf_coef * sum(sq) / len(sq)


REFERENCE_VALUES = {
    "sft": _sft_value,
    "dpo": _dpo_value,
    "unlikelihood": _unlikelihood_value,
    "multitask": _multitask_value,
    "ppo": _ppo_value,
}
