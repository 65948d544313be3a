"""Hand-computed reference values for objective tests. The fixtures (a random tiny causal LM, a hand-made
batch) moved to :mod:`revmix.objectives.fixtures`, where plug-ins' checks use them too; re-exported here."""

from __future__ import annotations

import math

import torch

from revmix.objectives.base import IGNORE_INDEX, policy_logits
from revmix.objectives.fixtures import VOCAB as VOCAB
from revmix.objectives.fixtures import make_batch as make_batch
from revmix.objectives.fixtures import pack as _pack  # noqa: F401 - test_multitask imports it from here
from revmix.objectives.fixtures import tiny_lm as tiny_lm
from revmix.objectives.reference import FrozenCopyReference

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


def _kto_value(policy, batch, ref_model, beta: float = 0.1) -> float:
    """Ethayarajh et al. 2024 as TRL 1.16 (loss_type="kto"): examples e_k = (x_k mod B, y_k), y+ rows then
    y− rows; r = Σ log π − Σ log π_ref; z0 = max(0, mean_k r(x of e_k, y of e_(k−1 mod 2B))) (TRL's rotated
    KL pairs); loss = mean over e_k of 1 − σ(β(r − z0)) (y+) or 1 − σ(β(z0 − r)) (y−)."""

    def r(prompt: list[int], y: list[int]) -> float:
        return sum(row_token_logps(policy, prompt, y)) - sum(row_token_logps(ref_model, prompt, y))

    prompts = list(batch.prompt_ids) * 2
    ys = responses(batch.labels) + responses(batch.other_labels)
    n = len(ys)
    z0 = max(0.0, sum(r(prompts[k], ys[k - 1]) for k in range(n)) / n)
    terms = []
    for k in range(n):
        gain = r(prompts[k], ys[k]) - z0 if k < n // 2 else z0 - r(prompts[k], ys[k])
        terms.append(1.0 - 1.0 / (1.0 + math.exp(-beta * gain)))
    return sum(terms) / n


def _pair_logps(policy, batch) -> list[tuple[list[float], list[float]]]:
    """(token log-probs of y+, of y−) per row, each from its own unpadded float64 forward pass."""
    return [
        (row_token_logps(policy, p, yc), row_token_logps(policy, p, yr))
        for p, yc, yr in zip(batch.prompt_ids, responses(batch.labels), responses(batch.other_labels))
    ]


def _chosen_nll(pairs) -> float:
    """The token mean of −log π over every y+ token of the batch (TRL's NLL term)."""
    return -sum(sum(c) for c, _ in pairs) / sum(len(c) for c, _ in pairs)


def _simpo_value(policy, batch, ref_model, beta: float = 2.0, gamma_beta_ratio: float = 0.5) -> float:
    """Meng et al. 2024: mean of −log σ(β·mean log π(y+) − β·mean log π(y−) − γ), γ = β·ratio."""
    pairs = _pair_logps(policy, batch)
    z = [beta * (sum(c) / len(c) - sum(r) / len(r)) - beta * gamma_beta_ratio for c, r in pairs]
    return sum(math.log1p(math.exp(-v)) for v in z) / len(z)


def _cpo_value(policy, batch, ref_model, beta: float = 0.1, alpha: float = 1.0) -> float:
    """Xu et al. 2024: mean of −log σ(β(Σ log π(y+) − Σ log π(y−))) + α·NLL(y+)."""
    pairs = _pair_logps(policy, batch)
    pref = [math.log1p(math.exp(-beta * (sum(c) - sum(r)))) for c, r in pairs]
    return sum(pref) / len(pref) + alpha * _chosen_nll(pairs)


def _orpo_value(policy, batch, ref_model, lam: float = 0.1) -> float:
    """Hong et al. 2024: NLL(y+) − λ·mean log σ(log odds(y+) − log odds(y−)), odds of p = exp(mean log π)."""

    def log_odds(lps: list[float]) -> float:
        m = sum(lps) / len(lps)
        return m - math.log(1.0 - math.exp(m))

    pairs = _pair_logps(policy, batch)
    log_sig = [-math.log1p(math.exp(-(log_odds(c) - log_odds(r)))) for c, r in pairs]
    return _chosen_nll(pairs) - lam * sum(log_sig) / len(log_sig)


def _complementary_dpo_value(
    policy, batch, ref_model, beta: float = 0.1, floor: float = 0.5, alpha: float = 1.0
) -> float:
    """revmix.objectives.complementary: mean of −log σ(β(u+ − max(u−, −δ|y−|))) + α·NLL(y+), with u the
    summed log-ratio to the reference and δ the per-token floor."""
    pairs, losses = _pair_logps(policy, batch), []
    for p, yc, yr, (c, r) in zip(
        batch.prompt_ids, responses(batch.labels), responses(batch.other_labels), pairs
    ):
        u_chosen = sum(c) - sum(row_token_logps(ref_model, p, yc))
        u_rejected = sum(r) - sum(row_token_logps(ref_model, p, yr))
        losses.append(math.log1p(math.exp(-beta * (u_chosen - max(u_rejected, -floor * len(yr))))))
    return sum(losses) / len(losses) + alpha * _chosen_nll(pairs)


REFERENCE_VALUES = {
    "sft": _sft_value,
    "dpo": _dpo_value,
    "complementary_dpo": _complementary_dpo_value,
    "kto": _kto_value,
    "unlikelihood": _unlikelihood_value,
    "multitask": _multitask_value,
    "ppo": _ppo_value,
    "simpo": _simpo_value,
    "cpo": _cpo_value,
    "orpo": _orpo_value,
}


class CountingReference:
    """A reference that takes the concatenated pairs only and counts its forward passes."""

    shared_prompt = False
    length_groups = 1

    def __init__(self, model: torch.nn.Module) -> None:
        self.inner, self.calls = FrozenCopyReference(model), 0

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner.logits(input_ids, attention_mask)


class Frozen:
    """The bare minimum a PPO step asks of a reference: logits of a model in eval mode, no gradient."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return policy_logits(self.model, input_ids, attention_mask)


def train_steps(objective, policy: torch.nn.Module, batch, ref, steps: int = 10, lr: float = 1e-2):
    """``steps`` AdamW steps of ``objective`` on one batch; returns (first metrics, last LossOutput)."""
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    first, out = None, None
    for _ in range(steps):
        out = objective(policy, batch, ref)
        first = first if first is not None else out.metrics
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return first, out
