"""collate: right padding, labels on the response only, and the same batch whether a row's token fields
are lists (tokenised in memory) or numpy arrays (streamed from Parquet)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from revmix.platform.data.tokenize import collate, pad_prompt_response, token_list

PAD, X = 0, -100  # pad id; IGNORE_INDEX


def row(prompt: list[int], response: list[int], other: list[int], direction: int = 0) -> dict:
    return {
        "item_id": f"i{len(prompt)}",
        "direction": direction,
        "task": "t",
        "answer": None,
        "prompt_ids": prompt,
        "response_ids": response,
        "other_ids": other,
    }


ROWS = [row([5, 6], [7, 8, 9], [4]), row([3], [2], [11, 12, 13, 14], direction=1)]


def as_arrays(r: dict, dtype: type = np.int32) -> dict:
    return {k: np.array(v, dtype=dtype) if k.endswith("_ids") else v for k, v in r.items()}


def test_padding_mask_and_labels_by_hand() -> None:
    b = collate(ROWS, PAD)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [3, 2, PAD, PAD, PAD]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b.labels.tolist() == [[X, X, 7, 8, 9], [X, 2, X, X, X]]
    assert b.other_input_ids.tolist() == [[5, 6, 4, PAD, PAD], [3, 11, 12, 13, 14]]
    assert b.other_attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b.other_labels.tolist() == [[X, X, 4, X, X], [X, 11, 12, 13, 14]]
    assert b.direction.tolist() == [0, 1] and b.prompt_ids == [[5, 6], [3]]
    assert all(t.dtype == torch.long for t in (b.input_ids, b.attention_mask, b.labels))


@pytest.mark.parametrize("kinds", ["arrays", "mixed"])
def test_numpy_token_arrays_give_the_same_batch_as_lists(kinds: str) -> None:
    rows = [as_arrays(ROWS[0]), as_arrays(ROWS[1], np.int64) if kinds == "arrays" else ROWS[1]]
    got, want = collate(rows, PAD), collate(ROWS, PAD)
    for name in ("input_ids", "attention_mask", "labels", "other_input_ids", "other_labels"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.prompt_ids == want.prompt_ids and all(type(t) is int for p in got.prompt_ids for t in p)


def test_the_other_response_is_collated_only_when_every_row_has_one() -> None:
    b = collate([ROWS[0], as_arrays(row([1], [2], []))], PAD)
    assert b.other_input_ids is None and b.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, PAD, PAD, PAD]]
    assert collate(ROWS, PAD, with_other=False).other_input_ids is None


def test_token_list_gives_python_ints() -> None:
    assert token_list(np.array([1, 2], dtype=np.int32)) == [1, 2]
    assert type(token_list(np.array([7]))[0]) is int and token_list((3, 4)) == [3, 4]


def test_a_batch_mixing_lists_and_arrays_in_either_order_is_the_same_batch() -> None:
    empty_other = [row([1], [2], [])]
    for rows in ([as_arrays(ROWS[0]), ROWS[1]], [ROWS[0], as_arrays(ROWS[1])]):
        for extra in ([], empty_other, [as_arrays(empty_other[0])]):
            got, want = collate(rows + extra, PAD), collate(ROWS + empty_other[: len(extra)], PAD)
            assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
            assert got.input_ids.dtype == torch.long


def test_pad_prompt_response_right_pads_and_labels_the_response() -> None:
    """PPO's sampled responses go through the same padding as a batch of rows."""
    ids, mask, labels = pad_prompt_response([[5, 6], [7]], [[8, 9, 2], [3]], pad_id=0)
    assert ids.tolist() == [[5, 6, 8, 9, 2], [7, 3, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert labels.tolist() == [[X, X, 8, 9, 2], [X, 3, X, X, X]]
