"""PPO's training step: sample rollouts with the live policy, reward them, then several PPO passes.

The training loop calls :func:`ppo_step` instead of ``supervised_step`` when ``objective.needs_rollouts``
(same signature: ``(ctx, batch_rows, step) -> (metrics, n_tokens)``). One call is one *outer* step:

1. **rollout** — ``group_size`` responses per prompt of the Mixer's rows (so the reverse fraction and
   curricula apply to PPO too), sampled from the CURRENT weights by a :class:`RolloutEngine`;
2. **scoring** — decode, reward (``revmix.platform.rollout.rewards``), answer accuracy and format for metrics;
3. **reference** — old log-probs / values under the policy and log-probs under the reference, in one
   no-grad pass each (``PPO.make_rollout``), rewards shaped with the KL, advantages estimated;
4. **optimisation** — ``ppo_epochs`` × ``num_mini_batches`` optimizer steps (each split into
   ``stage.grad_accum`` micro-batches), with clipping at ``stage.max_grad_norm``. The loop steps the LR
   scheduler once afterwards.

Dropout is off for the whole step (the model is in eval mode, gradients still flow), so the first
mini-batch sees ratio 1 exactly and the clipped objective measures only the policy's own change — TRL's
PPO trainer disables dropout for the same reason.

Engines (hf, vLLM) live in :mod:`revmix.platform.rollout.engines`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from revmix.objectives.base import IGNORE_INDEX, per_direction
from revmix.objectives.ppo import PPO
from revmix.platform.evaluation.answers import extract_answer, score_completion
from revmix.platform.generation.protocol import SamplingParams
from revmix.platform.rollout.engines import HFRolloutEngine, RolloutEngine, eval_mode
from revmix.platform.rollout.rewards import Sample, answer_kind, build_reward, has_answer_line

# --------------------------------------------------------------------------------------------------
# Building the rollout batch
# --------------------------------------------------------------------------------------------------


def pack(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)`` of prompt + response (labels on the response)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor(list(p) + list(r), dtype=torch.long)
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = seq[len(p) :]
    return ids, mask, labels


def _clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _TimedReference:
    """Wraps a reference policy and adds the time its forward passes take (for the step's time split)."""

    def __init__(self, ref: Any, device: torch.device) -> None:
        self.ref = ref
        self.device = device
        self.seconds = 0.0

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        t0 = _clock(self.device)
        try:
            return self.ref.logits(input_ids, attention_mask)
        finally:
            self.seconds += _clock(self.device) - t0


def _accumulate(sums: dict[str, float], counts: dict[str, int], metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v
        counts[k] = counts.get(k, 0) + 1


def _adopt_new_parameters(ctx: Any, params: list[torch.nn.Parameter]) -> None:
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
    ctx: Any, batch_rows: list[dict], step: int, engine: RolloutEngine | None = None
) -> tuple[dict[str, float], int]:
    """One PPO outer step on the Mixer's rows (see the module docstring); returns (metrics, tokens).

    ``ctx`` is the loop's ``StepContext``; ``engine`` defaults to :class:`HFRolloutEngine` on the policy.
    """
    obj = ctx.objective
    if not isinstance(obj, PPO):
        raise TypeError(f"ppo_step needs the 'ppo' objective, got {type(obj).__name__}")
    if ctx.ref is None:
        raise ValueError("ppo_step: ctx.ref is None; PPO's KL term needs the stage's reference policy")
    if ctx.ref_cache is not None:
        raise ValueError(
            "stages.*.reference: 'cache' stores log-probs of the dataset's responses, but PPO scores fresh "
            "rollouts; use 'auto', 'adapter' or 'copy'"
        )
    if not batch_rows:
        raise ValueError("ppo_step: empty batch")
    group_size = obj.samples_per_prompt
    if obj.num_mini_batches > len(batch_rows) * group_size:
        raise ValueError(
            f"objective.num_mini_batches={obj.num_mini_batches} exceeds the rollout batch of "
            f"{len(batch_rows) * group_size} responses (batch_size × group_size); lower it"
        )
    dev = ctx.device
    timings = {"rollout": 0.0, "scoring": 0.0, "reference": 0.0, "old_logps": 0.0, "optimisation": 0.0}
    created = obj.prepare_policy(ctx.policy)
    if created:
        _adopt_new_parameters(ctx, created)
    reward_fn = build_reward(obj.reward, path="objective.reward")
    tok = ctx.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bool(ctx.autocast))

    # 1. rollout
    t0 = _clock(dev)
    engine = engine or HFRolloutEngine.for_policy(ctx.policy, tok)
    params = SamplingParams(
        max_new_tokens=obj.max_new_tokens,
        temperature=obj.temperature,
        top_p=obj.top_p,
        n=group_size,
        seed=(ctx.seed * 1_000_003 + step) % (2**31),
    )
    prompts = [list(r["prompt_ids"]) for r in batch_rows]
    with autocast:
        sampled = engine.generate(ctx.policy, prompts, params)
    timings["rollout"] = _clock(dev) - t0

    # 2. scoring
    t0 = _clock(dev)
    seq_prompts, seq_responses, directions, groups = [], [], [], []
    scores, correct, formatted = [], [], []
    for i, (row, outs) in enumerate(zip(batch_rows, sampled)):
        if len(outs) != group_size:
            raise RuntimeError(
                f"rollout engine returned {len(outs)} responses for prompt {i}, wanted {group_size}"
            )
        other = tok.decode(row["other_ids"], skip_special_tokens=True) if row.get("other_ids") else ""
        other_answer = extract_answer(other) if other else None
        for ids in outs:
            text = tok.decode(ids, skip_special_tokens=True)
            sample = Sample(
                completion=text,
                answer=row.get("answer"),
                task=str(row.get("task") or ""),
                direction=int(row["direction"]),
                other_answer=other_answer,
                item_id=str(row.get("item_id", "")),
            )
            scores.append(float(reward_fn(sample)))
            gold = row.get("answer")
            kind = answer_kind("auto", sample.task)
            correct.append(float(gold is not None and score_completion(text, gold, kind)))
            formatted.append(float(has_answer_line(text)))
            # A response cut to nothing (a non-EOS pad sampled first) is scored as one pad token.
            seq_prompts.append(row["prompt_ids"])
            seq_responses.append(ids if ids else [pad_id])
            directions.append(int(row["direction"]))
            groups.append(i)
    timings["scoring"] = _clock(dev) - t0

    # 3. reference log-probs, and old log-probs + values under the policy (timed apart)
    t0 = _clock(dev)
    ids, mask, labels = pack(seq_prompts, seq_responses, pad_id)
    direction = torch.tensor(directions, dtype=torch.long, device=dev)
    ref = _TimedReference(ctx.ref, dev)
    with eval_mode(ctx.train_model):
        with autocast:
            rollout, rollout_metrics = obj.make_rollout(
                ctx.policy,
                ref,
                ids.to(dev),
                mask.to(dev),
                labels.to(dev),
                direction,
                torch.tensor(scores, device=dev),
                torch.tensor(groups, dtype=torch.long, device=dev),
            )
        timings["reference"] = ref.seconds
        timings["old_logps"] = _clock(dev) - t0 - ref.seconds

        # 4. optimisation
        t0 = _clock(dev)
        n = rollout.size
        gen = torch.Generator().manual_seed((ctx.seed * 7_368_787 + step) % (2**31))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        grad_norms: list[float] = []
        accum = max(1, int(ctx.stage.grad_accum))
        for _ in range(obj.ppo_epochs):
            perm = torch.randperm(n, generator=gen)
            for mb in perm.chunk(obj.num_mini_batches):
                for micro in mb.chunk(min(accum, len(mb))):
                    with autocast:
                        out = obj.loss(ctx.train_model, rollout.select(micro.to(dev)))
                    (out.loss * (len(micro) / len(mb))).backward()
                    _accumulate(sums, counts, out.metrics)
                if ctx.stage.max_grad_norm:
                    grad_norms.append(
                        float(torch.nn.utils.clip_grad_norm_(ctx.trainable, ctx.stage.max_grad_norm))
                    )
                ctx.optimizer.step()
                ctx.optimizer.zero_grad(set_to_none=True)
        timings["optimisation"] = _clock(dev) - t0

    metrics = {k: sums[k] / counts[k] for k in sums}
    metrics |= rollout_metrics
    metrics |= per_direction(torch.tensor(correct), direction.cpu(), "ppo/accuracy")
    metrics |= per_direction(torch.tensor(formatted), direction.cpu(), "ppo/format")
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
    for k, v in timings.items():
        metrics[f"ppo/time/{k}_s"] = v
    return metrics, int(mask.sum())
