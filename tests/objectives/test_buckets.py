"""Length-grouped forward passes: the optimal grouping by hand, and the same logits, losses and
gradients as one padded pass (directly, through the wrapper, and through the references)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from revmix.objectives.base import PolicyForward, build_objective, token_logps
from revmix.objectives.buckets import LengthBucketedLM, bucketed_logits, is_right_padded, length_buckets
from revmix.objectives.reference import AdapterDisabledReference, FrozenCopyReference
from revmix.platform.models import LoraSpec, apply_lora, load_model, resolve_model_path
from tests.objectives.helpers import make_batch


def area(lengths: list[int], groups: list[list[int]]) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def test_length_buckets_minimise_the_padded_area():
    lengths = [10, 3, 9, 2, 4]
    # sorted: 2(3) 3(1) 4(4) 9(2) 10(0); two groups: {2,3,4} × 4 + {9,10} × 10 = 12 + 20 = 32
    assert length_buckets(lengths, 2) == [[3, 1, 4], [2, 0]]
    assert area(lengths, length_buckets(lengths, 2)) == 32
    assert area(lengths, length_buckets(lengths, 1)) == 50  # one padded pass: 5 × 10
    # three groups: {2,3} × 3 + {4} × 4 + {9,10} × 10 = 30, tied with {2} × 2 + {3,4} × 4 + {9,10} × 10
    assert area(lengths, length_buckets(lengths, 3)) == 30 and len(length_buckets(lengths, 3)) == 3
    assert length_buckets([5, 5, 5], 3) == [[0, 1, 2]]  # extra groups that save nothing are not used
    assert length_buckets([], 2) == [] and length_buckets([7], 4) == [[0]]
    with pytest.raises(ValueError, match="k must be >= 1"):
        length_buckets([1], 0)


def test_length_buckets_agree_with_brute_force():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 7))]
        srt = sorted(lengths)
        n = len(srt)
        best = min(
            sum((b - a) * srt[b - 1] for a, b in zip((0, *cuts), (*cuts, n)))
            for r in range(0, 2)
            for cuts in itertools.combinations(range(1, n), r)
        )
        assert area(lengths, length_buckets(lengths, 2)) == best


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return apply_lora(load_model(resolve_model_path(None, "tiny")), LoraSpec(r=4, alpha=8)).eval()


def ragged(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids/mask/labels with very different lengths (3 .. 40 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 40, 7, 38, 12, 5][:n]
    width = max(lengths)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, :length] = torch.randint(3, 500, (length,), generator=gen)
        mask[i, :length] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a short "prompt"
    return ids, mask, labels


def test_bucketed_logits_equal_one_padded_pass_on_real_tokens(model):
    ids, mask, labels = ragged()
    full = model(input_ids=ids, attention_mask=mask).logits
    for k in (2, 3, 6):
        got = bucketed_logits(model, ids, mask, k)
        assert got.shape == full.shape
        real = mask.bool()
        assert torch.allclose(got[real], full[real], atol=1e-5)
        lp_full, _ = token_logps(full, labels)
        lp_got, _ = token_logps(got, labels)
        assert torch.allclose(lp_got, lp_full, atol=1e-5)


def test_left_padding_and_single_rows_fall_back_to_one_pass(model):
    ids, mask, _ = ragged()
    left_mask = mask.flip(1)
    assert is_right_padded(mask) and not is_right_padded(left_mask)
    left_ids = ids.flip(1)
    full = model(input_ids=left_ids, attention_mask=left_mask).logits
    assert torch.equal(bucketed_logits(model, left_ids, left_mask, 3), full)
    one = model(input_ids=ids[:1], attention_mask=mask[:1]).logits
    assert torch.equal(bucketed_logits(model, ids[:1], mask[:1], 3), one)


@pytest.mark.parametrize("objective", ["sft", "dpo", "unlikelihood"])
def test_wrapper_gives_the_same_loss_and_gradients(model, objective):
    batch = make_batch(seed=3, batch_size=6)
    obj = build_objective({"name": objective})
    plain = copy.deepcopy(model).train()
    wrapped_inner = copy.deepcopy(model).train()
    wrapped = LengthBucketedLM(wrapped_inner, 3)
    ref_plain = AdapterDisabledReference(plain) if obj.needs_reference else None
    ref_wrapped = AdapterDisabledReference(wrapped_inner, length_groups=3) if obj.needs_reference else None
    # As the training loop decides for this (sdpa) model: shared-prompt rows, in 3 groups with the wrapper.
    shared = PolicyForward(shared_prompt=True)
    out_plain = obj(plain, dataclasses.replace(batch, policy_forward=shared), ref_plain)
    grouped = dataclasses.replace(shared, length_groups=3)
    out_wrapped = obj(wrapped, dataclasses.replace(batch, policy_forward=grouped), ref_wrapped)
    assert float(out_wrapped.loss) == pytest.approx(float(out_plain.loss), rel=1e-5, abs=1e-5)
    out_plain.loss.backward()
    out_wrapped.loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in wrapped_inner.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_references_with_buckets_equal_one_pass(model):
    ids, mask, labels = ragged()
    for ref_cls in (AdapterDisabledReference, FrozenCopyReference):
        one = token_logps(ref_cls(model).logits(ids, mask), labels)[0]
        grouped = token_logps(ref_cls(model, length_groups=3).logits(ids, mask), labels)[0]
        assert torch.allclose(one, grouped, atol=1e-5)


def test_wrapper_passes_other_keywords_straight_through(model):
    ids, mask, _ = ragged(3)
    out = LengthBucketedLM(model, 2)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert out.hidden_states is not None  # the model's own output, not the bucketed logits
