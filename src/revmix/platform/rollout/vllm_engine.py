"""PPO rollouts from vLLM, with the policy's current weights pushed into the engine before every batch.

The engine starts once per stage from the stage's starting model (``init_path``); each
:meth:`VLLMRolloutEngine.generate` first streams the live policy's weights into it through vLLM's in-place
reload (``collective_rpc("reload_weights")`` — the worker's layer-wise reload, which also redoes the
post-load processing a CPU or quantised build applies), clears the prefix cache (cached KV blocks were
computed by the old weights), then samples token ids. With LoRA, the adapter is merged on the fly
(W + ΔW per LoRA layer, :func:`merged_weights`), so vLLM serves the exact policy without its LoRA support;
the value head is never sent.

Placement (``placement``):

* ``local`` — the engine lives in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no copy
  of the weights leaves the process. The colocated pattern of TRL's ``vllm_mode="colocate"``. On a GPU
  the engine takes ``gpu_memory_utilization`` (0.3 by default) and sleeps between rollouts
  (``enable_sleep_mode``: its KV cache is released while the trainer optimises).
* ``actor`` — the engine runs in its own Ray actor (its own process and distributed state), and the
  merged weights travel through the object store. Needed when the trainer runs in Ray Train workers:
  they hold a ``torch.distributed`` group, which an in-process engine would join as its own world and
  tear down when it shuts down.

An actor asks Ray for ``num_cpus`` (1) and ``num_gpus`` (a whole GPU where there is one: rollouts get
GPUs of their own, OpenRLHF's layout) — set both in ``objective.vllm_engine`` to fit the cluster; an
actor Ray cannot place waits for resources, as every Ray task does.

``auto`` picks ``local`` unless ``torch.distributed`` is initialised (``runtime.num_workers`` = 0 runs
in-process without it).

The importance ratio never depends on the engine: PPO recomputes the old log-probs with the training
model (``PPO.make_rollout``), so vLLM's numerics (bf16, other kernels) change which tokens are sampled,
not the loss. vLLM is imported lazily; ``import revmix`` never needs it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from revmix.objectives.ppo import VALUE_HEAD_ATTR, VLLM_PLACEMENTS
from revmix.platform.generation.protocol import SamplingParams, vllm_usable
from revmix.platform.generation.vllm_backend import vllm_cpu_env, vllm_sampling_kwargs

PLACEMENTS = VLLM_PLACEMENTS  # one list: the objective validates it before Ray starts


def vllm_missing_message(what: str) -> str:
    return (
        f"{what} needs vLLM, which is not usable in this environment (not installed, or a CUDA build on a "
        "machine without a GPU): install the 'vllm' extra (pip install -e '.[vllm]') on a GPU machine, or run "
        "scripts/setup_vllm_cpu.sh for the CPU build (docs/vllm_cpu.md); or set it to 'hf'"
    )


# --------------------------------------------------------------------------------------------------
# The policy's weights, in the checkpoint's names
# --------------------------------------------------------------------------------------------------


def _base_model(policy: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """The transformers model under a peft wrapper (and whether there was one); the rollout step never
    hands an engine a DDP wrapper."""
    from peft import PeftModel

    if isinstance(policy, PeftModel):
        return policy.get_base_model(), True
    return policy, False


def checkpoint_names(policy: torch.nn.Module) -> list[str]:
    """The names the policy's weights have in a ``save_pretrained`` checkpoint of the plain causal LM.

    Adapter tensors, the value head and (with tied embeddings) ``lm_head.weight`` are not among them.
    """
    base, _ = _base_model(policy)
    from transformers import PreTrainedModel

    tied = isinstance(base, PreTrainedModel) and bool(base.config.tie_word_embeddings)
    names: list[str] = []
    for name in base.state_dict():
        if "lora_" in name or name.split(".")[0] == VALUE_HEAD_ATTR:
            continue
        hf = name.replace(".base_layer.", ".")
        if tied and hf == "lm_head.weight":
            continue
        if hf not in names:
            names.append(hf)
    return names


@torch.no_grad()
def merged_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` for every weight of the policy, LoRA adapters merged in.

    For a LoRA layer the tensor is ``W + ΔW`` of its active adapters (peft's ``get_delta_weight``),
    computed one layer at a time without touching the policy — merging in place and unmerging would
    leave float rounding in the trained weights. Equal to ``merge_and_unload()``'s state dict (tested).
    """
    base, is_peft = _base_model(policy)
    deltas: dict[str, torch.Tensor] = {}
    if is_peft:
        from peft.tuners.lora import LoraLayer

        for mname, module in base.named_modules():
            if not isinstance(module, LoraLayer) or module.merged:
                continue
            for adapter in module.active_adapters:
                if adapter not in module.lora_A and adapter not in module.lora_embedding_A:
                    continue
                if module.use_dora.get(adapter, False):
                    raise NotImplementedError(
                        f"vLLM rollouts: DoRA adapter on {mname} cannot be merged on the fly; use "
                        "rollout_backend 'hf'"
                    )
                # peft declares get_delta_weight on each layer type (Linear, Embedding), not on LoraLayer
                delta = module.get_delta_weight(adapter)  # type: ignore[attr-defined]
                key = f"{mname}.weight"
                deltas[key] = deltas[key] + delta if key in deltas else delta
    wanted = set(checkpoint_names(policy))
    for name, tensor in base.state_dict().items():
        hf = name.replace(".base_layer.", ".")
        if hf not in wanted or "lora_" in name:
            continue
        wanted.discard(hf)  # tied weights appear once
        yield hf, (tensor + deltas[hf].to(tensor.dtype)) if hf in deltas else tensor.detach()


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


def _context_length(model_dir: str | os.PathLike[str]) -> int:
    """The checkpoint's ``max_position_embeddings`` (what vLLM would allow at most)."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


class RolloutLLM:
    """One ``vllm.LLM`` that reloads weights and samples token ids; the body of the Ray actor too."""

    def __init__(self, path: str, engine_kwargs: dict[str, Any], env: dict[str, str]) -> None:
        os.environ.update(env)  # before vllm is imported: it reads these at import and engine start
        import vllm

        threads = torch.get_num_threads()
        self.llm = vllm.LLM(model=path, **engine_kwargs)
        # vLLM lowers torch's thread count "for serving"; in-process that would slow the trainer down
        torch.set_num_threads(threads)
        self.sleeping = False
        self.sleep_mode = bool(engine_kwargs.get("enable_sleep_mode"))

    def load(self, weights: Any) -> None:
        """Replace every weight in place (an iterable of ``(name, tensor)``), then forget cached KV."""
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], sampling: list[dict[str, Any]]) -> list[list[list[int]]]:
        import vllm
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        params = [vllm.SamplingParams(**s) for s in sampling]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = [[list(o.token_ids) for o in sorted(out.outputs, key=lambda o: o.index)] for out in outs]
        if self.sleep_mode:  # give the KV cache's memory back to the trainer until the next rollout
            self.llm.sleep(level=1)
            self.sleeping = True
        return result

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        """Stop the engine core now (in-process it also tears down the distributed state it created),
        rather than in a finaliser at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()


class VLLMRolloutEngine:
    """:class:`~revmix.platform.rollout.engines.RolloutEngine` over vLLM (see the module docstring).

    ``model_dir`` — the checkpoint the engine starts from (the stage's starting model: same architecture
    and tokenizer as the policy); ``eos_ids`` — every token that ends a response (vLLM's ``token_ids``
    keep the EOS, as the hf engine's do); ``engine_kwargs`` — extra ``vllm.LLM`` arguments, which win.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        eos_ids: Sequence[int],
        placement: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        num_cpus: float = 1.0,
        num_gpus: float | None = None,
    ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(
                f"vLLM rollout placement {placement!r} is unknown; valid: {', '.join(PLACEMENTS)}"
            )
        if not vllm_usable():
            raise ImportError(vllm_missing_message("objective.rollout_backend 'vllm'"))
        if placement == "auto":
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            placement = "actor" if dist else "local"
        self.placement = placement
        self.eos_ids = [int(i) for i in eos_ids]
        self.on_gpu = torch.cuda.is_available()
        kwargs: dict[str, Any] = {"dtype": "bfloat16" if self.on_gpu else "float32", "seed": seed}
        if (
            self.on_gpu and placement == "local"
        ):  # shares the trainer's GPU: a slice, and sleeps between rollouts
            kwargs |= {"gpu_memory_utilization": 0.3, "enable_sleep_mode": True}
        elif not self.on_gpu:
            # a CPU KV cache of 1 GiB holds a 2k context of a small model, not a 32k one
            kwargs |= {"enforce_eager": True, "max_model_len": min(2048, _context_length(model_dir))}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs |= engine_kwargs or {}
        self.engine_kwargs = kwargs
        self.syncs = 0  # weight pushes so far (one per generate)
        self.sync_seconds = 0.0  # wall time spent pushing them
        env = vllm_cpu_env()
        if self.on_gpu:
            del env["VLLM_CPU_KVCACHE_SPACE"]
        if placement == "local":
            self._local: RolloutLLM | None = RolloutLLM(str(model_dir), kwargs, env)
            self._actor: Any = None
        else:
            import ray

            self._local = None
            gpus = (1.0 if self.on_gpu else 0.0) if num_gpus is None else num_gpus
            actor = ray.remote(RolloutLLM).options(
                num_cpus=num_cpus, num_gpus=gpus, runtime_env={"env_vars": env}
            )
            self._actor = actor.remote(str(model_dir), kwargs, env)
            ray.get(self._actor.ping.remote())

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Push the policy's current (LoRA-merged) weights into the engine."""
        t0 = time.perf_counter()
        if self._local is not None:
            self._local.load(merged_weights(policy))
        elif self._actor is not None:
            import ray

            cpu = [(n, t.detach().to("cpu", copy=True)) for n, t in merged_weights(policy)]
            ray.get(self._actor.load.remote(cpu))
        else:
            raise RuntimeError("VLLMRolloutEngine is closed")
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - t0

    def sampling(self, params: SamplingParams, n_prompts: int) -> list[dict[str, Any]]:
        """Per-prompt ``vllm.SamplingParams`` arguments: prompt i is seeded ``params.seed + i``; token ids,
        not text, end at an EOS id."""
        base = vllm_sampling_kwargs(params.replace(stop=())) | {
            "stop_token_ids": self.eos_ids,
            "detokenize": False,
        }
        return [{**base, "seed": (params.seed + i) % (2**31)} for i in range(n_prompts)]

    def generate(
        self, policy: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[list[int]]]:
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("VLLMRolloutEngine.generate: every prompt needs at least one token")
        self.sync_weights(policy)
        prompts = [list(map(int, p)) for p in prompt_ids]
        sampling = self.sampling(params, len(prompts))
        if self._local is not None:
            return self._local.generate(prompts, sampling)
        import ray

        return ray.get(self._actor.generate.remote(prompts, sampling))

    def close(self) -> None:
        """Release the engine (its actor, or the in-process engine's memory)."""
        if self._actor is not None:
            import ray

            with contextlib.suppress(Exception):
                ray.kill(self._actor)
            self._actor = None
        if self._local is not None:
            self._local.shutdown()
            self._local = None
