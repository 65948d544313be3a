"""KTO: hand-computed values, equality with TRL 1.16's KTOTrainer, the unpaired property, and z0 with a
reference cache."""

from __future__ import annotations

import copy
import functools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from revmix.objectives.base import IGNORE_INDEX, build_objective, sequence_logps
from revmix.objectives.kto import kto_losses, mismatched_pairs, reference_point
from revmix.objectives.reference import FrozenCopyReference, concatenated_inputs, reference_logps
from tests.objectives.helpers import (
    CountingReference,
    make_batch,
    responses,
    row_token_logps,
    tiny_lm,
    train_steps,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------------
# The pure loss, by hand (float64)
# --------------------------------------------------------------------------------------------------

POLICY = torch.tensor([-1.0, -3.0, -2.5, -4.0], dtype=torch.float64)
REF = torch.tensor([-2.0, -2.0, -2.0, -1.0], dtype=torch.float64)  # r = 1, -1, -0.5, -3
DESIRABLE = torch.tensor([True, False, True, False])


def test_losses_hand_computed():
    losses, rewards = kto_losses(POLICY, REF, DESIRABLE, 0.5, beta=1.0)
    # desirable: 1 − σ(β(r − z0)); undesirable: 1 − σ(β(z0 − r))
    expected = [1 - _sigmoid(0.5), 1 - _sigmoid(1.5), 1 - _sigmoid(-1.0), 1 - _sigmoid(3.5)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert losses.tolist() == pytest.approx([0.37754067, 0.18242552, 0.73105858, 0.02931223], rel=1e-6)
    assert rewards.tolist() == pytest.approx([1.0, -1.0, -0.5, -3.0])  # β·r, z0 not subtracted


def test_weights_and_beta_hand_computed():
    losses, rewards = kto_losses(
        POLICY, REF, DESIRABLE, 0.0, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5
    )
    expected = [
        2.0 * (1 - _sigmoid(0.1)),
        0.5 * (1 - _sigmoid(0.1)),
        2.0 * (1 - _sigmoid(-0.05)),
        0.5 * (1 - _sigmoid(0.3)),
    ]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert rewards.tolist() == pytest.approx([0.1, -0.1, -0.05, -0.3])


def test_reference_point_is_the_clamped_detached_mean():
    policy = torch.tensor([-1.0, -2.0, -4.0], requires_grad=True)
    # mean(1, 0, -2) = -1/3 < 0 → 0; mean(3, 2, 0) = 5/3
    assert float(reference_point(policy, torch.tensor([-2.0, -2.0, -2.0]))) == 0.0
    assert float(reference_point(policy, torch.tensor([-4.0, -4.0, -4.0]))) == pytest.approx(5 / 3, rel=1e-6)
    assert not reference_point(policy, torch.tensor([-4.0, -4.0, -4.0])).requires_grad


# --------------------------------------------------------------------------------------------------
# The unpaired property
# --------------------------------------------------------------------------------------------------


def test_batch_loss_is_the_weighted_mean_of_per_example_terms():
    """For a fixed z0 each example's term is computed alone; the batch loss is their plain mean."""
    z0, beta, wd, wu = 0.3, 0.7, 1.5, 0.8
    batch_losses, _ = kto_losses(POLICY, REF, DESIRABLE, z0, beta, wd, wu)
    alone = [
        float(kto_losses(POLICY[i : i + 1], REF[i : i + 1], DESIRABLE[i : i + 1], z0, beta, wd, wu)[0])
        for i in range(4)
    ]
    by_hand = [
        (wd if d else wu) * (1 - _sigmoid(beta * ((r - z0) if d else (z0 - r))))
        for r, d in zip((POLICY - REF).tolist(), DESIRABLE.tolist())
    ]
    assert float(batch_losses.mean()) == pytest.approx(sum(alone) / 4, rel=1e-12)
    assert alone == pytest.approx(by_hand, rel=1e-12)


def test_pairing_does_not_matter_for_a_fixed_z0():
    """Which undesirable example sits next to which desirable one changes nothing, nor does an unequal
    number of each."""
    z0 = 0.2
    base = float(kto_losses(POLICY, REF, DESIRABLE, z0, 0.5)[0].mean())
    order = torch.tensor([2, 3, 0, 1])  # swaps the pairs (0, 1) and (2, 3) → (2, 1) and (0, 3) as neighbours
    assert float(kto_losses(POLICY[order], REF[order], DESIRABLE[order], z0, 0.5)[0].mean()) == pytest.approx(
        base, rel=1e-12
    )
    only_desirable = kto_losses(POLICY[[0, 2]], REF[[0, 2]], DESIRABLE[[0, 2]], z0, 0.5)[0]
    assert only_desirable.tolist() == pytest.approx([1 - _sigmoid(0.5 * 0.8), 1 - _sigmoid(0.5 * -0.7)])


def test_objective_does_not_pair_y_plus_with_y_minus(setup):
    """With the matched z0 (cached reference, no live one) z0 does not depend on the order of the batch's
    examples: moving every undesirable example (x, y−) to another row leaves the loss unchanged."""
    policy, ref_model, batch = setup
    cached = _cached(batch, ref_model)
    moved = copy.copy(cached)
    perm = torch.roll(torch.arange(batch.size), 1)
    moved.other_input_ids = cached.other_input_ids[perm]
    moved.other_attention_mask = cached.other_attention_mask[perm]
    moved.other_labels = cached.other_labels[perm]
    moved.ref_rejected_logps = cached.ref_rejected_logps[perm]
    objective = build_objective({"name": "kto", "beta": 0.5})
    assert float(objective(policy, moved, None).loss) == pytest.approx(
        float(objective(policy, cached, None).loss), rel=1e-5, abs=1e-6
    )


# --------------------------------------------------------------------------------------------------
# The mismatched (KL) pairs and equality with TRL 1.16
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    return tiny_lm(seed=0), tiny_lm(seed=1), make_batch(seed=3, batch_size=6)


def _cached(batch, ref_model):
    b = copy.copy(batch)
    b.ref_chosen_logps, b.ref_rejected_logps = reference_logps(FrozenCopyReference(ref_model), batch)
    return b


def _trl_examples(batch) -> list[dict]:
    """Our batch as TRL's unpaired examples, y+ rows then y− rows, with TRL's KL completions.

    TRL 1.16 ``KTOTrainer._prepare_dataset`` (trl/trainer/kto_trainer.py lines 1141-1156) rotates the
    completions of each ``per_device_train_batch_size`` batch by one: ``add_kl_completion_ids`` (a closure,
    so restated here) sets ``KL_completion_ids = [c[-1]] + c[:-1]``; the batch here is all 2B examples.
    """
    b = batch.size
    completions = responses(batch.labels) + responses(batch.other_labels)
    kl = [completions[-1]] + completions[:-1]
    return [
        {
            "prompt_ids": batch.prompt_ids[k % b],
            "completion_ids": completions[k],
            "KL_completion_ids": kl[k],
            "label": k < b,
        }
        for k in range(2 * b)
    ]


def test_mismatched_pairs_are_trls_kl_sequences(setup):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    _, _, batch = setup
    trl = DataCollatorForUnpairedPreference(pad_token_id=0)(_trl_examples(batch))
    ids, mask, labels = mismatched_pairs(batch)
    assert torch.equal(ids * mask, trl["KL_input_ids"] * trl["KL_attention_mask"])
    assert torch.equal(mask, trl["KL_attention_mask"])
    assert torch.equal(labels != IGNORE_INDEX, trl["KL_completion_mask"].bool())
    # Spelled out: prompt x_i is scored with y+_(i−1) and y−_(i−1); x_0 with the last row's.
    b = batch.size
    assert ids[1, : int(mask[1].sum())].tolist() == batch.prompt_ids[1] + responses(batch.labels)[0]
    assert ids[0, : int(mask[0].sum())].tolist() == batch.prompt_ids[0] + responses(batch.other_labels)[b - 1]
    assert ids[b, : int(mask[b].sum())].tolist() == batch.prompt_ids[0] + responses(batch.labels)[b - 1]


def _trl_loss(policy, ref_model, batch, beta, desirable_weight, undesirable_weight, precomputed=None):
    """TRL 1.16's own KTO loss on our batch, through ``KTOTrainer._compute_loss`` unbound.

    Source: trl/trainer/kto_trainer.py (trl 1.16.0) — ``_compute_loss`` (lines 1370-1563): the policy's KL
    log-probs under ``no_grad`` (``_compute_kl_logps``, 1337-1368), the matched ones through the fused LM
    head, the reference's from ``self.ref_model`` (1425-1440) or from ``ref_logps``/``ref_KL_logps`` when
    ``precompute_ref_logps``; ``kl = (KL_logps − ref_KL_logps).mean().clamp(min=0)`` (1442-1444),
    ``loss_type="kto"`` losses (1449-1477) and ``losses.nanmean()``. The attributes below are those it
    reads; the fused head scores tokens with TRL's own kernel, independently of ours.
    """
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model, ref = copy.deepcopy(policy), copy.deepcopy(ref_model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
    add_fused_lm_head(ref)
    examples = _trl_examples(batch)
    if precomputed is not None:
        for example, ref_logp, ref_kl_logp in zip(examples, *precomputed):
            example["ref_logps"], example["ref_KL_logps"] = float(ref_logp), float(ref_kl_logp)
    inputs = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=model,
        ref_model=ref,
        accelerator=accelerator,
        aux_loss_enabled=False,
        precompute_ref_logps=precomputed is not None,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, trainer)
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train" if model.training else "eval"].items()}
    return float(loss.detach()), metrics


@pytest.mark.parametrize(
    "spec",
    [
        {"beta": 0.1},
        {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 1.0},
        {"beta": 2.0, "desirable_weight": 0.5, "undesirable_weight": 1.5},
    ],
)
def test_equals_trl(setup, spec):
    policy, ref_model, batch = setup
    out = build_objective({"name": "kto", **spec})(policy, batch, FrozenCopyReference(ref_model))
    trl_loss, trl_metrics = _trl_loss(
        policy,
        ref_model,
        batch,
        spec["beta"],
        spec.get("desirable_weight", 1.0),
        spec.get("undesirable_weight", 1.0),
    )
    assert float(out.loss.detach()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert out.metrics["loss"] == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert out.metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def test_equals_trl_with_precomputed_reference(setup):
    """The loop's ``cache`` mode (matched reference log-probs cached, the live reference passed too) gives
    TRL's loss with ``precompute_ref_log_probs`` (which also precomputes the KL pairs' values)."""
    policy, ref_model, batch = setup
    ref = FrozenCopyReference(ref_model)
    ids, mask, labels = mismatched_pairs(batch)
    ref_kl = sequence_logps(ref.logits(ids, mask), labels)
    cached = _cached(batch, ref_model)
    precomputed = (torch.cat([cached.ref_chosen_logps, cached.ref_rejected_logps]), ref_kl)
    out = build_objective({"name": "kto", "beta": 0.3})(policy, cached, ref)
    trl_loss, trl_metrics = _trl_loss(policy, ref_model, batch, 0.3, 1.0, 1.0, precomputed=precomputed)
    assert float(out.loss.detach()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert out.metrics["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-5, abs=1e-6)


def test_z0_is_positive_and_equals_the_mismatched_log_ratios_row_by_row():
    """A policy trained up on the mismatched pairs themselves has z0 > 0 (the clamp lets it through), and z0
    is the mean of the 2B mismatched log-ratios computed row by row, unpadded, in float64."""
    policy, batch = tiny_lm(seed=0), make_batch(seed=4)
    ref = FrozenCopyReference(policy)
    ids, mask, labels = mismatched_pairs(batch)
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        (-sequence_logps(policy(input_ids=ids, attention_mask=mask).logits, labels).mean()).backward()
        opt.step()
    out = build_objective({"name": "kto"})(policy, batch, ref)
    b = batch.size
    completions = responses(batch.labels) + responses(batch.other_labels)
    ratios = [
        sum(row_token_logps(policy, batch.prompt_ids[k % b], completions[k - 1]))
        - sum(row_token_logps(ref.model, batch.prompt_ids[k % b], completions[k - 1]))
        for k in range(2 * b)
    ]
    assert sum(ratios) / (2 * b) > 0.1
    assert out.metrics["kl"] == pytest.approx(sum(ratios) / (2 * b), rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The reference: live, cached, or cached without a live one
# --------------------------------------------------------------------------------------------------


def test_cache_with_a_live_reference_gives_the_same_numbers_and_scores_only_the_kl_pairs(setup):
    policy, ref_model, batch = setup
    objective = build_objective({"name": "kto"})
    live = CountingReference(ref_model)
    online = objective(policy, batch, live)
    assert live.calls == 2  # the matched examples and the mismatched pairs
    with_cache = CountingReference(ref_model)
    cached = objective(policy, _cached(batch, ref_model), with_cache)
    assert with_cache.calls == 1  # the mismatched pairs only: the cache cannot hold them
    assert float(cached.loss.detach()) == pytest.approx(float(online.loss.detach()), rel=1e-5, abs=1e-6)
    assert cached.metrics["kl"] == pytest.approx(online.metrics["kl"], rel=1e-5, abs=1e-6)


def test_cache_without_a_live_reference_uses_the_matched_z0(setup):
    """No mismatched reference log-probs to be had: z0 = max(0, mean r) over the batch's own 2B examples."""
    policy, ref_model, batch = setup
    cached = _cached(batch, ref_model)
    beta = 0.4
    out = build_objective({"name": "kto", "beta": beta})(policy, cached, None)
    b = batch.size
    completions = responses(batch.labels) + responses(batch.other_labels)
    ratios = [
        sum(row_token_logps(policy, batch.prompt_ids[k % b], completions[k]))
        - sum(row_token_logps(ref_model, batch.prompt_ids[k % b], completions[k]))
        for k in range(2 * b)
    ]
    z0 = max(0.0, sum(ratios) / (2 * b))
    terms = [1 - _sigmoid(beta * (r - z0)) for r in ratios[:b]] + [
        1 - _sigmoid(beta * (z0 - r)) for r in ratios[b:]
    ]
    assert out.metrics["kl"] == pytest.approx(z0, rel=1e-5, abs=1e-6)
    assert float(out.loss.detach()) == pytest.approx(sum(terms) / (2 * b), rel=1e-5, abs=1e-6)


def test_one_row_uses_the_matched_z0_without_extra_passes(setup):
    policy, ref_model, batch = setup
    row = batch.select(torch.tensor([2]))
    ref = CountingReference(ref_model)
    out = build_objective({"name": "kto"})(policy, row, ref)
    assert ref.calls == 1
    ids, mask, labels = concatenated_inputs(row)
    with torch.no_grad():
        r = sequence_logps(policy(input_ids=ids, attention_mask=mask).logits, labels) - sequence_logps(
            ref_model(input_ids=ids, attention_mask=mask).logits, labels
        )
    assert out.metrics["kl"] == pytest.approx(max(0.0, float(r.double().mean())), rel=1e-5, abs=1e-6)


def test_missing_reference_is_a_clear_error(setup):
    policy, _, batch = setup
    with pytest.raises(ValueError, match="kto needs reference log-probs"):
        build_objective({"name": "kto"})(policy, batch, None)


def test_policy_scores_the_kl_pairs_without_a_graph(setup):
    policy, ref_model, batch = setup
    seen = []
    handle = policy.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((kwargs["input_ids"].shape[0], torch.is_grad_enabled())),
        with_kwargs=True,
    )
    try:
        build_objective({"name": "kto"})(policy, batch, FrozenCopyReference(ref_model))
    finally:
        handle.remove()
    assert seen == [(2 * batch.size, True), (2 * batch.size, False)]


# --------------------------------------------------------------------------------------------------
# Config and metrics
# --------------------------------------------------------------------------------------------------


def test_bad_hyperparameters_are_loud():
    with pytest.raises(ValueError, match="objective.beta: expected a number > 0, got 0.0"):
        build_objective({"name": "kto", "beta": 0.0})
    with pytest.raises(ValueError, match="both 0"):
        build_objective({"name": "kto", "desirable_weight": 0.0, "undesirable_weight": 0.0})
    with pytest.raises(
        ValueError, match="objective.desirable_weigth: unknown key .*did you mean 'desirable_weight'"
    ):
        build_objective({"name": "kto", "desirable_weigth": 1.0})


def test_metrics_per_direction_and_training_moves_rewards_apart():
    policy, batch = tiny_lm(seed=0), make_batch(seed=5)
    ref = FrozenCopyReference(policy)
    objective = build_objective({"name": "kto", "beta": 0.5})
    first, out = train_steps(objective, policy, batch, ref)
    for name in (
        "logps/chosen",
        "logps/rejected",
        "logps/margin",
        "rewards/chosen",
        "rewards/rejected",
        "loss",
    ):
        assert {name, f"{name}/forward", f"{name}/reverse"} <= set(first), name
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: r = z0 = 0, 1 − σ(0)
    assert first["kl"] == 0.0
    assert out.metrics["rewards/chosen"] > 0.5 and out.metrics["rewards/rejected"] < -0.5
    assert out.metrics["loss"] < 0.4
