"""experiments.report.paired: the paired difference in accuracy of two nets on the same images and
McNemar's exact p-value, checked against scipy's binomial test and a direct computation from the
per-image differences."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from experiments.report.paired import compare_predictions, mcnemar_exact_p


def _predictions(seed: int, n: int, classes: int, agree: float):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    a = torch.where(torch.rand(n, generator=g) < 0.7, labels, torch.randint(0, classes, (n,), generator=g))
    b = torch.where(torch.rand(n, generator=g) < agree, a, torch.randint(0, classes, (n,), generator=g))
    return a, b, labels


@settings(max_examples=60)
@given(b=st.integers(0, 400), c=st.integers(0, 400))
def test_the_exact_p_value_is_scipys_two_sided_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    # both are one rounding of an exact sum (scipy sums floats: a few ulps apart)
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert mcnemar_exact_p(b, c) == mcnemar_exact_p(c, b)


def test_the_p_value_stays_exact_far_beyond_float_range_of_its_terms():
    # 2^3000 overflows a float: the division is of Python integers
    assert mcnemar_exact_p(1500, 1500) == 1.0
    assert 0 < mcnemar_exact_p(1400, 1600) < 1e-3
    assert mcnemar_exact_p(0, 6) == 2 / 64


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), classes=st.integers(2, 10),
       agree=st.floats(0, 1))
def test_counts_difference_and_stderr_equal_a_direct_computation(seed, n, classes, agree):
    a, b, labels = _predictions(seed, n, classes, agree)
    got = compare_predictions(a, b, labels)
    right_a, right_b = (a == labels), (b == labels)
    assert got.n == n and got.both + got.only_a + got.only_b == int((right_a | right_b).sum())
    # difference = acc(A) - acc(B); counts are integers, so exactly (b - c) / n
    assert got.difference == (int(right_a.sum()) - int(right_b.sum())) / n
    d = right_a.double() - right_b.double()
    # the standard error of the mean of the per-image differences (divisor n): float64 sums of
    # at most 300 terms in [-1, 1], agreeing to rounding
    assert got.stderr == pytest.approx(d.std(unbiased=False).item() / math.sqrt(n), abs=1e-12)
    swapped = compare_predictions(b, a, labels)
    assert (swapped.only_a, swapped.only_b, swapped.p_value) == (got.only_b, got.only_a, got.p_value)
    assert swapped.difference == -got.difference


def test_identical_predictions_are_no_evidence_and_shapes_must_agree():
    a, _, labels = _predictions(0, 50, 10, 1.0)
    same = compare_predictions(a, a, labels)
    assert (same.only_a, same.only_b, same.difference, same.stderr, same.p_value) == (0, 0, 0.0, 0.0, 1.0)
    assert "+0.00 points" in same.describe() and "p = 1" in same.describe()
    with pytest.raises(ValueError, match=r"expected predictions and labels of one shape \(N,\), "
                                         r"got \(50,\), \(49,\) and \(50,\)"):
        compare_predictions(a, a[:49], labels)
