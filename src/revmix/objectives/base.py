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
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Protocol, Union, runtime_checkable

import torch
from pydantic import ConfigDict, Discriminator, Field
from torch import Tensor

from revmix.validation import Strict, did_you_mean, validate

IGNORE_INDEX = -100
DirectionName = Literal["forward", "reverse"]
DIRECTIONS: tuple[DirectionName, ...] = typing.get_args(DirectionName)
"""The question directions, in the order of their codes in ``Batch.direction`` (0 forward, 1 reverse)."""


@dataclass(frozen=True)
class PolicyForward:
    """What objectives may ask of the policy's forward pass; the training loop decides it once per stage
    (objectives never inspect the model or its wrappers) and hands it over on every :class:`Batch`.

    ``shared_prompt``: the policy takes a boolean 4-D attention mask with ``position_ids``, so DPO may
    score each pair in one row behind one copy of the prompt (:mod:`revmix.objectives.prefix`).
    ``length_groups``: forward calls one pass over such rows may be split into (1 under DDP, which
    allows one forward per backward).
    """

    shared_prompt: bool = False
    length_groups: int = 1


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


def shifted_log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """float32 log-probs over the vocabulary at positions ``0 … T-2``, each predicting the next token
    (``[B, T-1, V]``); the logits are divided by a sampling ``temperature`` other than 1 first."""
    logits = logits[:, :-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def gather_logps(logp_all: Tensor, targets: Tensor) -> Tensor:
    """The log-prob of each target token: ``logp_all[..., targets]``, shaped like ``targets``."""
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def label_logps(logp_all: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log p(label) from :func:`shifted_log_softmax` output and the response mask, ``[B, T-1]``.

    Masked positions get log-prob 0 so that sums over a row equal the sum over its response tokens.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return gather_logps(logp_all, targets.masked_fill(~mask, 0)) * mask, mask


def token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log p(label) and the response mask, both ``[B, T-1]`` after the causal shift."""
    return label_logps(shifted_log_softmax(logits), labels)


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


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: register an :class:`Objective` under its ``name`` literal (one class per name)."""
    if not issubclass(cls, Objective):
        raise TypeError(f"{cls.__qualname__} must subclass revmix.objectives.base.Objective")
    name = cls.model_fields["name"].default
    if not isinstance(name, str) or typing.get_args(cls.model_fields["name"].annotation) != (name,):
        raise TypeError(f'{cls.__qualname__} must declare its name as name: Literal["x"] = "x"')
    if name in _REGISTRY:
        raise ValueError(f"objective {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def objective_names() -> list[str]:
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown objective {name!r}{did_you_mean(name, _REGISTRY)}; valid objectives: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def objective_union() -> Any:
    """Every registered objective as one type, told apart by ``name`` (the config's ``objective`` field)."""
    members = tuple(_REGISTRY[n] for n in sorted(_REGISTRY))
    return Annotated[Union[members], Discriminator("name")]  # noqa: UP007 - built from a runtime tuple


def build_objective(spec: Mapping[str, Any], path: str = "objective") -> Objective:
    """Build from ``{"name": ..., **hyperparams}``; a bad name, key or value is a :class:`ConfigError`
    naming its dotted path under ``path``."""
    return validate(objective_union(), dict(spec), path)
