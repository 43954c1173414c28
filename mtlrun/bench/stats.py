"""The bench's statistics: medians' order-statistic intervals, interquartile ranges, paired ratios, verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95  # of the ratios' intervals
# The targets: a ratio at most this many times its reference (the hand-written loop, or the ideal).
AVERAGED_VS_HAND, STEPS_VS_IDEAL, DATA_WAIT_GPU = 1.05, 1.10, 0.05


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2): the chance that at most k of n draws fall below their median."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def least_repeats(confidence: float = CONFIDENCE) -> int:
    """The fewest draws whose smallest and largest cover their median with `confidence`."""
    n = 1
    while 2 * _binomial_half_cdf(0, n) > 1 - confidence:
        n += 1
    return n


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free interval for the median of what `values` are draws of: the k-th smallest and k-th
    largest value, k the largest rank for which the median lies outside with probability
    2 P(Binomial(n, 1/2) <= k - 1) <= 1 - confidence (an order-statistic interval: no normality assumed, and
    a few repeats slowed by another process move it by at most as many ranks)."""
    n, k = len(values), 0
    while k < n // 2 and 2 * _binomial_half_cdf(k, n) <= 1 - confidence:
        k += 1
    if k == 0:
        raise ValueError(f"{n} values give no {confidence:.0%} interval of their median; "
                         f"{least_repeats(confidence)} do")
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def spread(values: Sequence[float]) -> float:
    """The interquartile range (quartiles linear between order statistics, numpy's default)."""
    return float(np.quantile(values, 0.75) - np.quantile(values, 0.25))


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float, float]:
    """The median of the ratios of measurements paired by repeat (timed in the same sweep, so that a load
    slowing both cancels) and its interval: (median, low, high)."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    low, high = median_interval(ratios)
    return float(np.median(ratios)), low, high


def verdict(low: float, high: float, limit: float) -> str:
    """Whether a ratio meets `ratio <= limit`: "yes" when its whole interval does, "no" when none of it does,
    "within noise" when the interval straddles the limit and the measurement cannot tell."""
    if high <= limit:
        return "yes"
    if low > limit:
        return "no"
    return "within noise"
