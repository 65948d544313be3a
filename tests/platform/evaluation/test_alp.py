"""ALP: pure helpers on hand numbers, and alp_table against a hand-written forward pass on a tiny model."""

from __future__ import annotations

import pytest
import torch

from revmix.platform.data.schema import Row
from revmix.platform.evaluation.alp import (
    alp,
    alp_table,
    cross_direction_table,
    format_table,
    score_items,
    summarize,
)
from revmix.platform.evaluation.benchmarks import EvalItem
from revmix.platform.generation.hf import HFGenerator
from revmix.platform.generation.protocol import chat_prompt
from tests.platform.generation.helpers import varied_model_dir


def test_alp_mean_of_first_n() -> None:
    assert alp([-1.0, -2.0, -3.0], 2) == pytest.approx(-1.5)
    assert alp([-1.0, -2.0, -3.0]) == pytest.approx(-2.0)
    assert alp([-4.0], 1000) == -4.0
    assert alp([]) is None
    with pytest.raises(ValueError, match="n_tokens"):
        alp([-1.0], 0)


def test_summarize_by_direction() -> None:
    records = [
        {"id": "a", "direction": "forward", "chosen": -1.0, "rejected": -3.0, "margin": 2.0},
        {"id": "b", "direction": "forward", "chosen": -2.0, "rejected": -2.5, "margin": 0.5},
        {"id": "c", "direction": "reverse", "chosen": -4.0, "rejected": -1.0, "margin": -3.0},
    ]
    table = summarize(records)
    assert table["forward"] == {"chosen": -1.5, "rejected": -2.75, "margin": 1.25, "n": 2}
    assert table["reverse"] == {"chosen": -4.0, "rejected": -1.0, "margin": -3.0, "n": 1}
    assert summarize([])["forward"] == {"chosen": None, "rejected": None, "margin": None, "n": 0}


def test_cross_direction_table_rows_and_markdown() -> None:
    fwd = {
        "forward": {"chosen": -1.0, "rejected": -2.0, "margin": 1.0, "n": 3},
        "reverse": {"chosen": -3.0, "rejected": -2.0, "margin": -1.0, "n": 3},
    }
    rev = {
        "forward": {"chosen": None, "rejected": None, "margin": None, "n": 0},
        "reverse": {"chosen": -0.5, "rejected": -1.5, "margin": 1.0, "n": 2},
    }
    rows = cross_direction_table({"train=forward": fwd, "train=reverse": rev})
    assert [(r["train"], r["test"], r["margin"], r["n"]) for r in rows] == [
        ("train=forward", "forward", 1.0, 3),
        ("train=forward", "reverse", -1.0, 3),
        ("train=reverse", "forward", None, 0),
        ("train=reverse", "reverse", 1.0, 2),
    ]
    md = format_table(rows)
    assert "| train=forward | forward | -1.0000 | -2.0000 | 1.0000 | 3 |" in md
    assert "| train=reverse | forward | — | — | — | 0 |" in md


def _hand_alp(model, tok, question: str, completion: str, n: int) -> float:
    """ALP by hand: chat-template the question, one forward pass, log-softmax, gather, mean of first n."""
    p = tok(chat_prompt(tok, question), add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"][:n]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c)) / len(c)


@pytest.fixture(scope="module")
def gen() -> HFGenerator:
    return HFGenerator(varied_model_dir(), batch_size=3)


def test_alp_table_matches_hand_computation(gen: HFGenerator) -> None:
    items = [
        EvalItem(
            "1/f",
            "What is 3 + 4?",
            "7",
            "exact",
            "forward",
            "t",
            "3 + 4 = 7. Answer: 7",
            "7 - 4 = 3. Answer: 3",
        ),
        EvalItem("2/f", "What is 2 * 6?", "12", "exact", "forward", "t", "2 * 6 = 12", "12 / 6 = 2"),
        EvalItem(
            "1/r",
            "The sum is 7 and one term is 4. Other?",
            "3",
            "exact",
            "reverse",
            "t",
            "7 - 4 = 3. Answer: 3",
            "3 + 4 = 7. Answer: 7",
        ),
        EvalItem("x", "no twin", "1", "exact", "forward", "t", "1", None),  # skipped: no y−
    ]
    n = 5
    table = alp_table(gen, items, n_tokens=n)
    model, tok = gen.model, gen.tokenizer
    hand = {
        it.id: (
            _hand_alp(model, tok, it.prompt, it.response, n),
            _hand_alp(model, tok, it.prompt, it.other_response, n),
        )
        for it in items[:3]
    }
    fwd = [hand["1/f"], hand["2/f"]]
    assert table["forward"]["n"] == 2 and table["reverse"]["n"] == 1
    assert table["forward"]["chosen"] == pytest.approx(sum(c for c, _ in fwd) / 2, rel=1e-5, abs=1e-5)
    assert table["forward"]["rejected"] == pytest.approx(sum(r for _, r in fwd) / 2, rel=1e-5, abs=1e-5)
    assert table["forward"]["margin"] == pytest.approx(
        table["forward"]["chosen"] - table["forward"]["rejected"], rel=1e-6, abs=1e-6
    )
    assert table["reverse"]["chosen"] == pytest.approx(hand["1/r"][0], rel=1e-5, abs=1e-5)
    assert table["reverse"]["margin"] == pytest.approx(hand["1/r"][0] - hand["1/r"][1], rel=1e-5, abs=1e-5)


def test_alp_table_accepts_rows_and_in_memory_model(gen: HFGenerator) -> None:
    rows = [
        Row("i1", "forward", "t", "What is 3 + 4?", "3 + 4 = 7", "7 - 4 = 3", "7"),
        Row("i1", "reverse", "t", "Sum 7, one term 4; other?", "7 - 4 = 3", "3 + 4 = 7", "3"),
    ]
    by_model = alp_table(gen.model, rows, n_tokens=1000, tokenizer=gen.tokenizer)
    by_gen = alp_table(gen, rows)
    for d in ("forward", "reverse"):  # batch composition differs (16 vs 3 rows): float rounding only
        assert by_model[d] == pytest.approx(by_gen[d], rel=1e-5, abs=1e-5)
    records = score_items(gen, rows)
    assert [r["id"] for r in records] == ["i1", "i1"] and [r["direction"] for r in records] == [
        "forward",
        "reverse",
    ]
