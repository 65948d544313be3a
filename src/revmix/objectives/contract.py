"""The contract every objective must pass — built-in or plug-in — as plain functions over an instance.

Each ``check_*`` builds its own tiny fixtures (:mod:`revmix.objectives.fixtures`: a random 2-layer LM, a
padded batch of both directions, a frozen reference when the objective needs one), calls the objective
the way the training loop does, and raises :class:`AssertionError` saying what broke, or
:class:`NotApplicable` when the check does not concern it (a reference check for an objective without
one). :func:`run_checks` runs them all (``revmix objectives check``); ``tests/objectives/test_contract.py``
runs each on every registered objective. What no function can check is whether the loss is the right one:
the tests compare each built-in with an independent hand computation; a plug-in's own tests should too.

The checks: the declarations are honest and the objective round-trips through a config; the loss is a
finite scalar with per-direction metrics; gradients reach trainable parameters only; padding changes
nothing; ``requires`` declares y− when it is read; a length-bucketed forward changes nothing; the optional
policy hooks add and release only what they say; a shared-prompt reference gives the same loss as a plain
one; ``needs_rollouts`` goes with the rollout step's interface.
"""

from __future__ import annotations

import copy
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from revmix.objectives.base import (
    Batch,
    LossOutput,
    Objective,
    PolicyForward,
    Reference,
    build_objective,
    objective_class,
)
from revmix.objectives.buckets import LengthBucketedLM
from revmix.objectives.fixtures import FrozenCopy, make_batch, tiny_lm

BATCH_FIELDS = frozenset({"response", "other_response"})
"""What ``requires`` may name: the batch fields a collator fills (y+ and y−)."""


class NotApplicable(Exception):
    """The check does not concern this objective; the message says why."""


def _require(condition: bool, message: str) -> None:
    if not condition:  # not `assert`: the checks must hold under `python -O` too
        raise AssertionError(message)


def fixtures_for(
    objective: Objective, with_other: bool = True
) -> tuple[torch.nn.Module, Batch, Reference | None]:
    """What the checks run on: a tiny policy with frozen embeddings (gradient must not reach them), a batch, and a frozen
    reference when the instance needs one (a multitask objective answers from its routes)."""
    model = tiny_lm()
    embeddings(model).requires_grad_(False)
    ref = FrozenCopy(tiny_lm(seed=1)) if objective.needs_reference else None
    return model, make_batch(with_other=with_other), ref


def embeddings(model: torch.nn.Module) -> torch.Tensor:
    """The input embedding matrix ``[V, d]`` of a Hugging Face causal LM (the fixtures' :func:`tiny_lm`)."""
    layer = typing.cast(PreTrainedModel, model).get_input_embeddings()
    if not isinstance(layer, torch.nn.Embedding):
        raise TypeError(f"expected a causal LM with an nn.Embedding input layer, got {type(layer).__name__}")
    return layer.weight


def _run(objective: Objective, model: torch.nn.Module, batch: Batch, ref: Reference | None) -> LossOutput:
    """One micro-batch as the training loop runs it: backward unless the objective applied its gradients."""
    out = objective(model, batch, ref)
    if not out.grads_applied:
        out.loss.backward()
    return out


def check_declarations(objective: Objective) -> None:
    """``requires`` names batch fields only, the flags are booleans on the class and the instance, the name
    finds this class again, and the objective survives a trip through a config (``model_dump`` → build)."""
    cls = type(objective)
    _require(
        isinstance(objective.requires, frozenset) and objective.requires <= BATCH_FIELDS,
        f"requires must be a frozenset of {sorted(BATCH_FIELDS)}, got {objective.requires!r}",
    )
    for flag in ("needs_reference", "needs_rollouts"):
        values = (getattr(cls, flag), getattr(objective, flag))
        _require(all(isinstance(v, bool) for v in values), f"{flag} must be a bool, got {values!r}")
    found = objective_class(objective.name)
    _require(
        found is cls, f"name {objective.name!r} resolves to {found.__qualname__}, not {cls.__qualname__}"
    )
    again = build_objective(objective.model_dump(mode="json"))
    _require(again == objective, f"model_dump → build_objective gives {again!r}, not {objective!r}")


def check_documented(objective: Objective) -> None:
    """The class has a docstring (its first line is the summary of ``--help-config``) and every
    hyper-parameter a ``description`` (the reason printed next to it)."""
    cls = type(objective)
    _require(bool((cls.__doc__ or "").strip()), f"{cls.__qualname__} has no docstring")
    bare = [n for n, f in cls.model_fields.items() if n != "name" and not f.description]
    _require(not bare, f"fields without Field(description=...): {', '.join(bare)}")


def check_finite_loss_and_direction_metrics(objective: Objective) -> None:
    """A finite scalar loss; float metrics with keys for both directions (``*/forward``, ``*/reverse``)."""
    out = _run(objective, *fixtures_for(objective))
    _require(out.loss.dim() == 0, f"the loss must be a scalar, got shape {tuple(out.loss.shape)}")
    _require(bool(torch.isfinite(out.loss)), f"the loss is not finite: {float(out.loss.detach())}")
    for direction in ("forward", "reverse"):
        _require(
            any(k.endswith(f"/{direction}") for k in out.metrics),
            f"no metric ends in '/{direction}' on a batch of both directions; metrics: {sorted(out.metrics)}",
        )
    bad = {k: type(v).__name__ for k, v in out.metrics.items() if not isinstance(v, float)}
    _require(not bad, f"metrics must be Python floats; not: {bad}")


def check_gradients_reach_trainable_params_only(objective: Objective) -> None:
    """After one step's backward: no gradient on a frozen parameter, a non-zero one somewhere, all finite."""
    model, batch, ref = fixtures_for(objective)
    _run(objective, model, batch, ref)
    _require(embeddings(model).grad is None, "a frozen parameter (the embeddings) got a gradient")
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    _require(
        any(g is not None and bool(g.abs().sum() > 0) for g in grads.values()),
        "no trainable parameter got a non-zero gradient",
    )
    bad = [n for n, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())]
    _require(not bad, f"non-finite gradients in {bad}")


def check_masked_tokens_get_zero_gradient(objective: Objective) -> None:
    """Padding (masked in attention and labels) changes neither the loss nor any gradient: other pad ids
    give the same loss, and a token id that occurs only as padding gets a zero embedding gradient."""
    model, batch, ref = fixtures_for(objective)
    base = objective(model, batch, ref).loss.detach()
    altered = copy.deepcopy(batch)
    pairs = [(altered.input_ids, altered.attention_mask)]
    if altered.other_input_ids is not None and altered.other_attention_mask is not None:
        pairs.append((altered.other_input_ids, altered.other_attention_mask))
    for ids, mask in pairs:
        ids[mask == 0] = 7
    again = objective(model, altered, ref).loss.detach()
    _require(
        torch.allclose(base, again, atol=1e-5),
        f"the loss changed from {float(base)} to {float(again)} when only padded tokens changed",
    )
    emb = embeddings(model)
    emb.requires_grad_(True)
    model.zero_grad()
    _run(objective, model, batch, ref)
    pad_only = set(batch.input_ids[batch.attention_mask == 0].tolist())
    pad_only -= set(batch.input_ids[batch.attention_mask == 1].tolist())
    if batch.other_input_ids is not None and batch.other_attention_mask is not None:
        pad_only -= set(batch.other_input_ids[batch.other_attention_mask == 1].tolist())
    leaked = [t for t in sorted(pad_only) if emb.grad is not None and bool((emb.grad[t] != 0).any())]
    _require(not leaked, f"token ids seen only as padding got embedding gradient: {leaked}")


def check_requires_declares_other_response(objective: Objective) -> None:
    """On a batch without y− (``other_*`` None): an objective that requires ``other_response`` raises a
    ValueError naming the missing ``other_*`` field; any other gives a finite loss (it never reads y−)."""
    model, batch, ref = fixtures_for(objective, with_other=False)
    if "other_response" in objective.requires:
        try:
            objective(model, batch, ref)
        except ValueError as e:
            _require("other_" in str(e), f"the ValueError does not name the missing other_* field: {e}")
            return
        raise AssertionError("requires has other_response, but a batch without y− raised no ValueError")
    try:
        loss = objective(model, batch, ref).loss
    except Exception as e:  # reading a missing y− fails in many ways (None.shape, a model given None)
        raise AssertionError(
            f"a batch without y− failed, so the objective reads y−: add 'other_response' to requires "
            f"({type(e).__name__}: {e})"
        ) from e
    _require(
        bool(torch.isfinite(loss)), f"the loss is not finite on a batch without y−: {float(loss.detach())}"
    )


def check_length_bucketed_forward_changes_nothing(objective: Objective) -> None:
    """Through ``LengthBucketedLM`` (the loop's ``runtime.length_buckets``) loss and gradients are those of
    the plain model."""
    if objective.needs_rollouts:
        raise NotApplicable("the loop never wraps a rollout objective's model (PPO reads its value head)")
    model, batch, ref = fixtures_for(objective)
    twin = copy.deepcopy(model)
    plain = float(_run(objective, model, batch, ref).loss.detach())
    bucketed = float(_run(objective, LengthBucketedLM(twin, 3), batch, ref).loss.detach())
    _require(
        abs(bucketed - plain) <= 1e-5 + 1e-5 * abs(plain),
        f"loss {bucketed} through LengthBucketedLM(3) vs {plain} plain",
    )
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            _require(
                q.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-5),
                f"the gradient of {n} differs through LengthBucketedLM",
            )


def check_prepare_and_release_policy_round_trip(objective: Objective) -> None:
    """``prepare_policy`` returns exactly the parameters it added (once: a second call adds none) and
    ``release_policy`` takes them out again, leaving the policy as it was."""
    model, _, _ = fixtures_for(objective)
    before = {n: id(p) for n, p in model.named_parameters()}
    created = objective.prepare_policy(model)
    added = [p for n, p in model.named_parameters() if n not in before]
    _require(
        {id(p) for p in created} == {id(p) for p in added},
        f"prepare_policy returned {len(created)} parameters but added {len(added)}",
    )
    _require(objective.prepare_policy(model) == [], "a second prepare_policy added parameters again")
    released = objective.release_policy(model)
    _require(
        {n: id(p) for n, p in model.named_parameters()} == before,
        "after release_policy the policy's parameters differ from before prepare_policy",
    )
    if created:
        _require(
            released is not None and {id(p) for p in released.parameters()} == {id(p) for p in created},
            "release_policy must return the module holding exactly the parameters prepare_policy added",
        )
    else:
        _require(released is None, "release_policy returned a module though prepare_policy added nothing")


def check_shared_prompt_reference_gives_the_same_loss(objective: Objective) -> None:
    """With the loop's shared-prompt decision on the batch, a reference that takes shared-prompt rows and
    one that does not give the same loss (objectives read ``Reference.shared_prompt``, never the model)."""
    if not objective.needs_reference:
        raise NotApplicable("needs no reference")
    model, ref_model, batch = tiny_lm(), tiny_lm(seed=1), make_batch()
    batch.policy_forward = PolicyForward(shared_prompt=True)
    shared, concatenated = FrozenCopy(ref_model, shared_prompt=True), FrozenCopy(ref_model)
    with_shared = float(objective(copy.deepcopy(model), batch, shared).loss.detach())
    without = float(objective(copy.deepcopy(model), batch, concatenated).loss.detach())
    _require(
        abs(with_shared - without) <= 1e-6 + 1e-5 * abs(without),
        f"loss {with_shared} with a shared-prompt reference vs {without} with a plain one",
    )
    _require(
        concatenated.shared_prompt_calls == 0,
        "a reference with shared_prompt False was handed shared-prompt rows (position_ids)",
    )


def check_rollouts_go_with_the_rollout_interface(objective: Objective) -> None:
    """``needs_rollouts`` sends an objective to the rollout step, which drives it through
    ``RolloutObjective``; an objective that does not need rollouts does not pretend to implement it."""
    # The interface lives with the step that uses it (torch only, like this package).
    from revmix.platform.rollout.objective import RolloutObjective

    implements = isinstance(objective, RolloutObjective)
    _require(
        implements == objective.needs_rollouts,
        f"needs_rollouts is {objective.needs_rollouts} but the objective "
        f"{'implements' if implements else 'does not implement'} RolloutObjective "
        "(revmix.platform.rollout.objective)",
    )


CHECKS: dict[str, Callable[[Objective], None]] = {
    "declarations": check_declarations,
    "documented": check_documented,
    "finite_loss_and_direction_metrics": check_finite_loss_and_direction_metrics,
    "gradients_reach_trainable_params_only": check_gradients_reach_trainable_params_only,
    "masked_tokens_get_zero_gradient": check_masked_tokens_get_zero_gradient,
    "requires_declares_other_response": check_requires_declares_other_response,
    "length_bucketed_forward_changes_nothing": check_length_bucketed_forward_changes_nothing,
    "prepare_and_release_policy_round_trip": check_prepare_and_release_policy_round_trip,
    "shared_prompt_reference_gives_the_same_loss": check_shared_prompt_reference_gives_the_same_loss,
    "rollouts_go_with_the_rollout_interface": check_rollouts_go_with_the_rollout_interface,
}
"""Every check by name, in the order :func:`run_checks` runs them."""


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Literal["pass", "fail", "skip"]
    message: str = ""


def run_checks(objective: Objective) -> list[CheckResult]:
    """Every check of :data:`CHECKS` on ``objective``: an :class:`AssertionError` fails a check with its
    message, any other exception fails it with the exception and where it was raised."""
    results = []
    for name, check in CHECKS.items():
        try:
            check(objective)
        except NotApplicable as e:
            results.append(CheckResult(name, "skip", str(e)))
        except AssertionError as e:
            results.append(CheckResult(name, "fail", str(e) or "assertion failed"))
        except Exception as e:  # a crash inside the objective fails the check: say where it happened
            where = traceback.extract_tb(e.__traceback__)[-1]
            message = f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno})"
            results.append(CheckResult(name, "fail", message))
        else:
            results.append(CheckResult(name, "pass"))
    return results
