"""Metrics over several sampled completions per item: mean accuracy, pass@k and maj@k.

With ``n`` samples per item of which ``c`` are correct:

- **mean accuracy** is c / n averaged over items (with n = 1: plain accuracy);
- **pass@k** is the probability that at least one of k samples drawn without replacement from the n is
  correct, the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``, computed as the
  product ``1 - prod_{i=n-c+1..n} (1 - k/i)`` so no binomial coefficient overflows at large n;
- **maj@k** is whether the most frequent normalised answer among the *first* k samples is correct
  (majority voting, "self-consistency"). Samples with no readable answer do not vote; ties go to the
  answer that appeared first in sample order, so the result is deterministic given the samples.

Pure functions: no model, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one item with ``c`` correct of ``n`` samples (``1 <= k <= n``)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_index(keys: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote among ``keys`` (None: no sample had an answer).

    The winner is the most frequent non-None key; among equally frequent keys, the one seen first. The
    index returned is that key's first sample.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
            first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def majority_correct(correct: Sequence[bool], keys: Sequence[str | None], k: int) -> bool:
    """maj@k of one item: is the voted answer among the first ``k`` samples correct?"""
    if len(correct) != len(keys) or not 1 <= k <= len(keys):
        raise ValueError(f"majority_correct: {len(correct)} flags, {len(keys)} keys, k={k}")
    winner = majority_index(keys[:k])
    return winner is not None and bool(correct[winner])


def sample_metrics(
    correct: Sequence[Sequence[bool]], keys: Sequence[Sequence[str | None]], ks: Sequence[int]
) -> dict[str, float | None]:
    """``{"accuracy", "pass@k"..., "maj@k"...}`` averaged over items (None for no items).

    ``correct[i][j]`` / ``keys[i][j]``: sample j of item i is correct / its normalised answer. Every item
    has the same number of samples; each k in ``ks`` is at most that number (``keys`` is only read for
    maj@k, so it may be empty when ``ks`` is).
    """
    names = ["accuracy", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in ks)]
    if not correct:
        return dict.fromkeys(names)
    n = len(correct[0])
    if any(len(row) != n for row in correct) or (ks and len(keys) != len(correct)):
        raise ValueError("sample_metrics: every item needs the same number of samples and keys")
    out: dict[str, float | None] = {"accuracy": _mean([sum(row) / n for row in correct])}
    for k in ks:
        out[f"pass@{k}"] = _mean([pass_at_k(n, sum(row), k) for row in correct])
    for k in ks:
        out[f"maj@{k}"] = _mean([float(majority_correct(c, key, k)) for c, key in zip(correct, keys)])
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
