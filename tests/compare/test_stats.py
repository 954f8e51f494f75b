"""The report's statistics against hand computations, closed forms and (where installed) SciPy."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.report.stats import paired_t_test, regularized_incomplete_beta, summarize, t_two_sided_p


def test_paired_t_test_by_hand():
    # differences 0.1, 0.2, 0.3 (x - b): mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3, df = 2;
    # for df = 2 the two-sided p is 1 - |t| / sqrt(2 + t^2) = 1 - sqrt(12 / 14)
    test = paired_t_test([1.1, 2.2, 3.3], [1.0, 2.0, 3.0])
    assert test.n == 3 and test.df == 2
    assert test.mean_diff == pytest.approx(0.2, abs=1e-12)
    assert test.std_diff == pytest.approx(0.1, abs=1e-12)
    assert test.t == pytest.approx(2 * math.sqrt(3), rel=1e-9)
    assert test.p == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)  # 0.0741799...


def test_two_seeds_closed_form():
    # df = 1 is the Cauchy distribution: p = 1 - (2 / pi) atan |t|. Differences 1 and 3: mean 2, sd sqrt 2,
    # t = 2 / (sqrt 2 / sqrt 2) = 2
    test = paired_t_test([1.0, 3.0], [0.0, 0.0])
    assert test.t == pytest.approx(2.0, rel=1e-12)
    assert test.p == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-9)  # 0.2951672...


def test_degenerate_cases():
    one = paired_t_test([1.0], [0.5])
    assert one.p is None and one.t is None and one.mean_diff == 0.5
    assert paired_t_test([1.0, 2.0], [1.0, 2.0]).p == 1.0  # no difference at all
    assert paired_t_test([2.0, 3.0], [1.0, 2.0]).p == 0.0  # the same difference every seed
    with pytest.raises(ValueError, match="differ in number"):
        paired_t_test([1.0, 2.0], [1.0])
    assert summarize([4.0]).std is None


@pytest.mark.parametrize("x", [0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
@pytest.mark.parametrize("a", [0.5, 1.0, 2.5, 7.0])
def test_incomplete_beta_closed_forms(a, x):
    assert regularized_incomplete_beta(a, 1.0, x) == pytest.approx(x**a, abs=1e-12)  # I_x(a, 1) = x^a
    assert regularized_incomplete_beta(1.0, a, x) == pytest.approx(1 - (1 - x) ** a, abs=1e-12)  # I_x(1, b)


def test_incomplete_beta_half_half():
    # I_x(1/2, 1/2) = (2 / pi) asin(sqrt x): the arcsine distribution
    for x in (0.05, 0.25, 0.5, 0.9):
        assert regularized_incomplete_beta(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.2, 5.0, 40.0])
@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30, 200])
def test_t_p_value_matches_scipy(t, df):
    stats = pytest.importorskip("scipy.stats")
    assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-15)


# multiples of 1/8: sums, differences and the common offset below are exact in binary floating point
eighths = st.integers(-800, 800).map(lambda i: i / 8)
values = st.lists(eighths, min_size=3, max_size=8)


@settings(max_examples=200, deadline=None)
@given(values, st.data())
def test_paired_test_invariants(xs, data):
    bs = data.draw(st.lists(eighths, min_size=len(xs), max_size=len(xs)))
    forward, backward = paired_t_test(xs, bs), paired_t_test(bs, xs)
    assert 0.0 <= forward.p <= 1.0
    assert forward.p == pytest.approx(backward.p, abs=1e-12)  # the test is symmetric in its two arms
    if forward.t is not None and math.isfinite(forward.t):
        assert backward.t == pytest.approx(-forward.t, rel=1e-9, abs=1e-9)
        shifted = paired_t_test([x + 7.5 for x in xs], [b + 7.5 for b in bs])  # a common offset cancels in pairs
        assert shifted.t == pytest.approx(forward.t, rel=1e-6, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=64), min_size=2, max_size=10))
def test_summary_matches_statistics_module(xs):
    s = summarize(xs)
    assert s.mean == pytest.approx(statistics.fmean(xs), abs=1e-9)
    assert s.std == pytest.approx(statistics.stdev(xs), rel=1e-9, abs=1e-9)
