"""PPO's training step: sample rollouts with the live policy, reward them, then several PPO passes.

The stage recipe calls :func:`ppo_step` instead of ``supervised_step`` when ``objective.needs_rollouts``
(same signature: ``(ctx, batch_rows, step) -> (metrics, n_tokens)``); the objective implements
:class:`~revmix.platform.rollout.objective.RolloutObjective`. One call is one *outer* step:

1. **rollout** — ``group_size`` responses per prompt of the Mixer's rows (so the reverse fraction and
   curricula apply to PPO too), sampled from the CURRENT weights by a :class:`RolloutEngine`;
2. **scoring** — decode, reward (``revmix.platform.rollout.rewards``), answer accuracy and format for metrics;
3. **reference** — old log-probs / values under the policy and log-probs under the reference, in one
   no-grad pass each (``PPO.make_rollout``), rewards shaped with the KL, advantages estimated;
4. **optimisation** — ``ppo_epochs`` × ``num_mini_batches`` optimizer steps (each split into
   ``stage.grad_accum`` micro-batches), with clipping at ``stage.max_grad_norm``. The loop steps the LR
   scheduler once afterwards. With the objective's ``dynamic_sampling`` the rollout holds only the groups
   whose scores differ, possibly none: then no optimizer step is taken (no ``loss``/``grad_norm`` metrics;
   the objective reports ``rollout/no_update``), and the run goes on.

Dropout is off for the whole step (the model is in eval mode, gradients still flow), so the first
mini-batch sees ratio 1 exactly and the clipped objective measures only the policy's own change — TRL's
PPO trainer disables dropout for the same reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from revmix.objectives.base import Reference, per_direction
from revmix.objectives.ppo import Rollout
from revmix.objectives.reference import eval_mode
from revmix.platform.data.tokenize import pad_prompt_response, token_list
from revmix.platform.evaluation.answers import extract_answer, score_completion
from revmix.platform.generation.protocol import SamplingParams
from revmix.platform.rollout.engines import HFRolloutEngine, RolloutEngine
from revmix.platform.rollout.objective import RolloutObjective, check_rollout_objective
from revmix.platform.rollout.rewards import Sample, answer_kind, build_reward, has_answer_line
from revmix.platform.step import MetricMeans, StepContext

# --------------------------------------------------------------------------------------------------
# Helpers of the step
# --------------------------------------------------------------------------------------------------


def _clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _TimedReference:
    """A reference policy that adds up the time its forward passes take (for the step's time split)."""

    def __init__(self, ref: Reference, device: torch.device) -> None:
        self.ref = ref
        self.device = device
        self.seconds = 0.0
        self.shared_prompt = ref.shared_prompt
        self.length_groups = ref.length_groups

    def logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        t0 = _clock(self.device)
        try:
            return self.ref.logits(input_ids, attention_mask, position_ids)
        finally:
            self.seconds += _clock(self.device) - t0


def _adopt_new_parameters(ctx: StepContext, params: list[torch.nn.Parameter]) -> None:
    """Train parameters the objective just created (the value head) with the already-built optimizer.

    They join the optimizer's first param group rather than a new one: the loop's LR scheduler was built
    for a fixed number of groups (torch zips them strictly) and must schedule the head's LR too. AdamW
    creates per-parameter state lazily, so a parameter joining a group mid-run is well defined. A resumed
    run still needs the head before its optimizer is built (see ``PPO.prepare_policy``).
    """
    if ctx.world > 1:
        raise RuntimeError(
            "ppo: the value head was created after the model was wrapped for distributed training, so its "
            "gradients would not be synchronised; the training loop must call objective.prepare_policy(policy) "
            "before rtt.prepare_model and before building the optimizer"
        )
    ctx.optimizer.param_groups[0]["params"].extend(params)
    ctx.trainable.extend(params)


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------


def ppo_step(
    ctx: StepContext, batch_rows: list[dict], step: int, engine: RolloutEngine | None = None
) -> tuple[dict[str, float], int]:
    """One PPO outer step on the Mixer's rows (see the module docstring); returns (metrics, tokens).

    ``engine`` defaults to :class:`HFRolloutEngine` on the policy.
    """
    obj, reference = _checked(ctx, batch_rows)
    created = obj.prepare_policy(ctx.policy)
    if created:
        _adopt_new_parameters(ctx, created)
    reward_fn = build_reward(obj.reward, path="objective.reward")
    dev = ctx.device
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bool(ctx.autocast))
    timings: dict[str, float] = {}

    t0 = _clock(dev)  # 1. rollout
    engine = engine or HFRolloutEngine.for_policy(ctx.policy, ctx.tokenizer)
    prompts = [token_list(r["prompt_ids"]) for r in batch_rows]
    with autocast:
        sampled = engine.generate(
            ctx.policy, prompts, _sampling(obj, ctx.seed, step, ctx.rank * len(prompts))
        )
    timings["rollout"] = _clock(dev) - t0

    t0 = _clock(dev)  # 2. scoring
    scored = _score(ctx.tokenizer, batch_rows, prompts, sampled, obj.samples_per_prompt, reward_fn)
    timings["scoring"] = _clock(dev) - t0

    t0 = _clock(dev)  # 3. reference log-probs, and old log-probs + values under the policy (timed apart)
    ids, mask, labels = pad_prompt_response(scored.prompts, scored.responses, _pad_id(ctx.tokenizer))
    direction = torch.tensor(scored.directions, dtype=torch.long, device=dev)
    ref = _TimedReference(reference, dev)
    with eval_mode(ctx.train_model):
        with autocast:
            rollout, rollout_metrics = obj.make_rollout(
                ctx.policy,
                ref,
                ids.to(dev),
                mask.to(dev),
                labels.to(dev),
                direction,
                torch.tensor(scored.scores, device=dev),
                torch.tensor(scored.groups, dtype=torch.long, device=dev),
            )
        timings["reference"] = ref.seconds
        timings["old_logps"] = _clock(dev) - t0 - ref.seconds

        t0 = _clock(dev)  # 4. optimisation
        metrics: dict[str, float] = {}
        if rollout.size:  # dynamic sampling may leave no row with signal: then no update (rollout/no_update)
            metrics, grad_norm = _optimise(ctx, obj, rollout, step, autocast)
            metrics["grad_norm"] = grad_norm
        timings["optimisation"] = _clock(dev) - t0

    metrics |= rollout_metrics
    metrics |= per_direction(torch.tensor(scored.correct), direction.cpu(), "ppo/accuracy")
    metrics |= per_direction(torch.tensor(scored.formatted), direction.cpu(), "ppo/format")
    for k, v in timings.items():
        metrics[f"ppo/time/{k}_s"] = v
    return metrics, int(mask.sum())


def _checked(ctx: StepContext, batch_rows: list[dict]) -> tuple[RolloutObjective, Reference]:
    """The step's objective and reference, after the checks that fail before any sampling."""
    obj = check_rollout_objective(ctx.objective, "ppo_step")
    if ctx.ref is None:
        raise ValueError("ppo_step: ctx.ref is None; PPO's KL term needs the stage's reference policy")
    if ctx.ref_cache is not None:
        raise ValueError(
            "stages.*.reference: 'cache' stores log-probs of the dataset's responses, but PPO scores fresh "
            "rollouts; use 'auto', 'adapter' or 'copy'"
        )
    if not batch_rows:
        raise ValueError("ppo_step: empty batch")
    if obj.dynamic_sampling and ctx.world > 1:
        raise ValueError(
            "objective.dynamic_sampling drops a different number of rows on each worker, which would leave "
            "the workers' backward passes (and their gradient all-reduces) unmatched; use one worker "
            "(runtime.num_workers: 0 or 1) or set dynamic_sampling to false"
        )
    if obj.num_mini_batches > len(batch_rows) * obj.samples_per_prompt:
        raise ValueError(
            f"objective.num_mini_batches={obj.num_mini_batches} exceeds the rollout batch of "
            f"{len(batch_rows) * obj.samples_per_prompt} responses (batch_size × group_size); lower it"
        )
    return obj, ctx.ref


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _sampling(obj: RolloutObjective, seed: int, step: int, first: int) -> SamplingParams:
    """Sampling seeded by the run, the step and ``first``, the global index of the worker's first prompt,
    not by the rank. Engines add a prompt's index within the call (vLLM seeds prompt i ``seed + i``; hf
    seeds each chunk of micro-batch size ``seed + its first prompt``), so a prompt's (vLLM) or a
    micro-batch's (hf) samples depend on its place in the step's global batch only."""
    return SamplingParams(
        max_new_tokens=obj.max_new_tokens,
        temperature=obj.temperature,
        top_p=obj.top_p,
        n=obj.samples_per_prompt,
        seed=(seed * 1_000_003 + step * 65_537 + first) % (2**31),
    )


@dataclass
class _Scored:
    """Every sampled response as one row of the rollout batch, with its score and metrics."""

    prompts: list[list[int]] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    directions: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # the prompt each response answers
    scores: list[float] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    formatted: list[float] = field(default_factory=list)


def _score(
    tok: Any,
    batch_rows: list[dict],
    prompts: list[list[int]],
    sampled: list[list[list[int]]],
    group_size: int,
    reward_fn: Any,
) -> _Scored:
    """Decode and reward every response; answer accuracy and format for the metrics. ``prompts``: each
    row's prompt ids as the rollout took them."""
    out = _Scored()
    pad_id = _pad_id(tok)
    for i, (row, responses) in enumerate(zip(batch_rows, sampled)):
        if len(responses) != group_size:
            raise RuntimeError(
                f"rollout engine returned {len(responses)} responses for prompt {i}, wanted {group_size}"
            )
        other_ids = token_list(row.get("other_ids", []))
        other = tok.decode(other_ids, skip_special_tokens=True) if other_ids else ""
        other_answer = extract_answer(other) if other else None
        for ids in responses:
            text = tok.decode(ids, skip_special_tokens=True)
            sample = Sample(
                completion=text,
                answer=row.get("answer"),
                task=str(row.get("task") or ""),
                direction=int(row["direction"]),
                other_answer=other_answer,
                item_id=str(row.get("item_id", "")),
            )
            out.scores.append(float(reward_fn(sample)))
            gold = row.get("answer")
            kind = answer_kind("auto", sample.task)
            out.correct.append(float(gold is not None and score_completion(text, gold, kind)))
            out.formatted.append(float(has_answer_line(text)))
            # A response cut to nothing (a non-EOS pad sampled first) is scored as one pad token.
            out.prompts.append(prompts[i])
            out.responses.append(ids if ids else [pad_id])
            out.directions.append(int(row["direction"]))
            out.groups.append(i)
    return out


def _optimise(
    ctx: StepContext, obj: RolloutObjective, rollout: Rollout, step: int, autocast: Any
) -> tuple[dict[str, float], float]:
    """``ppo_epochs`` × ``num_mini_batches`` optimizer steps over the rollout batch, each accumulated over
    ``grad_accum`` micro-batches; returns the mean loss metrics and the mean clipped gradient norm."""
    dev = ctx.device
    gen = torch.Generator().manual_seed((ctx.seed * 7_368_787 + step) % (2**31))
    means = MetricMeans()
    grad_norms: list[float] = []
    accum = max(1, int(ctx.stage.grad_accum))
    for _ in range(obj.ppo_epochs):
        perm = torch.randperm(rollout.size, generator=gen)
        for mb in perm.chunk(obj.num_mini_batches):
            for micro in mb.chunk(min(accum, len(mb))):
                with autocast:
                    out = obj.loss(ctx.train_model, rollout.select(micro.to(dev)))
                (out.loss * (len(micro) / len(mb))).backward()
                means.add(out.metrics)
            if ctx.stage.max_grad_norm:
                grad_norms.append(
                    float(torch.nn.utils.clip_grad_norm_(ctx.trainable, ctx.stage.max_grad_norm))
                )
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
    return means.means(), sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
