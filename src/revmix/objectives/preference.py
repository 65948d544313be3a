r"""What every paired preference objective shares (``dpo``, ``complementary_dpo``, ``simpo``, ``cpo``,
``orpo``).

A row's y+ (``input_ids``/``labels``) is *chosen* and its y− (``other_*``) *rejected*; in "When Inverse
Data Outperforms" (arXiv 2509.13079, §4) y+ is the row's own direction's solution and y− its twin's.

Log-probs
---------
Per pair, the summed response-token log-probs :math:`\log\pi(y^+|x)`, :math:`\log\pi(y^-|x)` and the token
counts :math:`|y^+|`, :math:`|y^-|`, from one forward pass: one ``[x, y+, y−]`` row per pair behind a single
prompt copy (:mod:`revmix.objectives.prefix`) where the training loop allows it
(``Batch.policy_forward.shared_prompt``) and the objective's ``shared_prompt`` is on, else the concatenated
``[y+; y−]`` batch (:func:`~revmix.objectives.reference.concatenated_inputs`). A reference's log-probs come
from the batch's cache or from one pass of the :class:`~revmix.objectives.base.Reference`.

NLL anchor on y+
----------------
RPO's, CPO's, ORPO's and CPO-SimPO's supervised term is the token mean over every y+ token of the
micro-batch, as TRL 1.16 computes it (``DPOTrainer`` loss type ``sft``; the cross-entropy over the chosen
half in ``CPOTrainer`` / ``ORPOTrainer``):

.. math::  \mathrm{NLL}(y^+) = -\frac{\sum_b \log\pi_\theta(y^+_b|x_b)}{\sum_b |y^+_b|}

Metrics
-------
Every preference objective reports ``logps/chosen``, ``logps/rejected`` (the *summed* response log-probs
under the policy, TRL's convention, even when the loss normalises by length), ``logps/margin`` (chosen −
rejected), ``loss`` and, with an NLL term, ``nll``; each overall and per direction (``logps/margin/forward``).
``loss/<direction>`` is the objective's loss on that direction's rows alone.

Where the probability mass goes (the paper's third mechanism: a margin can grow while y+ itself loses
probability to continuations that are neither response), as token means over the micro-batch's rows
(:math:`\sum_b s_b / \sum_b |y_b|`, overall and per direction): ``logps/chosen_per_token`` and
``logps/rejected_per_token`` (mean log π per response token) and, with ``entropy_metrics`` (default on),
``entropy/chosen`` and ``entropy/rejected``, the mean entropy :math:`H_t = -\sum_v p_v \log p_v` (nats) of
the next-token distribution at the positions that predict y+'s (y−'s) tokens. A rising ``entropy/chosen``
while ``logps/chosen_per_token`` falls says the mass left y+ for spread-out alternatives rather than for
one competitor. The entropy comes from the log-prob pass the loss already runs
(:func:`~revmix.objectives.base.target_logps_and_entropy`): forward-only extra work (one ``exp`` and two
reductions per vocabulary row), no backward work, no extra memory beyond a ``[B, T]`` float per response;
``benchmarks/entropy_cost.py`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from revmix.objectives.base import (
    DIRECTIONS,
    Batch,
    LossOutput,
    Objective,
    Reference,
    log_prob_forward,
    per_direction,
    score_tokens,
    token_stats,
)
from revmix.objectives.prefix import (
    SharedPromptPairs,
    pack_shared_prompt,
    per_response_sums,
    shared_prompt_logps,
    shared_prompt_token_logps,
)
from revmix.objectives.reference import concatenated_inputs, reference_logps


@dataclass
class PairLogps:
    """The policy's summed response log-probs of y+ and y− and their token counts, ``[B]`` each."""

    chosen: Tensor
    rejected: Tensor
    n_chosen: Tensor
    n_rejected: Tensor
    # The shared-prompt rows the policy was scored on (None: the concatenated batch), for the reference.
    packed: SharedPromptPairs | None
    # Summed next-token entropies (nats) over y+'s and y−'s tokens, detached; None when not computed.
    entropy_chosen: Tensor | None = None
    entropy_rejected: Tensor | None = None

    def mean_per_token(self) -> tuple[Tensor, Tensor]:
        """Mean response-token log-probs of y+ and y− (SimPO's and ORPO's length normalisation)."""
        return self.chosen / self.n_chosen.clamp(min=1), self.rejected / self.n_rejected.clamp(min=1)


def policy_pair_logps(
    policy: torch.nn.Module, batch: Batch, shared_prompt: bool, entropy: bool = False
) -> PairLogps:
    """Score y+ and y− of every pair in one forward pass (module docstring: shared-prompt rows when
    ``shared_prompt`` and the loop allow it and every pair shares its prompt, else the concatenated batch);
    with ``entropy``, also the summed next-token entropies over each response, from the same pass (chunked:
    the entropy needs the logits), else the log-probs come from the kernel the loop chose."""
    allowed = batch.policy_forward  # what the training loop allows of the policy's forward pass
    packed = pack_shared_prompt(batch) if shared_prompt and allowed.shared_prompt else None
    forward, weight = log_prob_forward(policy, "chunked" if entropy else allowed.logp_kernel)
    if packed is not None:
        by_position = lambda i, m, p: forward(i, m, position_ids=p)  # noqa: E731
        logps, entropies = shared_prompt_token_logps(
            by_position, packed, allowed.length_groups, entropy, weight
        )
        chosen, rejected = per_response_sums(logps, packed)
        n_c = (packed.valid & ~packed.is_rejected).sum(-1)
        n_r = (packed.valid & packed.is_rejected).sum(-1)
        pair = PairLogps(chosen, rejected, n_c, n_r, packed)
        if entropies is not None:
            pair.entropy_chosen, pair.entropy_rejected = per_response_sums(entropies, packed)
        return pair
    ids, mask, labels = concatenated_inputs(batch)
    scores = forward(ids, mask)
    b = batch.size
    if entropy:
        stats = token_stats(scores, labels)
        sums, n_tok, row_entropy = stats.logp.sum(-1), stats.mask.sum(-1), stats.entropy.detach().sum(-1)
        return PairLogps(sums[:b], sums[b:], n_tok[:b], n_tok[b:], None, row_entropy[:b], row_entropy[b:])
    logp, tok_mask = score_tokens(scores, weight, labels)
    sums, n_tok = logp.sum(-1), tok_mask.sum(-1)
    return PairLogps(sums[:b], sums[b:], n_tok[:b], n_tok[b:], None)


def reference_pair_logps(
    batch: Batch, ref: Reference | None, packed: SharedPromptPairs | None, objective: str
) -> tuple[Tensor, Tensor]:
    """Summed reference log-probs of y+ and y−, ``[B]`` each: the batch's cached values when present, else
    one ``ref`` pass (over the shared-prompt rows ``packed`` when the reference takes position ids)."""
    cached_chosen, cached_rejected = batch.ref_chosen_logps, batch.ref_rejected_logps
    if cached_chosen is not None and cached_rejected is not None:
        device = batch.input_ids.device
        return cached_chosen.to(device).float(), cached_rejected.to(device).float()
    if (cached_chosen is None) != (cached_rejected is None):
        raise ValueError("batch.ref_chosen_logps and batch.ref_rejected_logps must be both set or both None")
    if ref is None:
        raise ValueError(
            f"{objective} needs reference log-probs: pass a Reference (AdapterDisabledReference, "
            "FrozenCopyReference) or attach cached ones (ReferenceLogpCache.attach)"
        )
    if packed is not None and ref.shared_prompt:
        with torch.no_grad():
            forward = lambda i, m, p: ref.logits(i, m, position_ids=p)  # noqa: E731
            chosen, rejected, _, _ = shared_prompt_logps(forward, packed, ref.length_groups)
        return chosen.float(), rejected.float()
    return reference_logps(ref, batch)


def chosen_nll(chosen: Tensor, n_chosen: Tensor) -> Tensor:
    """The NLL anchor on y+ (module docstring): −Σ_b log π(y+_b) / Σ_b |y+_b|, a scalar.

    Args:
        chosen: ``[B]`` summed response log-probs of y+.
        n_chosen: ``[B]`` their token counts.
    """
    return -chosen.sum() / n_chosen.sum().clamp(min=1)


def _token_mean_per_direction(sums: Tensor, counts: Tensor, direction: Tensor, name: str) -> dict[str, float]:
    """Σ sums / Σ counts overall and per direction present (a token mean, like :func:`chosen_nll`)."""
    sums, counts = sums.detach().double(), counts.double()
    out = {name: float(sums.sum() / counts.sum().clamp(min=1))}
    for code, label in enumerate(DIRECTIONS):
        sel = direction == code
        if bool(sel.any()):
            out[f"{name}/{label}"] = float(sums[sel].sum() / counts[sel].sum().clamp(min=1))
    return out


def preference_metrics(
    chosen_sum: Tensor,
    rejected_sum: Tensor,
    direction: Tensor,
    losses: Tensor,
    nll_weight: float = 0.0,
    n_chosen: Tensor | None = None,
) -> dict[str, float]:
    """The metrics every preference objective reports (module docstring), overall and per direction.

    Args:
        chosen_sum: ``[B]`` summed response log-probs of y+ under the policy.
        rejected_sum: ``[B]`` the same for y−.
        direction: ``[B]`` direction codes (0 forward, 1 reverse).
        losses: ``[B]`` the per-pair preference loss (without the NLL anchor).
        nll_weight: the NLL anchor's weight w; ``loss`` is then mean(losses) + w·NLL(y+), per direction too.
        n_chosen: ``[B]`` y+ token counts, needed when ``nll_weight`` is not 0.
    """
    metrics = per_direction(chosen_sum, direction, "logps/chosen")
    metrics |= per_direction(rejected_sum, direction, "logps/rejected")
    metrics |= per_direction(chosen_sum - rejected_sum, direction, "logps/margin")
    metrics |= per_direction(losses, direction, "loss")
    if nll_weight:
        if n_chosen is None:
            raise ValueError("preference_metrics: nll_weight needs n_chosen (the y+ token counts)")
        nll = _token_mean_per_direction(-chosen_sum, n_chosen, direction, "nll")
        metrics |= nll
        for key in [k for k in metrics if k == "loss" or k.startswith("loss/")]:
            metrics[key] += nll_weight * nll["nll" + key.removeprefix("loss")]
    return metrics


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, direction: Tensor) -> dict[str, float]:
    """DPO's implicit-reward metrics, overall and per direction: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margin`` (their difference) and ``rewards/accuracy`` (the fraction with chosen > rejected).

    Args:
        chosen_rewards: ``[B]`` β·(log π_θ(y+) − log π_ref(y+)), summed log-probs, detached.
        rejected_rewards: ``[B]`` the same for y−.
        direction: ``[B]`` direction codes (0 forward, 1 reverse).
    """
    metrics = per_direction(chosen_rewards, direction, "rewards/chosen")
    metrics |= per_direction(rejected_rewards, direction, "rewards/rejected")
    metrics |= per_direction(chosen_rewards - rejected_rewards, direction, "rewards/margin")
    metrics |= per_direction((chosen_rewards > rejected_rewards).float(), direction, "rewards/accuracy")
    return metrics


def likelihood_metrics(pair: PairLogps, direction: Tensor) -> dict[str, float]:
    """Where the probability mass goes (module docstring), overall and per direction, each a token mean
    over the micro-batch (Σ over rows / Σ token counts): ``logps/chosen_per_token``,
    ``logps/rejected_per_token`` and, when ``pair`` carries them, ``entropy/chosen``, ``entropy/rejected``."""
    metrics = _token_mean_per_direction(pair.chosen, pair.n_chosen, direction, "logps/chosen_per_token")
    metrics |= _token_mean_per_direction(
        pair.rejected, pair.n_rejected, direction, "logps/rejected_per_token"
    )
    if pair.entropy_chosen is not None and pair.entropy_rejected is not None:
        metrics |= _token_mean_per_direction(pair.entropy_chosen, pair.n_chosen, direction, "entropy/chosen")
        metrics |= _token_mean_per_direction(
            pair.entropy_rejected, pair.n_rejected, direction, "entropy/rejected"
        )
    return metrics


def preference_output(pair: PairLogps, direction: Tensor, losses: Tensor, nll_weight: float) -> LossOutput:
    """``mean(losses) + nll_weight·NLL(y+)`` with :func:`preference_metrics` and :func:`likelihood_metrics`
    (``losses``: ``[B]``)."""
    loss = losses.mean()
    if nll_weight:
        loss = loss + nll_weight * chosen_nll(pair.chosen, pair.n_chosen)
    metrics = preference_metrics(pair.chosen, pair.rejected, direction, losses, nll_weight, pair.n_chosen)
    metrics |= likelihood_metrics(pair, direction)
    return LossOutput(loss=loss, metrics=metrics)


class PairedObjective(Objective):
    """Base of the objectives that score a pair (y+, y−) per row; registers nothing itself."""

    shared_prompt: bool = Field(
        True, description="score y+ and y- in one row behind one copy of the prompt, where attention allows"
    )
    entropy_metrics: bool = Field(
        True,
        description="log entropy/chosen and entropy/rejected, the next-token entropy on y+ and y- tokens "
        "(forward-only cost: one exp per vocabulary row)",
    )

    requires: ClassVar[frozenset[str]] = frozenset({"response", "other_response"})

    def policy_logps(self, policy: torch.nn.Module, batch: Batch) -> PairLogps:
        """:func:`policy_pair_logps` with this objective's ``shared_prompt`` and ``entropy_metrics``."""
        return policy_pair_logps(policy, batch, self.shared_prompt, self.entropy_metrics)
