"""Rows over ``data.max_length``: ``truncate`` cuts the response, ``drop`` leaves the row out, ``error``
refuses the data naming ``FILE:LINE`` and the lengths; rows and tokens lost are counted per direction,
printed in one line and put in summary.json's ``data`` block. No Ray: tokenise/prepare level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revmix.cli import main
from revmix.config import load_config
from revmix.platform.data.loaders import DataError
from revmix.platform.data.prepare import prepare_data
from revmix.platform.data.synthetic import generate_mix, split_by_item
from revmix.platform.data.tokenize import chat_prompt_ids, tokenise_checked, tokenise_rows
from revmix.platform.models import load_tokenizer, resolve_model_path
from revmix.platform.storage import Store
from revmix.platform.train import _prepare_inputs, _summary_head

ROOT = Path(__file__).resolve().parents[3]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"
MAX = 200  # the affine_mod rows here need at most 44 + 105 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None, "tiny"))


def _lengths(tokenizer, row: dict) -> tuple[int, int, int]:
    """(prompt, response + EOS, other_response + EOS) token counts, computed here independently."""
    p = len(chat_prompt_ids(tokenizer, row["prompt"]))
    y = len(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) + 1
    o = len(tokenizer(row["other_response"], add_special_tokens=False)["input_ids"]) + 1
    return p, y, o


def _rows(n_items: int = 10, long_at: tuple[int, ...] = (0, 3)) -> list[dict]:
    """Forward/reverse rows whose responses at ``long_at`` get 300 more words (over MAX tokens; the
    twin's ``other_response`` is its own copy of the text, so it stays short)."""
    rows = generate_mix(["affine_mod"], n_items, seed=0)
    for i in long_at:
        rows[i]["response"] += " word" * 300
    return rows


@pytest.mark.parametrize("policy", ["truncate", "drop", "error"])
def test_tokenise_checked_follows_the_policy_and_counts_what_is_lost(tokenizer, policy):
    rows = _rows(long_at=(1, 4))
    lengths = [_lengths(tokenizer, r) for r in rows]
    over = [i for i, (p, y, o) in enumerate(lengths) if max(y, o) > MAX - p]
    assert over == [1, 4]
    done = tokenise_checked(rows, tokenizer, MAX, truncation=policy)
    if policy == "truncate":
        assert len(done.rows) == len(rows) and done.truncated == 2 and not done.dropped
        cut = sum(max(0, y - (MAX - p)) + max(0, o - (MAX - p)) for p, y, o in lengths)
        assert done.truncated_tokens == cut > 0
        assert all(len(r["prompt_ids"]) + len(r["response_ids"]) <= MAX for r in done.rows)
    elif policy == "drop":
        assert [r["row_index"] for r in done.rows] == [i for i in range(len(rows)) if i not in over]
        assert done.dropped == over and done.truncated == 0
        assert done.dropped_tokens == sum(sum(lengths[i]) for i in over)
    else:
        assert [i for i, _ in done.over_length] == over and len(done.rows) == len(rows) - 2
        p, y, o = lengths[1]
        why = done.over_length[0][1]
        assert why.startswith(
            f"prompt {p} + response {y} / other_response {o} tokens (with chat template and EOS) exceed "
            f"data.max_length {MAX} (data.truncation=error"
        )
        assert why.endswith(f"raise data.max_length to {p + max(y, o)})")
        with pytest.raises(
            ValueError, match=rf"row 1 \(item {rows[1]['item_id']}\): prompt {lengths[1][0]} \+"
        ):
            tokenise_rows(rows, tokenizer, MAX, truncation="error")


def test_an_unknown_policy_lists_the_valid_ones(tokenizer):
    with pytest.raises(ValueError, match="unknown truncation 'cut'; valid: truncate, drop, error"):
        tokenise_checked(_rows(), tokenizer, MAX, truncation="cut")


def _long_training_rows(tmp_path: Path) -> tuple[Path, list[dict], list[int]]:
    """A JSONL file with two long forward training rows; returns the file, rows and their line numbers."""
    rows = generate_mix(["affine_mod"], 10, seed=0)
    _, test = split_by_item(rows, 0.2, seed=0)  # sft_tiny's test_fraction and seed
    held_out = {r["item_id"] for r in test}
    long = [i for i, r in enumerate(rows) if r["item_id"] not in held_out and r["direction"] == "forward"][:2]
    for i in long:
        rows[i]["response"] += " word" * 300
    f = tmp_path / "d" / "rows.jsonl"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f, rows, [i + 1 for i in long]


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_prepare_with_error_names_file_line_and_lengths(tmp_path, tokenizer, skip_invalid):
    f, rows, lines = _long_training_rows(tmp_path)
    cfg = load_config(SFT, [f"data.source={f}", "data.truncation=error", f"data.skip_invalid={skip_invalid}"])
    with pytest.raises(DataError) as info:
        prepare_data(cfg.data, tokenizer)
    assert [(p.file, p.line, p.field) for p in info.value.problems] == [
        (str(f), n, "response") for n in lines
    ]
    p, y, _ = _lengths(tokenizer, rows[lines[0] - 1])
    assert f"{f}:{lines[0]}: response: prompt {p} + response {y} / other_response" in str(info.value)
    assert "exceed data.max_length 256" in str(info.value)


def test_prepare_counts_per_direction_prints_one_line_and_fills_the_summary(tmp_path, tokenizer, capsys):
    f, rows, lines = _long_training_rows(tmp_path)
    cfg = load_config(SFT, [f"data.source={f}", "data.truncation=drop"])
    data = prepare_data(cfg.data, tokenizer)
    assert [len(data.train[d]) for d in ("forward", "reverse")] == [8 - 2, 8]
    lost = sum(sum(_lengths(tokenizer, rows[n - 1])) for n in lines)  # every token of the dropped rows
    assert data.dropped == {"forward": {"rows": 2, "tokens": lost}, "reverse": {"rows": 0, "tokens": 0}}
    assert data.truncated == {d: {"rows": 0, "tokens": 0} for d in ("forward", "reverse")}
    path_line, *length_line = capsys.readouterr().out.strip().splitlines()
    assert path_line.startswith("data: 16 training rows <= data.stream_threshold_rows 200000: tokenised in ")
    assert length_line == [
        "data: max_length 256, truncation=drop: "
        f"forward 0 rows truncated (0 tokens cut), 2 dropped ({lost} tokens); "
        "reverse 0 rows truncated (0 tokens cut), 0 dropped (0 tokens)"
    ]

    cfg = load_config(SFT, [f"data.source={f}"])  # the default: truncate
    summary = _summary_head(cfg, Store(tmp_path / "out"), _prepare_inputs(cfg, evaluate=False))["data"]
    cut = 0
    for n in lines:
        p, y, _ = _lengths(tokenizer, rows[n - 1])
        cut += y - (256 - p)
    assert summary["truncated"] == {
        "forward": {"rows": 2, "tokens": cut},
        "reverse": {"rows": 0, "tokens": 0},
    }
    assert summary["dropped"] == {d: {"rows": 0, "tokens": 0} for d in ("forward", "reverse")}
    assert summary["train_rows"] == {"forward": 8, "reverse": 8}


def test_revmix_train_refuses_before_writing_anything(tmp_path, capsys):
    f, _, lines = _long_training_rows(tmp_path)
    out = tmp_path / "out"
    code = main(["train", str(SFT), f"data.source={f}", "data.truncation=error", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{f}:{lines[0]}: response: prompt" in err and "Traceback" not in err
    assert not out.exists()
