"""Packing several rows per sequence (revmix.objectives.packing): the same losses, gradients and metrics as
right-padded rows, no attention across rows, restarted positions, and the loop's choice of layout."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from revmix.objectives.base import IGNORE_INDEX, Batch, PolicyForward, build_objective
from revmix.objectives.fixtures import VOCAB, pack
from revmix.objectives.packing import (
    first_fit_decreasing,
    pack_padded,
    pack_rows,
    packing_mode,
    response_logps,
)
from tests.objectives.helpers import _sft_value, _unlikelihood_value, tiny_lm

MODES = ("mask", "varlen")  # "varlen" on sdpa: transformers reads the row boundaries off position_ids


def _mixed_batch(seed: int, with_other: bool) -> Batch:
    """Rows of 4 to 17 tokens (both directions), so first-fit packs several rows per sequence."""
    g = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    prompts = [rand(n) for n in (2, 3, 5, 2, 4, 3)]
    responses = [rand(n) for n in (2, 12, 3, 15, 1, 6)]
    ids, mask, labels = pack(prompts, responses)
    batch = Batch(ids, mask, labels, direction=torch.tensor([0, 1, 0, 1, 1, 0]), prompt_ids=prompts)
    if with_other:
        others = [rand(n) for n in (3, 2, 9, 4, 2, 7)]
        batch.other_input_ids, batch.other_attention_mask, batch.other_labels = pack(prompts, others)
    return batch


def _packed(batch: Batch, mode: str) -> Batch:
    return dataclasses.replace(batch, policy_forward=PolicyForward(packing=mode))  # type: ignore[arg-type]


def _loss_and_grads(spec: dict, batch: Batch) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    model = tiny_lm()
    out = build_objective(spec)(model, batch, None)
    out.loss.backward()
    return float(out.loss.detach()), out.metrics, [p.grad.clone() for p in model.parameters()]


def _assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        scale = float(w.abs().max())  # float32 rounding scales with the gradient's size
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5 * max(scale, 1e-6)), float((g - w).abs().max())


def test_first_fit_decreasing_by_hand():
    # Longest first into the first bin with room (capacity 8): 6→A, 5→B, 4→C, 3→B (full), 2→A (full).
    assert first_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert first_fit_decreasing([], 8) == []
    with pytest.raises(ValueError, match="exceeds capacity 8"):
        first_fit_decreasing([9, 1], 8)


def test_pack_rows_positions_labels_and_mask_by_hand():
    rows = [
        (torch.tensor([11, 12, 13]), torch.tensor([IGNORE_INDEX, 12, 13])),
        (torch.tensor([21, 22]), torch.tensor([21, 22])),  # a label on its first token: never a target
        (torch.tensor([31, 32, 33, 34]), torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 33, 34])),
    ]
    p = pack_rows(rows, max_tokens=5)  # longest first: row 2 alone (then a pad), rows 0 and 1 together
    assert p.input_ids.tolist() == [[31, 32, 33, 34, 0], [11, 12, 13, 21, 22]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]  # restart at every row
    x = IGNORE_INDEX
    assert p.labels.tolist() == [[x, x, 33, 34, x], [x, 12, 13, x, 22]]
    assert p.attention_mask is not None and p.attention_mask.shape == (2, 1, 5, 5)
    for seq, segment in enumerate(([2, 2, 2, 2, -1], [0, 0, 0, 1, 1])):
        want = [[int(segment[i] == segment[j] and j <= i) for j in range(5)] for i in range(5)]
        assert p.attention_mask[seq, 0].int().tolist() == want
    # Unpacking puts each row's targets back at their padded positions: packed target index k of
    # sequence s is value 4 s + k; row 1's single target (22) sits at index 3 of sequence 1.
    values = torch.arange(8.0).reshape(2, 4)  # [P, W-1]
    assert p.unpack(values, 5).tolist() == [[4.0, 5.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.0]]
    assert pack_rows(rows, max_tokens=5, block_mask=False).attention_mask is None


def test_pack_padded_bins_as_wide_as_the_longest_row():
    batch = _mixed_batch(seed=0, with_other=False)
    lengths = batch.attention_mask.sum(-1).tolist()
    p = pack_padded(batch.input_ids, batch.attention_mask, batch.labels, "mask")
    assert p.input_ids.shape[1] == max(lengths)
    assert p.input_ids.shape[0] < batch.size  # fewer sequences than rows
    v = pack_padded(batch.input_ids, batch.attention_mask, batch.labels, "varlen")
    assert v.input_ids.shape == (1, sum(lengths)) and v.attention_mask is None
    with pytest.raises(ValueError, match="right-padded"):
        pack_padded(batch.input_ids.flip(1), batch.attention_mask.flip(1), batch.labels.flip(1), "mask")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sft_packed_equals_padded(mode: str, smoothing: float):
    batch = _mixed_batch(seed=3, with_other=False)
    # Lengths 4, 15, 8, 17, 5, 9 in bins of 17: [17], [15], [9, 8], [5, 4] — 4 sequences for 6 rows.
    assert pack_padded(batch.input_ids, batch.attention_mask, batch.labels, "mask").input_ids.shape[0] == 4
    spec = {"name": "sft", "label_smoothing": smoothing}
    loss, metrics, grads = _loss_and_grads(spec, batch)
    p_loss, p_metrics, p_grads = _loss_and_grads(spec, _packed(batch, mode))
    assert p_loss == pytest.approx(loss, rel=1e-5, abs=1e-6)
    if not smoothing:  # and both equal the mean NLL from one unpadded float64 pass per row
        assert p_loss == pytest.approx(_sft_value(tiny_lm(), batch, None), rel=1e-5, abs=1e-6)
    assert p_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert p_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    _assert_grads_close(p_grads, grads)


@pytest.mark.parametrize("mode", MODES)
def test_unlikelihood_packed_equals_padded(mode: str):
    batch = _mixed_batch(seed=5, with_other=True)
    spec = {"name": "unlikelihood", "alpha": 0.5}
    loss, metrics, grads = _loss_and_grads(spec, batch)
    p_loss, p_metrics, p_grads = _loss_and_grads(spec, _packed(batch, mode))
    assert p_loss == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert p_loss == pytest.approx(_unlikelihood_value(tiny_lm(), batch, None, alpha=0.5), rel=1e-5, abs=1e-6)
    for key, value in metrics.items():
        assert p_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    _assert_grads_close(p_grads, grads)


def _row_logps(model: torch.nn.Module, batch: Batch, mode: str) -> torch.Tensor:
    with torch.no_grad():
        logp, _ = response_logps(model, batch.input_ids, batch.attention_mask, batch.labels, mode)  # type: ignore[arg-type]
    return logp


@pytest.mark.parametrize("mode", MODES)
def test_packed_rows_do_not_attend_to_each_other(mode: str):
    # Rows 0 and 1 share a packed sequence (lengths 4 and 5 fit a bin of the longest row, 10).
    prompts, responses = [[5, 6], [7, 8, 9], [3] * 4], [[10, 11], [12, 13], [14] * 6]
    ids, mask, labels = pack(prompts, responses)
    batch = Batch(ids, mask, labels, direction=torch.zeros(3, dtype=torch.long))
    assert pack_padded(ids, mask, labels, "mask").input_ids.shape[0] == 2
    model = tiny_lm()
    before = _row_logps(model, batch, mode)
    changed = batch.input_ids.clone()
    changed[0, :4] = torch.tensor([VOCAB - 1, VOCAB - 2, VOCAB - 3, VOCAB - 4])  # all of row 0
    after = _row_logps(model, dataclasses.replace(batch, input_ids=changed), mode)
    assert not torch.allclose(after[0], before[0])  # row 0's own log-probs do change ...
    assert torch.equal(after[1:], before[1:])  # ... and nobody else's
    # Control: the same packed sequence under a plain causal mask lets row 0 leak into row 1.
    packed = pack_padded(changed, mask, labels, "mask")
    leak = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits
    blocked = model(
        input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids
    )
    assert not torch.allclose(leak, blocked.logits)


def test_packing_mode_from_the_attention_kernel():
    def model(attn: str) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn))

    assert packing_mode(model("sdpa")) == "mask"
    assert packing_mode(model("eager")) == "mask"
    assert packing_mode(model("flash_attention_2")) == "varlen"
    with pytest.raises(ValueError, match="'flex_attention' is not one of sdpa, eager, flash_attention_2"):
        packing_mode(model("flex_attention"))


def test_loop_decides_packing_once():
    from revmix.platform.recipe import policy_forward

    model = tiny_lm()
    assert model.config._attn_implementation == "sdpa"
    assert policy_forward(model, length_groups=2, world=1).packing == "off"
    assert policy_forward(model, length_groups=2, world=1, packing=True).packing == "mask"
