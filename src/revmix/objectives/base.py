"""The objective base class, the batch it reads, and the registry.

Objectives are torch-only: this package never imports ray or vllm, so every objective is testable in
milliseconds with no Ray running.

Conventions
-----------
* ``labels`` are aligned with ``input_ids`` (Hugging Face style): ``labels[b, t]`` is the token at position
  ``t`` when it is a response token and ``-100`` otherwise. Log-probs shift by one inside
  :func:`token_logps`.
* Metric keys are ``"<name>/<direction>"`` (``"loss/forward"``) plus direction-free keys (``"loss"``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, ValidationError
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, PydanticKnownError, core_schema
from torch import Tensor

from revmix.objectives.plugins import PluginError, import_path, installed
from revmix.validation import OpenTagged, Strict, did_you_mean, validate

IGNORE_INDEX = -100
DirectionName = Literal["forward", "reverse"]
DIRECTIONS: tuple[DirectionName, ...] = typing.get_args(DirectionName)
"""The question directions, in the order of their codes in ``Batch.direction`` (0 forward, 1 reverse)."""
PackingMode = Literal["off", "mask", "varlen"]
"""How rows are laid out for the policy's forward pass (:class:`PolicyForward`)."""
LogpKernel = Literal["chunked", "cce"]
"""How response log-probs are computed from the policy's forward pass (:func:`forward_token_logps`)."""


@dataclass(frozen=True)
class PolicyForward:
    """What objectives may ask of the policy's forward pass; the training loop decides it once per stage
    (objectives never inspect the model or its wrappers) and hands it over on every :class:`Batch`.

    ``shared_prompt``: the policy takes a boolean 4-D attention mask with ``position_ids``, so DPO may
    score each pair in one row behind one copy of the prompt (:mod:`revmix.objectives.prefix`).
    ``length_groups``: forward calls one pass over such rows may be split into (1 under DDP, which
    allows one forward per backward).
    ``packing``: how row-based objectives may pack several rows into one sequence
    (:mod:`revmix.objectives.packing`): ``"off"`` (right-padded rows), ``"mask"`` (a block-diagonal boolean
    4-D mask with restarted ``position_ids``: sdpa, eager) or ``"varlen"`` (one row, restarted
    ``position_ids``, no mask: flash_attention_2's variable-length path).
    ``logp_kernel``: how response log-probs are computed (:func:`forward_token_logps`): ``"chunked"`` (the
    model's logits, :func:`token_logps`) or ``"cce"`` (the final hidden states and the output layer's
    weight, fused by Cut Cross-Entropy: no ``[B, T, V]`` logits). What needs the whole next-token
    distribution (entropy metrics, label smoothing, PPO) and the reference's log-probs stay chunked.
    """

    shared_prompt: bool = False
    length_groups: int = 1
    packing: PackingMode = "off"
    logp_kernel: LogpKernel = "chunked"


@dataclass
class Batch:
    """A collated, right-padded batch of canonical rows.

    ``input_ids``/``labels`` hold prompt + y+ (``response``); ``other_*`` hold prompt + y−
    (``other_response``) when an objective requires it. ``direction`` is 0 (forward) / 1 (reverse).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    direction: Tensor
    task: list[str] = field(default_factory=list)
    other_input_ids: Tensor | None = None
    other_attention_mask: Tensor | None = None
    other_labels: Tensor | None = None
    prompt_ids: list[list[int]] | None = None
    answer: list[str | None] | None = None
    item_id: list[str] | None = None
    # Reference log-probs cached per example (summed over response tokens) — see ``dpo``.
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    # What the objective may ask of the policy's forward pass, decided by the training loop.
    policy_forward: PolicyForward = field(default_factory=PolicyForward)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        moved: dict[str, Any] = {
            f.name: v.to(device)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
            if isinstance(v, Tensor)
        }
        return dataclasses.replace(self, **moved)

    def select(self, index: Tensor) -> Batch:
        """The sub-batch at ``index`` (a 1-D long tensor of row positions)."""
        idx = index.tolist()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[index]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx] if v else v
            else:
                out[f.name] = v
        return Batch(**out)


@dataclass
class LossOutput:
    """A scalar loss to back-propagate and float metrics (keys ``name`` or ``name/direction``)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    # True when the objective already accumulated gradients into ``.grad`` itself (gradient surgery);
    # the training loop then skips ``loss.backward()``.
    grads_applied: bool = False


@runtime_checkable
class Reference(Protocol):
    """A frozen reference policy: logits with no gradient (adapter-disabled model, frozen copy, …).

    ``shared_prompt``: whether ``logits`` takes DPO's shared-prompt rows — a boolean 4-D attention mask
    ``[B, 1, W, W]`` with ``position_ids`` (:mod:`revmix.objectives.prefix`); when False, objectives hand
    it the concatenated pairs instead. ``length_groups``: how many forward calls one pass over such rows
    may be split into (rows of similar length together, :mod:`revmix.objectives.buckets`).
    """

    shared_prompt: bool
    length_groups: int

    def logits(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor: ...


class Objective(Strict):
    """What the training loop calls once per micro-batch: a pydantic model whose fields are the
    hyper-parameters, registered with :func:`register_objective`.

    A subclass declares a discriminator ``name: Literal["<name>"] = "<name>"`` and one typed field per
    hyper-parameter (``Field(default, gt=…, description="why")``; cross-field rules in a
    ``model_validator``), so a bad value fails when the config is read, naming its dotted path
    (``stages.0.objective.beta``). Instances are frozen; runtime state goes in ``PrivateAttr``.

    Required:

    * ``__call__(policy, batch, ref) -> LossOutput`` — the loss of one micro-batch (the base raises
      ``NotImplementedError``).
    * Class attributes ``requires`` (the batch fields read: ``response``, ``other_response``),
      ``needs_reference`` (the loop passes a :class:`Reference`) and ``needs_rollouts`` (the loop runs the
      rollout step, which samples from the policy, instead of the supervised step). The base's values
      are those of plain supervised training; an objective may answer them per instance.

    Optional, with no-op defaults (override only what the objective needs):

    * ``prepare_policy(policy) -> list[Parameter]`` — add what the objective trains alongside the policy
      (PPO's value head) before the optimizer and DDP see its parameters; returns the parameters it
      created. Default: adds nothing, returns ``[]``.
    * ``release_policy(policy) -> Module | None`` — detach what ``prepare_policy`` added, before the
      policy is saved; returns it. Default: nothing to detach, returns ``None``.
    """

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="registered objective name (the discriminator of the config union)")

    requires: ClassVar[frozenset[str]] = frozenset({"response"})
    needs_reference: ClassVar[bool] = False
    needs_rollouts: ClassVar[bool] = False

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(policy, batch, ref)")

    def prepare_policy(self, policy: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Optional hook: add trainable modules to ``policy``; returns the new parameters (none here)."""
        return []

    def release_policy(self, policy: torch.nn.Module) -> torch.nn.Module | None:
        """Optional hook: detach what :meth:`prepare_policy` added (nothing here)."""
        return None


# --------------------------------------------------------------------------------------------------
# Shared maths
# --------------------------------------------------------------------------------------------------


def logits_of(output: Any) -> Tensor:
    """The logits of a causal LM's forward output: a module returns them as a tensor or as ``.logits``."""
    return output if isinstance(output, Tensor) else output.logits


def policy_logits(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
    """Logits of a causal LM; ``kwargs`` go to the model."""
    return logits_of(model(input_ids=input_ids, attention_mask=attention_mask, **kwargs))


LOGP_CHUNK_TOKENS = 1024
"""Positions (summed over the rows) whose float32 vocabulary rows :func:`target_logps` holds at once.

The extra memory of a log-prob pass is then a few ``[chunk, V]`` float32 blocks (1024 × 151,936 × 4 B ≈
0.6 GB each) instead of two float32 copies of ``[B, T, V]`` (20 GB each at B=8, T=4096). The fused path
(:func:`fused_token_logps`, ``runtime.logp_kernel: cce``) goes further on GPU: it replaces the model's
``lm_head`` call *and* this function, taking hidden states, and never materialises the logits."""


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """One chunk of logits in float32, divided by a sampling temperature other than 1."""
    x = logits.float()
    return x / temperature if temperature != 1.0 else x


class _ChunkedTargetLogps(torch.autograd.Function):
    """Forward and backward of :func:`target_logps`, ``step`` positions of every row at a time.

    Position ``t < L`` of ``logits`` (``[B, T, V]``, ``T >= L``) is scored against ``targets[:, t]``
    (``[B, L]``); later positions get zero gradient, so a causal shift needs no sliced copy of the logits
    or of their gradient. Only the logits (already alive, in their own dtype) and the float32
    ``logsumexp`` per position are kept for backward; each chunk's softmax is recomputed there. With
    ``x = logits / τ`` and ``p = softmax(x)``: ∂ log p_y / ∂x = onehot(y) − p; ∂H / ∂x = −p ⊙ (x − E_p[x])
    for the entropy ``H = lse − E_p[x]``; ∂ mean_v log p_v / ∂x = 1/V − p; each then divided by τ.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, targets: Tensor, temperature: float, chunk: int, stats: bool
    ) -> tuple[Tensor, ...]:
        rows, width = targets.shape
        step = max(1, chunk // max(rows, 1))
        lse = logits.new_empty((rows, width), dtype=torch.float32)
        logp = torch.empty_like(lse)
        entropy, mean = torch.empty_like(lse), torch.empty_like(lse)  # filled only with stats
        for s in range(0, width, step):
            sl = slice(s, min(s + step, width))
            x = _scaled(logits[:, sl], temperature)
            lse[:, sl] = torch.logsumexp(x, dim=-1)
            logp[:, sl] = x.gather(-1, targets[:, sl, None]).squeeze(-1) - lse[:, sl]
            if stats:
                p = (x - lse[:, sl, None]).exp_()
                entropy[:, sl] = lse[:, sl] - (p * x).sum(-1)
                mean[:, sl] = x.mean(-1) - lse[:, sl]
        ctx.set_materialize_grads(False)  # an output no loss uses gets None: its term is skipped
        ctx.temperature, ctx.step = temperature, step
        ctx.save_for_backward(logits, targets, lse, lse - entropy if stats else lse)  # lse − H = E_p[x]
        return (logp, entropy, mean) if stats else (logp,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        logits, targets, lse, expected_x = ctx.saved_tensors
        g_logp, g_ent, g_mean = (*grads, None, None)[:3]
        rows, width = targets.shape
        vocab, tau = logits.shape[-1], ctx.temperature
        grad = torch.empty_like(logits)
        grad[:, width:] = 0
        # Per position, ∂L/∂x = p ⊙ coef (+ the entropy term) + g_logp at the target + g_mean / V.
        coef = torch.zeros_like(lse)
        for g in (g_logp, g_mean):
            if g is not None:
                coef -= g
        for s in range(0, width, ctx.step):
            sl = slice(s, min(s + ctx.step, width))
            x = _scaled(logits[:, sl], tau)
            p = (x - lse[:, sl, None]).exp_()
            if g_ent is not None:  # x may be the logits themselves: no in-place op on it
                p.mul_((x - expected_x[:, sl, None]).mul_(-g_ent[:, sl, None]).add_(coef[:, sl, None]))
            else:
                del x
                p.mul_(coef[:, sl, None])
            if g_logp is not None:
                p.scatter_add_(-1, targets[:, sl, None], g_logp[:, sl, None])
            if g_mean is not None:
                p.add_(g_mean[:, sl, None] / vocab)
            grad[:, sl] = p.div_(tau) if tau != 1.0 else p
        return grad, None, None, None, None


def target_logps(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk: int = LOGP_CHUNK_TOKENS
) -> Tensor:
    """float32 ``log softmax(logits / temperature)[..., target]`` without the float32 ``[B, L, V]`` tensor.

    .. math::  \\log p(y) = x_y - \\log \\sum_v e^{x_v}, \\qquad x = \\text{logits} / \\tau

    computed ``chunk`` positions (summed over rows) at a time, forward and backward
    (:data:`LOGP_CHUNK_TOKENS`); equal to ``torch.log_softmax(logits.float() / τ, -1).gather(-1, targets)``.

    Args:
        logits: ``[B, T, V]`` with ``T >= L``, any float dtype (gradients come back in it); positions from
            ``L`` on are not scored (the causal shift: ``token_logps`` passes all ``T`` and ``L = T - 1``).
        targets: ``[B, L]`` token ids, all valid (fill masked positions with any id and mask afterwards).
    """
    return _ChunkedTargetLogps.apply(logits, targets, temperature, chunk, False)[0]


def target_logps_and_entropy(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk: int = LOGP_CHUNK_TOKENS
) -> tuple[Tensor, Tensor]:
    """:func:`target_logps` and the entropy ``H = log Z − E_p[x]`` (nats) of each scored position's
    next-token distribution, ``[B, L]`` each, from the same chunked pass.

    The entropy reuses the chunk's ``log Z``; it adds one ``exp`` and two reductions over each ``[chunk, V]``
    block to the forward (and the vocabulary mean, which this discards). With the entropy detached (a
    metric), backward is exactly :func:`target_logps`'s: an output no loss uses gets no gradient work.
    """
    logp, entropy, _ = _ChunkedTargetLogps.apply(logits, targets, temperature, chunk, True)
    return logp, entropy


def token_logps(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk: int = LOGP_CHUNK_TOKENS
) -> tuple[Tensor, Tensor]:
    """Per-token log p(label) and the response mask, both ``[B, T-1]`` after the causal shift.

    Position ``t`` of ``logits`` (``[B, T, V]``) predicts ``labels[:, t + 1]`` (``[B, T]``, ``-100`` off
    the response); masked positions get log-prob 0 so that a row's sum is the sum over its response tokens.
    The logits are divided by a sampling ``temperature`` other than 1 first. Chunked: :func:`target_logps`.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = target_logps(logits, targets.masked_fill(~mask, 0), temperature, chunk)
    return logp * mask, mask


class TokenStats(typing.NamedTuple):
    """Per-position statistics of the next-token distribution, each ``[B, T-1]``, 0 off the response."""

    logp: Tensor  # log p(label)
    mask: Tensor  # response positions
    entropy: Tensor  # −Σ_v p_v log p_v (PPO's entropy bonus)
    mean_logp: Tensor  # (1/V) Σ_v log p_v (SFT's label smoothing)


def token_stats(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk: int = LOGP_CHUNK_TOKENS
) -> TokenStats:
    """:func:`token_logps` plus the entropy and the vocabulary-mean log-prob of each position, chunked the
    same way (no float32 ``[B, T-1, V]``); a statistic no loss uses costs no backward work.

    .. math::  H = \\log Z - E_p[x], \\qquad \\tfrac{1}{V}\\sum_v \\log p_v = \\bar{x} - \\log Z

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` with ``-100`` off the response.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # All T positions go in, as in token_logps: the last is not scored, and no sliced copy of the logits'
    # gradient is made.
    outs = _ChunkedTargetLogps.apply(logits, targets.masked_fill(~mask, 0), temperature, chunk, True)
    logp, entropy, mean_logp = (o * mask for o in outs)
    return TokenStats(logp, mask, entropy, mean_logp)


# --------------------------------------------------------------------------------------------------
# Fused log-probs: the output layer and the log-softmax in one kernel (Cut Cross-Entropy)
# --------------------------------------------------------------------------------------------------

CCE_FILTER_EPS: float | str | None = None
"""Cut Cross-Entropy's ``filter_eps``: None, exact gradients. The library's default (``"high"``) skips, in
backward, every vocabulary block whose softmax entries are all below ``eps(dtype) / 32`` (2.4e-4 in bf16).
On a near-uniform distribution — a random-weight model at Qwen2.5's 151,936 tokens has p ≈ 6.6e-6
everywhere — that drops the softmax term of the gradient altogether, so revmix keeps every block; the
skipping is a speed-up to measure on a GPU (``benchmarks/logp_memory.py`` times both), not a default."""

_NO_LOGITS = "logits_to_keep"  # the keyword that keeps a Hugging Face causal LM from computing logits
_LAST_HIDDEN = "output_hidden_states"  # the keyword that asks it for hidden states (-1: the last only)


def hidden_request(kwargs: Mapping[str, Any]) -> bool:
    """Whether a forward call's keywords are exactly :func:`policy_hidden`'s request (final hidden states,
    no logits), so that a wrapper (:class:`~revmix.objectives.buckets.LengthBucketedLM`) may split it."""
    return set(kwargs) == {_NO_LOGITS, _LAST_HIDDEN} and kwargs[_LAST_HIDDEN] == -1


def policy_hidden(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
    """The final hidden states ``[B, T, H]`` of a causal LM (after its last norm: what ``lm_head`` reads),
    without computing any logits; ``kwargs`` go to the model.

    One call of the model itself, through every wrapper (DDP, length groups, PEFT): Hugging Face's
    ``logits_to_keep`` given no positions makes the ``lm_head`` call ``[B, 0, V]``, and
    ``output_hidden_states=-1`` keeps only the last hidden state (transformers returns the final norm's
    output there). No second forward, no hook on the model.
    """
    keep_none = torch.empty(0, dtype=torch.long, device=input_ids.device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        **{_LAST_HIDDEN: -1, _NO_LOGITS: keep_none},
        **kwargs,
    )
    return out.hidden_states[-1]


def output_layer_problem(model: torch.nn.Module) -> str:
    """Why the fused kernel cannot read ``model``'s output layer (a Hugging Face or PEFT causal LM, possibly
    inside DDP or :class:`~revmix.objectives.buckets.LengthBucketedLM`), or ``""`` when it can: it needs a
    plain bias-free ``nn.Linear`` with a local weight, not an adapter on ``lm_head`` nor an FSDP shard."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear:
        return f"the output layer is a {type(head).__name__}, not a plain nn.Linear (an adapter on lm_head?)"
    if head.bias is not None:
        return "the output layer has a bias"
    if _is_sharded(head.weight):
        return "the output layer's weight is an FSDP shard (a DTensor)"
    return ""


def output_weight(model: torch.nn.Module) -> Tensor:
    """The output layer's weight ``[V, H]`` of a causal LM (wrapped as :func:`output_layer_problem` says); a
    ``ValueError`` saying why when the fused kernel cannot read it."""
    problem = output_layer_problem(model)
    if problem:
        raise ValueError(
            f"fused log-probs (runtime.logp_kernel=cce): {problem}; set runtime.logp_kernel=chunked"
        )
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_output_embeddings().weight  # type: ignore[operator]


def _is_sharded(weight: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)


@functools.cache
def _linear_cross_entropy(impl: str) -> Callable[..., Tensor]:
    """Cut Cross-Entropy's ``linear_cross_entropy`` for ``impl`` (``"cce"``: its Triton kernel, CUDA;
    ``"torch_compile"``: ``torch.compile`` of the plain computation, any device), imported on first use.

    The package's ``__init__`` imports the Triton kernels on every system but macOS, so on a CPU-only Linux
    machine without ``triton`` it does not import at all; the ``torch_compile`` implementation, which needs
    no Triton, is then loaded from its own module (``cut_cross_entropy.torch_compile``) without running the
    package's ``__init__``. A ``ModuleNotFoundError`` when the package is not installed.
    """
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        spec = importlib.util.find_spec("cut_cross_entropy")
        if impl != "torch_compile" or spec is None:
            raise
        package = importlib.util.module_from_spec(spec)  # its __init__ is not run: it imports Triton
        sys.modules[spec.name] = package
        try:
            module = importlib.import_module(f"{spec.name}.torch_compile")
        finally:
            for name in [n for n in sys.modules if n == spec.name or n.startswith(f"{spec.name}.")]:
                del sys.modules[name]  # no half-initialised package left behind for a later import
        return module.torch_compile_linear_cross_entropy
    return functools.partial(linear_cross_entropy, impl=impl, filter_eps=CCE_FILTER_EPS)


def fused_available(impl: str = "cce") -> tuple[bool, str]:
    """Whether Cut Cross-Entropy's ``impl`` (``"cce"``: the Triton kernel; ``"torch_compile"``) imports
    here, and if not, why (one line)."""
    try:
        _linear_cross_entropy(impl)
    except Exception as e:  # missing package, no triton, a triton built for another torch: all mean no kernel
        return False, f"cut_cross_entropy does not import ({type(e).__name__}: {e})"
    return True, "cut_cross_entropy imports"


def _fused_nll(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, shift: bool) -> Tensor:
    """Per-position −log softmax(hidden · weightᵀ / τ)[target] from Cut Cross-Entropy, float32, 0 where the
    target is ``IGNORE_INDEX``: its Triton kernel on CUDA, its ``torch_compile`` implementation elsewhere
    (which computes the logits: for checking equality on CPU, not for memory)."""
    lce = _linear_cross_entropy("cce" if hidden.is_cuda else "torch_compile")
    h = hidden / temperature if temperature != 1.0 else hidden
    nll = lce(h, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", shift=shift)
    return nll.float()


def fused_target_logps(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """:func:`target_logps` from the final hidden states and the output layer's weight, never forming the
    logits: float32 ``log softmax(hidden · weightᵀ / temperature)[..., target]``, ``[B, L]``.

    Args:
        hidden: ``[B, T, H]`` with ``T >= L``; positions from ``L`` on are not scored.
        weight: ``[V, H]``, the ``lm_head`` weight (:func:`output_weight`).
        targets: ``[B, L]`` token ids, all valid (fill masked positions with any id and mask afterwards).
    """
    width = targets.shape[1]
    return -_fused_nll(hidden[:, :width], weight, targets, temperature, shift=False)


def fused_token_logps(
    hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """:func:`token_logps` from the final hidden states ``[B, T, H]`` and the output layer's weight
    ``[V, H]``: per-token log p(label) and the response mask, ``[B, T-1]`` each, 0 off the response.

    Cut Cross-Entropy (Wijmans et al. 2025, "Cut Your Losses in Large-Vocabulary Language Models",
    arXiv 2411.09009) shifts the labels itself and scores only the response positions: the forward keeps a
    log-sum-exp per scored position, the backward recomputes each vocabulary block's softmax in on-chip
    memory, so no ``[B, T, V]`` (or ``[chunk, V]``) tensor exists. Hidden states are divided by a sampling
    ``temperature`` other than 1 (the same as dividing the logits).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = -_fused_nll(hidden, weight, labels, temperature, shift=True)
    return logp * mask, mask


def log_prob_forward(
    model: torch.nn.Module, kernel: LogpKernel = "chunked"
) -> tuple[Callable[..., Tensor], Tensor | None]:
    """What per-token log-probs of ``model`` are computed from under ``kernel`` — the one place the kernel
    is applied: a forward function ``(input_ids, attention_mask, **kwargs) -> Tensor`` and the output
    layer's weight. ``"chunked"``: the logits ``[B, T, V]`` and None (score with :func:`target_logps` /
    :func:`token_logps`); ``"cce"``: the final hidden states ``[B, T, H]`` and the weight (score with
    :func:`fused_target_logps` / :func:`fused_token_logps`; :func:`score_targets` and :func:`score_tokens`
    pick by the weight)."""
    if kernel == "chunked":
        return functools.partial(policy_logits, model), None
    if kernel == "cce":
        return functools.partial(policy_hidden, model), output_weight(model)
    raise ValueError(f"unknown log-prob kernel {kernel!r}; valid: {', '.join(typing.get_args(LogpKernel))}")


def score_targets(scores: Tensor, weight: Tensor | None, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """:func:`target_logps` of logits (``weight`` None) or :func:`fused_target_logps` of hidden states, as
    :func:`log_prob_forward` returned them."""
    if weight is None:
        return target_logps(scores, targets, temperature)
    return fused_target_logps(scores, weight, targets, temperature)


def score_tokens(
    scores: Tensor, weight: Tensor | None, labels: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """:func:`token_logps` of logits (``weight`` None) or :func:`fused_token_logps` of hidden states, as
    :func:`log_prob_forward` returned them."""
    if weight is None:
        return token_logps(scores, labels, temperature)
    return fused_token_logps(scores, weight, labels, temperature)


def forward_token_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    kernel: LogpKernel = "chunked",
    temperature: float = 1.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """:func:`token_logps` of ``model`` on ``input_ids`` (``[B, T]``; ``kwargs`` go to the model) computed
    by ``kernel`` (:func:`log_prob_forward`): per-token log p(label) and the response mask, ``[B, T-1]``."""
    forward, weight = log_prob_forward(model, kernel)
    return score_tokens(forward(input_ids, attention_mask, **kwargs), weight, labels, temperature)


def sequence_logps(logits: Tensor, labels: Tensor, average: bool = False) -> Tensor:
    """Summed (or mean, when ``average``) response-token log-prob per row, shape ``[B]``."""
    logp, mask = token_logps(logits, labels)
    total = logp.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def per_direction(values: Tensor, direction: Tensor, name: str) -> dict[str, float]:
    """Mean of ``values`` ([B]) overall and per direction present in the batch."""
    values = values.detach().float()
    out = {name: float(values.mean())}
    for code, label in enumerate(DIRECTIONS):
        sel = direction == code
        if bool(sel.any()):
            out[f"{name}/{label}"] = float(values[sel].mean())
    return out


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Objective]] = {}


class UnknownObjective(KeyError):
    """A name that no objective answers to; the message says why and what would (printed unquoted)."""

    def __str__(self) -> str:
        return str(self.args[0])


def declared_name(cls: Any) -> str:
    """The name ``cls`` answers to, from its ``name: Literal["x"] = "x"``; a :class:`TypeError` when ``cls`` is
    not an :class:`Objective` subclass or declares its name any other way."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        what = f"class {cls.__qualname__}" if isinstance(cls, type) else f"{cls!r} (a {type(cls).__name__})"
        raise TypeError(f"{what} is not a subclass of revmix.objectives.base.Objective")
    name = cls.model_fields["name"].default
    if not isinstance(name, str) or typing.get_args(cls.model_fields["name"].annotation) != (name,):
        raise TypeError(f'{cls.__qualname__} must declare its name as name: Literal["x"] = "x"')
    return name


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: register an :class:`Objective` under its ``name`` literal (one class per name)."""
    name = declared_name(cls)
    if name in _REGISTRY:
        raise ValueError(f"objective {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def objective_names() -> list[str]:
    """The registered objectives (the built-ins and any registered since), sorted; plug-ins are not here."""
    return sorted(_REGISTRY)


def known_objective_names() -> list[str]:
    """Every objective a config can name without an import path: registered and installed, sorted."""
    return sorted({*_REGISTRY, *installed()})


def objective_class(name: str) -> type[Objective]:
    """The class ``name`` stands for: a registered objective (which wins a clash), an installed plug-in
    (entry-point group ``revmix.objectives``) or a ``pkg.module:ClassName`` import path
    (:mod:`revmix.objectives.plugins`). A plug-in class's ``name`` literal must be that same name, so an
    objective dumps to a config that loads again. Raises :class:`UnknownObjective` saying why not."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    builtin = f"built-in objectives: {', '.join(sorted(_REGISTRY))}"
    loaders = {} if ":" in name else installed()
    if ":" not in name and name not in loaders:
        valid = sorted({*_REGISTRY, *loaders})
        raise UnknownObjective(
            f"{name!r} is not one of {', '.join(valid)}{did_you_mean(name, valid)}; a plug-in is named by its "
            "import path, pkg.module:ClassName"
        )
    try:
        found = loaders[name]() if name in loaders else import_path(name)
        declared = declared_name(found)
    except (PluginError, TypeError) as e:
        raise UnknownObjective(f"objective {name!r}: {e}; {builtin}") from e
    if declared != name:
        raise UnknownObjective(
            f"objective {name!r}: {found.__qualname__} declares name {declared!r}; a plug-in's name literal is "
            f"the name configs use: name: Literal[{name!r}] = {name!r}"
        )
    return found


def build_objective(spec: Mapping[str, Any], path: str = "objective") -> Objective:
    """Build from ``{"name": ..., **hyperparams}``; a bad name, key or value is a :class:`ConfigError`
    naming its dotted path under ``path``."""
    return validate(AnyObjective, dict(spec), path)


class _Objectives(Mapping[str, type[BaseModel]]):
    """Name → class of every objective, for :mod:`revmix.validation`: iteration lists the registered and
    installed ones; a lookup also finds import paths (a name that finds nothing is absent)."""

    def __getitem__(self, name: str) -> type[BaseModel]:
        return objective_class(name)  # UnknownObjective is a KeyError: `in` answers False

    def __iter__(self) -> Iterator[str]:
        return iter(known_objective_names())

    def __len__(self) -> int:
        return len(known_objective_names())


def _tagged(error: ValidationError, name: str) -> ValidationError:
    """``error`` with ``name`` after the objective's own location, as pydantic's tagged unions report it, so
    :func:`revmix.validation.explain` walks into that class's fields (their bounds, the valid keys)."""
    errors = [
        {
            "type": PydanticCustomError(e["type"], e["msg"], e.get("ctx")),
            "loc": (name, *e["loc"]),
            "input": e["input"],
        }
        for e in error.errors()
    ]
    return ValidationError.from_exception_data(error.title, errors)  # type: ignore[arg-type]


def _name_error(reason: str, value: Any) -> ValidationError:
    line = {
        "type": PydanticCustomError("objective_name", "{reason}", {"reason": reason}),
        "loc": ("name",),
        "input": value,
    }
    return ValidationError.from_exception_data("Objective", [line])  # type: ignore[list-item]


def _validate_objective(value: Any) -> Objective:
    """An :class:`Objective` from ``{"name": ..., **hyper-parameters}`` (an instance passes as it is)."""
    if isinstance(value, Objective):
        return value
    if not isinstance(value, Mapping):
        raise PydanticKnownError("dict_type")
    name = value.get("name")
    if not isinstance(name, str):
        names = ", ".join(known_objective_names())
        reason = f"expected an objective name, got {name!r}" if "name" in value else "required key missing"
        raise _name_error(f"{reason}; one of {names}, or a plug-in's import path pkg.module:ClassName", name)
    try:
        cls = objective_class(name)
    except UnknownObjective as e:
        raise _name_error(str(e), name) from None
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        raise _tagged(e, name) from None


_IN_JSON_SCHEMA: ContextVar[bool] = ContextVar("_IN_JSON_SCHEMA", default=False)


class AnyObjective(OpenTagged):
    """The type of a config's ``objective``: any objective, chosen by its ``name`` when the value is read
    (:func:`objective_class`), so objectives registered or installed after import count; the other keys
    are validated by that class's own fields. Dumps with the class's own fields, as ``SerializeAsAny``."""

    @classmethod
    def members(cls) -> Mapping[str, type[BaseModel]]:
        return _Objectives()

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate_objective,
            serialization=core_schema.wrap_serializer_function_ser_schema(
                lambda value, dump: dump(value), schema=core_schema.any_schema()
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """One of the registered and installed objectives, told apart by ``name`` (import paths are open);
        inside one of them (a multitask route) an object with a ``name``, which keeps the schema finite."""
        if _IN_JSON_SCHEMA.get():
            return {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
        token = _IN_JSON_SCHEMA.set(True)
        try:
            refs = {name: handler(member.__pydantic_core_schema__) for name, member in _Objectives().items()}
        finally:
            _IN_JSON_SCHEMA.reset(token)
        return {"oneOf": list(refs.values()), "discriminator": {"propertyName": "name"}}
