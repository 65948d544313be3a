r"""Proximal Policy Optimisation (Schulman et al. 2017, arXiv 1707.06347) with a critic-free group baseline
(GRPO, Shao et al. 2024, arXiv 2402.03300), for language-model rollouts.

A rollout is a prompt x and a sampled response y = (a_1 … a_n); the state before token a_t is
s_t = (x, a_{<t}). With π_old the policy that sampled y (its log-probs are stored), π_ref the stage-start
reference, β = ``kl_coef`` and R(x, y) the scalar score of the reward function:

* **Per-token reward with a KL penalty** (``baseline="critic"``; Ziegler et al. 2019 / InstructGPT / TRL,
  k1 estimator): :math:`r_t = -β\,(\log π_{old}(a_t|s_t) - \log π_{ref}(a_t|s_t)) + [t = n]\,R(x, y)`.
* **GAE** (Schulman et al. 2016) with a value head V on the last hidden state:
  :math:`δ_t = r_t + γ V(s_{t+1}) - V(s_t)` (V(s_{n+1}) = 0),
  :math:`\hat A_t = \sum_{k \ge t} (γλ)^{k-t} δ_k`, returns :math:`G_t = \hat A_t + V(s_t)`; advantages are
  whitened over the batch's response tokens (mean 0, unit variance).
* **Clipped surrogate** (PPO Eq. 7) with ratio :math:`ρ_t = π_θ(a_t|s_t) / π_{old}(a_t|s_t)`:
  :math:`L^{CLIP} = \mathbb{E}_t[\max(-\hat A_t ρ_t,\; -\hat A_t\,\mathrm{clip}(ρ_t, 1-ε, 1+ε))]`.
* **Clipped value loss** (as in OpenAI baselines / TRL):
  :math:`L^V = \tfrac12 \mathbb{E}_t[\max((V_θ - G_t)^2, (V_{old} + \mathrm{clip}(V_θ - V_{old}, ±ε_v) - G_t)^2)]`.
* Total: :math:`L = L^{CLIP} + c_v L^V - c_H H[π_θ]`, minimised for ``ppo_epochs`` passes over the rollout
  batch in ``num_mini_batches`` shuffled mini-batches.

**Group baseline** (``baseline="group"``, GRPO §4.1.2 outcome supervision): ``group_size`` responses per
prompt, no value head; every token of response i gets :math:`\hat A_i = (R_i - \mathrm{mean}_g R) /
(\mathrm{std}_g R + 10^{-4})` (÷ std only with ``scale_rewards``: on unless ``dr_grpo``), and the KL enters
the *loss*, not the reward, with GRPO's unbiased k3 estimator (Eq. 4):
:math:`L = L^{CLIP} + β\,\mathbb{E}_t[e^{\log π_{ref} - \log π_θ} - (\log π_{ref} - \log π_θ) - 1]`.

**RLOO baseline** (``baseline="rloo"``; Kool et al. 2019, Ahmadian et al. 2024, arXiv 2402.14740): as the
group baseline, but :math:`\hat A_i = R_i - \frac{1}{k-1}\sum_{j \ne i} R_j` — the mean of the *other* k−1
scores of the prompt (:func:`rloo_advantages`), never divided by a std; the k3 KL term stays in the loss
(TRL's RLOO instead puts a k1 penalty in the reward and clips a sequence-level ratio).

**Loss aggregation** (``loss_aggregation``, :func:`aggregate_loss`): the clipped surrogate plus the k3 term,
per token, are reduced as ``token_mean`` (default, every token weighs the same: DAPO, TRL's PPO and GRPO
``bnpo``), ``sequence_mean`` (GRPO Eq. 3: per-response means, then their mean) or ``dr_grpo`` (sum ÷ (rows ×
``max_new_tokens``), Liu et al. 2025, arXiv 2503.20783; it implies ``scale_rewards`` false). The rollout
step weighs each micro-batch by its share of rows, so ``sequence_mean`` and ``dr_grpo`` are exact over a
mini-batch split into ``grad_accum`` micro-batches, while ``token_mean`` is then a row-weighted mean of the
micro-batches' token means (exact with ``grad_accum: 1``).

**DAPO** (Yu et al. 2025, arXiv 2503.14476): ``clip_eps_high`` clips the ratio to :math:`[1-ε, 1+ε_{high}]`
(clip-higher), and ``dynamic_sampling`` drops the groups whose scores are all equal before the update
(:func:`informative_rows`, metric ``rollout/kept_groups_fraction``; when none is left the step makes no
update and reports ``rollout/no_update`` 1). DAPO re-samples until the batch is full again; here the batch
just shrinks, so the step costs no extra generation. Each worker would drop a different number of rows, so
the rollout step allows dynamic sampling on one worker only.

Sampling temperature τ also divides the logits whenever log-probs are computed (policy, old and
reference), so the ratio compares the distribution that actually sampled the tokens (as TRL does).

This module is torch only: the pure functions above, the value head, and :class:`PPO`, whose
:meth:`PPO.make_rollout` / :meth:`PPO.loss` the rollout step (``revmix.platform.rollout.step.ppo_step``)
drives; generation and rewards live there. Called on a plain :class:`Batch` (the contract suite), PPO
treats each row's y+ as a rollout with score 1 — reference solutions are correct by construction — and
returns the loss of the first pass over it (ratio 1: the advantage-weighted log-likelihood gradient).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from revmix.objectives.base import (
    IGNORE_INDEX,
    Batch,
    LossOutput,
    Objective,
    Reference,
    logits_of,
    per_direction,
    register_objective,
    token_logps,
    token_stats,
)

VALUE_HEAD_ATTR = "v_head"
"""Name of the value head submodule on the policy (TRL's ``AutoModelForCausalLMWithValueHead`` name)."""
VLLM_PLACEMENTS: tuple[str, ...] = ("auto", "local", "actor")


# --------------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is true (0 when the mask is empty)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean of ``x`` ([B, T]) over masked positions, shape ``[B]``."""
    m = mask.to(x.dtype)
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to mean 0 and unit (unbiased) variance over masked positions; zeros elsewhere.

    With ``shift_mean=False`` the mean is added back (TRL's reward whitening). Fewer than two masked
    values carry no variance: then ``x`` is only centred (or returned unchanged without ``shift_mean``).
    """
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    if n < 2:
        out = x - mean if shift_mean else x
        return out * m
    var = (((x - mean) ** 2) * m).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_penalty(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k1 estimate of KL(π ‖ π_ref): ``log π − log π_ref`` (its mean under π is the KL)."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate (Schulman 2020; GRPO Eq. 4): ``exp(r) − r − 1`` with ``r = log π_ref − log π``.

    Unbiased for KL(π ‖ π_ref) under samples from π, and always ≥ 0.
    """
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over masked positions; returns ``(advantages, returns)``.

    ``rewards``/``values``/``mask`` are ``[B, T]``; positions where ``mask`` is false are skipped (the
    recursion links each response token to the next *masked* one, so prompts and padding may sit anywhere)
    and get advantage and return 0. The value after a row's last masked token is 0 (the episode ends).
    """
    mask = mask.bool()
    adv = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(torch.nonzero(mask.any(0)).flatten().tolist()):  # columns with no action: skipped
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        g = delta + gamma * lam * last_gae
        adv[:, t] = torch.where(m, g, torch.zeros_like(g))
        last_gae = torch.where(m, g, last_gae)
        next_value = torch.where(m, values[:, t], next_value)
    returns = (adv + values) * mask
    return adv, returns


class ClippedLoss(NamedTuple):
    """A clipped loss: the masked token mean, the per-token loss and where the clipped branch won."""

    loss: Tensor
    per_token: Tensor
    clipped: Tensor


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, eps: float, eps_high: float | None = None
) -> ClippedLoss:
    r"""PPO's clipped surrogate (Eq. 7), negated for minimisation: ``max(−A ρ, −A clip(ρ, 1−ε, 1+ε_high))``.

    ``eps_high`` is DAPO's *clip-higher* (Yu et al. 2025, arXiv 2503.14476, §3.1): the ratio is clipped to
    :math:`[1-ε_{low}, 1+ε_{high}]` with :math:`ε_{high} > ε_{low}`, so a low-probability token with a
    positive advantage may grow further before its gradient is cut (against entropy collapse); None keeps
    PPO's symmetric range. TRL's GRPO ``epsilon``/``epsilon_high`` compute the same.
    ``clipped`` marks tokens where the clipped term is the larger (the gradient is then zero) — its masked
    mean is the usual clip fraction.

    Args:
        logp, old_logp, adv, mask: ``[B, T]`` (current and sampling log-probs, advantages, response mask).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped_term = -adv * torch.clamp(ratio, 1.0 - eps, 1.0 + (eps if eps_high is None else eps_high))
    per_token = torch.maximum(unclipped, clipped_term)
    return ClippedLoss(masked_mean(per_token, mask), per_token, (clipped_term > unclipped) & mask.bool())


def clipped_value_loss(v: Tensor, old_v: Tensor, returns: Tensor, mask: Tensor, eps: float) -> ClippedLoss:
    """``½ max((V − G)², (V_old + clip(V − V_old, ±ε) − G)²)`` as a masked token mean (value clipping)."""
    v_clipped = old_v + torch.clamp(v - old_v, -eps, eps)
    per_token = 0.5 * torch.maximum((v - returns) ** 2, (v_clipped - returns) ** 2)
    clipped = ((v_clipped - returns) ** 2 > (v - returns) ** 2) & mask.bool()
    return ClippedLoss(masked_mean(per_token, mask), per_token, clipped)


def group_advantages(scores: Tensor, group: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantage per response: ``R − mean`` of its group (÷ ``std + eps`` with ``scale``).

    ``group`` ([N] ints) says which prompt each response answers. The std is the unbiased sample std (as
    ``torch.std`` and TRL's GRPO); a group of one response has advantage 0.
    """
    adv = torch.zeros_like(scores, dtype=torch.float32)
    for g in torch.unique(group):
        sel = group == g
        s = scores[sel].float()
        if s.numel() < 2:
            continue
        centred = s - s.mean()
        adv[sel] = centred / (s.std() + eps) if scale else centred
    return adv


def rloo_advantages(scores: Tensor, group: Tensor) -> Tensor:
    r"""REINFORCE leave-one-out advantage per response (Kool et al. 2019, "Buy 4 REINFORCE samples, get a
    baseline for free"; Ahmadian et al. 2024, arXiv 2402.14740, "RLOO"): each response's baseline is the
    mean score of the *other* k−1 responses to its prompt,

    .. math::  \hat A_i = R_i - \frac{1}{k-1}\sum_{j \ne i} R_j = \frac{k}{k-1}\,(R_i - \bar R_g),

    an unbiased baseline (it does not depend on :math:`y_i`) with no std scaling. A group of one response
    has advantage 0 (no other sample to compare with), as TRL's RLOO.

    Args:
        scores: ``[N]`` rewards; group: ``[N]`` ints, the prompt each response answers.
    """
    adv = torch.zeros_like(scores, dtype=torch.float32)
    for g in torch.unique(group):
        sel = group == g
        s = scores[sel].float()
        k = s.numel()
        if k < 2:
            continue
        adv[sel] = s - (s.sum() - s) / (k - 1)
    return adv


def informative_rows(scores: Tensor, group: Tensor) -> Tensor:
    r"""DAPO's dynamic-sampling filter (Yu et al. 2025, arXiv 2503.14476, §3.2): keep a prompt's group only
    when its scores are not all equal, :math:`\max_g R > \min_g R` (DAPO's constraint
    :math:`0 < |\{o_i : o_i \text{ correct}\}| < G` for a 0/1 reward). An all-equal group has advantage
    exactly 0 under the group and RLOO baselines, so it adds no policy gradient, only dilutes the batch.
    Exact comparison on purpose: equal rewards give bitwise-equal floats, and any difference is signal.

    Args:
        scores: ``[N]`` rewards; group: ``[N]`` ints, the prompt each response answers.

    Returns:
        ``[N]`` bool, true on the rows of the groups that are kept.
    """
    keep = torch.zeros_like(group, dtype=torch.bool)
    for g in torch.unique(group):
        sel = group == g
        keep[sel] = bool(scores[sel].max() > scores[sel].min())
    return keep


LOSS_AGGREGATIONS: tuple[str, ...] = ("token_mean", "sequence_mean", "dr_grpo")


def aggregate_loss(per_token: Tensor, mask: Tensor, mode: str, max_new_tokens: int) -> Tensor:
    r"""Reduce a per-token loss :math:`\ell_{i,t}` over the batch's response tokens (masked) to a scalar.

    * ``token_mean`` — :math:`\sum_{i,t}\ell_{i,t} / \sum_i |o_i|`: every token weighs the same (DAPO §3.3
      "token-level policy gradient loss"; TRL GRPO's ``bnpo``; TRL's PPO).
    * ``sequence_mean`` — :math:`\frac1B\sum_i \frac1{|o_i|}\sum_t \ell_{i,t}`: GRPO's Eq. 3 (Shao et al.
      2024); every response weighs the same, so tokens of short ones weigh more (TRL GRPO's ``grpo``).
    * ``dr_grpo`` — :math:`\sum_{i,t}\ell_{i,t} / (B \cdot L_{max})` with :math:`L_{max}` = ``max_new_tokens``
      (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783, Dr. GRPO): a constant
      normaliser, so no response-length bias (TRL GRPO's ``dr_grpo``, same formula).

    A row without response tokens adds 0 and still counts as a row (as TRL's ``clamp(min=1)``).

    Args:
        per_token: ``[B, T]``; mask: ``[B, T]`` response positions; mode: one of :data:`LOSS_AGGREGATIONS`.
    """
    m = mask.to(per_token.dtype)
    total = per_token * m
    if mode == "token_mean":
        return total.sum() / m.sum().clamp(min=1)
    if mode == "sequence_mean":
        return (total.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if mode == "dr_grpo":
        return total.sum() / (per_token.shape[0] * max_new_tokens)
    raise ValueError(f"loss_aggregation {mode!r} is not one of {', '.join(LOSS_AGGREGATIONS)}")


# --------------------------------------------------------------------------------------------------
# Value head
# --------------------------------------------------------------------------------------------------


class ValueHead(torch.nn.Module):
    """V(s_t) = w·h_t + b on the policy's last hidden state, in float32, initialised to exactly zero.

    Zero init makes the first advantages the plain (KL-shaped) rewards-to-go instead of noise from a random
    critic, and makes a fresh head deterministic (no RNG draw), so attaching it never shifts a seeded run.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.summary.weight)
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # values stay float32 under bf16 autocast
            return self.summary(hidden.float()).squeeze(-1)


def get_value_head(model: torch.nn.Module) -> ValueHead | None:
    """The value head in ``model``'s module tree, if any: on the policy, or on the policy inside whatever
    module the training loop forwards through (a DDP wrapper)."""
    return next((m for m in model.modules() if isinstance(m, ValueHead)), None)


def attach_value_head(policy: Any) -> tuple[ValueHead, bool]:
    """Register a :class:`ValueHead` as ``policy.v_head`` unless one is there; returns ``(head, created)``.

    ``policy`` is the causal LM itself (before any DDP wrapper). As a registered submodule the head is in
    ``policy.parameters()``: an optimizer built *after* this call trains it, DDP syncs it, a checkpoint
    holds it. On a ``PeftModel`` ``merge_and_unload`` drops it, so the next stage starts from a clean LM.
    """
    head = get_value_head(policy)
    if head is not None:
        return head, False
    if VALUE_HEAD_ATTR in policy._modules:
        raise TypeError(
            f"{type(policy).__name__}.{VALUE_HEAD_ATTR} exists and is not a revmix ValueHead; cannot attach one"
        )
    ref = next(policy.parameters())
    head = ValueHead(int(policy.config.hidden_size)).to(ref.device)
    policy.add_module(VALUE_HEAD_ATTR, head)
    return head, True


def detach_value_head(policy: torch.nn.Module) -> ValueHead | None:
    """Remove and return the value head of the policy itself, so ``save_pretrained`` writes a plain
    causal LM (full fine-tune)."""
    head = policy._modules.get(VALUE_HEAD_ATTR)
    if not isinstance(head, ValueHead):
        return None
    del policy._modules[VALUE_HEAD_ATTR]
    return head


# --------------------------------------------------------------------------------------------------
# Rollout batches
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """Sampled sequences and everything PPO stores about them, ready for several optimisation passes.

    ``input_ids``/``attention_mask``/``labels`` are ``[N, T]`` (prompt + response, right-padded, labels
    -100 outside the response); every per-token tensor is ``[N, T-1]``, aligned with ``token_logps``
    (position t scores token t+1). ``old_values``/``returns`` are None with the group baseline.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    direction: Tensor
    group: Tensor
    scores: Tensor
    mask: Tensor
    old_logps: Tensor
    ref_logps: Tensor
    advantages: Tensor
    old_values: Tensor | None = None
    returns: Tensor | None = None
    token_rewards: Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: Tensor) -> Rollout:
        """The sub-rollout at ``index`` (a mini-batch), trimmed of columns that are padding in all rows."""
        out = {
            f.name: (v[index] if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        used = torch.nonzero(out["attention_mask"].bool().any(0)).flatten()
        width = max(int(used.max()) + 1 if used.numel() else 0, 2)
        for name, v in out.items():
            if isinstance(v, Tensor) and v.dim() == 2:
                out[name] = v[:, : width if name in ("input_ids", "attention_mask", "labels") else width - 1]
        return Rollout(**out)


def _empty_rollout(input_ids: Tensor) -> Rollout:
    """A rollout of zero rows as wide as ``input_ids`` ([N, T]): dynamic sampling dropped every group."""
    ids = input_ids.new_zeros(0, input_ids.shape[1])
    rows = input_ids.new_zeros(0)
    z = torch.zeros(0, max(input_ids.shape[1] - 1, 0), device=input_ids.device)
    return Rollout(ids, ids, ids, rows, rows, rows.float(), z.bool(), z, z, z)


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


@register_objective
class PPO(Objective):
    """PPO / GRPO hyper-parameters (TRL's defaults where TRL has them). See the module docstring.

    ``reward`` is a reward spec (a name, or a mapping such as ``{name: sum, terms: [{name: correct, weight:
    1}, {name: format, weight: 0.1}]}``), built and validated by ``revmix.platform.rollout.rewards``.
    ``rollout_backend``: ``hf`` (``model.generate`` in the training process), ``vllm`` (a vLLM engine that
    receives the policy's weights before every rollout batch) or ``auto`` (vllm on a GPU where vLLM is
    installed, else hf). ``vllm_engine``: ``placement`` (auto | local | actor), ``num_cpus``/``num_gpus``
    of an actor engine, and any ``vllm.LLM`` argument, e.g. ``gpu_memory_utilization``.
    """

    name: Literal["ppo"] = "ppo"
    baseline: Literal["critic", "group", "rloo"] = Field(
        "critic",
        description="critic: value head + GAE; group: GRPO's group-mean baseline; rloo: leave-one-out mean",
    )
    group_size: int | None = Field(
        None, ge=1, description="responses sampled per prompt (null: 1 for critic, 4 for group and rloo)"
    )
    loss_aggregation: Literal["token_mean", "sequence_mean", "dr_grpo"] = Field(
        "token_mean", description="how per-token policy losses become one number (see aggregate_loss)"
    )
    clip_eps_high: float | None = Field(
        None, gt=0.0, description="DAPO clip-higher: upper clip range of the ratio (null: clip_eps)"
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop groups whose scores are all equal (no signal); group or rloo only"
    )
    kl_coef: float = Field(0.05, ge=0.0, description="beta of the KL to the reference")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="GAE discount")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda")
    clip_eps: float = Field(0.2, gt=0.0, description="clip range of the policy ratio")
    value_clip_eps: float = Field(0.2, gt=0.0, description="clip range of the value update")
    vf_coef: float = Field(0.1, ge=0.0, description="weight of the value loss")
    entropy_coef: float = Field(0.0, ge=0.0, description="weight of the entropy bonus")
    ppo_epochs: int = Field(4, ge=1, description="optimisation passes per rollout batch")
    num_mini_batches: int = Field(1, ge=1, description="optimizer steps per pass")
    whiten_advantages: bool = Field(True, description="critic: normalise advantages over the batch")
    scale_rewards: bool | None = Field(
        None, description="group: divide advantages by the group std (null: yes, but no with dr_grpo)"
    )
    temperature: float = Field(
        1.0, gt=0.0, description="rollout sampling temperature (greedy rollouts give PPO nothing to compare)"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="rollout nucleus sampling")
    max_new_tokens: int = Field(64, ge=1, description="rollout response length cap")
    reward: str | dict[str, Any] = Field("correct", description="reward name or spec mapping (see class doc)")
    rollout_backend: Literal["auto", "hf", "vllm"] = Field("auto", description="who samples the rollouts")
    vllm_engine: dict[str, Any] | None = Field(None, description="vLLM engine options (see class doc)")

    needs_reference: ClassVar[bool] = True
    needs_rollouts: ClassVar[bool] = True

    @field_validator("vllm_engine")
    @classmethod
    def _known_placement(cls, engine: dict[str, Any] | None) -> dict[str, Any] | None:
        placement = (engine or {}).get("placement", "auto")
        if placement not in VLLM_PLACEMENTS:
            raise ValueError(f"placement {placement!r} is not one of {', '.join(VLLM_PLACEMENTS)}")
        return engine

    @model_validator(mode="after")
    def _options_fit_the_baseline(self) -> PPO:
        if self.uses_groups and self.samples_per_prompt < 2:
            raise ValueError(
                f"baseline {self.baseline!r} needs group_size >= 2 (the baseline is a mean over the prompt's "
                f"responses), got {self.group_size}"
            )
        if self.clip_eps_high is not None and self.clip_eps_high < self.clip_eps:
            raise ValueError(
                f"clip_eps_high={self.clip_eps_high} is below clip_eps={self.clip_eps}; DAPO's clip-higher "
                "widens the upper range only (null: symmetric)"
            )
        if self.dynamic_sampling and not self.uses_groups:
            raise ValueError(
                "dynamic_sampling drops groups whose scores are all equal, so it needs baseline 'group' or "
                f"'rloo', got {self.baseline!r}"
            )
        # Explicit True only: null resolves per baseline (see scales_group_rewards).
        if self.scale_rewards and self.baseline != "group":
            raise ValueError(
                f"scale_rewards divides GRPO's group advantages by their std; baseline {self.baseline!r} has "
                "none (rloo is unscaled, critic whitens over the batch): remove it or set it to false"
            )
        if self.scale_rewards and self.loss_aggregation == "dr_grpo":
            raise ValueError(
                "loss_aggregation 'dr_grpo' removes GRPO's std normalisation too (Liu et al. 2025): set "
                "scale_rewards to false or leave it null"
            )
        return self

    # ------------------------------------------------------------------ setup

    @property
    def samples_per_prompt(self) -> int:
        if self.group_size is not None:
            return self.group_size
        return 4 if self.uses_groups else 1

    @property
    def uses_critic(self) -> bool:
        return self.baseline == "critic"

    @property
    def uses_groups(self) -> bool:
        """The baseline is computed from the other responses to the same prompt (group or rloo)."""
        return self.baseline in ("group", "rloo")

    @property
    def scales_group_rewards(self) -> bool:
        """Whether GRPO's group advantages are divided by the group std: ``scale_rewards``, which defaults to
        true except with ``dr_grpo`` (whose point is to drop that scaling)."""
        if self.scale_rewards is not None:
            return self.scale_rewards
        return self.loss_aggregation != "dr_grpo"

    def prepare_policy(self, policy: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Attach what the policy needs before an optimizer is built: the value head (critic only).

        Returns the parameters it *created* (empty when nothing was added), so a caller whose optimizer
        already exists can add them as a param group.
        """
        if not self.uses_critic:
            return []
        head, created = attach_value_head(policy)
        return list(head.parameters()) if created else []

    def release_policy(self, policy: torch.nn.Module) -> torch.nn.Module | None:
        """Detach and return the value head at the end of a stage, so the saved model is a plain causal LM."""
        return detach_value_head(policy)

    # ------------------------------------------------------------------ forward passes

    def _forward(
        self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """(logits, values [B, T-1] or None) from one forward pass of the policy."""
        head = get_value_head(model) if self.uses_critic else None
        if self.uses_critic and head is None:
            raise RuntimeError(
                "ppo (baseline 'critic') needs a value head on the policy: call objective.prepare_policy(policy) "
                "before building the optimizer"
            )
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=head is not None)
        logits = logits_of(out)
        values = head(out.hidden_states[-1][:, :-1]) if head is not None else None
        return logits, values

    @torch.no_grad()
    def make_rollout(
        self,
        policy: torch.nn.Module,
        ref: Reference | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        direction: Tensor,
        scores: Tensor,
        group: Tensor | None = None,
    ) -> tuple[Rollout, dict[str, float]]:
        """Score sampled sequences under π_old, π_ref (and V), shape rewards, estimate advantages.

        ``scores`` ([N]) are the reward function's outputs; ``group`` ([N]) the prompt index of each
        response (default: every response its own group). Returns the rollout and its metrics (reward,
        KL to the reference, response length; per direction). With ``dynamic_sampling`` the groups whose
        scores are all equal are dropped first (:func:`informative_rows`; score and length metrics still
        cover every response): the rollout may hold fewer rows, or none — then the step makes no update.
        """
        if ref is None:
            raise ValueError("ppo needs a reference policy for its KL term: pass ref (the stage-start model)")
        if group is None:
            group = torch.arange(input_ids.shape[0], device=input_ids.device)
        scores = scores.to(input_ids.device).float()
        metrics = per_direction(scores, direction, "ppo/score")  # every sampled response, kept or not
        response_lengths = (labels[:, 1:] != IGNORE_INDEX).sum(-1).float()
        metrics |= per_direction(response_lengths, direction, "ppo/response_length")
        if self.dynamic_sampling:
            keep = informative_rows(scores, group)
            kept = torch.unique(group[keep]).numel() / torch.unique(group).numel()
            metrics |= {"rollout/kept_groups_fraction": kept, "rollout/no_update": float(not keep.any())}
            if not bool(keep.any()):  # no signal anywhere: the rollout step makes no update
                return _empty_rollout(input_ids), metrics
            input_ids, attention_mask, labels, direction, group, scores = (
                t[keep] for t in (input_ids, attention_mask, labels, direction, group, scores)
            )
        logits, values = self._forward(policy, input_ids, attention_mask)
        old_logps, mask = token_logps(logits, labels, self.temperature)
        del logits
        ref_logps, _ = token_logps(ref.logits(input_ids, attention_mask), labels, self.temperature)
        kl = kl_penalty(old_logps, ref_logps) * mask
        token_rewards = None
        returns = None
        if self.uses_critic:
            assert values is not None  # _forward returns the value head's output with the critic
            token_rewards = -self.kl_coef * kl
            width = mask.shape[1]
            last = width - 1 - mask.flip(-1).float().argmax(-1)  # each row's last response token
            idx = last.unsqueeze(-1)
            has = (mask.sum(-1) > 0).float().unsqueeze(-1)
            token_rewards = token_rewards.scatter_add(1, idx, scores.unsqueeze(-1) * has)
            values = values * mask
            advantages, returns = gae(token_rewards, values, mask, self.gamma, self.lam)
            if self.whiten_advantages:
                advantages = whiten(advantages, mask)
        elif self.baseline == "rloo":
            advantages = rloo_advantages(scores, group).unsqueeze(-1) * mask
        else:
            advantages = group_advantages(scores, group, self.scales_group_rewards).unsqueeze(-1) * mask
        rollout = Rollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            direction=direction,
            group=group,
            scores=scores,
            mask=mask,
            old_logps=old_logps,
            ref_logps=ref_logps,
            advantages=advantages,
            old_values=values,
            returns=returns,
            token_rewards=token_rewards,
        )
        total_reward = (
            token_rewards.sum(-1) if token_rewards is not None else scores - self.kl_coef * kl.sum(-1)
        )
        metrics |= per_direction(total_reward, direction, "ppo/reward")
        metrics |= per_direction(kl.sum(-1), direction, "ppo/kl")
        return rollout, metrics

    def loss(self, policy: torch.nn.Module, rb: Rollout) -> LossOutput:
        """The PPO (or GRPO / RLOO) loss of one mini-batch under the current policy; metrics per direction.

        The clipped surrogate and the group baselines' k3 KL term are reduced by ``loss_aggregation``
        (:func:`aggregate_loss`); the value loss and the entropy bonus stay token means (as TRL's).
        """
        logits, values = self._forward(policy, rb.input_ids, rb.attention_mask)
        # Chunked (no fp32 [N, T, V]); the entropy gets backward work only when it is in the loss.
        logp, _, entropy, _ = token_stats(logits, rb.labels, self.temperature)
        mask = rb.mask
        pg = clipped_policy_loss(logp, rb.old_logps, rb.advantages, mask, self.clip_eps, self.clip_eps_high)
        policy_loss = aggregate_loss(pg.per_token, mask, self.loss_aggregation, self.max_new_tokens)
        loss = policy_loss
        if self.entropy_coef:
            loss = loss - self.entropy_coef * masked_mean(entropy, mask)
        d = rb.direction
        metrics: dict[str, float] = {}
        if self.uses_critic:
            assert values is not None and rb.old_values is not None and rb.returns is not None
            vf = clipped_value_loss(values, rb.old_values, rb.returns, mask, self.value_clip_eps)
            loss = loss + self.vf_coef * vf.loss
            metrics["ppo/value_loss"] = float(vf.loss.detach())
            metrics |= per_direction(row_mean(vf.per_token.detach(), mask), d, "ppo/value_loss")
            metrics |= per_direction(row_mean(vf.clipped.float(), mask), d, "ppo/value_clip_fraction")
        else:
            k3 = kl_k3(logp, rb.ref_logps)
            kl_loss = aggregate_loss(k3, mask, self.loss_aggregation, self.max_new_tokens)
            if self.kl_coef:
                loss = loss + self.kl_coef * kl_loss
            metrics |= per_direction(row_mean(k3.detach(), mask), d, "ppo/kl_k3")
        metrics |= per_direction(row_mean(pg.per_token.detach(), mask), d, "ppo/policy_loss")
        metrics["ppo/policy_loss"] = float(policy_loss.detach())
        metrics |= per_direction(row_mean(pg.clipped.float(), mask), d, "ppo/clip_fraction")
        metrics |= per_direction(row_mean(entropy.detach(), mask), d, "ppo/entropy")
        approx_kl = 0.5 * (logp.detach() - rb.old_logps) ** 2
        metrics |= per_direction(row_mean(approx_kl, mask), d, "ppo/approx_kl")
        metrics |= per_direction(rb.advantages.sum(-1) / mask.sum(-1).clamp(min=1), d, "ppo/advantage")
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss=loss, metrics=metrics)

    # ------------------------------------------------------------------ plain-batch call

    def __call__(self, policy: torch.nn.Module, batch: Batch, ref: Reference | None = None) -> LossOutput:
        """One PPO pass over the batch's y+ treated as a rollout with score 1 (see the module docstring).

        Attaches the value head when missing (critic baseline); a training loop must instead call
        :meth:`prepare_policy` before building its optimizer, or the head is never trained.
        """
        self.prepare_policy(policy)
        # Every row scores 1, so dynamic sampling would drop them all: this pass keeps every row.
        keep_all = self.model_copy(update={"dynamic_sampling": False}) if self.dynamic_sampling else self
        rollout, rollout_metrics = keep_all.make_rollout(
            policy,
            ref,
            batch.input_ids,
            batch.attention_mask,
            batch.labels,
            batch.direction,
            torch.ones(batch.size, device=batch.input_ids.device),
        )
        out = self.loss(policy, rollout)
        out.metrics = {**rollout_metrics, **out.metrics}
        return out
