"""The objective protocol, the batch it reads, and the registry (DESIGN §5).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

IGNORE_INDEX = -100
DIRECTION_NAMES: tuple[str, str] = ("forward", "reverse")


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

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: (v.to(device) if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return Batch(**moved)

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
    """A frozen reference policy: logits with no gradient (adapter-disabled model, frozen copy, …)."""

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...


class Objective(Protocol):
    """What the training loop calls once per micro-batch."""

    requires: ClassVar[frozenset[str]]
    needs_reference: ClassVar[bool]
    needs_rollouts: ClassVar[bool]

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None) -> LossOutput: ...


# --------------------------------------------------------------------------------------------------
# Shared maths
# --------------------------------------------------------------------------------------------------


def policy_logits(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
    """Logits of a causal LM (any module returning ``.logits`` or a tensor); ``kwargs`` go to the model."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log p(label) and the response mask, both ``[B, T-1]`` after the causal shift.

    Masked positions get log-prob 0 so that sums over a row equal the sum over its response tokens.
    """
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


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
    for code, label in enumerate(DIRECTION_NAMES):
        sel = direction == code
        if bool(sel.any()):
            out[f"{name}/{label}"] = float(values[sel].mean())
    return out


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}


def register_objective(name: str) -> Callable[[type], type]:
    """Register a frozen dataclass (its fields are the hyper-parameters) under ``name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"objective {name!r} must be a dataclass, got {cls!r}")
        for attr in ("requires", "needs_reference", "needs_rollouts"):
            if not hasattr(cls, attr):
                raise TypeError(f"objective {name!r} must define class attribute {attr!r}")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return deco


def _ensure_builtins() -> None:
    # Import for the side effect of registration; kept lazy to avoid import cycles.
    from revmix.objectives import builtins  # noqa: F401


def objective_names() -> list[str]:
    _ensure_builtins()
    return sorted(_REGISTRY)


def objective_class(name: str) -> type:
    _ensure_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown objective {name!r}; valid objectives: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def objective_fields(name: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(objective_class(name))}


def build_objective(spec: dict[str, Any], path: str = "objective") -> Objective:
    """Build from ``{"name": ..., **hyperparams}``; unknown keys are errors naming ``path``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"{path}: expected a mapping with a 'name' key, got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    try:
        cls = objective_class(spec["name"])
    except KeyError as e:
        raise ValueError(f"{path}.name: {e.args[0]}") from None
    valid = objective_fields(spec["name"])
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {unknown} for objective {spec['name']!r}; valid keys: "
            f"{', '.join(sorted(valid)) or '(none)'}"
        )
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
