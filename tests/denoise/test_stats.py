"""pycosdist.denoise.stats against scipy.stats (an independent implementation of the same formulas)."""

import math

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from pycosdist.denoise import stats


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 6, 9, 14, 29, 100])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_t_critical_is_scipy_quantile(df, confidence):
    expected = scipy_stats.t.ppf((1 + confidence) / 2, df)
    assert stats.t_critical(df, confidence) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("df", [1, 2, 3, 8, 13])
def test_t_central_probability_is_scipy_cdf(df):
    for t in (0.0, 0.1, 1.0, 2.5, 12.0):
        assert stats.t_central_probability(t, df) == pytest.approx(2 * scipy_stats.t.cdf(t, df) - 1, abs=1e-13)


@pytest.mark.parametrize("n", [2, 3, 7, 25])
def test_summarize_matches_scipy_interval(n):
    x = np.random.default_rng(n).normal(0.02, 0.04, n)
    s = stats.summarize(x)
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert (s.n, s.mean, s.std) == (n, pytest.approx(x.mean()), pytest.approx(x.std(ddof=1)))
    assert s.sem == pytest.approx(scipy_stats.sem(x))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert s.half_width == pytest.approx((high - low) / 2)


def test_paired_summary_is_scipy_paired_t_interval():
    rng = np.random.default_rng(0)
    base = rng.normal(1.7, 0.05, 9)
    treat = base + rng.normal(0.01, 0.02, 9)
    keyed = lambda v: {f"seed{i}": float(x) for i, x in enumerate(v)}
    # a missing seed and a failed (NaN) run drop out of the pairing only
    b, t = keyed(base), keyed(treat)
    b["seed9"], t["seed10"], t["seed3"] = 1.0, 2.0, float("nan")
    s = stats.paired_summary(b, t)
    keep = [i for i in range(9) if i != 3]
    ci = scipy_stats.ttest_rel(treat[keep], base[keep]).confidence_interval(0.95)
    assert s.n == 8 and s.mean == pytest.approx((treat[keep] - base[keep]).mean())
    assert (s.ci_low, s.ci_high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    assert list(stats.paired_differences(b, t)) == [f"seed{i}" for i in keep]


def test_summarize_degenerate_sizes():
    assert stats.summarize([]).mean is None
    one = stats.summarize([1.5, None, float("nan")])
    assert (one.n, one.mean, one.std, one.ci_low) == (1, 1.5, None, None) and not one.excludes_zero()
    assert stats.summarize([1.0, 1.1, 1.2]).excludes_zero()
    assert not stats.summarize([-1.0, 1.0, 0.1]).excludes_zero()


@pytest.mark.parametrize("n", [2, 3, 5, 10, 16, 20])
@pytest.mark.parametrize("effect_over_std", [0.3, 0.75, 1.5])
def test_power_is_scipy_noncentral_t(n, effect_over_std):
    std = 0.04
    t_star = scipy_stats.t.ppf(0.975, n - 1)
    nc = effect_over_std * math.sqrt(n)
    expected = scipy_stats.nct.sf(t_star, n - 1, nc) + scipy_stats.nct.cdf(-t_star, n - 1, nc)
    assert stats.paired_t_power(n, effect_over_std * std, std) == pytest.approx(expected, abs=1e-5)
    assert stats.paired_t_power(n, -effect_over_std * std, std) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("effect,std", [(0.03, 0.042), (0.03, 0.02), (0.03, 0.006), (0.01, 0.03)])
def test_required_pairs_is_the_first_n_with_enough_power(effect, std):
    def scipy_power(n):
        t_star = scipy_stats.t.ppf(0.975, n - 1)
        nc = effect * math.sqrt(n) / std
        return scipy_stats.nct.sf(t_star, n - 1, nc) + scipy_stats.nct.cdf(-t_star, n - 1, nc)

    brute = next(n for n in range(2, 1000) if scipy_power(n) >= 0.8)
    assert stats.required_pairs(effect, std, power=0.8) == brute


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="confidence"):
        stats.t_critical(3, 1.5)
    with pytest.raises(ValueError, match="df"):
        stats.t_critical(0)
    with pytest.raises(ValueError, match="n: expected an integer >= 2"):
        stats.paired_t_power(1, 0.03, 0.04)
    with pytest.raises(ValueError, match="std"):
        stats.required_pairs(0.03, 0.0)
    with pytest.raises(ValueError, match="effect"):
        stats.required_pairs(0.0, 0.04)
