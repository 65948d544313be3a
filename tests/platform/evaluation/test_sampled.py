"""pass@k (unbiased estimator), maj@k (majority vote) and mean accuracy over samples: hand-computed cases."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from revmix.platform.evaluation.answers import answer_key
from revmix.platform.evaluation.sampled import majority_correct, majority_index, pass_at_k, sample_metrics


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 4, 5 / 6),  # 1 - C(7,4)/C(10,4) = 1 - 35/210
        (4, 1, 1, 0.25),  # pass@1 is c/n
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
        (3, 1, 3, 1.0),  # n - c < k: every draw holds the correct one
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_is_stable_where_binomials_overflow_a_float() -> None:
    n, c, k = 2000, 10, 300  # C(2000, 300) ~ 1e358 is beyond float range
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 4, 1), (3, 1, 0)])
def test_pass_at_k_refuses_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def test_majority_ties_go_to_the_answer_seen_first_and_none_does_not_vote() -> None:
    assert majority_index(["3", "4", "4", None]) == 1
    assert majority_index(["a", "b", "b", "a"]) == 0  # 2–2: "a" came first
    assert majority_index([None, "y", "x", "x", "y"]) == 1  # 2–2: "y" came first
    assert majority_index([None, None]) is None
    flags, keys = [False, True, True, False], ["5", "7", "7", "5"]
    assert majority_correct(flags, keys, 1) is False
    assert majority_correct(flags, keys, 3) is True  # "7" twice against "5" once
    assert majority_correct(flags, keys, 4) is False  # 2–2: "5" came first
    assert majority_correct([True], [None], 1) is False  # no readable answer: no vote


def test_sample_metrics_average_over_items() -> None:
    correct = [[True, False, False], [True, True, False]]
    keys = [["1", "2", "2"], ["9", "9", "8"]]  # item 0: the wrong "2" wins the vote; item 1: "9" wins
    got = sample_metrics(correct, keys, [1, 3])
    assert got == pytest.approx(
        {"accuracy": 0.5, "pass@1": 0.5, "pass@3": 1.0, "maj@1": 1.0, "maj@3": 0.5}, rel=1e-12
    )
    assert sample_metrics([], [], [1]) == {"accuracy": None, "pass@1": None, "maj@1": None}
    assert sample_metrics([[True, False]], [], []) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="same number of samples"):
        sample_metrics([[True], [True, False]], [], [])


def test_answer_key_puts_equal_answers_together() -> None:
    assert answer_key("so it costs $18.00", "math") == answer_key("Answer: 18", "math") == "18"
    assert answer_key("\\boxed{\\dfrac{1}{2}}", "math") == answer_key("Answer: \\frac{1}{2}", "math")
    assert answer_key("the answer is (b)", "choice") == "B"
    assert answer_key("Answer: 025", "integer") == "25"
    assert answer_key("work\n  foo   bar. ", "exact") == "foo bar"
    assert answer_key("", "math") is None
    with pytest.raises(ValueError, match="valid kinds: math, integer, choice, exact"):
        answer_key("1", "number")
