"""Small torch-only fixtures for objective tests: a random tiny causal LM and a hand-made batch."""

from __future__ import annotations

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
