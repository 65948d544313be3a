"""Answer extraction and equivalence: each marker, the tricky equivalences, negatives and junk input."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from revmix.platform.evaluation.answers import (
    KINDS,
    extract_answer,
    extract_choice,
    is_equivalent,
    normalize_text,
    score_completion,
)

# ----------------------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        # \boxed: nested braces, last one wins, escaped braces, "\boxed 5"
        (r"so \boxed{\frac{1}{2}} then \boxed{\frac{\sqrt{3}}{2}}.", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"The answer is $\boxed{x^{2}+1}$.", "x^{2}+1"),
        (r"\boxed 5 apples", "5"),
        (r"\boxed{3} is wrong, unterminated \boxed{4", "3"),
        # Answer: last occurrence, trailing period and $ stripped, bold, next-line value
        ("Answer: 5\nmore thinking\nAnswer: 7.", "7"),
        (r"Answer: $\frac{1}{2}$.", r"\frac{1}{2}"),
        ("**Answer:** 12", "12"),
        ("Final answer: -3", "-3"),
        ("Answer:\n\n  42\n", "42"),
        (r"Answer: \boxed{9}.", "9"),
        (r"Answer: \(x^2\)", "x^2"),
        (r"Answer: \$18.90", r"\$18.90"),
        # whichever marker comes last wins
        (r"\boxed{3} ... on reflection Answer: 4", "4"),
        (r"Answer: 4 ... no wait \boxed{3}", "3"),
        # GSM8K
        ("She makes 9 * 2 = $18.\n#### 18", "18"),
        ("#### 1,234", "1,234"),
        # last-number fallback: ints, decimals, negatives, thousands commas
        ("first 3 then 17", "17"),
        ("it cools to -4 degrees", "-4"),
        ("costs 3.25 dollars", "3.25"),
        ("roughly 1,000,000 people", "1000000"),
        ("a value of .5 is", ".5"),
        ("x2 then 7.", "7"),
        ("1,2,3", "3"),
        ("the result is \u22125", "-5"),  # unicode minus
        # empty boxed/Answer fall through to the number fallback
        (r"\boxed{} 8", "8"),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "junk", [None, "", "   ", "no numbers here", 5, b"Answer: 3", ["Answer: 3"], r"\boxed{"]
)
def test_extract_answer_junk_is_none(junk: object) -> None:
    assert extract_answer(junk) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("b", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        ("Answer: b", "B"),
        ("the answer is C because it fits", "C"),
        ("So the answer is (a).", "A"),
        ("(B) 42 apples", "B"),
        (r"\boxed{c}", "C"),
        (r"\text{(D)}", "D"),
        ("I reject (A) and pick (D)", "D"),
    ],
)
def test_extract_choice(text: str, letter: str) -> None:
    assert extract_choice(text) == letter


@pytest.mark.parametrize("text", [None, "", "the answer is a number", "E", "42", "A banana"])
def test_extract_choice_none(text: str | None) -> None:
    assert extract_choice(text) is None


# ----------------------------------------------------------------------------------------------------------
# equivalence


@pytest.mark.parametrize(
    "pred, gold, kind",
    [
        (r"\frac{1}{2}", "0.5", "math"),
        ("0.5", r"\frac{1}{2}", "math"),
        ("1/2", r"\frac{1}{2}", "math"),
        ("1/2", "0.5", "math"),
        (r"\dfrac{1}{2}", r"\frac12", "math"),
        (r"\tfrac{3}{4}", "0.75", "math"),
        ("10", r"10\text{ cm}", "math"),
        (r"10\text{ cm}", "10", "math"),
        ("90", r"90^\circ", "math"),
        (r"90^{\circ}", "90", "math"),
        ("-3", "- 3", "math"),
        ("1,000", "1000", "math"),
        ("1000", "1,000", "math"),
        ("007", "7", "math"),
        ("18 dollars", "18", "math"),
        (r"\$18.90", "18.9", "math"),
        ("32348", r"\$32,\!348", "math"),
        ("Evelyn", r"\text{Evelyn}", "math"),
        (r"(3, \pi/2)", r"\left( 3, \frac{\pi}{2} \right)", "math"),
        ("-2, 1", "1,-2", "math"),
        (r"2\sqrt{3}", r"\sqrt{12}", "math"),
        ("x^2+2x+1", "(x+1)^2", "math"),
        ("025", "25", "integer"),
        ("25", "025", "integer"),
        ("25.0", "25", "integer"),
        (r"\frac{50}{2}", "25", "integer"),
        ("1,000", "1000", "integer"),
        ("b", "B", "choice"),
        ("(B)", "B", "choice"),
        ("Answer: b", "B", "choice"),
        ("the answer is C", "C", "choice"),
        ("hello world", " hello   world ", "exact"),
        ("$abc$", "abc", "exact"),
        ("42.", "42", "exact"),
    ],
)
def test_equivalent(pred: str, gold: str, kind: str) -> None:
    assert is_equivalent(pred, gold, kind)


@pytest.mark.parametrize(
    "pred, gold, kind",
    [
        ("3", "4", "math"),
        ("-2", "2", "math"),
        ("0.33", r"\frac{1}{3}", "math"),
        ("3.0001", "3", "math"),
        ("5 pi", "5", "math"),
        ("5i", "5", "math"),
        ("x", "y", "math"),
        ("Navin", r"\text{Evelyn}", "math"),
        ("1000", "100", "math"),
        ("24", "025", "integer"),
        ("25.5", "25", "integer"),
        ("A", "B", "choice"),
        ("the answer is a number", "A", "choice"),
        ("Hello", "hello", "exact"),
        ("12", "21", "exact"),
    ],
)
def test_not_equivalent(pred: str, gold: str, kind: str) -> None:
    assert not is_equivalent(pred, gold, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "pred", [None, "", "   ", r"\frac{", "}}}{{{", r"\sqrt{\sqrt{", "$$$", 3.5, object()]
)
def test_junk_never_raises(pred: object, kind: str) -> None:
    assert is_equivalent(pred, "2", kind) is False  # type: ignore[arg-type]
    assert is_equivalent("2", "", kind) is False


def test_numbers_accepted_as_text() -> None:
    assert is_equivalent(25, "025", "integer")  # type: ignore[arg-type]
    assert is_equivalent("0.5", 0.5, "math")  # type: ignore[arg-type]


def test_unknown_kind_raises_listing_kinds() -> None:
    with pytest.raises(ValueError, match="math, integer, choice, exact"):
        is_equivalent("1", "1", "fuzzy")
    with pytest.raises(ValueError, match="unknown answer kind"):
        score_completion("Answer: 1", "1", "fuzzy")


def test_normalize_text() -> None:
    assert normalize_text(r"  $\text{ east }$. ") == "east"
    assert normalize_text("a \n\t b") == "a b"
    assert normalize_text(r"\text{a} + \text{b}") == r"\text{a} + \text{b}"  # not one wrapper


# ----------------------------------------------------------------------------------------------------------
# score_completion


@pytest.mark.parametrize(
    "completion, gold, kind, expected",
    [
        ("Half of it.\nAnswer: $\\dfrac{1}{2}$.", "0.5", "math", True),
        ("Half of it.\nAnswer: $\\dfrac{1}{3}$.", "0.5", "math", False),
        ("so 25 minutes... \\boxed{025}", "25", "integer", True),
        ("9 eggs at $2 each is 18 dollars.", "18", "math", True),
        ("9 eggs at $2 each is 18 dollars. Then I ate 3.", "18", "math", False),
        ("Janet makes 18.\n#### 18", "18", "math", True),
        ("Options 1 and 2 fail, so the answer is C.", "C", "choice", True),
        ("Answer: (b)", "B", "choice", True),
        ("Answer: (b)", "C", "choice", False),
        ("step 1\nstep 2\nAnswer: olleh", "olleh", "exact", True),
        ("olleh", "olleh", "exact", True),  # no marker: last non-empty line
        ("step\nAnswer: hello", "olleh", "exact", False),
        ("", "1", "math", False),
    ],
)
def test_score_completion(completion: str, gold: str, kind: str, expected: bool) -> None:
    assert score_completion(completion, gold, kind) is expected


def test_math_off_main_thread() -> None:
    """math_verify's signal.alarm timeout cannot run off the main thread (Ray Serve, thread pools)."""
    results: list[bool] = []

    def work() -> None:
        results.append(is_equivalent(r"\dfrac{2}{4}", "0.5", "math"))
        results.append(is_equivalent(r"\frac{2}{3}", "0.5", "math"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert results == [True, False]


def test_math_verify_is_imported_lazily() -> None:
    code = (
        "import sys; import revmix.platform.evaluation.answers as a; "
        "assert 'math_verify' not in sys.modules and 'sympy' not in sys.modules; "
        "assert a.is_equivalent('1/2', '0.5'); assert 'math_verify' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
