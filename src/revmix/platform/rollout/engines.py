"""Rollout engines: sample response token ids from a policy's current weights.

:class:`HFRolloutEngine` calls ``model.generate`` on token ids directly. The ``hf`` Generator
(``generation/hf.py``) is text in / text out; PPO must score exactly the tokens that were sampled
(re-tokenising decoded text can split differently and would corrupt the importance ratio), so it does not
fit. :class:`~revmix.platform.rollout.vllm_engine.VLLMRolloutEngine` implements the same protocol over vLLM
and pushes the policy's (LoRA-merged) weights into its engine at every ``generate`` call;
:func:`build_rollout_engine` picks one from ``objective.rollout_backend``.

Engines receive the policy itself (never a DDP or length-bucketing wrapper): they read its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from revmix.objectives.reference import eval_mode
from revmix.platform.generation.hf import eos_token_ids, exact_generation_config
from revmix.platform.generation.protocol import SamplingParams
from revmix.platform.rollout.objective import RolloutObjective

# --------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples response token ids from a policy's current weights.

    ``generate`` returns ``params.n`` responses per prompt, in prompt order; each response is the list of
    sampled token ids, ending with the EOS token when the model emitted one (as training responses do).
    ``close`` frees what the engine holds (a vLLM engine's memory); the stage calls it once, at its end.
    """

    def generate(
        self, policy: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[list[int]]]: ...

    def close(self) -> None: ...


class HFRolloutEngine:
    """Batched, KV-cached sampling with ``model.generate`` on left-padded prompt ids (in-process).

    Prompts are sampled ``batch_size`` at a time; the chunk starting at prompt ``start`` is seeded
    ``params.seed + start``, so a chunk's samples depend on its prompts and its place only."""

    def __init__(self, eos_ids: Sequence[int], pad_id: int, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"HFRolloutEngine batch_size must be >= 1, got {batch_size}")
        self.eos_ids = [int(i) for i in eos_ids]
        self.pad_id = int(pad_id)
        self.batch_size = batch_size

    @classmethod
    def for_policy(cls, policy: torch.nn.Module, tokenizer: Any, batch_size: int = 64) -> HFRolloutEngine:
        eos = eos_token_ids(policy, tokenizer, "policy")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        return cls(eos, pad, batch_size)

    def close(self) -> None:
        """Nothing to free: sampling runs on the policy itself."""

    def _config(self, params: SamplingParams) -> Any:
        return exact_generation_config(params.replace(stop=()), self.pad_id, self.eos_ids)

    def _cut(self, tokens: list[int]) -> list[int]:
        for j, t in enumerate(tokens):
            if t in self.eos_ids:
                return tokens[: j + 1]
        n = len(tokens)
        while n > 0 and tokens[n - 1] == self.pad_id:
            n -= 1
        return tokens[:n]

    @torch.no_grad()
    def generate(
        self, policy: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[list[int]]]:
        model: Any = policy  # a Hugging Face causal LM: it has generate()
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("HFRolloutEngine.generate: every prompt needs at least one token")
        device = next(model.parameters()).device
        cfg = self._config(params)
        out: list[list[list[int]]] = [[] for _ in prompt_ids]
        fork = [device] if device.type == "cuda" else []
        with eval_mode(model):
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(prompt_ids))))
                width = max(len(prompt_ids[i]) for i in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for k, i in enumerate(chunk):
                    p = list(prompt_ids[i])
                    ids[k, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[k, width - len(p) :] = 1
                with torch.random.fork_rng(devices=fork):  # sampling never shifts the training RNG stream
                    torch.manual_seed(params.seed + start)
                    seqs = model.generate(
                        input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg
                    )
                new = seqs[:, width:].tolist()
                for k, i in enumerate(chunk):
                    out[i] = [self._cut(new[k * params.n + j]) for j in range(params.n)]
        return out


def build_rollout_engine(
    objective: RolloutObjective,
    policy: torch.nn.Module,
    tokenizer: Any,
    init_path: str,
    seed: int = 0,
    hf_batch_size: int = 64,
) -> RolloutEngine:
    """The stage's rollout engine from ``objective.rollout_backend`` (``auto``: vllm on a GPU where vLLM
    is usable, else hf — on CPU even the CPU build of vLLM gives way to hf, whose engine starts in no time).
    A vLLM engine starts from ``init_path`` (the stage's starting model) and is the caller's to ``close()``.
    ``hf_batch_size``: prompts per ``generate`` call of the hf engine (the training loop passes its
    micro-batch, so each micro-batch of the global batch is sampled apart, seeded by its place)."""
    from revmix.platform.generation.protocol import vllm_usable
    from revmix.platform.rollout.vllm_engine import VLLMRolloutEngine

    backend = objective.rollout_backend
    if backend == "auto":
        backend = "vllm" if torch.cuda.is_available() and vllm_usable() else "hf"
    if backend == "hf":
        return HFRolloutEngine.for_policy(policy, tokenizer, hf_batch_size)
    from revmix.platform.models import architecture_dir

    options = dict(objective.vllm_engine or {})
    return VLLMRolloutEngine(  # the live weights are pushed before every rollout: the base's shape suffices
        architecture_dir(init_path),
        eos_token_ids(policy, tokenizer, "policy"),
        placement=options.pop("placement", "auto"),
        seed=seed,
        num_cpus=float(options.pop("num_cpus", 1.0)),
        num_gpus=options.pop("num_gpus", None),
        engine_kwargs=options,
    )
