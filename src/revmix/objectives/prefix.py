"""Preference pairs scored with one shared prompt: x, y+ and y− in one row (Wang et al. 2024, "Accelerating
Direct Preference Optimization with Prefix Sharing", arXiv 2410.20305).

DPO scores log π(y+ | x) and log π(y− | x). The usual concatenated batch runs the prompt x twice (once
before each response); here each pair is one row ``[x, y+, y−]`` with a block attention mask — y− sees x
and itself, never y+ — and position ids that restart y− right after x, so every response token gets
exactly the logits it would get in its own sequence. Per pair that is |x| + |y+| + |y−| tokens instead of
2|x| + |y+| + |y−|: 21% fewer on ``dpo_tiny``'s synthetic twins (affine_mod, arith_chain, string_ops).

The first token of y+ and of y− are both predicted from the last prompt position; every later token from
the position before it in its own block. Rows are forwarded in up to ``length_groups`` groups of similar length
(:func:`revmix.objectives.buckets.length_buckets`), like every other forward pass.

The mask needs an attention implementation that honours a custom 4-D mask (``sdpa``, ``eager``);
:func:`supports_shared_prompt` says whether a model does. The training loop asks it once, of the model
itself, and hands the answer to objectives (``Batch.policy_forward``, ``Reference.shared_prompt``); they
score the concatenated batch when the answer is no, or when a pair's two rows do not share their prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from revmix.objectives.base import IGNORE_INDEX, Batch, score_targets, target_logps_and_entropy
from revmix.objectives.buckets import length_buckets

MASK_AWARE_ATTENTION = ("sdpa", "eager")


def supports_shared_prompt(model: Any) -> bool:
    """True when ``model`` — a Hugging Face or PEFT causal LM itself, not a wrapper around one — attends
    with a custom 4-D mask."""
    return model.config._attn_implementation in MASK_AWARE_ATTENTION


@dataclass
class SharedPromptPairs:
    """Packed rows and the bookkeeping to read the two responses' log-probs back out."""

    input_ids: Tensor  # [B, W]
    position_ids: Tensor  # [B, W]
    allowed: Tensor  # [B, W, W] bool: query i may attend key j
    lengths: list[int]  # real tokens per row (|x| + |y+| + |y−|)
    predictor: Tensor  # [B, N] position whose logits predict each response token
    target: Tensor  # [B, N] the response token
    is_rejected: Tensor  # [B, N] bool: token belongs to y−
    valid: Tensor  # [B, N] bool


def _response(ids: Tensor, labels: Tensor) -> tuple[int, list[int]] | None:
    """(prompt length, response tokens) of one right-padded row, or None if its labels are not one run."""
    where = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    if not where or where != list(range(where[0], where[-1] + 1)):
        return None
    return where[0], ids[where[0] : where[-1] + 1].tolist()


def pack_shared_prompt(batch: Batch) -> SharedPromptPairs | None:
    """One ``[x, y+, y−]`` row per pair; ``None`` when some pair cannot be packed (then score unshared)."""
    if batch.other_input_ids is None or batch.other_labels is None:
        return None
    rows = []
    for i in range(batch.size):
        chosen = _response(batch.input_ids[i], batch.labels[i])
        rejected = _response(batch.other_input_ids[i], batch.other_labels[i])
        if chosen is None or rejected is None or chosen[0] != rejected[0] or chosen[0] == 0:
            return None
        p = chosen[0]
        prompt = batch.input_ids[i, :p]
        if not torch.equal(prompt, batch.other_input_ids[i, :p]):
            return None
        rows.append((prompt.tolist(), chosen[1], rejected[1]))
    width = max(len(x) + len(c) + len(r) for x, c, r in rows)
    n_resp = max(len(c) + len(r) for _, c, r in rows)
    b = len(rows)
    ids = torch.zeros(b, width, dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    allowed = torch.zeros(b, width, width, dtype=torch.bool)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    predictor = torch.zeros(b, n_resp, dtype=torch.long)
    target = torch.zeros(b, n_resp, dtype=torch.long)
    is_rej = torch.zeros(b, n_resp, dtype=torch.bool)
    valid = torch.zeros(b, n_resp, dtype=torch.bool)
    lengths = []
    for i, (x, c, r) in enumerate(rows):
        p, nc, nr = len(x), len(c), len(r)
        n = p + nc + nr
        lengths.append(n)
        ids[i, :n] = torch.tensor(x + c + r)
        pos[i, :n] = torch.cat([torch.arange(p + nc), torch.arange(p, p + nr)])
        a = causal.clone()
        a[p + nc : n, p : p + nc] = False  # y− never sees y+
        a[:, n:] = False  # nobody attends to padding ...
        a[torch.arange(n, width), torch.arange(n, width)] = True  # ... but padding sees itself (no NaN rows)
        allowed[i] = a
        chosen_pred = [p - 1 + k for k in range(nc)]
        rejected_pred = [p - 1] + [p + nc + k - 1 for k in range(1, nr)]
        predictor[i, : nc + nr] = torch.tensor(chosen_pred + rejected_pred)
        target[i, : nc + nr] = torch.tensor(c + r)
        is_rej[i, nc : nc + nr] = True
        valid[i, : nc + nr] = True
    dev = batch.input_ids.device
    return SharedPromptPairs(
        ids.to(dev), pos.to(dev), allowed.to(dev), lengths, predictor.to(dev), target.to(dev),
        is_rej.to(dev), valid.to(dev),
    )  # fmt: skip


def shared_prompt_token_logps(
    forward: Any,
    packed: SharedPromptPairs,
    length_groups: int = 1,
    entropy: bool = False,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per response token of every pair (``[B, N]``, 0 where not ``packed.valid``): its log-prob and, with
    ``entropy``, the entropy of the next-token distribution it was drawn from (else None).

    ``forward(input_ids, attention_mask, position_ids)`` returns logits, or — with ``weight``, the output
    layer's — the final hidden states, scored by the fused kernel
    (:func:`~revmix.objectives.base.log_prob_forward`; no entropy then). It is called once per length group
    (``length_groups=1`` where a single call is required, e.g. under DDP).
    """
    if entropy and weight is not None:
        raise ValueError("shared_prompt_token_logps: the entropy needs the logits; the fused kernel has none")
    logps = torch.zeros(packed.target.shape, device=packed.input_ids.device)
    entropies = torch.zeros_like(logps) if entropy else None
    for group in length_buckets(packed.lengths, max(1, length_groups)):
        idx = torch.tensor(group, device=packed.input_ids.device)
        w = max(packed.lengths[i] for i in group)
        mask = packed.allowed[idx, :w, :w].unsqueeze(1)
        scores = forward(packed.input_ids[idx, :w], mask, packed.position_ids[idx, :w])
        rows = scores.gather(1, packed.predictor[idx].unsqueeze(-1).expand(-1, -1, scores.shape[-1]))
        if entropies is None:
            lp = score_targets(rows, weight, packed.target[idx])
        else:
            lp, ent = target_logps_and_entropy(rows, packed.target[idx])
            entropies = entropies.index_put((idx,), ent.detach() * packed.valid[idx])
        logps = logps.index_put((idx,), lp * packed.valid[idx])
    return logps, entropies


def per_response_sums(values: Tensor, packed: SharedPromptPairs) -> tuple[Tensor, Tensor]:
    """Sums of per-token ``values`` (``[B, N]``) over y+'s tokens and over y−'s tokens, ``[B]`` each."""
    chosen_sel = packed.valid & ~packed.is_rejected
    rejected_sel = packed.valid & packed.is_rejected
    return (values * chosen_sel).sum(-1), (values * rejected_sel).sum(-1)


def shared_prompt_logps(
    forward: Any, packed: SharedPromptPairs, length_groups: int = 1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Summed log-probs of y+ and y− per pair and their token counts: ``(chosen, rejected, n_c, n_r)``
    (``forward`` and ``length_groups`` as in :func:`shared_prompt_token_logps`)."""
    logps, _ = shared_prompt_token_logps(forward, packed, length_groups)
    chosen, rejected = per_response_sums(logps, packed)
    n_chosen = (packed.valid & ~packed.is_rejected).sum(-1)
    n_rejected = (packed.valid & packed.is_rejected).sum(-1)
    return chosen, rejected, n_chosen, n_rejected
