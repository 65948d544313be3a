"""DPO / IPO: hand-computed values, equality with TRL 1.16's DPOTrainer, caching and one-pass forward."""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from revmix.objectives.base import IGNORE_INDEX, PolicyForward, build_objective
from revmix.objectives.dpo import dpo_loss
from revmix.objectives.reference import FrozenCopyReference, concatenated_inputs, reference_logps
from tests.objectives.helpers import (
    CountingReference,
    make_batch,
    responses,
    row_token_logps,
    tiny_lm,
    train_steps,
)

# --------------------------------------------------------------------------------------------------
# The pure loss, by hand
# --------------------------------------------------------------------------------------------------

# Rows: (policy chosen, policy rejected, ref chosen, ref rejected) -> h = (pc - pr) - (rc - rr)
PC = torch.tensor([-1.0, -4.0, -2.0])
PR = torch.tensor([-3.0, -2.0, -2.0])
RC = torch.tensor([-2.0, -3.0, -1.0])
RR = torch.tensor([-2.0, -3.0, -1.0])
H = [2.0, -2.0, 0.0]


def test_sigmoid_hand_computed():
    losses, chosen_r, rejected_r = dpo_loss(PC, PR, RC, RR, beta=0.5)
    # -log σ(βh) = log(1 + e^{-βh}): βh = 1, -1, 0
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0)), math.log(2.0)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert losses.tolist() == pytest.approx([0.3132617, 1.3132617, 0.6931472], abs=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.5, -0.5, -0.5])  # 0.5 * (pc - rc)
    assert rejected_r.tolist() == pytest.approx([-0.5, 0.5, -0.5])  # 0.5 * (pr - rr)


def test_sigmoid_conservative_label_smoothing_hand_computed():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    # (1-ε)·log(1+e^{-βh}) + ε·log(1+e^{βh}); at βh = 1: 0.9·0.3132617 + 0.1·1.3132617 = 0.4132617
    assert losses[0].item() == pytest.approx(0.4132617, abs=1e-6)
    assert losses[1].item() == pytest.approx(0.9 * 1.3132617 + 0.1 * 0.3132617, abs=1e-6)
    assert losses[2].item() == pytest.approx(math.log(2.0), abs=1e-6)  # symmetric at h = 0


def test_ipo_hand_computed():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")
    # (h - 1/(2β))² with 1/(2β) = 1: (2-1)², (-2-1)², (0-1)²
    assert losses.tolist() == pytest.approx([1.0, 9.0, 1.0])
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo")
    assert losses.tolist() == pytest.approx([0.0, 16.0, 4.0])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _softplus(x: float) -> float:  # −log σ(−x)
    return math.log1p(math.exp(x))


# Log-ratios of the rows above: u_w = pc − rc, u_l = pr − rr (h = u_w − u_l = H).
UW = [1.0, -1.0, -1.0]
UL = [-1.0, 1.0, -1.0]


def test_hinge_hand_computed():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge")
    # max(0, 1 − βh), βh = 1, −1, 0
    assert losses.tolist() == pytest.approx([0.0, 2.0, 1.0])


def test_robust_hand_computed():
    eps, beta = 0.1, 0.5
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust", label_smoothing=eps)
    # (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε), with −log σ(z) = softplus(−z)
    expected = [((1 - eps) * _softplus(-beta * h) - eps * _softplus(beta * h)) / (1 - 2 * eps) for h in H]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert losses[0].item() == pytest.approx((0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8, rel=1e-5)
    plain, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust")
    assert plain.tolist() == pytest.approx(dpo_loss(PC, PR, RC, RR, beta=beta)[0].tolist())  # ε = 0: DPO


def test_apo_hand_computed():
    beta = 0.5
    zero, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="apo_zero")
    # 1 − σ(β u_w) + σ(β u_l); row 0: 1 − σ(0.5) + σ(−0.5) = 2σ(−0.5)
    assert zero.tolist() == pytest.approx(
        [1 - _sigmoid(beta * w) + _sigmoid(beta * v) for w, v in zip(UW, UL)], rel=1e-5, abs=1e-6
    )
    assert zero.tolist() == pytest.approx([0.7550813, 1.2449187, 1.0], abs=1e-6)
    down, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="apo_down")
    # σ(β u_w) + 1 − σ(βh); row 0: σ(0.5) + 1 − σ(1)
    assert down.tolist() == pytest.approx(
        [_sigmoid(beta * w) + 1 - _sigmoid(beta * h) for w, h in zip(UW, H)], rel=1e-5, abs=1e-6
    )
    assert down.tolist() == pytest.approx([0.8914007, 1.1085993, 0.8775407], abs=1e-6)


def test_dpop_hand_computed():
    beta, lam = 0.5, 2.0
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, dpop_lambda=lam)
    # −log σ(β(h − λ·max(0, −u_w))): penalties 0, 1, 1, so βh' = 1, −2, −1
    assert losses.tolist() == pytest.approx(
        [_softplus(-beta * (h - lam * max(0.0, -w))) for h, w in zip(H, UW)], rel=1e-5, abs=1e-6
    )
    assert losses.tolist() == pytest.approx([0.3132617, 2.1269280, 1.3132617], abs=1e-6)


def test_bad_hyperparameters_are_loud():
    with pytest.raises(
        ValueError,
        match="dpo.loss_type: 'hnge' is not one of sigmoid, ipo, hinge, robust, apo_zero, apo_down",
    ):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hnge")
    with pytest.raises(ValueError, match="'sigmoid' or 'robust' only"):
        build_objective({"name": "dpo", "loss_type": "ipo", "label_smoothing": 0.1})
    with pytest.raises(ValueError, match="dpop_lambda applies to loss_type 'sigmoid' only"):
        build_objective({"name": "dpo", "loss_type": "hinge", "dpop_lambda": 1.0})
    with pytest.raises(ValueError, match="objective.rpo_alpha: expected a number >= 0"):
        build_objective({"name": "dpo", "rpo_alpha": -1.0})
    with pytest.raises(ValueError, match="objective.beta: expected a number > 0, got 0.0"):
        build_objective({"name": "dpo", "beta": 0.0})
    with pytest.raises(ValueError, match="objective.betta: unknown key .*did you mean 'beta'"):
        build_objective({"name": "dpo", "betta": 0.1})


# --------------------------------------------------------------------------------------------------
# Equality with TRL 1.16
# --------------------------------------------------------------------------------------------------


def _trl_loss(
    policy,
    ref_model,
    batch,
    loss_type: str | list[str],
    beta: float,
    label_smoothing: float = 0.0,
    cached=None,
    loss_weights: list[float] | None = None,
):
    """TRL 1.16's own DPO loss on our batch, through ``DPOTrainer._compute_loss`` unbound.

    Source: trl/trainer/dpo_trainer.py (trl 1.16.0) — ``_compute_loss`` (lines 1285-1612): one forward of the
    concatenated ``[chosen; rejected]`` batch through the fused LM head (``add_fused_lm_head``, trainer
    ``__init__`` lines 957-962), token log-probs summed over ``completion_mask`` (1299-1306), reference
    log-probs from ``inputs["ref_chosen_logps"]`` when ``precompute_ref_logps`` (1319-1320) or from
    ``self.ref_model`` under ``no_grad`` (1321-1346); ``sigmoid`` = ``-logsigmoid(β·Δ)`` (1387-1388),
    ``ipo`` = ``(Δ/len - 1/(2β))²`` with per-token normalisation (1393-1403), ``sigmoid_norm`` the
    normalised sigmoid (1504-1509), ``aot`` the sorted cDPO form with label smoothing (1447-1456),
    ``hinge`` (1390-1391), ``robust`` (1428-1431), ``apo_zero`` / ``apo_down`` (1467-1481), ``sft`` the
    token-mean NLL of the chosen half (1495-1502); several loss types are summed with ``loss_weights``
    (1386-1528); rewards/margins/accuracies metrics at 1580-1601. The attributes below are exactly those
    it reads; TRL's fused head scores tokens with its own chunked kernel, so the log-probs are computed
    independently of ours.
    """
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model, ref = copy.deepcopy(policy), copy.deepcopy(ref_model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(ref)
    ids, mask, labels = concatenated_inputs(batch)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": (labels != IGNORE_INDEX).long()}
    if cached is not None:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = cached
    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        unwrap_model=lambda m: m,
    )
    trainer = SimpleNamespace(
        model=model,
        ref_model=ref,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=cached is not None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type] if isinstance(loss_type, str) else loss_type,
        loss_weights=loss_weights or [1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval" if not model.training else "train"].items()}
    return float(loss.detach()), metrics


@pytest.fixture(scope="module")
def setup():
    batch = make_batch(seed=3, batch_size=6)
    batch.policy_forward = PolicyForward(shared_prompt=True)  # the loop's decision for an sdpa model
    return tiny_lm(seed=0), tiny_lm(seed=1), batch


@pytest.mark.parametrize(
    ("spec", "trl_types", "trl_weights"),
    [
        ({"beta": 0.1}, "sigmoid", None),
        ({"beta": 0.5}, "sigmoid", None),
        ({"beta": 0.1, "average_log_prob": True}, "sigmoid_norm", None),
        ({"beta": 0.1, "loss_type": "ipo"}, "ipo", None),
        ({"beta": 0.5, "loss_type": "ipo"}, "ipo", None),
        ({"beta": 0.5, "loss_type": "hinge"}, "hinge", None),
        ({"beta": 0.3, "loss_type": "robust", "label_smoothing": 0.2}, "robust", None),
        ({"beta": 0.5, "loss_type": "apo_zero"}, "apo_zero", None),
        ({"beta": 0.5, "loss_type": "apo_down"}, "apo_down", None),
        # RPO: TRL 1.16 has no rpo_alpha; its recipe is loss_type=["sigmoid", "sft"] weighted [1, α].
        ({"beta": 0.1, "rpo_alpha": 0.7}, ["sigmoid", "sft"], [1.0, 0.7]),
        ({"beta": 0.5, "loss_type": "hinge", "rpo_alpha": 1.0}, ["hinge", "sft"], [1.0, 1.0]),
    ],
)
@pytest.mark.parametrize("shared_prompt", [True, False])
def test_equals_trl(setup, spec, trl_types, trl_weights, shared_prompt):
    policy, ref_model, batch = setup
    objective = build_objective({"name": "dpo", "shared_prompt": shared_prompt, **spec})
    out = objective(policy, batch, FrozenCopyReference(ref_model))
    trl_loss, trl_metrics = _trl_loss(
        policy, ref_model, batch, trl_types, spec["beta"], spec.get("label_smoothing", 0.0), None, trl_weights
    )
    assert float(out.loss.detach()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert out.metrics["loss"] == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    # Rewards and log-probs are summed in both, whatever the loss normalisation (TRL's logs).
    for ours, theirs in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"),
        ("rewards/accuracy", "rewards/accuracies"),
        ("logps/chosen", "logps/chosen"),
        ("logps/rejected", "logps/rejected"),
    ]:
        assert out.metrics[ours] == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=1e-5), ours
    margin = trl_metrics["logps/chosen"] - trl_metrics["logps/rejected"]
    assert out.metrics["logps/margin"] == pytest.approx(margin, rel=1e-5, abs=1e-5)


def test_dpop_equals_a_float64_recomputation(setup):
    """TRL 1.16 has no DPOP: compare with Pal et al. 2024, Eq. 3, recomputed per row (unpadded, float64)."""
    policy, ref_model, batch = setup
    beta, lam = 0.5, 5.0
    ref = FrozenCopyReference(ref_model)
    out = build_objective({"name": "dpo", "beta": beta, "dpop_lambda": lam})(policy, batch, ref)
    losses, penalised = [], 0
    for p, yc, yr in zip(batch.prompt_ids, responses(batch.labels), responses(batch.other_labels)):
        pc, pr = sum(row_token_logps(policy, p, yc)), sum(row_token_logps(policy, p, yr))
        rc, rr = sum(row_token_logps(ref_model, p, yc)), sum(row_token_logps(ref_model, p, yr))
        penalised += rc > pc
        h = (pc - rc) - (pr - rr) - lam * max(0.0, rc - pc)
        losses.append(_softplus(-beta * h))
    assert 0 < penalised < batch.size  # both sides of the max(0, ·) are exercised
    assert float(out.loss.detach()) == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-6)
    plain = build_objective({"name": "dpo", "beta": beta})(policy, batch, ref)
    assert float(out.loss.detach()) > float(plain.loss.detach()) + 1e-3


def test_equals_trl_with_precomputed_reference(setup):
    policy, ref_model, batch = setup
    cached = reference_logps(FrozenCopyReference(ref_model), batch)
    b = copy.copy(batch)
    b.ref_chosen_logps, b.ref_rejected_logps = cached
    out = build_objective({"name": "dpo", "beta": 0.2})(policy, b, None)
    trl_loss, _ = _trl_loss(policy, ref_model, batch, "sigmoid", 0.2, cached=cached)
    assert float(out.loss.detach()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)


def test_label_smoothing_equals_trl_aot_per_row(setup):
    """TRL 1.16 dropped ε from ``sigmoid``; its ``aot`` loss (lines 1447-1456) is cDPO on *sorted* log-ratio
    differences, which for a batch of one row is exactly conservative DPO. Compare row by row."""
    policy, ref_model, batch = setup
    ref = FrozenCopyReference(ref_model)
    objective = build_objective({"name": "dpo", "beta": 0.3, "label_smoothing": 0.2})
    for i in range(batch.size):
        row = batch.select(torch.tensor([i]))
        trl_loss, _ = _trl_loss(policy, ref_model, row, "aot", 0.3, label_smoothing=0.2)
        assert float(objective(policy, row, ref).loss.detach()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Objective behaviour
# --------------------------------------------------------------------------------------------------


def test_one_concatenated_forward_each_for_policy_and_reference(setup):
    policy, ref_model, batch = setup
    shapes = []
    handle = policy.register_forward_hook(
        lambda m, args, kwargs, out: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        ref = CountingReference(ref_model)
        out = build_objective({"name": "dpo", "shared_prompt": False})(policy, batch, ref)
    finally:
        handle.remove()
    width = max(batch.input_ids.shape[1], batch.other_input_ids.shape[1])
    assert shapes == [torch.Size([2 * batch.size, width])]
    assert ref.calls == 1
    assert {
        "rewards/margin/forward",
        "rewards/margin/reverse",
        "logps/chosen/reverse",
        "loss/forward",
    } <= set(out.metrics)


def test_cached_reference_skips_the_reference_forward(setup):
    policy, ref_model, batch = setup
    b = copy.copy(batch)
    b.ref_chosen_logps, b.ref_rejected_logps = reference_logps(FrozenCopyReference(ref_model), batch)
    ref = CountingReference(ref_model)
    cached = build_objective({"name": "dpo"})(policy, b, ref)
    online = build_objective({"name": "dpo"})(policy, batch, FrozenCopyReference(ref_model))
    assert ref.calls == 0
    assert float(cached.loss.detach()) == pytest.approx(float(online.loss.detach()), rel=1e-5)


def test_missing_reference_is_a_clear_error(setup):
    policy, _, batch = setup
    with pytest.raises(ValueError, match="dpo needs reference log-probs"):
        build_objective({"name": "dpo"})(policy, batch, None)


def test_reference_equal_to_policy_gives_log2_and_zero_rewards(setup):
    policy, _, batch = setup
    out = build_objective({"name": "dpo"})(policy, batch, FrozenCopyReference(policy))
    assert float(out.loss.detach()) == pytest.approx(math.log(2.0), abs=1e-6)
    assert out.metrics["rewards/margin"] == pytest.approx(0.0, abs=1e-6)


def test_training_raises_the_margin():
    policy, batch = tiny_lm(seed=0), make_batch(seed=5)
    ref = FrozenCopyReference(policy)
    objective = build_objective({"name": "dpo", "beta": 0.5})
    first, out = train_steps(objective, policy, batch, ref)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert out.metrics["rewards/margin"] > 1.0
    assert out.metrics["rewards/accuracy"] == 1.0
    assert out.metrics["loss"] < 0.5 * math.log(2.0)


def test_shared_prompt_scores_each_pair_in_one_row_with_the_same_loss_and_gradients(setup):
    """Default DPO packs [x, y+, y−] per pair (B rows, one prompt copy each) and equals the concatenated
    batch (2B rows) in loss, gradients and the reference's log-probs."""
    model, ref_model, batch = setup
    policy, twin = copy.deepcopy(model), copy.deepcopy(model)  # fresh grads; the hook on one only
    shapes = []
    handle = policy.register_forward_hook(
        lambda m, args, kwargs, out: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        shared = build_objective({"name": "dpo"})(policy, batch, FrozenCopyReference(ref_model))
    finally:
        handle.remove()
    plain = build_objective({"name": "dpo", "shared_prompt": False})(
        twin, batch, FrozenCopyReference(ref_model)
    )
    prompts = [int((row != -100).nonzero()[0]) for row in batch.labels]
    n_c = (batch.labels != -100).sum(-1)
    n_r = (batch.other_labels != -100).sum(-1)
    assert shapes == [
        torch.Size([batch.size, max(p + int(c) + int(r) for p, c, r in zip(prompts, n_c, n_r))])
    ]
    assert float(shared.loss) == pytest.approx(float(plain.loss), rel=1e-5, abs=1e-6)
    for k in ("logps/chosen", "logps/rejected", "rewards/margin"):
        assert shared.metrics[k] == pytest.approx(plain.metrics[k], rel=1e-5, abs=1e-4)
    shared.loss.backward()
    plain.loss.backward()
    for (n, p), q in zip(policy.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    ipo = build_objective({"name": "dpo", "loss_type": "ipo"})(policy, batch, FrozenCopyReference(ref_model))
    ipo_plain = build_objective({"name": "dpo", "loss_type": "ipo", "shared_prompt": False})(
        twin, batch, FrozenCopyReference(ref_model)
    )
    # length-normalised counts
    assert float(ipo.loss) == pytest.approx(float(ipo_plain.loss), rel=1e-5, abs=1e-6)


def test_shared_prompt_falls_back_when_the_pair_does_not_share_its_prompt(setup):
    policy, ref_model, batch = setup
    b = copy.copy(batch)
    b.other_input_ids = batch.other_input_ids.clone()
    b.other_input_ids[0, 0] = (b.other_input_ids[0, 0] + 1) % 40 + 1  # another prompt for pair 0
    shapes = []
    handle = policy.register_forward_hook(
        lambda m, args, kwargs, out: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        build_objective({"name": "dpo"})(policy, b, FrozenCopyReference(ref_model))
    finally:
        handle.remove()
    assert shapes[0][0] == 2 * batch.size  # the concatenated batch: no pair is packed


def test_shared_prompt_only_where_the_training_loop_allows_it(setup):
    """The objective does not inspect the model: without ``batch.policy_forward.shared_prompt`` it scores
    the concatenated batch, and a reference that declares no shared-prompt support gets that batch too."""
    policy, ref_model, batch = setup
    shapes = []
    handle = policy.register_forward_hook(
        lambda m, args, kwargs, out: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        b = copy.copy(batch)
        b.policy_forward = PolicyForward()
        build_objective({"name": "dpo"})(policy, b, FrozenCopyReference(ref_model))
        ref = CountingReference(ref_model)
        shared = build_objective({"name": "dpo"})(policy, batch, ref)
    finally:
        handle.remove()
    assert [s[0] for s in shapes] == [2 * batch.size, batch.size]  # then packed for the policy only
    assert ref.calls == 1
    plain = build_objective({"name": "dpo", "shared_prompt": False})(
        policy, batch, FrozenCopyReference(ref_model)
    )
    assert float(shared.loss) == pytest.approx(float(plain.loss), rel=1e-5, abs=1e-6)


def test_shared_prompt_needs_a_mask_aware_attention_and_works_through_wrappers_and_lora(setup):
    from revmix.objectives.buckets import LengthBucketedLM
    from revmix.objectives.prefix import supports_shared_prompt
    from revmix.objectives.reference import AdapterDisabledReference
    from revmix.platform.models import LoraSpec, apply_lora

    model, _, batch = setup
    assert supports_shared_prompt(model) and FrozenCopyReference(model).shared_prompt
    flash = copy.deepcopy(model)
    flash.config._attn_implementation = "flash_attention_2"  # ignores custom 4-D masks
    assert not supports_shared_prompt(flash)
    assert not FrozenCopyReference(flash).shared_prompt  # a reference declares what its model allows

    torch.manual_seed(0)
    lora = apply_lora(copy.deepcopy(model), LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    assert supports_shared_prompt(lora)  # so the shared path below really runs on the LoRA model
    assert AdapterDisabledReference(lora, 2).shared_prompt
    grouped = copy.copy(batch)  # what the loop hands objectives that forward through the wrapper
    grouped.policy_forward = PolicyForward(shared_prompt=True, length_groups=3)
    losses = [
        float(
            build_objective({"name": "dpo", "shared_prompt": s})(
                wrap, b, AdapterDisabledReference(lora, 2)
            ).loss
        )
        for s in (True, False)
        for wrap, b in ((lora, batch), (LengthBucketedLM(lora, 3), grouped))
    ]
    assert losses == pytest.approx([losses[0]] * 4, rel=1e-5, abs=1e-6)
    assert losses[0] != pytest.approx(0.6931, abs=1e-3)
