"""Statistics for reports over seeds: mean and sample standard deviation, and the paired t-test.

A method and the baseline trained with the same seeds (same initialisation, same data order) form pairs; the
paired t-test asks whether the mean of the per-seed differences d_i = x_i - b_i is zero:

    t = mean(d) / (sd(d) / sqrt(n)),  sd with n - 1 in the denominator,  df = n - 1,
    p (two-sided) = P(|T_df| >= |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2),

where I_x(a, b) is the regularised incomplete beta function (Student 1908; any statistics text). It is computed
here with its continued fraction, so no SciPy is needed at run time (the tests compare with SciPy and with the
closed forms for df = 1 and df = 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "PairedTest", "summarize", "paired_t_test", "t_two_sided_p", "regularized_incomplete_beta"]


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (n - 1) of ``n`` values; ``std`` is None for fewer than two."""

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class PairedTest:
    """The paired t-test of method minus baseline over ``n`` matched seeds (``p`` None for fewer than two)."""

    mean_diff: float
    std_diff: float | None
    n: int
    t: float | None
    df: int
    p: float | None


def summarize(values: Sequence[float]) -> Summary:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(mean=mean, std=None, n=n)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Summary(mean=mean, std=math.sqrt(var), n=n)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz evaluation), converging for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        # even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))
        num = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        # odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    # the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps the fraction in its fast-converging range
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(values: Sequence[float], baseline: Sequence[float]) -> PairedTest:
    """Paired t-test of ``values`` against ``baseline`` (same order: the i-th of each share a seed).

    With fewer than two pairs there is no test (``t`` and ``p`` None). Identical differences (zero spread)
    give p = 1 when they are all zero and p = 0 otherwise: the limit of the test as the spread vanishes."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values differ in number: {len(values)} vs {len(baseline)}")
    diffs = [float(v) - float(b) for v, b in zip(values, baseline)]
    if not diffs:
        raise ValueError("paired_t_test needs at least one pair")
    summary = summarize(diffs)
    n = summary.n
    if n < 2 or summary.std is None:
        return PairedTest(mean_diff=summary.mean, std_diff=None, n=n, t=None, df=n - 1, p=None)
    if summary.std == 0.0:
        t = 0.0 if summary.mean == 0.0 else math.copysign(math.inf, summary.mean)
    else:
        t = summary.mean / (summary.std / math.sqrt(n))
    return PairedTest(mean_diff=summary.mean, std_diff=summary.std, n=n, t=t, df=n - 1, p=t_two_sided_p(t, n - 1))
