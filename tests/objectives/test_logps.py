"""Chunked log-probs (objectives.base): equal to the plain float32 ``log_softmax`` in values and gradients,
for any chunk size, with padding and ``-100`` labels, float32 and bfloat16 logits, with a temperature."""

from __future__ import annotations

import math

import pytest
import torch

from revmix.objectives import base
from revmix.objectives.base import (
    IGNORE_INDEX,
    Batch,
    build_objective,
    sequence_logps,
    target_logps,
    token_logps,
    token_stats,
)

B, T, V = 3, 9, 50
# Per-element tolerance relative to the largest magnitude compared: float32 is exact to ~1e-7 and the sums
# over V add a little; bfloat16 gradients are rounded to 8 mantissa bits (relative step 2^-8).
REL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    scale = max(1.0, float(want.abs().max()))
    err = float((got.detach().double() - want.detach().double()).abs().max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel:.0e} × {scale:.3g}"


def _inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows: prompts of 3/2/4 tokens, responses to the end or padded (label -100 after)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, :2] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX  # padding
    labels[2, :4] = IGNORE_INDEX
    labels[2, 8:] = IGNORE_INDEX
    return logits, labels


def _plain(logits: torch.Tensor, labels: torch.Tensor, tau: float) -> tuple[torch.Tensor, ...]:
    """The unchunked reference in float64: log-probs, mask, entropy, vocabulary-mean log-prob."""
    logp_all = torch.log_softmax(logits[:, :-1].double() / tau, dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logp_all.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return picked * mask, mask, entropy * mask, logp_all.mean(-1) * mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_chunked_values_and_gradients_equal_the_plain_log_softmax(dtype, chunk, tau):
    logits, labels = _inputs(dtype)
    w = torch.randn(3, B, T - 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    got_leaf = logits.clone().requires_grad_()
    stats = token_stats(got_leaf, labels, tau, chunk=chunk)
    lp, mask = token_logps(got_leaf, labels, tau, chunk=chunk)
    loss = sum((wi * s.double()).sum() for wi, s in zip(w, (stats.logp, stats.entropy, stats.mean_logp)))
    loss.backward()

    want_leaf = logits.clone().double().requires_grad_()
    want = _plain(want_leaf, labels, tau)
    sum((wi * s).sum() for wi, s in zip(w, (want[0], want[2], want[3]))).backward()

    assert torch.equal(mask, want[1]) and torch.equal(stats.mask, want[1])
    for got, ref in (
        (lp, want[0]),
        (stats.logp, want[0]),
        (stats.entropy, want[2]),
        (stats.mean_logp, want[3]),
    ):
        assert got.dtype == torch.float32
        _close(got, ref.detach(), 1e-5)  # the forward is float32 whatever the logits' dtype
        assert bool((got[~mask] == 0).all())  # off the response: exactly 0
    assert got_leaf.grad is not None and got_leaf.grad.dtype == dtype
    _close(got_leaf.grad, want_leaf.grad, REL[dtype])


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_token_logps_gradient_alone_and_sequence_sums(chunk):
    """A statistic no loss uses adds nothing to the gradient; sequence_logps sums the response tokens."""
    logits, labels = _inputs(torch.float32, seed=3)
    a = logits.clone().requires_grad_()
    lp, mask = token_logps(a, labels, chunk=chunk)
    (lp * torch.arange(1.0, T).expand(B, -1)).sum().backward()
    b = logits.clone().requires_grad_()
    stats = token_stats(b, labels, chunk=chunk)  # entropy and mean computed, not in the loss
    (stats.logp * torch.arange(1.0, T).expand(B, -1)).sum().backward()
    assert a.grad is not None and b.grad is not None
    _close(a.grad, b.grad, 1e-6)
    want = _plain(logits, labels, 1.0)[0].sum(-1)
    _close(sequence_logps(logits, labels), want, 1e-5)
    n = mask.sum(-1)
    _close(sequence_logps(logits, labels, average=True), want / n, 1e-5)


def test_hand_computed_uniform_and_peaked_rows():
    """Uniform logits: log p = −log V and entropy log V; one logit raised by log 3 over V−1 zeros:
    p = 3 / (V + 2) for it and 1 / (V + 2) for the others."""
    logits = torch.zeros(1, 3, V)
    logits[0, 1, 5] = math.log(3.0)
    labels = torch.tensor([[IGNORE_INDEX, 7, 5]])
    stats = token_stats(logits, labels, chunk=1)
    assert stats.logp[0, 0].item() == pytest.approx(-math.log(V), rel=1e-6)
    assert stats.entropy[0, 0].item() == pytest.approx(math.log(V), rel=1e-6)
    assert stats.mean_logp[0, 0].item() == pytest.approx(-math.log(V), rel=1e-6)
    p_hi, p_lo = 3.0 / (V + 2), 1.0 / (V + 2)
    assert stats.logp[0, 1].item() == pytest.approx(math.log(p_hi), rel=1e-6)
    h = -(p_hi * math.log(p_hi) + (V - 1) * p_lo * math.log(p_lo))
    assert stats.entropy[0, 1].item() == pytest.approx(h, rel=1e-6)


def test_no_float32_block_larger_than_one_chunk(monkeypatch):
    """The only float32 vocabulary blocks, forward and backward, are one chunk of positions (chunk // B
    positions of every row), never the whole [B, T-1, V]."""
    seen: list[tuple[int, ...]] = []
    real = base._scaled

    def spy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
        seen.append(tuple(logits.shape))
        return real(logits, temperature)

    monkeypatch.setattr(base, "_scaled", spy)
    logits, labels = _inputs(torch.bfloat16)
    leaf = logits.clone().requires_grad_()
    lp, _ = token_logps(leaf, labels, chunk=6)  # 6 // 3 rows = 2 positions per chunk
    lp.sum().backward()
    assert seen and max(math.prod(s) for s in seen) == B * 2 * V
    assert len(seen) == 2 * math.ceil((T - 1) / 2)  # forward and backward, every chunk once


def test_target_logps_without_shift_matches_gather():
    logits, _ = _inputs(torch.float32, seed=5)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(6))
    want = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    _close(target_logps(logits, targets, chunk=4), want, 1e-5)


class _FixedLogits(torch.nn.Module):
    """A "policy" whose logits are a trainable parameter (the objective sees only logits)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sft_label_smoothing_uses_the_chunked_vocabulary_mean(eps):
    """SFT = (1 − ε) · mean NLL + ε · mean over response tokens of −(1/V) Σ_v log p_v, and its gradient."""
    logits, labels = _inputs(torch.float32, seed=7)
    policy = _FixedLogits(logits)
    ids = torch.zeros(B, T, dtype=torch.long)
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, direction=torch.zeros(B))
    out = build_objective({"name": "sft", "label_smoothing": eps})(policy, batch)
    out.loss.backward()

    leaf = logits.double().requires_grad_()
    picked, mask, _, mean = _plain(leaf, labels, 1.0)
    n = mask.sum()
    want = (1 - eps) * (-picked.sum() / n) + eps * (-mean.sum() / n)
    want.backward()
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert policy.logits.grad is not None and leaf.grad is not None
    _close(policy.logits.grad, leaf.grad, 1e-5)
