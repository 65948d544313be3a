"""Test models for the generation backends.

``tiny_dir()`` is the project's locally built tiny Qwen2 (``revmix.platform.models``): what ``revmix serve``
and the eval runner see by default. Its random weights make greedy decoding repeat one token and never emit
EOS, so ``varied_model_dir()`` builds a second, deliberately "chattier" model with the same tokenizer:
larger init (so different prompts give different continuations) and an EOS output row aimed at the mean
final hidden state, so that some rows end early and others run to ``max_new_tokens`` — the cases batched
generation must get right.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from revmix.platform.generation.protocol import chat_prompt
from revmix.platform.models import build_tokenizer, resolve_model_path

QUESTIONS: tuple[str, ...] = (
    "What is 2+3?",
    "Solve x - 9 = 4 for x.",
    "hi",
    "The area of a rectangle is its width times its height. Find the area of a 3 by 4 rectangle.",
    "Given the result 84 and one factor 12, what is the other factor?",
    "A prime number has exactly two divisors.",
    "Compute 17 mod 5.",
    "If f(x) = 2x + 1, what is f(4)? Work step by step, then state the final answer.",
    "The mean of 4, 8 and 9 is?",
    "Reverse question: recover the input.",
)


def tiny_dir() -> str:
    return resolve_model_path(None, "tiny", 0)


@functools.cache
def varied_model_dir(seed: int = 0, eos_quantile: float = 0.04) -> str:
    """Build (once per process) a small random Qwen2 whose greedy outputs differ per prompt and sometimes
    end with EOS. Saved with ``save_pretrained`` under a temp dir so every backend can load it by path."""
    tok = build_tokenizer(512)
    root = tempfile.mkdtemp(prefix="revmix-varied-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    out = Path(root) / f"seed{seed}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = Qwen2Config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,  # head_dim 32: vLLM's CPU attention has no kernel for 16
            num_key_value_heads=1,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            initializer_range=0.3,
            use_sliding_window=False,
            bos_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = Qwen2ForCausalLM(cfg).eval()
        prompts = [chat_prompt(tok, q) for q in QUESTIONS]
        ids = [tok(p, add_special_tokens=False)["input_ids"] + list(range(3, 40)) for p in prompts]
        with torch.no_grad():
            hidden = torch.cat([model.model(input_ids=torch.tensor([s])).last_hidden_state[0] for s in ids])
            u = hidden.mean(0)
            u = u / u.norm()
            top = model.lm_head(hidden).max(-1).values
            proj = hidden @ u
            ratio = top[proj > 0] / proj[proj > 0]
            scale = torch.quantile(ratio, eos_quantile)  # EOS wins at ~eos_quantile of positions
            model.lm_head.weight[tok.eos_token_id] = scale * u
    model.generation_config = GenerationConfig(
        bos_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id, tok.pad_token_id],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return os.fspath(out)
