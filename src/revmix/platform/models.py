"""Models: load any Hugging Face causal LM, or build a tiny Qwen2 one locally; LoRA or full fine-tuning.

Why one loading path: a tiny model is *built* once (tokenizer trained locally, weights randomly
initialised with a seed) and written with ``save_pretrained`` into a cache directory. From then on it is
loaded exactly like ``Qwen/Qwen2.5-0.5B-Instruct`` — through ``AutoTokenizer`` / ``AutoModelForCausalLM``
(and vLLM, which supports Qwen2). Tests on a laptop therefore exercise the same code that runs a real
model on GPUs; only the name changes (``None`` or ``"tiny:small"`` vs. a hub id or a path).

Nothing here downloads: a tiny model needs no network, and a real model name is handed to
``from_pretrained`` untouched (offline runs set ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import peft
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from revmix.platform.artifacts import ADAPTER_DIR, CHAIN_FILE, AdapterChain, is_adapter_stage, resolve_chain

# --------------------------------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------------------------------


class Scale(NamedTuple):
    """A Qwen2 shape: the ``Qwen2Config`` fields a scale sets."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


SCALES: dict[str, Scale] = {
    "tiny": Scale(128, 4, 4, 2, 512),
    "small": Scale(256, 6, 8, 4, 1024),
    "base": Scale(512, 8, 8, 4, 1920),
}
"""The single size dial of a locally built model: a name → Qwen2 shape.

Parameter counts with the default 512-token vocabulary and tied embeddings (checked in
tests/platform/test_models.py):

=======  ==========  ======  =====  ========  ============  ==========
scale    parameters  hidden  layers heads/kv  intermediate  head_dim
=======  ==========  ======  =====  ========  ============  ==========
tiny      1,050,752     128      4     4/2          512         32
small     6,035,712     256      6     8/4         1024         32
base     30,163,456     512      8     8/4         1920         64
=======  ==========  ======  =====  ========  ============  ==========

Head dims are 32 or 64, the smallest sizes that fused attention kernels (vLLM's included) commonly
support; these dirs have not yet been run through vLLM here. Grouped-query attention (kv heads < heads)
mirrors Qwen2.5 so the code paths that handle GQA are exercised.
"""

MAX_POSITION_EMBEDDINGS = 512
VOCAB_SIZE = 512  # tokenizer target and embedding rows of every tiny model
TINY_PREFIX = "tiny:"
DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

# Bump when the on-disk layout or build recipe changes: old cache entries are then ignored, not reused.
_BUILD_FORMAT = 1
_BUILD_INFO = "revmix_build.json"

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML exactly as Qwen2.5 renders it, minus Qwen's default system message (a tiny model has no
identity to announce, and the prompt stays short)."""

_GENERAL_TEXT = """\
Mathematics is the study of numbers, quantities, shapes and patterns. A proof shows that a statement is
true for every case. To solve an equation, find the value of the unknown that makes both sides equal.
For example, if 3x + 5 = 20, then 3x = 15, so x = 5. The sum of the angles of a triangle is 180 degrees.
The area of a rectangle is its width times its height. A prime number has exactly two divisors: one and
itself. The first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29. The remainder of 17 divided by 5 is 2,
so 17 mod 5 = 2. If f(x) = 2x + 1, then f(4) = 9, and the inverse function is g(y) = (y - 1) / 2.
Question: What is 12 times 7? Answer: 12 * 7 = 84. Question: Find x such that x - 9 = 4. Answer: x = 13.
Reverse question: The answer is 84 and one factor is 12. What is the other factor? Answer: 84 / 12 = 7.
Given the result, recover one of the original inputs. Work step by step, then state the final answer.
The final answer is \\boxed{42}. Let us check the answer: substitute it back and verify both sides agree.
A sequence starts 1, 1, 2, 3, 5, 8; each term is the sum of the two before it. The mean of 4, 8 and 9 is 7.
Therefore the solution is correct. We conclude that the claim holds, which completes the proof.
"""


def _task_text() -> list[str]:
    """Training text from the synthetic task family (2,000 rows of every family, seed 0).

    Changing the corpus changes the tokenizer hash, so cached tiny models are rebuilt, never mismatched.
    """
    from revmix.platform.data import synthetic

    rows = synthetic.generate_mix(synthetic.family_names(), 2000, seed=0)
    return [f"user\n{r['prompt']}\nassistant\n{r['response']}" for r in rows]


# Qwen2's pre-tokenisation regex (transformers ``Qwen2Tokenizer.PRETOKENIZE_REGEX``). ``\p{N}`` splits
# every digit into its own piece, so numbers are spelled digit by digit — tiny models learn carries and
# place value far better than with merged multi-digit tokens.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per process and vocab size; the JSON is the canonical artefact.

    The normaliser / pre-tokeniser / decoder are exactly the ones transformers' ``Qwen2Tokenizer``
    rebuilds around the saved vocab and merges: for ``model_type == "qwen2"`` directories
    ``AutoTokenizer`` (and so vLLM) ignores the pipeline in ``tokenizer.json`` and keeps only vocab and
    merges. Any other pipeline (e.g. ``Digits`` + ``ByteLevel``) would tokenise differently after a
    save/load round trip; this one is identical before and after (tested).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"build_tokenizer: vocab_size={vocab_size} is below the byte alphabet (256) + "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {256 + len(SPECIAL_TOKENS)}"
        )
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        continuing_subword_prefix="",  # "" (not None) as Qwen2Tokenizer writes it: byte-identical JSON
        end_of_word_suffix="",
    )
    corpus = [_GENERAL_TEXT, *_task_text()]
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tok.to_str()


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE with single-digit tokens, ChatML specials and chat template; no download.

    Deterministic: the same corpus and vocab size give byte-identical ``tokenizer.json`` in any process.
    ``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn (eos), as in Qwen2.5-Instruct.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tokenizer_hash(vocab_size: int = 512) -> str:
    """SHA-256 over everything that defines the tokenizer: trained JSON, specials, chat template."""
    h = hashlib.sha256()
    for part in (_trained_tokenizer_json(vocab_size), "\0".join(SPECIAL_TOKENS), CHAT_TEMPLATE):
        h.update(part.encode())
        h.update(b"\0\0")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Tiny model build + cache
# --------------------------------------------------------------------------------------------------


def _check_scale(scale: str) -> Scale:
    if scale not in SCALES:
        raise ValueError(f"unknown model scale {scale!r}; valid scales: {sorted(SCALES)}")
    return SCALES[scale]


def _default_cache_dir() -> Path:
    env = os.environ.get("REVMIX_CACHE")
    return Path(env) / "models" if env else Path.home() / ".cache" / "revmix" / "models"


def _qwen2_config(scale: str, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    shape = _check_scale(scale)
    return Qwen2Config(
        # Rows for the full target vocabulary even if a small corpus stops BPE short of it (as Qwen pads
        # 151665 tokens to 151936 rows): parameter counts then do not move with the corpus.
        vocab_size=max(VOCAB_SIZE, len(tokenizer)),
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=tokenizer.pad_token_id,  # Qwen2.5 convention: bos = <|endoftext|>, never prepended
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **shape._asdict(),
    )


def _build_into(out_dir: Path, scale: str, seed: int, key: str) -> None:
    """Write tokenizer + seeded random Qwen2 model + a build record into ``out_dir``."""
    tokenizer = build_tokenizer(VOCAB_SIZE)
    config = _qwen2_config(scale, tokenizer)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "scale": scale,
        "seed": seed,
        "key": key,
        "parameters": count_parameters(model)[1],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out_dir / _BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def tiny_model_dir(scale: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Directory of a locally built random Qwen2 model + tokenizer; built on first use, then cached.

    Cache key = scale shape + seed + tokenizer hash (+ build format), so changing the corpus or a scale
    never serves a stale model. Safe with concurrent builders (Ray workers, parallel tests): each builds in
    its own temporary directory next to the target and atomically renames it into place; a loser of the
    race discards its copy and uses the winner's (both are identical, being seeded).
    """
    shape = _check_scale(scale)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"tiny_model_dir: seed must be a non-negative int, got {seed!r}")
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    key_src = json.dumps(
        {
            "format": _BUILD_FORMAT,
            "shape": shape._asdict(),
            "seed": seed,
            "tokenizer": tokenizer_hash(VOCAB_SIZE),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    final = root / f"qwen2-{scale}-seed{seed}-{key}"
    if (final / _BUILD_INFO).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        _build_into(tmp, scale, seed, key)
        # mkdtemp makes 0700 dirs (and safetensors 0600 files): open them up for a cache shared by users.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            os.rename(tmp, final)  # atomic; fails if another builder got there first
        except OSError:
            if not (final / _BUILD_INFO).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_scale_of(name_or_path: str | None, scale: str = "tiny") -> str | None:
    """The tiny scale a config's model field names (``None`` → ``scale``; ``"tiny:<scale>"`` → that
    scale), or ``None`` for anything else (a hub id or a path)."""
    if name_or_path is None:
        return scale
    if not isinstance(name_or_path, str):
        raise TypeError(f"model name must be a str or None, got {type(name_or_path).__name__}")
    if not name_or_path.startswith(TINY_PREFIX):
        return None
    wanted = name_or_path[len(TINY_PREFIX) :]
    if wanted not in SCALES:
        raise ValueError(
            f"model name {name_or_path!r}: unknown tiny scale {wanted!r}; valid: {[TINY_PREFIX + s for s in SCALES]}"
        )
    return wanted


def resolve_model_path(name_or_path: str | None, scale: str = "tiny", seed: int = 0) -> str:
    """Turn a config's model field into something ``from_pretrained`` accepts.

    ``None`` → the tiny model of ``scale``; ``"tiny:<scale>"`` → that scale (so a sweep can vary
    ``model.name`` over ``tiny:tiny``, ``tiny:small``, ``Qwen/Qwen2.5-0.5B-Instruct``); anything else (hub
    id or path) is returned unchanged. Tiny models here have seeded random weights; ``model.base:
    pretrained`` goes through :func:`revmix.platform.pretrain.base_model_path`.
    """
    tiny = tiny_scale_of(name_or_path, scale)
    if tiny is not None:
        return str(tiny_model_dir(tiny, seed))
    assert name_or_path is not None
    return name_or_path


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_tokenizer(path: str, *, padding_side: str | None = None) -> PreTrainedTokenizerFast:
    """``AutoTokenizer`` (fast only) with a pad token guaranteed, so batches can be left-padded for
    generation (``padding_side="left"``) or right-padded for training (the saved default)."""
    tok = AutoTokenizer.from_pretrained(resolve_chain(path)[0], use_fast=True)  # training keeps the base's
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(
            f"load_tokenizer({path!r}): got {type(tok).__name__}, need a fast (tokenizers) tokenizer"
        )
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(
                f"load_tokenizer({path!r}): tokenizer has neither a pad nor an eos token to pad with"
            )
        tok.pad_token = tok.eos_token  # Llama-style models ship no pad token; eos is the usual stand-in
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tok.padding_side = padding_side
    return tok


ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


def choose_attn_implementation(requested: str, device: str | torch.device) -> tuple[str, str]:
    """The attention kernel ``from_pretrained`` gets for ``requested`` on ``device``, and why (one line).

    ``auto``: ``flash_attention_2`` on a CUDA device when the ``flash_attn`` package imports (no
    ``[T, T]`` score matrix, fastest at long T, but it ignores custom 4-D masks, so DPO then scores pairs
    concatenated), else ``sdpa`` (PyTorch's fused kernels; honours the 4-D shared-prompt mask).
    """
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attn_implementation {requested!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if requested != "auto":
        return requested, "set by model.attn_implementation"
    if torch.device(device).type != "cuda":
        return "sdpa", "auto: not on a CUDA device (flash_attention_2 needs one)"
    try:
        importlib.import_module("flash_attn")  # only whether it imports matters
    except Exception as e:  # a missing package or a build for another CUDA/torch: both mean no kernel
        return "sdpa", f"auto: on CUDA but flash_attn does not import ({type(e).__name__}: {e})"
    return "flash_attention_2", "auto: on CUDA and flash_attn imports"


LOGP_KERNELS: tuple[str, ...] = ("auto", "chunked", "cce")
LOGP_KERNEL_SCOPE = "entropy, label smoothing, PPO and the reference stay chunked"
"""What the chosen kernel does not cover: statistics of the whole next-token distribution read the logits."""


def choose_logp_kernel(
    requested: str, device: str | torch.device, strategy: str = "ddp", model: torch.nn.Module | None = None
) -> tuple[str, str]:
    """The response log-prob kernel (:class:`revmix.objectives.base.PolicyForward` ``logp_kernel``) for
    ``requested`` (``runtime.logp_kernel``) on ``device``, and why (one line).

    ``auto``: ``cce`` — Cut Cross-Entropy's Triton kernel, fused with the output layer, never forming the
    ``[B, T, V]`` logits — on a CUDA device when ``cut_cross_entropy`` imports, unless ``strategy`` is fsdp
    (the kernel reads the whole ``lm_head`` weight, which FSDP shards) or ``model``'s output layer is not a
    plain bias-free ``nn.Linear``; else ``chunked``. An explicit ``cce`` that cannot run is a ``ValueError``
    saying why; off CUDA it runs Cut Cross-Entropy's ``torch_compile`` implementation, which computes the
    logits (for equality checks, not memory).
    """
    from revmix.objectives.base import fused_available, output_layer_problem

    if requested not in LOGP_KERNELS:
        raise ValueError(f"unknown logp_kernel {requested!r}; valid: {', '.join(LOGP_KERNELS)}")
    if requested == "chunked":
        return "chunked", "set by runtime.logp_kernel"
    auto, cuda = requested == "auto", torch.device(device).type == "cuda"
    if auto and not cuda:
        return "chunked", "auto: not on a CUDA device (Cut Cross-Entropy's kernel needs one)"
    imports, why = fused_available("cce" if cuda else "torch_compile")
    reason = "" if imports else why
    if strategy == "fsdp":
        reason = "runtime.strategy=fsdp shards the lm_head weight the fused kernel reads whole"
    elif not reason and model is not None:
        reason = output_layer_problem(model)
    if reason and auto:
        return "chunked", f"auto: on CUDA but {reason}"
    if reason:
        hint = " (install the gpu extra: pip install 'revmix[gpu]')" if not imports else ""
        raise ValueError(
            f"runtime.logp_kernel=cce: {reason}{hint}; set runtime.logp_kernel to auto or chunked"
        )
    if auto:
        return "cce", "auto: on CUDA and cut_cross_entropy imports"
    if not cuda:
        return (
            "cce",
            "set by runtime.logp_kernel; off CUDA its torch_compile implementation computes the logits",
        )
    return "cce", "set by runtime.logp_kernel"


def load_model(
    path: str,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(path, dtype=..., attn_implementation=...)`` moved to
    ``device``, in eval mode. ``attn_implementation``: None keeps transformers' default; ``auto`` follows
    :func:`choose_attn_implementation`.

    ``path`` may also be a stage folder holding an adapter chain (:data:`CHAIN_FILE`): its base model is
    loaded and every adapter of the chain merged into it in memory, oldest first, as training did."""
    if dtype not in DTYPES:
        raise ValueError(f"load_model: unknown dtype {dtype!r}; valid: {list(DTYPES)}")
    kwargs = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = choose_attn_implementation(attn_implementation, device)[0]
    base, adapters = resolve_chain(path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype], **kwargs)
    with torch.random.fork_rng(devices=[]):  # peft initialises each adapter before loading it: keep the
        for adapter in adapters:  # caller's RNG as a full model's load leaves it (the next LoRA's init)
            model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # transformers declares .to through functools.wraps(nn.Module.to), which mypy reads as unbound.
    return model.to(device)  # type: ignore[arg-type]


def checkpointing_wanted(setting: str, device_type: str) -> bool:
    """``runtime.activation_checkpointing`` resolved: ``on``, ``off``, or ``auto`` = on on a GPU."""
    choices = ("auto", "on", "off")
    if setting not in choices:
        raise ValueError(f"unknown activation_checkpointing {setting!r}; valid: {', '.join(choices)}")
    return setting == "on" or (setting == "auto" and device_type == "cuda")


def apply_activation_checkpointing(model: PreTrainedModel, setting: str, device: str | torch.device) -> bool:
    """``runtime.activation_checkpointing`` on ``model``: ``on``, ``off``, or ``auto`` = on when training
    on a GPU; returns whether it is on.

    Checkpointing keeps only each decoder layer's input and recomputes the layer in backward: ~30% more
    compute for activation memory that no longer grows with the layer count. CPU runs (tiny models, short
    rows) are not memory-bound, so ``auto`` keeps the faster path there. It is Hugging Face activation
    checkpointing (``gradient_checkpointing_enable``, renamed ``activation_checkpointing_enable`` in
    transformers 5) with ``use_reentrant=False``: that variant needs no checkpointed input to require grad —
    the LoRA case, with frozen embeddings — and transformers also calls ``enable_input_require_grads``
    itself, so LoRA needs nothing more. Call it on the base model, before :func:`apply_lora`. Layers are
    recomputed only in ``train()`` mode with gradients on.
    """
    on = checkpointing_wanted(setting, torch.device(device).type)
    if on:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return on


# --------------------------------------------------------------------------------------------------
# LoRA / full fine-tuning
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (Hu et al. 2021): W' = W + (alpha / r) · B A, with B initialised to zero."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoraSpec.r must be > 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoraSpec.target_modules is empty")


def apply_lora(model: PreTrainedModel, spec: LoraSpec) -> peft.PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; only adapter weights stay trainable.

    Fails loudly when a target name matches no ``nn.Linear`` (peft would otherwise error obscurely or,
    for partial matches, silently adapt fewer layers than asked).
    """
    if isinstance(model, peft.PeftModel):
        raise TypeError("apply_lora: model already has an adapter; merge_lora() it first")
    linear_names = sorted(
        {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    )
    missing = [t for t in spec.target_modules if t not in linear_names]
    if missing:
        raise ValueError(f"LoraSpec.target_modules {missing} not in the model's linear layers {linear_names}")
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type=peft.TaskType.CAUSAL_LM,
    )
    return peft.get_peft_model(model, config)


def merge_lora(model: PreTrainedModel | peft.PeftModel) -> PreTrainedModel:
    """Fold the adapter into the base weights (in place) and return the plain model; identity otherwise.

    The next stage then trains a fresh adapter on top, and this merged model is its reference policy.
    """
    if isinstance(model, peft.PeftModel):
        return model.merge_and_unload()
    return model


def trainable_state_dict(model: PreTrainedModel | peft.PeftModel) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: adapter weights with LoRA, every trainable parameter otherwise.

    Tensors are detached views, not copies — save them before the next optimiser step. Tied weights appear
    once (``named_parameters`` de-duplicates), so ``safetensors.torch.save_file`` accepts the dict.
    Restore with :func:`load_trainable_state_dict`.
    """
    if isinstance(model, peft.PeftModel):
        state = {k: v.detach() for k, v in peft.get_peft_model_state_dict(model).items()}
        # Trainable modules attached outside the adapter (a PPO value head) belong in the checkpoint too.
        extra = {
            n: p.detach()
            for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith("base_model.")
        }
        return {**state, **extra}
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(
    model: PreTrainedModel | peft.PeftModel, state: dict[str, torch.Tensor]
) -> None:
    """Inverse of :func:`trainable_state_dict`; raises on any unexpected key."""
    if isinstance(model, peft.PeftModel):
        params = dict(model.named_parameters())
        extra = {k: v for k, v in state.items() if not k.startswith("base_model.") and k in params}
        with torch.no_grad():
            for k, v in extra.items():
                params[k].copy_(v)
        result = peft.set_peft_model_state_dict(model, {k: v for k, v in state.items() if k not in extra})
        # peft annotates the result as a bare ``namedtuple``; it is torch's (missing, unexpected) keys.
        unexpected = list(result.unexpected_keys)  # type: ignore[attr-defined]
    else:
        result = model.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        expected = {name for name, p in model.named_parameters() if p.requires_grad}
        missing = sorted(expected - set(state))
        if missing:
            raise KeyError(f"load_trainable_state_dict: missing trainable parameters {missing[:5]} ...")
    if unexpected:
        raise KeyError(f"load_trainable_state_dict: unexpected keys {unexpected[:5]} ...")


def save_model(
    model: PreTrainedModel | peft.PeftModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path
) -> None:
    """Save a full (merged) model + tokenizer with ``save_pretrained``: loadable by ``load_model``/vLLM.

    A ``PeftModel`` is merged on a deep copy so the caller's training model keeps its adapter; at the end
    of a stage call ``merge_lora`` first to avoid the copy's memory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = merge_lora(copy.deepcopy(model)) if isinstance(model, peft.PeftModel) else model
    full.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------------
# Adapter chains: what a LoRA stage saves instead of a merged full model
# --------------------------------------------------------------------------------------------------


def save_adapter(model: peft.PeftModel, chain: AdapterChain, stage_dir: str | Path) -> None:
    """A LoRA stage's artifact: the adapter alone (``save_pretrained`` of a ``PeftModel`` writes only the
    adapter's weights and config) in ``stage_dir/adapter``, and the chain it completes (the tokenizer is
    the base's: training never changes it)."""
    if not isinstance(model, peft.PeftModel):
        raise TypeError(f"save_adapter: the model has no LoRA adapter ({type(model).__name__})")
    out = Path(stage_dir)
    model.save_pretrained(str(out / ADAPTER_DIR))
    (out / CHAIN_FILE).write_text(chain.to_json())


def model_identity(path: str | Path) -> str:
    """The identity by content of the model ``path`` loads as (a full model, or a chain's base and every
    adapter): the reference log-prob cache's key, so another chain never reads a stale entry. Each file's
    digest is remembered per node under the cache root (``file_digests``; see
    :func:`revmix.objectives.reference.file_digest` for why that is sound), so the workers of every stage
    and trial hash a given set of weights once."""
    from revmix.objectives.reference import files_identity
    from revmix.platform.data.cache import cache_root

    memo = cache_root() / "file_digests"
    base, adapters = resolve_chain(path)
    if not adapters:
        return files_identity(base, memo)
    parts = [files_identity(f, memo) for f in (base, *adapters)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@contextlib.contextmanager
def full_model_dir(path: str | Path) -> Iterator[str]:
    """A folder holding a full model for ``path``, for readers that load weights from disk themselves
    (vLLM): ``path`` itself, or for an adapter chain a merged copy in a temporary folder (removed after).

    Materialising costs one model's disk for the reader's lifetime; it keeps the default (adapter-only)
    saves usable by every vLLM path, where erroring would force ``save.merged: true`` on every trial."""
    if not is_adapter_stage(path):
        yield str(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="revmix-merged-"))
    try:
        save_model(load_model(str(path), dtype="auto"), load_tokenizer(str(path)), tmp)
        yield str(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def architecture_dir(path: str | Path) -> str:
    """A full model with ``path``'s architecture and tokenizer: the chain's base (or ``path`` itself).
    Enough for an engine that receives the live weights before every use (the vLLM rollout engine)."""
    return resolve_chain(path)[0]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
