"""Paired statistics for comparing training recipes over seeds (or test files): differences, mean,
sample std, Student-t confidence intervals, and the power / number of seeds of a paired t-test.

numpy and the standard library only (the application does not need scipy for this); the tests check
every function against ``scipy.stats``. Conventions: ``std`` is the sample std (ddof=1); a CI is
two-sided, ``mean ± t_{(1+confidence)/2, n-1} * std / sqrt(n)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a probability in (0, 1), got {confidence!r}")


def _check_df(df: int) -> None:
    if not (isinstance(df, (int, np.integer)) and df >= 1):
        raise ValueError(f"df: expected an integer >= 1 (degrees of freedom), got {df!r}")


def t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for T ~ Student-t with integer ``df``, t >= 0: the exact finite series of
    Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df) in theta = atan(t / sqrt(df))."""
    _check_df(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * [1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2)]
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    # odd: 2/pi * [theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3))]
    series = 0.0
    if df > 1:
        term, series = 1.0, 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
    return 2 / math.pi * (theta + s * math.cos(theta) * series)


def t_critical(df: int, confidence: float = 0.95) -> float:
    """The two-sided critical value t* with P(|T| <= t*) = ``confidence`` (T ~ t with ``df``): the
    ``(1 + confidence) / 2`` quantile, found by bisection on :func:`t_central_probability`."""
    _check_df(df)
    _check_confidence(confidence)
    lo, hi = 0.0, 1.0
    while t_central_probability(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_central_probability(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` values with its sample std, standard error and t-based CI (None when n < 2)."""

    n: int
    mean: float | None
    std: float | None
    sem: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float

    @property
    def half_width(self) -> float | None:
        return None if self.ci_high is None else 0.5 * (self.ci_high - self.ci_low)

    def excludes_zero(self) -> bool:
        """True if the CI lies wholly above or below 0 (a difference resolved at this confidence)."""
        return self.ci_low is not None and (self.ci_low > 0 or self.ci_high < 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "half_width": self.half_width}


def summarize(values, confidence: float = 0.95) -> Summary:
    """Mean, sample std (ddof=1), standard error and the t CI of ``values`` (1-D, finite; NaN/None
    are dropped)."""
    _check_confidence(confidence)
    x = np.array([v for v in np.ravel(np.asarray(values, dtype=object)) if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return Summary(0, None, None, None, None, None, confidence)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, None, None, None, None, confidence)
    std = float(x.std(ddof=1))
    sem = std / math.sqrt(n)
    half = t_critical(n - 1, confidence) * sem
    return Summary(n, mean, std, sem, mean - half, mean + half, confidence)


def paired_differences(baseline: Mapping, treatment: Mapping) -> dict:
    """``{key: treatment[key] - baseline[key]}`` over the keys (seeds, file names) both have with a
    finite value, in ``baseline``'s order."""
    def ok(v):
        return v is not None and math.isfinite(float(v))

    return {k: float(treatment[k]) - float(baseline[k]) for k in baseline
            if k in treatment and ok(baseline[k]) and ok(treatment[k])}


def paired_summary(baseline: Mapping, treatment: Mapping, confidence: float = 0.95) -> Summary:
    """:func:`summarize` of :func:`paired_differences` (treatment minus baseline, paired by key)."""
    return summarize(list(paired_differences(baseline, treatment).values()), confidence)


# --- power of the paired t-test --------------------------------------------------------------------
def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in np.ravel(x)]).reshape(np.shape(x))


def paired_t_power(n: int, effect: float, std: float, confidence: float = 0.95, points: int = 20001) -> float:
    """Probability that a two-sided paired t-test over ``n`` pairs rejects "no difference" at level
    ``1 - confidence`` when the true mean difference is ``effect`` and the per-pair std is ``std``.

    T = (Z + delta) / S with delta = effect * sqrt(n) / std, Z ~ N(0, 1) and S = sqrt(chi2_df / df),
    df = n - 1 (the noncentral t); the power E_S[P(|T| > t*)] is integrated over the density of S on a
    grid of ``points`` (trapezoid rule; within 1e-5 of scipy.stats.nct)."""
    if not (isinstance(n, (int, np.integer)) and n >= 2):
        raise ValueError(f"n: expected an integer >= 2 (pairs), got {n!r}")
    if not std > 0:
        raise ValueError(f"std: expected > 0, got {std!r}")
    df = n - 1
    delta = abs(effect) * math.sqrt(n) / std
    t_star = t_critical(df, confidence)
    s = np.linspace(0.0, 1.0 + 40.0 / math.sqrt(2 * df), points)[1:]
    log_f = (math.log(2) + (df / 2) * math.log(df / 2) - math.lgamma(df / 2) + (df - 1) * np.log(s)
             - df * s * s / 2)
    density = np.exp(log_f)
    reject = 1 - _normal_cdf(t_star * s - delta) + _normal_cdf(-t_star * s - delta)
    s = np.concatenate([[0.0], s])
    density = np.concatenate([[math.sqrt(2 / math.pi) if df == 1 else 0.0], density])  # the density at s = 0
    reject = np.concatenate([[1.0], reject])  # S -> 0: |T| -> infinity
    return float(np.clip(np.trapezoid(density * reject, s), 0.0, 1.0))


def required_pairs(effect: float, std: float, power: float = 0.8, confidence: float = 0.95, max_n: int = 10_000) -> int:
    """The smallest number of pairs (seeds) n >= 2 at which a two-sided paired t-test at level
    ``1 - confidence`` detects a true mean difference ``effect`` with probability >= ``power``, given
    the per-pair std ``std`` (:func:`paired_t_power`)."""
    if not 0 < power < 1:
        raise ValueError(f"power: expected a probability in (0, 1), got {power!r}")
    if effect == 0:
        raise ValueError("effect: expected a nonzero difference to detect, got 0")
    lo, hi = 2, 2
    while paired_t_power(hi, effect, std, confidence) < power:  # power grows with n: double, then bisect
        if hi >= max_n:
            raise ValueError(f"required_pairs: more than max_n={max_n} pairs needed (effect {effect}, std {std})")
        lo, hi = hi + 1, min(2 * hi, max_n)
    while lo < hi:
        mid = (lo + hi) // 2
        if paired_t_power(mid, effect, std, confidence) >= power:
            hi = mid
        else:
            lo = mid + 1
    return hi
