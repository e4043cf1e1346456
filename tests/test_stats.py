"""Tests of jaxsel.stats against scipy.stats and hand-computed closed forms."""

import numpy as np
import pytest
import scipy.stats as scipy_stats

from jaxsel import stats


def _samples(seed, n=40, ties=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    y = 0.6 * x + 0.8 * rng.standard_normal(n)
    if ties:  # Few distinct values in both, so many pairs tie in x, in y, or in both.
        x, y = np.round(x), np.round(y * 2) / 2
    return x, y


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_match_scipy(seed, ties):
    x, y = _samples(seed, ties=ties)
    assert stats.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y).statistic, abs=1e-12)
    assert stats.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic,
                                                 abs=1e-12)
    assert stats.kendall(x, y) == pytest.approx(
        scipy_stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)


def test_correlations_on_hand_computed_examples():
    # Pearson of (1,2,3) with (1,3,2): deviations (-1,0,1) and (-1,1,0), so 1 / sqrt(2 * 2).
    assert stats.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # Spearman with a tie in x: ranks (1.5, 1.5, 3) vs (1, 2, 3), deviations (-.5, -.5, 1) and
    # (-1, 0, 1), so 1.5 / sqrt(1.5 * 2) = sqrt(3) / 2.
    assert stats.spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2)
    # Kendall tau-b of x=(1,1,2), y=(1,2,3): pairs (0,1) tied in x, (0,2) and (1,2) concordant;
    # tau_b = 2 / sqrt(2 * 3).
    assert stats.kendall([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(6))
    # Monotone but non-linear: rank correlations are exactly 1, Pearson is not.
    x = np.arange(1.0, 11.0)
    assert stats.spearman(x, np.exp(x)) == 1.0 and stats.kendall(x, np.exp(x)) == 1.0
    assert stats.pearson(x, np.exp(x)) < 0.9


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(stats.average_ranks([3.0, 1.0, 3.0, 2.0, 3.0]),
                                  [4.0, 1.0, 4.0, 2.0, 4.0])
    np.testing.assert_array_equal(stats.average_ranks([2, 2]), [1.5, 1.5])


@pytest.mark.parametrize("fn", [stats.pearson, stats.spearman, stats.kendall])
def test_constant_input_gives_nan(fn):
    assert np.isnan(fn([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap():
    x, y = _samples(3, n=60)
    low, high = stats.bootstrap_ci(stats.pearson, x, y, num_resamples=4000, seed=0)
    reference = scipy_stats.bootstrap(
        (x, y), lambda a, b: scipy_stats.pearsonr(a, b).statistic, paired=True,
        vectorized=False, n_resamples=4000, method="percentile", confidence_level=0.95,
        rng=np.random.default_rng(1)).confidence_interval
    # Two independent Monte Carlo estimates of the same quantiles.
    assert low == pytest.approx(reference.low, abs=0.03)
    assert high == pytest.approx(reference.high, abs=0.03)
    assert low < stats.pearson(x, y) < high


def test_bootstrap_ci_width_follows_confidence_and_sample_size():
    x, y = _samples(4, n=200)
    low90, high90 = stats.bootstrap_ci(stats.spearman, x, y, 1000, seed=0, confidence=0.9)
    low99, high99 = stats.bootstrap_ci(stats.spearman, x, y, 1000, seed=0, confidence=0.99)
    assert low99 < low90 < high90 < high99
    # Fisher's approximation: the 95% interval of r is about 2 * 1.96 * (1 - r^2) / sqrt(n) wide.
    r = stats.pearson(x, y)
    low, high = stats.bootstrap_ci(stats.pearson, x, y, 2000, seed=1)
    assert high - low == pytest.approx(2 * 1.96 * (1 - r**2) / np.sqrt(200), rel=0.3)


def test_bootstrap_ci_is_seeded_and_skips_undefined_resamples():
    x, y = _samples(5, n=10)
    first = stats.bootstrap_ci(stats.kendall, x, y, 200, seed=7)
    assert first == stats.bootstrap_ci(stats.kendall, x, y, 200, seed=7)
    assert first != stats.bootstrap_ci(stats.kendall, x, y, 200, seed=8)
    # Perfectly related pairs: every defined resample gives exactly 1; the degenerate ones
    # (one distinct point drawn) are NaN and left out.
    assert stats.bootstrap_ci(stats.spearman, [1, 2], [3, 4], 100, seed=0) == (1.0, 1.0)


def test_variance_reduction_closed_form():
    values = np.array([1.0, 3.0, 10.0, 14.0])
    # Total: mean 7, squared deviations 36 + 16 + 9 + 49 = 110. Within clusters {1,3}, {10,14}:
    # 1 + 1 + 4 + 4 = 10.
    assert stats.variance_reduction(values, [0, 0, 1, 1]) == pytest.approx(1 - 10 / 110)
    assert stats.variance_reduction(values, [0, 1, 2, 3]) == pytest.approx(1.0)
    assert stats.variance_reduction(values, [5, 5, 5, 5]) == pytest.approx(0.0)
    # Vectors: squared distances summed over dimensions.
    points = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 4.0], [10.0, 6.0]])
    total = np.sum((points - points.mean(0)) ** 2)
    assert stats.variance_reduction(points, ["a", "a", "b", "b"]) == pytest.approx(1 - 4 / total)


def test_purity_closed_form():
    labels = ["x", "x", "y", "y", "y", "z"]
    # Cluster 0 = {x, x, y}: majority x, 2 points; cluster 1 = {y, y, z}: majority y, 2 points.
    assert stats.purity(labels, [0, 0, 0, 1, 1, 1]) == pytest.approx(4 / 6)
    assert stats.purity(labels, [0, 1, 2, 3, 4, 5]) == 1.0
    assert stats.purity(labels, [0] * 6) == pytest.approx(3 / 6)


def test_mean_interval_against_scipy_and_a_closed_form():
    x = np.array([6.2, 6.5, 6.1, 6.7, 6.4])
    got = stats.mean_interval(x, 0.9)
    low, high = scipy_stats.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert got["n"] == 5 and got["mean"] == pytest.approx(x.mean())
    assert got["std"] == pytest.approx(np.std(x, ddof=1))
    assert (got["low"], got["high"]) == pytest.approx((low, high))
    # Two values 0 and 2: mean 1, std sqrt(2), t(0.975; 1 df) = 12.7062.
    two = stats.mean_interval([0.0, 2.0])
    assert (two["low"], two["high"]) == pytest.approx((1 - 12.7062047, 1 + 12.7062047))
    one = stats.mean_interval([3.0])
    assert one == {"n": 1, "mean": 3.0, "std": None, "low": None, "high": None}


@pytest.mark.parametrize("call, message", [
    (lambda: stats.pearson([1, 2, 3], [1, 2]), "one length"),
    (lambda: stats.spearman([1], [1]), "at least 2"),
    (lambda: stats.kendall([1, np.nan], [1, 2]), "x has a non-finite"),
    (lambda: stats.pearson([[1, 2]], [[1, 2]]), "x must be 1-D"),
    (lambda: stats.bootstrap_ci(stats.pearson, [1, 2], [1, 2], 0, 0), "num_resamples"),
    (lambda: stats.bootstrap_ci(stats.pearson, [1, 2], [1, 2], 10, 0, 1.0), "confidence"),
    (lambda: stats.variance_reduction([1, 2], [0]), "cluster_ids must have shape"),
    (lambda: stats.variance_reduction([2, 2], [0, 1]), "values: all points are equal"),
    (lambda: stats.purity([], []), "labels must be a non-empty"),
    (lambda: stats.mean_interval([]), "values must be a non-empty"),
    (lambda: stats.mean_interval([1.0, np.inf]), "values has a non-finite"),
    (lambda: stats.mean_interval([1.0, 2.0], 1.0), "confidence"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
