r"""Means with 95% intervals over seeds, and whether two conditions differ beyond seed-to-seed noise.

Student's t interval (Student 1908; e.g. Wasserman, *All of Statistics*, §10.4): per-seed values
x_1..x_n with mean x̄ and sample standard deviation s give

.. math::  \bar x \pm t_{n-1,\,1-\alpha/2}\; s/\sqrt{n}

A difference between conditions A and B:

* paired by seed when both ran the same seeds (a seed fixes the data order and initialisation, so
  d_s = a_s − b_s cancels what the two runs share): the t interval of the d_s;
* otherwise Welch's interval (Welch 1947):
  :math:`(\bar a - \bar b) \pm t_\nu \sqrt{s_a^2/n_a + s_b^2/n_b}` with the Welch–Satterthwaite
  :math:`\nu = (s_a^2/n_a + s_b^2/n_b)^2 / \big((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)\big)`.

A difference is "beyond noise" when its interval excludes 0 and has a width (identical per-seed
differences give a zero-width interval, which is reported as such, not as certainty). t quantiles come from the t CDF,
:math:`F(t) = 1 - \tfrac12 I_{\nu/(\nu+t^2)}(\nu/2, \tfrac12)` for t ≥ 0, with the regularised incomplete
beta I by its continued fraction (Numerical Recipes, 3rd ed., §6.4), inverted by bisection — no scipy.
With three seeds the 95% quantile is t_{2} = 4.30, so three-seed intervals are wide: that is the point.

Where the report uses which (every caption says it too):

* every table cell, plot band and difference over trials: the t interval over seeds (a trial's final
  metric is one value per seed); differences paired by seed when both conditions ran the same seeds;
* accuracy when per-item correctness is at hand (:func:`bootstrap_accuracy`): a two-stage percentile
  bootstrap over seeds, then items within each drawn seed (Davison & Hinkley 1997, §3.8), which also
  covers item-sampling noise and so gives an interval with one seed: the conditions table's
  "(bootstrap)" accuracy columns, from the per-item scores each trial's ``summary.json`` keeps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
NO_INTERVAL = "1 seed: no interval"  # what a report says where one seed allows no interval
MINUS = "\u2212"  # the typographic minus of the report's sentences
_TINY = 1e-300  # keeps the continued fraction's denominators off zero (Lentz's method)


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz; converges fast for x < (a+1)/(a+b+2))."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 1000):
        for aa in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 ≤ x ≤ 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"incomplete_beta needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` > 0 degrees of freedom (fractional df allowed: Welch)."""
    if not df > 0:
        raise ValueError(f"t_cdf: degrees of freedom must be > 0, got {df}")
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T ≤ t) = p, by bisection on :func:`t_cdf` (to about 1e-12 relative)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # df → 0 has arbitrarily heavy tails: grow the bracket until it holds p
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided interval over ``n`` values (low = high = NaN with one value)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def degenerate(self) -> bool:
        """Zero width: every value was the same, so the values carry no spread to judge noise by."""
        return self.low == self.high

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes 0 (False without an interval, or with a zero-width one)."""
        return not self.degenerate and (self.low > 0.0 or self.high < 0.0)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and Student-t interval of per-seed values (see the module docstring).

    Args:
        values: one value per seed, length n ≥ 1 (n = 1 gives no interval: NaN bounds).
        level: two-sided coverage, e.g. 0.95.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values (a condition with no finished seed has no mean)")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = t_quantile(0.5 + level / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def difference_interval(
    a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL
) -> tuple[Interval, bool]:
    """The interval of mean(A) − mean(B) and whether it was paired by seed (else Welch).

    Args:
        a, b: seed → value of each condition; paired when both hold exactly the same seeds.
        level: two-sided coverage.
    """
    if not a or not b:
        raise ValueError("difference_interval: both conditions need at least one seed")
    if a.keys() == b.keys():
        return mean_interval([a[s] - b[s] for s in sorted(a)], level), True
    na, nb = len(a), len(b)
    diff = math.fsum(a.values()) / na - math.fsum(b.values()) / nb
    if na < 2 or nb < 2:
        return Interval(diff, math.nan, math.nan, min(na, nb)), False
    va, vb = statistics.variance(a.values()) / na, statistics.variance(b.values()) / nb
    if va + vb == 0.0:  # no spread in either: the difference is exact (and the Welch df undefined)
        return Interval(diff, diff, diff, min(na, nb)), False
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = t_quantile(0.5 + level / 2.0, df) * math.sqrt(va + vb)
    return Interval(diff, diff - half, diff + half, min(na, nb)), False


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_accuracy(
    correct: Mapping[int, Sequence[float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Mean accuracy over seeds and its percentile-bootstrap interval over seeds × items.

    Each resample draws the seeds with replacement and, for every drawn seed (independently when a seed
    is drawn twice), its items with replacement; the statistic is the mean over drawn seeds of their
    accuracy. The interval is the (1 − level)/2 and (1 + level)/2 quantiles of the resampled statistic
    (numpy's linear interpolation); seeded, so a report is reproducible.

    Args:
        correct: seed → per-item correctness of that seed's evaluation (True/False, 1/0, or the
            fraction of an item's samples scored correct).
        resamples: bootstrap resamples B.
        seed: the bootstrap's own random seed.
        level: two-sided coverage.
    """
    if not correct or any(len(v) == 0 for v in correct.values()):
        raise ValueError("bootstrap_accuracy: every seed needs at least one evaluated item")
    rng = np.random.default_rng(seed)
    items = [np.asarray(correct[s], dtype=np.float64) for s in sorted(correct)]
    k = len(items)
    # means[j, s, b]: seed s's accuracy over its items resampled for draw slot j of resample b
    means = np.stack(
        [
            np.stack([x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1) for x in items])
            for _ in range(k)
        ]
    )
    picks = rng.integers(0, k, size=(k, resamples))  # which seed fills slot j of resample b
    stat = means[np.arange(k)[:, None], picks, np.arange(resamples)[None, :]].mean(axis=0)
    low, high = np.quantile(stat, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    mean = math.fsum(float(x.mean()) for x in items) / k
    return Interval(mean, float(low), float(high), k)


def decimals(*values: float) -> int:
    """Decimals showing about three significant digits of the largest |value| (0 to 4)."""
    big = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    return 3 if big == 0.0 else min(4, max(0, 2 - math.floor(math.log10(big))))


def signed(v: float, places: int) -> str:
    """``+0.120`` / ``−0.050`` (typographic minus)."""
    text = f"{abs(v):.{places}f}"
    return (MINUS if v < 0 and float(text) != 0.0 else "+") + text


def format_interval(iv: Interval, show_n: bool = False) -> str:
    """A table cell: ``0.400 [0.152, 0.648]``; ``(n=2)`` appended when ``show_n``; no brackets for n = 1."""
    places = decimals(iv.mean, iv.low, iv.high)
    text = f"{iv.mean:.{places}f}"
    if iv.n > 1:
        text += f" [{iv.low:.{places}f}, {iv.high:.{places}f}]"
    return text + (f" (n={iv.n})" if show_n else "")


def holds_in_seeds(a: Mapping[int, float], b: Mapping[int, float], higher: bool) -> tuple[int, int]:
    """(k, n): of the n seeds both conditions ran, the k where A is strictly above B (``higher``) or below."""
    common = sorted(a.keys() & b.keys())
    return sum(1 for s in common if (a[s] > b[s] if higher else a[s] < b[s])), len(common)


def compare_text(a_label: str, b_label: str, a: Mapping[int, float], b: Mapping[int, float]) -> str:
    """One sentence: ``A − B = +0.12 [−0.05, +0.29] (3 seeds, paired by seed): within seed-to-seed noise;
    A > B holds in 2/3 seeds`` (the seed count only for seeds both ran; Welch when the seeds differ)."""
    iv, paired = difference_interval(a, b)
    places = decimals(iv.mean, iv.low, iv.high)
    text = f"{a_label} {MINUS} {b_label} = {signed(iv.mean, places)}"
    if paired:
        seeds = f"{iv.n} seed{'s' if iv.n != 1 else ''}, paired by seed"
    else:
        seeds = f"{len(a)} vs {len(b)} seeds, Welch"
    if math.isnan(iv.low):
        return f"{text} ({seeds}): {NO_INTERVAL}"
    if iv.degenerate and iv.mean == 0.0:  # a tie in every seed: no order to count
        return text + f" ({seeds}): equal in every seed"
    verdict = "beyond noise" if iv.beyond_noise else "within seed-to-seed noise"
    if iv.degenerate:  # e.g. one evaluation item more in every seed: no spread, not certainty
        verdict = "the same in every seed, so the seeds give no spread to judge noise by"
    text += f" [{signed(iv.low, places)}, {signed(iv.high, places)}] ({seeds}): {verdict}"
    k, n = holds_in_seeds(a, b, higher=iv.mean >= 0)
    if n:
        text += f"; {a_label} {'>' if iv.mean >= 0 else '<'} {b_label} holds in {k}/{n} seeds"
    return text
