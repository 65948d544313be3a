"""Final-answer extraction and equivalence checking for accuracy metrics.

Accuracy is only as good as the checker: a model that writes ``\\dfrac{1}{2}`` for a gold ``0.5``, or
``Answer: 025`` for an AIME answer ``25``, is right. ``extract_answer`` pulls the final answer out of a
free-form completion; ``is_equivalent`` compares it with the gold answer under one of four ``KINDS``:

- ``math``: symbolic equivalence with HuggingFace ``math_verify`` (fractions, decimals, LaTeX, sets,
  intervals, units in ``\\text{}``, degrees, percentages), falling back to a normalised string compare and
  to "same number, trailing unit words" (``18 dollars`` == ``18``) when it cannot decide;
- ``integer``: AIME-style, compared as integers (``"025" == "25"``);
- ``choice``: multiple choice compared by letter A–D (``"(B)"``, ``"b."``, ``"the answer is B"``);
- ``exact``: normalised string equality, for the synthetic tasks whose answers are strings.

Nothing here raises on junk model output: a completion that cannot be read scores False. ``math_verify``
(and sympy behind it) is imported lazily on the first ``math`` comparison because the import and the first
call take a noticeable fraction of a second. Its timeouts use ``signal.alarm``, which only works on the main
thread; off the main thread (Ray Serve replicas, thread pools) they are switched off.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Any

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("math", "integer", "choice", "exact")
CHOICE_LETTERS: str = "ABCD"
MATH_VERIFY_TIMEOUT_S: int = 5

# ----------------------------------------------------------------------------------------------------------
# extraction

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b\s*")
_ANSWER_RE = re.compile(r"answer\s*(?:\*\*)?\s*[:：]", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####")
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")


def _match_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (escaped ``\\{``/``\\}`` skipped), or None."""
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(start, content) of the last complete ``\\boxed{...}`` (or ``\\boxed 5``) in ``text``."""
    found: tuple[int, str] | None = None
    for m in _BOXED_RE.finditer(text):
        start = m.end()
        if start < len(text) and text[start] == "{":
            close = _match_brace(text, start)
            if close is not None:
                found = (m.start(), text[start + 1 : close].strip())
        elif m.group(0)[-1].isspace():
            # "\boxed 5": the argument is the next whitespace-delimited token
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                found = (m.start(), token.group(0))
    return found


def _rest_of_line(text: str, start: int) -> str:
    """The first non-empty line of ``text[start:]``."""
    for line in text[start:].splitlines():
        if line.strip():
            return line
    return ""


def _clean(answer: str) -> str:
    """Strip markdown bold, math delimiters and trailing sentence punctuation from a one-line answer."""
    s = answer.strip().replace("**", "").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
    while s and (s[-1] in ". " or (s[-1] == "$" and not s.endswith("\\$"))):
        s = s[:-1].rstrip()
    while s.startswith("$"):
        s = s[1:].lstrip()
    return s


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``, or None when there is none.

    The last of these markers in the text wins (a model may box a sub-result and then state its answer):
    ``\\boxed{...}`` (nested braces; its content verbatim), ``Answer: ...`` (rest of that line, stripped of
    ``$`` and a trailing period; a ``\\boxed`` inside it is unwrapped), GSM8K's ``#### ...``. Without any
    marker, the last number in the text (integers, decimals, negatives, thousands commas, which are
    dropped: ``1,000`` -> ``1000``).
    """
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        text = text.replace("\u2212", "-")  # unicode minus
        candidates: list[tuple[int, str, str]] = []
        boxed = _last_boxed(text)
        if boxed is not None:
            candidates.append((boxed[0], "boxed", boxed[1]))
        for kind, pattern in (("answer", _ANSWER_RE), ("gsm8k", _GSM8K_RE)):
            last = None
            for last in pattern.finditer(text):  # noqa: B007 - we want the last match
                pass
            if last is not None:
                candidates.append((last.start(), kind, _rest_of_line(text, last.end())))
        for _, kind, content in sorted(candidates, reverse=True):
            if kind != "boxed":
                inner = _last_boxed(content)
                content = inner[1] if inner is not None else _clean(content)
            if content:
                return content
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1].replace(",", "")
    except Exception:  # pragma: no cover - defensive: junk input must never raise
        logger.debug("extract_answer failed on %r", text[:200], exc_info=True)
    return None


# ----------------------------------------------------------------------------------------------------------
# normalisation

_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{(.*)\}$", re.DOTALL)
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize_text(s: str) -> str:
    """Whitespace-, delimiter- and wrapper-insensitive form of a short answer (case is kept).

    Used by kind ``exact`` and as the first, cheap test of kind ``math``: NFKC, outer ``$``/``\\(\\)``
    removed, an outer ``\\text{...}`` unwrapped, runs of whitespace collapsed, trailing period dropped.
    """
    s = unicodedata.normalize("NFKC", str(s)).replace("\u2212", "-")
    s = _clean(s)
    m = _WRAPPER_RE.match(s)
    while m and _match_brace(s, s.index("{")) == len(s) - 1:
        s = m.group(1).strip()
        m = _WRAPPER_RE.match(s)
    return re.sub(r"\s+", " ", s).strip().rstrip(".").strip()


def _math_key(s: str) -> str:
    """A stricter normal form for kind ``math``: LaTeX spacing, sizing and fraction styles removed."""
    s = normalize_text(s)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", "")):
        s = s.replace(old, new)
    for junk in ("\\!", "\\,", "\\;", "\\:", "\\ ", "^\\circ", "^{\\circ}", "\\$"):
        s = s.replace(junk, "")
    s = re.sub(r"\s+", "", s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


_UNIT_TAIL_RE = re.compile(
    r"^(?:\\?\$)?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)\s*"
    r"(?:\\?%|\\text\{[^{}]*\}|[A-Za-z]{3,}(?:\s+[A-Za-z]+)*)?\.?$"
)


def _plain_number(s: str) -> Decimal | None:
    """The number in ``"18"``, ``"$18.00"``, ``"18 dollars"``, ``"1,000 eggs"``; None for anything else."""
    m = _UNIT_TAIL_RE.match(normalize_text(s))
    if not m:
        return None
    try:
        return Decimal(m.group(1).replace(",", ""))
    except InvalidOperation:
        return None


# ----------------------------------------------------------------------------------------------------------
# math_verify (lazy)


def _timeout() -> int | None:
    """math_verify's signal-based timeout only works on the main thread; disable it elsewhere."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=8192)
def _mv_parse_cached(s: str, timeout: int | None) -> tuple[Any, ...]:
    from math_verify import parse

    for wrapped in (f"${s}$", f"\\boxed{{{s}}}"):
        parsed = parse(wrapped, parsing_timeout=timeout)
        if parsed:
            return tuple(parsed)
    return ()


def _mv_equal(pred: str, gold: str) -> bool:
    """math_verify's verdict on ``pred`` against ``gold``; False when either cannot be parsed."""
    from math_verify import verify

    pred_s, gold_s = _clean(pred), _clean(gold)
    if not pred_s or not gold_s:
        return False
    timeout = _timeout()
    gold_parsed = _mv_parse_cached(gold_s, timeout)
    pred_parsed = _mv_parse_cached(pred_s, timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout))


def _math_equal(pred: str, gold: str) -> bool:
    if _math_key(pred) == _math_key(gold):
        return True
    try:
        if _mv_equal(pred, gold):
            return True
    except Exception:
        logger.debug("math_verify failed on pred=%r gold=%r", pred[:200], gold[:200], exc_info=True)
    p, g = _plain_number(pred), _plain_number(gold)
    return p is not None and g is not None and p == g


# ----------------------------------------------------------------------------------------------------------
# integer and choice

_INT_RE = re.compile(r"^[+-]?\d+(?:\.0*)?$")


def _as_int(s: str) -> int | None:
    """``"025"`` -> 25, ``"1,000"`` -> 1000, ``"25.0"`` -> 25, ``"\\$25"`` -> 25; None if not an integer."""
    t = _math_key(s).replace("$", "")
    if not _INT_RE.match(t):
        return None
    return int(Decimal(t))


_CHOICE_ONLY_RE = re.compile(r"^\(?\s*([A-Da-d])\s*\)?\s*[.:)]?$")
_CHOICE_ANSWER_RE = re.compile(r"answer\s*(?:is|:)?\s*(?:\*\*)?\s*[(\[{]?\s*([A-Da-d])\b", re.IGNORECASE)
_CHOICE_LEADING_RE = re.compile(r"^\(?([A-D])[).:]\s")
_CHOICE_PAREN_RE = re.compile(r"\(([A-D])\)")


def extract_choice(text: str | None) -> str | None:
    """The multiple-choice letter (upper case, A–D) that ``text`` picks, or None.

    Accepts a bare letter (``"b"``, ``"(B)"``, ``"B."``), ``"Answer: b"`` / ``"the answer is (C)"`` (last
    occurrence), a leading ``"B) ..."``, and finally the last parenthesised capital ``"(C)"``. A lower-case
    letter counts only on its own or right after "answer" followed by punctuation or the end, so that
    "the answer is a number" does not read as choice A.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        s = normalize_text(text)
        inner = _last_boxed(s)
        if inner is not None:
            s = normalize_text(inner[1])
        m = _CHOICE_ONLY_RE.match(s)
        if m:
            return m.group(1).upper()
        for m in reversed(list(_CHOICE_ANSWER_RE.finditer(s))):
            letter = m.group(1)
            tail = s[m.end() :].lstrip()
            if letter.isupper() or not tail or tail[0] in ".,;:!)]}*":
                return letter.upper()
        m = _CHOICE_LEADING_RE.match(s)
        if m:
            return m.group(1)
        parens = _CHOICE_PAREN_RE.findall(s)
        if parens:
            return parens[-1]
    except Exception:  # pragma: no cover - defensive
        logger.debug("extract_choice failed on %r", text[:200], exc_info=True)
    return None


# ----------------------------------------------------------------------------------------------------------
# public comparison API


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    return None


def is_equivalent(pred: str | None, gold: str, kind: str = "math") -> bool:
    """Whether the extracted answer ``pred`` matches ``gold`` under ``kind`` (one of ``KINDS``).

    Never raises on junk answers (None, empty, unparsable LaTeX): those are False. An unknown ``kind`` is a
    programming error and raises ValueError listing the valid kinds.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    pred_s, gold_s = _as_text(pred), _as_text(gold)
    if pred_s is None or gold_s is None or not pred_s.strip() or not gold_s.strip():
        return False
    try:
        if kind == "exact":
            return normalize_text(pred_s) == normalize_text(gold_s)
        if kind == "choice":
            pred_choice = extract_choice(pred_s)
            return pred_choice is not None and pred_choice == extract_choice(gold_s)
        if kind == "integer":
            pred_int, gold_int = _as_int(pred_s), _as_int(gold_s)
            if pred_int is not None and gold_int is not None:
                return pred_int == gold_int
            return _math_equal(pred_s, gold_s)
        return _math_equal(pred_s, gold_s)
    except Exception:
        logger.debug("is_equivalent failed on pred=%r gold=%r kind=%s", pred_s[:200], gold_s[:200], kind)
        return False


def score_completion(completion: str, gold: str, kind: str) -> bool:
    """Extract the final answer from ``completion`` and compare it with ``gold`` under ``kind``.

    ``choice`` also looks for a letter in the whole completion ("... so the answer is C") when the
    extracted answer is not one; ``exact`` compares the last non-empty line when no answer is marked.
    """
    if not isinstance(completion, str):
        _check_kind(kind)
        return False
    return is_equivalent(_read_answer(completion, kind), gold, kind)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def _read_answer(completion: str, kind: str) -> str | None:
    """The answer ``completion`` gives under ``kind``: the letter for ``choice`` (from the marked answer,
    else anywhere in the text); for ``exact`` the last non-empty line when no answer is marked."""
    _check_kind(kind)
    pred = extract_answer(completion)
    if kind == "choice":
        letter = extract_choice(pred) if pred is not None else None
        return letter if letter is not None else extract_choice(completion)
    if kind == "exact" and pred is None:
        lines = [line for line in completion.splitlines() if line.strip()]
        pred = lines[-1] if lines else None
    return pred


def answer_key(completion: str, kind: str) -> str | None:
    """The normalised final answer of ``completion`` under ``kind``, for majority voting (None: none).

    Reads the answer as :func:`score_completion` does and maps equal answers to one key: the letter for
    ``choice``; the integer for ``integer``; for ``math`` the number when the answer is a plain number
    (``$18.00`` and ``18`` vote together), else its normal form; for ``exact`` its normalised text.
    """
    if not isinstance(completion, str):
        _check_kind(kind)
        return None
    pred = _read_answer(completion, kind)
    if kind == "choice":
        return pred
    if pred is None or not pred.strip():
        return None
    if kind == "exact":
        return normalize_text(pred)
    whole = _as_int(pred) if kind == "integer" else None
    if whole is not None:
        return str(whole)
    number = _plain_number(pred)
    return format(number.normalize(), "f") if number is not None else _math_key(pred)
