"""Reward registry: answer checking, format, the direction penalty, weighted sums and loud config errors."""

from __future__ import annotations

import pytest

from revmix.platform.rollout.rewards import (
    Sample,
    build_reward,
    has_answer_line,
    register_reward,
    reward_names,
)

SOLVED = "2*0 = 0\n0 + 3 = 3\n3 mod 7 = 3\nAnswer: 3"


def sample(
    completion: str, answer: str | None = "3", other: str | None = None, task: str = "synthetic/affine_mod"
):
    return Sample(
        completion=completion, answer=answer, task=task, direction=0, other_answer=other, item_id="i1"
    )


def test_correct_checks_the_final_answer():
    fn = build_reward("correct")
    assert fn(sample(SOLVED)) == 1.0
    assert fn(sample(SOLVED.replace("Answer: 3", "Answer: 4"))) == 0.0
    assert fn(sample("garbage with no answer")) == 0.0
    # auto kind: non-synthetic tasks compare as maths (1/2 == 0.5), synthetic ones exactly.
    assert fn(sample("Answer: 1/2", answer="0.5", task="gsm8k")) == 1.0
    assert build_reward({"name": "correct", "kind": "integer"})(sample("Answer: 025", answer="25")) == 1.0
    assert fn(sample("Answer: 03", answer="3")) == 0.0  # exact for synthetic/*


def test_correct_without_gold_answer_names_the_row():
    with pytest.raises(ValueError, match="row 'i1'.*has none"):
        build_reward("correct")(sample(SOLVED, answer=None))


def test_format_wants_a_final_answer_line():
    fn = build_reward("format")
    assert fn(sample(SOLVED)) == 1.0
    assert fn(sample(SOLVED + "\n\n  ")) == 1.0
    assert fn(sample("Answer: 3\nmore text after it")) == 0.0
    assert fn(sample("Answer:")) == 0.0
    assert fn(sample("")) == 0.0
    assert has_answer_line("x\nanswer : 12")


def test_direction_penalises_the_twins_answer_only():
    fn = build_reward({"name": "direction", "penalty": 0.5})
    # Reverse row "Given y = 3, find x" (gold x = 0); its forward twin's answer is 3.
    assert fn(sample("Answer: 3", answer="0", other="3")) == -0.5
    assert fn(sample("Answer: 0", answer="0", other="3")) == 0.0
    assert fn(sample("Answer: 5", answer="0", other="3")) == 0.0
    assert fn(sample("Answer: 4", answer="4", other="4")) == 0.0  # a fixed point x = f(x): not a mistake
    assert fn(sample("Answer: 3", answer="0", other=None)) == 0.0  # no twin


def test_weighted_sum():
    fn = build_reward(
        {
            "name": "sum",
            "terms": [{"name": "correct", "weight": 1}, {"name": "format", "weight": 0.1}, "direction"],
        }
    )
    assert fn(sample(SOLVED, other="0")) == pytest.approx(1.1)
    assert fn(sample("Answer: 0", other="0")) == pytest.approx(0.1 - 1.0)
    assert fn(sample("no answer", other="0")) == pytest.approx(0.0)


def test_errors_name_the_path_and_the_choices():
    with pytest.raises(
        ValueError, match=r"objective.reward.name: unknown reward 'corect'; valid rewards: .*correct"
    ):
        build_reward("corect")
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['weight'\] for reward 'format'; valid keys: \(none\)"
    ):
        build_reward({"name": "format", "weight": 1})
    with pytest.raises(ValueError, match=r"objective.reward.terms.1.weight: expected a number"):
        build_reward({"name": "sum", "terms": ["correct", {"name": "format", "weight": "high"}]})
    with pytest.raises(ValueError, match=r"objective.reward.terms.0.name: unknown reward 'nope'"):
        build_reward({"name": "sum", "terms": [{"name": "nope"}]})
    with pytest.raises(ValueError, match="non-empty list of terms"):
        build_reward({"name": "sum"})
    with pytest.raises(ValueError, match="kind: 'fuzzy' is not one of auto, math"):
        build_reward({"name": "correct", "kind": "fuzzy"})
    with pytest.raises(ValueError, match="mapping with a 'name'"):
        build_reward({"terms": []})


def test_registry_refuses_duplicates_and_lists_builtins():
    assert {"correct", "format", "direction", "sum"} <= set(reward_names())
    with pytest.raises(ValueError, match="already registered"):
        register_reward("correct")(lambda: lambda s: 0.0)
