"""Tiny torch-only fixtures for checking an objective in milliseconds: a random causal LM, a hand-made
batch of both directions, and a frozen reference written against the :class:`Reference` protocol alone.

The contract checks (:mod:`revmix.objectives.contract`) run on these; a plug-in's own tests may too.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from transformers import Qwen2Config, Qwen2ForCausalLM

from revmix.objectives.base import IGNORE_INDEX, Batch, policy_logits

VOCAB = 48


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 2-layer Qwen2 causal LM (vocabulary :data:`VOCAB`), in eval mode (no dropout:
    deterministic losses)."""
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
    model.eval()
    return model


def pack(prompts: list[list[int]], responses: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` off the response), each
    ``[B, max(len(prompt) + len(response))]``, for rows ``prompt + response``."""
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
    """A batch with both directions (rows alternate forward, reverse), different prompt and response lengths
    and padding; ``with_other`` adds a y− per row (``other_*``)."""
    g = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    prompts = [rand(3 + i % 3) for i in range(batch_size)]
    responses = [rand(4 + (i * 2) % 5) for i in range(batch_size)]
    others = [rand(3 + (i * 3) % 4) for i in range(batch_size)]
    ids, mask, labels = pack(prompts, responses)
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
        o_ids, o_mask, o_labels = pack(prompts, others)
        batch.other_input_ids, batch.other_attention_mask, batch.other_labels = o_ids, o_mask, o_labels
    return batch


class FrozenCopy:
    """A frozen copy of ``model`` as a :class:`~revmix.objectives.base.Reference`, written against the
    protocol alone. ``shared_prompt``: whether it takes shared-prompt rows (``position_ids``); it counts the
    calls that hand it such rows in ``shared_prompt_calls``."""

    length_groups = 1

    def __init__(self, model: torch.nn.Module, shared_prompt: bool = False) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.shared_prompt = shared_prompt
        self.shared_prompt_calls = 0

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        if position_ids is None:
            return policy_logits(self.model, input_ids, attention_mask)
        self.shared_prompt_calls += 1
        return policy_logits(self.model, input_ids, attention_mask, position_ids=position_ids)
