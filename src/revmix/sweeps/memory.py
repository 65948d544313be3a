"""GPU memory a trial needs, estimated from its config before anything starts (``revmix sweep --dry-run``).

The estimate is the peak of one training worker on one GPU (DDP replicates the model; there is no
sharding yet), as the sum of four terms, in bytes:

* weights: ``P × b_w`` (``b_w`` = 2 for bf16, the GPU default of ``model.dtype: auto``; 4 for float32), plus
  the LoRA adapter ``A × 4`` (peft keeps adapters in float32), plus another ``P × b_w`` for a
  ``reference: copy`` stage;
* gradients + optimizer: full fine-tuning ``P × 3 b_w`` (gradient and AdamW's two moments; torch's AdamW
  keeps them in the parameters' dtype); LoRA ``A × 12`` (float32 gradient and two moments of the adapter
  only);
* activations for ``n`` tokens per micro-batch (rows × sequences per row × ``data.max_length``; pair
  objectives forward response and other_response: 2 sequences per row), with ``b_a`` = 2 (bf16 autocast)
  or 4 (``runtime.precision: fp32``). One decoder layer keeps about ``n × (12 h + 4 I) × b_a`` — norm inputs
  (upcast to fp32), q/k/v and their rotary copies, the attention output, the residuals (≈ 12 h) and the
  SwiGLU gate, up, activation and product (4 I); flash/sdpa attention keeps no ``T × T`` matrix. Without
  checkpointing all ``L`` layers keep theirs; with activation checkpointing each layer keeps only its input
  ``n × h × b_a`` and one layer's full set is alive at a time during the backward recompute;
* logits: the ``[n, V]`` output and its gradient in ``b_a`` (``2 n V b_a``) plus two float32
  ``[chunk, V]`` blocks of the chunked log-softmax (``LOGP_CHUNK_TOKENS``). The chunked path's cost, kept
  whatever ``runtime.logp_kernel`` says: the fused kernel (``cce``) forms no logits, but what it holds
  instead has not been measured on a GPU, so for it the estimate errs high.

It leaves out the CUDA context, allocator fragmentation and kernels' workspaces: a point "fits" when the
estimate is at most :data:`USABLE_FRACTION` of the GPU's memory. Parameter counts come from the
architecture (:func:`param_count`), read from ``config.json`` when the model is local (or in the HF cache)
and from :data:`QWEN25` for the published Qwen2.5 hub ids otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from revmix.config import ExperimentConfig

GIB = 2**30
USABLE_FRACTION = 0.9  # the rest: CUDA context (~0.5-1 GiB), fragmentation, NCCL and kernel workspaces
LOGP_CHUNK_TOKENS = 1024  # revmix.objectives.base.LOGP_CHUNK_TOKENS (not imported: that pulls in torch)
ACT_HIDDEN, ACT_INTERMEDIATE = 12, 4  # activations kept per token and layer: 12 h + 4 I elements


@dataclass(frozen=True)
class Architecture:
    """The Qwen2 config values the estimate needs."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # input and output embeddings share one matrix


QWEN25: dict[str, Architecture] = {
    "Qwen/Qwen2.5-3B-Instruct": Architecture(2048, 36, 11008, 16, 2, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": Architecture(3584, 28, 18944, 28, 4, 152064, False),
    "Qwen/Qwen2.5-14B-Instruct": Architecture(5120, 48, 13824, 40, 8, 152064, False),
}
"""The published ``config.json`` values of the Qwen2.5 Instruct models the paper recipes name (hidden,
layers, intermediate, heads, kv heads, vocab, tied embeddings); used when the model is not local."""

ACCELERATOR_GIB: dict[str, float] = {
    "L4": 24,
    "A10G": 24,
    "A100-40G": 40,
    "A100-80G": 80,
    "H100": 80,
    "H200": 141,
}
"""Memory of one GPU by Ray ``accelerator_type`` name (nominal GB, compared as GiB: H100 80 GB reports 79.6
GiB, so the usable fraction absorbs the difference)."""


def param_count(a: Architecture) -> int:
    """Parameters of a Qwen2 decoder: per layer q/k/v (with biases) and o, SwiGLU, two RMSNorms;
    embeddings (twice when untied) and the final norm.

    With ``d = hidden / heads`` and ``kv = kv_heads × d``: per layer ``2 h² + 2 h·kv + h + 2 kv`` (attention)
    ``+ 3 h I`` (MLP) ``+ 2 h`` (norms); total ``L × that + V h (× 2 untied) + h``.
    """
    h, kv = a.hidden, a.kv_heads * (a.hidden // a.heads)
    per_layer = 2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * a.intermediate + 2 * h
    return a.layers * per_layer + a.vocab * h * (1 if a.tied else 2) + h


def lora_param_count(a: Architecture, r: int, targets: list[str]) -> int:
    """LoRA adapter parameters: ``r × (d_in + d_out)`` per targeted linear layer, in every layer."""
    h, kv, i = a.hidden, a.kv_heads * (a.hidden // a.heads), a.intermediate
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"LoRA target(s) {unknown} not in a Qwen2 layer; valid: {', '.join(shapes)}")
    return a.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def architecture(name_or_path: str | None, scale: str) -> Architecture | None:
    """The model's architecture: a tiny scale, a local ``config.json`` (or the HF cache), the Qwen2.5
    table; None when none of these knows the model."""
    if name_or_path is None or name_or_path.startswith("tiny:"):
        from revmix.platform.models import SCALES, VOCAB_SIZE

        s = SCALES[name_or_path[5:] if name_or_path else scale]
        return Architecture(
            s.hidden_size,
            s.num_hidden_layers,
            s.intermediate_size,
            s.num_attention_heads,
            s.num_key_value_heads,
            VOCAB_SIZE,
            True,
        )
    try:
        from transformers import AutoConfig

        c: Any = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        return Architecture(
            c.hidden_size,
            c.num_hidden_layers,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size,
            bool(c.tie_word_embeddings),
        )
    except (OSError, ValueError, AttributeError):  # not local, not cached, or not a decoder config
        return QWEN25.get(name_or_path) or QWEN25.get(f"{name_or_path}-Instruct")


@dataclass(frozen=True)
class Estimate:
    """Bytes of each term (see the module docstring) for the stage that needs the most."""

    weights: float
    grads_optimizer: float
    activations: float
    logits: float
    stage: str
    tokens: int  # per micro-batch
    lora: bool
    checkpointing: bool

    @property
    def total(self) -> float:
        return self.weights + self.grads_optimizer + self.activations + self.logits

    def line(self) -> str:
        g = [f"{x / GIB:.1f}" for x in (self.weights, self.grads_optimizer, self.activations, self.logits)]
        how = f"{'LoRA' if self.lora else 'full'}, checkpointing {'on' if self.checkpointing else 'off'}"
        return (
            f"~{self.total / GIB:.1f} GiB (weights {g[0]} + grads/optimizer {g[1]} + activations {g[2]} + "
            f"logits {g[3]}; stage {self.stage}, {self.tokens} tokens per micro-batch, {how})"
        )


def activation_bytes(a: Architecture, tokens: int, act_bytes: int, checkpointing: bool) -> int:
    """``L × n(12h + 4I) b_a`` without checkpointing; ``L × n h b_a + n(12h + 4I) b_a`` with it."""
    layer = tokens * (ACT_HIDDEN * a.hidden + ACT_INTERMEDIATE * a.intermediate) * act_bytes
    if checkpointing:
        return a.layers * tokens * a.hidden * act_bytes + layer
    return a.layers * layer


def estimate(cfg: ExperimentConfig, a: Architecture) -> Estimate:
    """The peak over the config's stages of one GPU worker's memory (module docstring)."""
    w_bytes = 4 if cfg.model.dtype == "float32" else 2  # auto: bf16 on a GPU
    a_bytes = 4 if cfg.runtime.precision == "fp32" else 2
    checkpointing = cfg.runtime.activation_checkpointing != "off"  # auto: on on a GPU
    params = param_count(a)
    best: Estimate | None = None
    for st in cfg.stages:
        lora = cfg.model.lora.enabled if st.lora is None else st.lora
        adapter = lora_param_count(a, cfg.model.lora.r, cfg.model.lora.target_modules) if lora else 0
        weights = params * w_bytes * (2 if st.reference == "copy" else 1) + adapter * 4
        grads = adapter * 12 if lora else params * 3 * w_bytes
        rows = max(1, st.batch_size // (max(1, cfg.runtime.num_workers) * st.grad_accum))
        tokens = rows * (2 if "other_response" in st.objective.requires else 1) * cfg.data.max_length
        acts = activation_bytes(a, tokens, a_bytes, checkpointing)
        logits = 2 * tokens * a.vocab * a_bytes + 2 * LOGP_CHUNK_TOKENS * a.vocab * 4
        e = Estimate(weights, grads, acts, logits, st.name, tokens, lora, checkpointing)
        best = e if best is None or e.total > best.total else best
    assert best is not None  # a config has at least one stage
    return best


def gpu_memory_gib(gpu_memory_gb: float | None, accelerator_type: str | None) -> float | None:
    """The GPU memory to check against: given directly, or looked up by accelerator type."""
    if gpu_memory_gb is not None:
        return gpu_memory_gb
    if accelerator_type is None:
        return None
    if accelerator_type not in ACCELERATOR_GIB:
        raise ValueError(
            f"unknown accelerator_type {accelerator_type!r}; known: {', '.join(ACCELERATOR_GIB)} "
            "(or give gpu_memory_gb)"
        )
    return ACCELERATOR_GIB[accelerator_type]


def fit_line(cfg: ExperimentConfig, memory_gib: float | None, what: str = "") -> str:
    """One dry-run line: the estimate and whether it fits ``memory_gib`` (``what`` names the GPU)."""
    a = architecture(cfg.model.name_or_path, cfg.model.scale)
    if a is None:
        return (
            f"memory: unknown architecture for {cfg.model.name_or_path!r} (not local, not in the HF cache, "
            f"not one of {', '.join(QWEN25)})"
        )
    e = estimate(cfg, a)
    if memory_gib is None:
        verdict = "no GPU memory given (sweep resources.gpu_memory_gb or accelerator_type)"
    else:
        fits = e.total <= USABLE_FRACTION * memory_gib * GIB
        gpu = f"{what} {memory_gib:g} GiB".strip()
        verdict = f"{'fits' if fits else 'does NOT fit'} {gpu} (usable {USABLE_FRACTION:.0%})"
    return f"memory: {e.line()}: {verdict}"
