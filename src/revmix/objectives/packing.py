"""Several rows per sequence: the same per-token log-probs as right-padded rows, without the padding.

A right-padded micro-batch costs ``B × T_max`` tokens of compute whatever its rows' lengths. Packing
(as in Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination", arXiv 2107.02027)
lays rows end to end; each row's ``position_ids`` restart at 0 and no token attends across a row
boundary, so every real token gets exactly the logits it gets alone in a padded row:

.. math::  \\text{allowed}[p, i, j] = (s_{p,i} = s_{p,j}) \\wedge (j \\le i)

where :math:`s_{p,i}` is the row that position ``i`` of packed sequence ``p`` holds. Two layouts, chosen
once by the training loop from the attention kernel (:func:`packing_mode`, ``PolicyForward.packing``):

* ``"mask"`` (sdpa, eager): rows go into sequences of at most the longest row's length (first-fit
  decreasing), with that boolean 4-D mask ``[P, 1, W, W]`` — as :mod:`revmix.objectives.prefix` does for
  DPO. No sequence is wider than the padded batch, so attention's ``W²`` never grows; the linear layers
  and the LM head see ``P × W`` instead of ``B × W`` positions.
* ``"varlen"`` (flash_attention_2): every row in one sequence ``[1, Σ L]`` with no mask and no padding;
  transformers reads the row boundaries off the restarted ``position_ids`` (``cu_seqlens``) and calls
  flash-attention's variable-length kernel.

Labels: a row's first token is never a target (the causal shift drops it in a padded row); in a packed
sequence it would be predicted by the previous row's last token, so it is set to ``-100``. Log-probs
come back in the padded layout ``[B, T-1]`` (:meth:`PackedBatch.unpack`), so an objective's sums, means
and per-row metrics are computed by the same code either way, and are equal up to float rounding.

Measured by ``benchmarks/packing_throughput.py --quick`` (30M ``base`` model + LoRA, fp32, sdpa, one CPU
thread, 8 rows of 24-160 tokens): the ``"mask"`` layout computes 1.23 positions per real token against
1.79 padded, 1.32× the tokens/s of one padded pass, and about the same as two length groups (0.96×,
1.21 positions per token; ``runtime.length_buckets=2``, the default) — so ``runtime.packing`` is off by
default. The padding-free ``"varlen"`` layout, where packing should pay off, needs flash_attention_2 on
a GPU and is not measured here (``benchmarks/results/packing_throughput.json``).

Row-based objectives use it: ``sft`` and ``unlikelihood`` (whose y+ and y− rows are independent in the
forward pass; the pairing only enters the loss, over the unpacked layout). Objectives that read the
logits of pairs together (``dpo``'s shared prompt, ``kto``, ``ppo``) do not pack.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from revmix.objectives.base import (
    IGNORE_INDEX,
    LogpKernel,
    PackingMode,
    TokenStats,
    forward_token_logps,
    log_prob_forward,
    policy_logits,
    score_tokens,
    token_stats,
)
from revmix.objectives.buckets import is_right_padded

PACKING_KERNELS: dict[str, PackingMode] = {"sdpa": "mask", "eager": "mask", "flash_attention_2": "varlen"}
"""Attention implementations that keep packed rows apart, and the layout each takes."""


def packing_mode(model: Any) -> PackingMode:
    """The packed layout ``model`` (a Hugging Face or PEFT causal LM itself) takes; a ``ValueError`` naming
    the kernels that pack when its attention implementation is not one of them."""
    attn = model.config._attn_implementation
    if attn not in PACKING_KERNELS:
        raise ValueError(
            f"runtime.packing needs an attention implementation that keeps packed rows apart; "
            f"{attn!r} is not one of {', '.join(PACKING_KERNELS)} (set model.attn_implementation, or "
            "runtime.packing=false)"
        )
    return PACKING_KERNELS[attn]


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into bins of at most ``capacity`` tokens, longest rows first.

    First-fit decreasing uses at most ``11/9 · OPT + 6/9`` bins (Dósa 2007), where greedy in-order packing
    (next-fit) may use up to ``2 · OPT``; fewer bins is fewer padded positions. Ties keep the original
    order, so the packing is deterministic.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"first_fit_decreasing: a row of {max(lengths)} tokens exceeds capacity {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, r in enumerate(room) if r >= lengths[i]), len(bins))
        if k == len(bins):
            bins.append([])
            room.append(capacity)
        bins[k].append(i)
        room[k] -= lengths[i]
    return bins


@dataclass
class PackedBatch:
    """Rows packed into ``P`` sequences of width ``W``, and where each row went."""

    input_ids: Tensor  # [P, W]
    position_ids: Tensor  # [P, W]: 0, 1, … restarting at each row; 0 on padding
    labels: Tensor  # [P, W]: the rows' labels, -100 on each row's first token and on padding
    attention_mask: Tensor | None  # [P, 1, W, W] bool (query i may attend key j), or None (varlen)
    source: Tensor  # [B, L_max - 1] long: flat index into [P, W - 1] of row b's shifted target t
    valid: Tensor  # [B, L_max - 1] bool: t < L_b - 1

    def unpack(self, values: Tensor, width: int) -> Tensor:
        """Per-target ``values`` of the packed sequences (``[P, W-1]``, after the causal shift) in the
        padded layout ``[B, width-1]``; positions past a row's last target hold 0 (False)."""
        flat = values.reshape(-1)[self.source]
        out = flat & self.valid if flat.dtype == torch.bool else flat * self.valid
        return torch.nn.functional.pad(out, (0, width - 1 - out.shape[1]))


def pack_rows(rows: Sequence[tuple[Tensor, Tensor]], max_tokens: int, block_mask: bool = True) -> PackedBatch:
    """Pack ``(input_ids, labels)`` rows (1-D, unpadded) into sequences of at most ``max_tokens`` tokens.

    Bins by :func:`first_fit_decreasing`. ``block_mask``: build the ``[P, 1, W, W]`` boolean mask (the
    ``"mask"`` layout); without it the caller relies on restarted ``position_ids`` alone (``"varlen"``,
    where one sequence holds every row).

    Args:
        rows: ``B`` pairs of ``[L_b]`` long tensors, on one device.
        max_tokens: the most tokens one packed sequence holds; at least the longest row.
    """
    lengths = [int(ids.shape[0]) for ids, _ in rows]
    bins = first_fit_decreasing(lengths, max_tokens)
    width = max([sum(lengths[i] for i in b) for b in bins] + [1])
    dev = rows[0][0].device if rows else torch.device("cpu")
    ids = torch.zeros(len(bins), width, dtype=torch.long, device=dev)
    labels = torch.full_like(ids, IGNORE_INDEX)
    pos = torch.zeros_like(ids)
    segment = torch.full_like(ids, -1)  # the row each position holds; -1: padding
    n_targets = max([n - 1 for n in lengths] + [0])
    source = torch.zeros(len(rows), n_targets, dtype=torch.long, device=dev)
    valid = torch.zeros(len(rows), n_targets, dtype=torch.bool, device=dev)
    for p, members in enumerate(bins):
        offset = 0
        for i in members:
            n, (row_ids, row_labels) = lengths[i], rows[i]
            ids[p, offset : offset + n] = row_ids
            labels[p, offset + 1 : offset + n] = row_labels[1:]
            pos[p, offset : offset + n] = torch.arange(n, device=dev)
            segment[p, offset : offset + n] = i
            m = max(n - 1, 0)  # targets of the row: its tokens after the first
            source[i, :m] = p * (width - 1) + offset + torch.arange(m, device=dev)
            valid[i, :m] = True
            offset += n
    mask = None
    if block_mask:
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        # Padding (segment -1) attends only to padding, causally: every query row keeps its diagonal.
        mask = ((segment[:, :, None] == segment[:, None, :]) & causal).unsqueeze(1)
    return PackedBatch(ids, pos, labels, mask, source, valid)


def pack_padded(input_ids: Tensor, attention_mask: Tensor, labels: Tensor, mode: PackingMode) -> PackedBatch:
    """The right-padded rows of a batch (``[B, T]`` each) packed in the layout ``mode``: bins as wide as the
    longest row (``"mask"``) or every row in one sequence (``"varlen"``)."""
    if mode == "off":
        raise ValueError("pack_padded: mode 'off' packs nothing; use 'mask' or 'varlen'")
    if not is_right_padded(attention_mask):
        raise ValueError("pack_padded: rows must be right-padded (ones then zeros in attention_mask)")
    lengths = attention_mask.sum(-1).tolist()
    rows = [(input_ids[b, :n], labels[b, :n]) for b, n in enumerate(lengths)]
    varlen = mode == "varlen"
    return pack_rows(rows, sum(lengths) if varlen else max(lengths), block_mask=not varlen)


def _packed_forward(forward: Any, packed: PackedBatch) -> Tensor:
    """``forward`` (logits ``[P, W, V]``, or hidden states ``[P, W, H]``: :func:`log_prob_forward`) of the
    packed sequences. No KV cache: with one, transformers' sdpa/eager mask builder ignores restarted
    ``position_ids`` and ``"varlen"`` rows would attend across rows there (its flash path reads the row
    boundaries either way)."""
    ids, mask, pos = packed.input_ids, packed.attention_mask, packed.position_ids
    return forward(ids, mask, position_ids=pos, use_cache=False)


def response_logps(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    mode: PackingMode,
    kernel: LogpKernel = "chunked",
) -> tuple[Tensor, Tensor]:
    """:func:`~revmix.objectives.base.token_logps` of ``model`` on right-padded rows (``[B, T]`` each):
    per-token log p(label) and the response mask, ``[B, T-1]``; the rows are packed unless ``mode`` is
    ``"off"`` (one padded forward); computed by ``kernel`` (:func:`~revmix.objectives.base.log_prob_forward`)."""
    if mode == "off":
        return forward_token_logps(model, input_ids, attention_mask, labels, kernel)
    packed = pack_padded(input_ids, attention_mask, labels, mode)
    forward, weight = log_prob_forward(model, kernel)
    logp, mask = score_tokens(_packed_forward(forward, packed), weight, packed.labels)
    width = input_ids.shape[1]
    return packed.unpack(logp, width), packed.unpack(mask, width)


def response_stats(
    model: Any, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, mode: PackingMode
) -> TokenStats:
    """:func:`~revmix.objectives.base.token_stats` (log-prob, mask, entropy, vocabulary-mean log-prob) of
    ``model`` on right-padded rows, each ``[B, T-1]``; packed unless ``mode`` is ``"off"``."""
    if mode == "off":
        return token_stats(policy_logits(model, input_ids, attention_mask), labels)
    packed = pack_padded(input_ids, attention_mask, labels, mode)
    stats = token_stats(_packed_forward(functools.partial(policy_logits, model), packed), packed.labels)
    width = input_ids.shape[1]
    return TokenStats(*(packed.unpack(s, width) for s in stats))
