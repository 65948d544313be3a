"""Means, t intervals and differences over seeds, checked against closed forms and published t tables."""

from __future__ import annotations

import math

import pytest

from revmix.sweeps.intervals import (
    Interval,
    bootstrap_accuracy,
    compare_text,
    decimals,
    difference_interval,
    format_interval,
    holds_in_seeds,
    incomplete_beta,
    mean_interval,
    t_cdf,
    t_quantile,
)


def _t2(p: float) -> float:
    """Closed form for 2 degrees of freedom: F(t) = 1/2 + t / (2 sqrt(2 + t²)) → t = q sqrt(2 / (1 − q²))."""
    q = 2 * p - 1
    return q * math.sqrt(2 / (1 - q * q))


def _t_pdf(t: float, df: float) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + t * t / df) ** (-(df + 1) / 2)


def _simpson(f, a: float, b: float, n: int = 20000) -> float:
    h = (b - a) / n
    inner = sum((4 if i % 2 else 2) * f(a + i * h) for i in range(1, n))
    return (f(a) + f(b) + inner) * h / 3


@pytest.mark.parametrize(
    ("a", "b", "x", "expected"),
    [
        (1.0, 1.0, 0.3, 0.3),  # uniform: I_x(1, 1) = x
        (3.0, 1.0, 0.6, 0.6**3),  # I_x(a, 1) = x^a
        (1.0, 4.0, 0.2, 1 - 0.8**4),  # I_x(1, b) = 1 − (1 − x)^b
        (2.5, 2.5, 0.5, 0.5),  # symmetric
        (0.5, 0.5, 0.25, 2 / math.pi * math.asin(math.sqrt(0.25))),  # arcsine law
    ],
)
def test_incomplete_beta_closed_forms(a, b, x, expected):
    assert incomplete_beta(a, b, x) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_t_quantile_closed_forms_and_table():
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)  # Cauchy
    assert t_quantile(0.975, 2) == pytest.approx(_t2(0.975), rel=1e-9)
    assert t_quantile(0.9, 2) == pytest.approx(_t2(0.9), rel=1e-9)
    # two-sided 95% critical values from any t table
    table = {
        3: 3.182446305,
        4: 2.776445105,
        5: 2.570581836,
        10: 2.228138852,
        20: 2.085963447,
        30: 2.042272456,
        120: 1.979930405,
    }
    for df, t in table.items():
        assert t_quantile(0.975, df) == pytest.approx(t, rel=1e-9)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, rel=1e-6)  # → the normal quantile
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445105, rel=1e-9)  # symmetric
    assert t_cdf(0.0, 3.0) == 0.5


def test_t_quantile_fractional_df_against_the_integrated_density():
    df = 32 / 19  # the Welch df of the example in test_welch_interval
    t = t_quantile(0.975, df)
    assert _simpson(lambda x: _t_pdf(x, df), 0.0, t) == pytest.approx(0.475, rel=1e-8)


def test_mean_interval_of_three_seeds():
    iv = mean_interval([0.3, 0.4, 0.5])
    half = _t2(0.975) * 0.1 / math.sqrt(3)  # sd 0.1 over three values
    assert iv.n == 3 and iv.mean == pytest.approx(0.4, rel=1e-12)
    assert (iv.low, iv.high) == (pytest.approx(0.4 - half, rel=1e-9), pytest.approx(0.4 + half, rel=1e-9))
    assert iv.beyond_noise


def test_mean_interval_needs_two_values_for_an_interval():
    one = mean_interval([2.5])
    assert one.mean == 2.5 and math.isnan(one.low) and math.isnan(one.high) and not one.beyond_noise
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])


def test_paired_difference_uses_per_seed_differences():
    a = {0: 0.5, 1: 0.65, 2: 0.65}
    b = {0: 0.3, 1: 0.4, 2: 0.5}
    iv, paired = difference_interval(a, b)
    half = _t2(0.975) * 0.05 / math.sqrt(3)  # differences 0.2, 0.25, 0.15: sd 0.05
    assert paired and iv.n == 3
    assert iv.mean == pytest.approx(0.2, rel=1e-9)
    assert iv.low == pytest.approx(0.2 - half, rel=1e-9) and iv.high == pytest.approx(0.2 + half, rel=1e-9)
    # the unpaired spread (sd 0.1 of b alone) would not have excluded 0; pairing does
    assert iv.beyond_noise


def test_welch_interval():
    a = {0: 1.0, 1: 2.0, 2: 3.0}  # mean 2, variance 1
    b = {3: 2.0, 4: 4.0}  # mean 3, variance 2
    iv, paired = difference_interval(a, b)
    se = math.sqrt(1 / 3 + 2 / 2)
    df = (4 / 3) ** 2 / ((1 / 3) ** 2 / 2 + 1.0**2 / 1)  # = 32/19
    assert df == pytest.approx(32 / 19)
    half = t_quantile(0.975, 32 / 19) * se
    assert not paired and iv.mean == pytest.approx(-1.0)
    assert (iv.low, iv.high) == (pytest.approx(-1.0 - half, rel=1e-9), pytest.approx(-1.0 + half, rel=1e-9))
    exact, _ = difference_interval({0: 1.0, 1: 1.0}, {2: 0.5, 3: 0.5, 4: 0.5})  # no spread at all
    assert (exact.mean, exact.low, exact.high) == (0.5, 0.5, 0.5)
    few, _ = difference_interval({0: 1.0}, {1: 0.0, 2: 1.0})
    assert few.mean == 0.5 and math.isnan(few.low)


def test_compare_text_beyond_and_within_noise():
    dpo = {0: 0.3, 1: 0.4, 2: 0.5}
    beyond = compare_text("simpo", "dpo", {0: 0.5, 1: 0.65, 2: 0.65}, dpo)
    # +0.2 ± 4.3027 × 0.05 / √3 = ±0.1242
    assert beyond == (
        "simpo − dpo = +0.200 [+0.076, +0.324] (3 seeds, paired by seed): beyond noise; "
        "simpo > dpo holds in 3/3 seeds"
    )
    within = compare_text("simpo", "dpo", {0: 0.5, 1: 0.7, 2: 0.6}, dpo)
    # differences 0.2, 0.3, 0.1: +0.2 ± 4.3027 × 0.1 / √3 = ±0.2484 — every seed agrees, yet within noise
    assert within == (
        "simpo − dpo = +0.200 [−0.048, +0.448] (3 seeds, paired by seed): within seed-to-seed noise; "
        "simpo > dpo holds in 3/3 seeds"
    )
    backwards = compare_text("dpo", "simpo", dpo, {0: 0.5, 1: 0.7, 2: 0.6})
    assert backwards.startswith("dpo − simpo = −0.200 [−0.448, +0.048]")
    assert backwards.endswith("dpo < simpo holds in 3/3 seeds")
    welch = compare_text("kto", "dpo", {0: 0.35, 1: 0.55}, dpo)
    assert "(2 vs 3 seeds, Welch): within seed-to-seed noise; kto > dpo holds in 2/2 seeds" in welch
    assert compare_text("kto", "dpo", {0: 0.35}, {0: 0.3}) == (
        "kto − dpo = +0.0500 (1 seed, paired by seed): 1 seed: no interval"  # 3 significant digits
    )


def test_holds_in_seeds_counts_common_seeds_only():
    assert holds_in_seeds({0: 1.0, 1: 0.0, 2: 5.0}, {0: 0.5, 1: 0.5, 3: 9.0}, higher=True) == (1, 2)
    assert holds_in_seeds({0: 1.0, 1: 0.0}, {0: 0.5, 1: 0.5}, higher=False) == (1, 2)


def test_formatting():
    assert decimals(0.648) == 3 and decimals(8.97) == 2 and decimals(4510.0) == 0 and decimals(0.0) == 3
    assert decimals(0.00012) == 4 and decimals(float("nan"), 12.5) == 1
    assert format_interval(mean_interval([0.3, 0.4, 0.5])) == "0.400 [0.152, 0.648]"
    assert format_interval(Interval(0.45, math.nan, math.nan, 1)) == "0.450"
    assert format_interval(Interval(-4.0, -8.97, 0.97, 2), show_n=True) == "-4.00 [-8.97, 0.97] (n=2)"


def test_identical_per_seed_differences_are_not_called_beyond_noise():
    """Three seeds each one evaluation item (1/64) apart: a zero-width interval, reported as no spread."""
    a = {0: 3 / 64, 1: 2 / 64, 2: 4 / 64}
    b = {s: v - 1 / 64 for s, v in a.items()}
    iv, paired = difference_interval(a, b)
    assert paired and iv.degenerate and not iv.beyond_noise
    text = compare_text("x", "y", a, b)
    assert "no spread to judge noise by" in text and "beyond noise" not in text


def test_bootstrap_two_seeds_one_item_each_by_hand():
    # one item per seed, so item resampling changes nothing; the two drawn seeds give accuracy
    # 1 (p = 1/4), 0.5 (p = 1/2) or 0 (p = 1/4): the 2.5% and 97.5% quantiles are 0 and 1
    iv = bootstrap_accuracy({0: [True], 1: [False]})
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.5, 0.0, 1.0, 2)


def test_bootstrap_one_seed_matches_the_binomial_interval():
    # 100 items, half right: the item bootstrap's 95% interval ≈ 0.5 ± 1.96·sqrt(0.25/100) = [0.402, 0.598]
    iv = bootstrap_accuracy({3: [True, False] * 50}, resamples=4000)
    assert iv.mean == 0.5 and iv.n == 1
    assert iv.low == pytest.approx(0.402, abs=0.015) and iv.high == pytest.approx(0.598, abs=0.015)


def test_bootstrap_all_right_is_degenerate_and_the_seed_fixes_the_draws():
    assert bootstrap_accuracy({0: [1, 1], 1: [1, 1, 1]}).degenerate
    data = {0: [True, False, True], 1: [False, False, True, True], 2: [True] * 3 + [False]}
    assert bootstrap_accuracy(data, seed=5) == bootstrap_accuracy(data, seed=5)
    assert bootstrap_accuracy(data, seed=5) != bootstrap_accuracy(data, seed=6)
    assert bootstrap_accuracy(data).mean == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3, rel=1e-12)


def test_bootstrap_refuses_an_empty_seed():
    with pytest.raises(ValueError, match="at least one evaluated item"):
        bootstrap_accuracy({0: [True], 1: []})


def test_a_tie_in_every_seed_is_said_as_such():
    text = compare_text("A", "B", {0: 0.25, 1: 0.5}, {0: 0.25, 1: 0.5})
    assert text == "A \u2212 B = +0.000 (2 seeds, paired by seed): equal in every seed"
