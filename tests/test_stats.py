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


def _clustered(seed, num_groups=8, per_group=5):
    """Pairs in groups that share a large group effect in both x and y (like the eval sets of one
    mixture): the groups are the independent units, not the pairs."""
    rng = np.random.default_rng(seed)
    effect_G = rng.standard_normal(num_groups)
    x = np.repeat(effect_G, per_group) + 0.3 * rng.standard_normal(num_groups * per_group)
    y = np.repeat(effect_G + 0.8 * rng.standard_normal(num_groups), per_group) + (
        0.3 * rng.standard_normal(num_groups * per_group))
    return x, y, np.repeat(np.arange(num_groups)[::-1], per_group)  # Labels in another order.


def test_grouped_bootstrap_ci_matches_a_hand_written_group_resampling_loop():
    x, y, groups = _clustered(0)
    got = stats.bootstrap_ci(stats.pearson, x, y, 300, seed=3, groups=groups)
    labels = sorted(set(groups.tolist()))
    draws = np.random.default_rng(3).integers(0, len(labels), size=(300, len(labels)))
    values = []
    for draw in draws:
        xs, ys = [], []
        for g in draw:
            for i in range(len(x)):
                if groups[i] == labels[g]:
                    xs.append(x[i])
                    ys.append(y[i])
        values.append(scipy_stats.pearsonr(xs, ys).statistic)
    assert got == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), abs=1e-12)


def test_grouped_bootstrap_ci_of_singletons_is_the_pair_bootstrap():
    x, y = _samples(6, n=30)
    assert stats.bootstrap_ci(stats.spearman, x, y, 200, seed=2, groups=np.arange(30)) == (
        stats.bootstrap_ci(stats.spearman, x, y, 200, seed=2))


def test_grouped_bootstrap_ci_is_wider_than_the_pair_bootstrap_for_clustered_pairs():
    # 8 independent groups of 5 pairs: resampling the 40 pairs as if independent overstates the
    # sample size and gives too narrow an interval.
    x, y, groups = _clustered(1)
    pair = stats.bootstrap_ci(stats.pearson, x, y, 2000, seed=0)
    grouped = stats.bootstrap_ci(stats.pearson, x, y, 2000, seed=0, groups=groups)
    assert grouped[1] - grouped[0] > 1.5 * (pair[1] - pair[0])


def _pooled(values, clusters):
    """1 - sum of the within-cluster sums of squares / the total sum of squares, one cluster at a
    time ([N] or [N, D] values)."""
    x = np.asarray(values, np.float64).reshape(len(values), -1)
    clusters = np.asarray(clusters)
    within = sum(np.sum((x[clusters == c] - x[clusters == c].mean(0)) ** 2)
                 for c in np.unique(clusters))
    return 1 - within / np.sum((x - x.mean(0)) ** 2)


def _unweighted(values, clusters):
    """1 - the plain mean of the per-cluster variances (ddof 0) / the total variance."""
    x = np.asarray(values, np.float64).reshape(len(values), -1)
    clusters = np.asarray(clusters)
    variances = [np.mean(np.sum((x[clusters == c] - x[clusters == c].mean(0)) ** 2, axis=1))
                 for c in np.unique(clusters)]
    return 1 - np.mean(variances) / np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))


def test_variance_reductions_on_hand_computed_examples():
    values = np.array([0.0, 2.0, 4.0, 11.0, 13.0])
    # Mean 6; squared deviations 36 + 16 + 4 + 25 + 49 = 130, variance 26. Clusters {0, 2, 4}
    # (mean 2, sum of squares 8, variance 8/3) and {11, 13} (mean 12, sum of squares 2,
    # variance 1): pooled 1 - 10/130; unweighted 1 - ((8/3 + 1) / 2) / 26 = 1 - 11/156.
    two = [0, 0, 0, 1, 1]
    assert stats.variance_reduction_pooled(values, two) == pytest.approx(1 - 10 / 130)
    assert stats.variance_reduction_unweighted(values, two) == pytest.approx(1 - 11 / 156)
    # Singletons {11} and {13}: variance 0 each, and each counts as a cluster. Pooled
    # 1 - 8/130; unweighted 1 - ((8/3 + 0 + 0) / 3) / 26 = 1 - 8/234.
    singletons = [0, 0, 0, 1, 2]
    assert stats.variance_reduction_pooled(values, singletons) == pytest.approx(1 - 8 / 130)
    assert stats.variance_reduction_unweighted(values, singletons) == pytest.approx(1 - 8 / 234)
    for fn in (stats.variance_reduction_pooled, stats.variance_reduction_unweighted):
        assert fn(values, [0, 1, 2, 3, 4]) == pytest.approx(1.0)  # all singletons
        assert fn(values, [5, 5, 5, 5, 5]) == pytest.approx(0.0)  # one cluster
    # Equal sizes: the two forms agree. {0, 2} and {11, 13} of [0, 2, 11, 13]: mean 6.5,
    # total 42.25 + 20.25 + 20.25 + 42.25 = 125, within 2 + 2 = 4; variances 1, 1 vs 31.25.
    equal = np.array([0.0, 2.0, 11.0, 13.0])
    assert stats.variance_reduction_pooled(equal, [0, 0, 1, 1]) == pytest.approx(1 - 4 / 125)
    assert stats.variance_reduction_unweighted(equal, [0, 0, 1, 1]) == pytest.approx(
        1 - 1 / 31.25)
    # Vectors: squared distances summed over dimensions; clusters {a, a} and {b, b} hold 2 + 2.
    points = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 4.0], [10.0, 6.0]])
    total = np.sum((points - points.mean(0)) ** 2)
    assert stats.variance_reduction_pooled(points, ["a", "a", "b", "b"]) == pytest.approx(
        1 - 4 / total)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variance_reductions_match_numpy_on_unequal_clusters(seed):
    # Sizes 3, 12, 60 and a singleton, with spreads that shrink as clusters grow: the two
    # forms weigh the clusters differently and differ clearly.
    rng = np.random.default_rng(seed)
    sizes, means, spreads = [3, 12, 60, 1], [0.0, 2.0, 5.0, 9.0], [4.0, 1.0, 0.3, 0.0]
    values = np.concatenate([m + s * rng.standard_normal(n)
                             for n, m, s in zip(sizes, means, spreads, strict=True)])
    order = rng.permutation(len(values))  # clusters interleaved, labels in no order
    values, labels = values[order], np.repeat([7, 2, 5, 0], sizes)[order]
    pooled = stats.variance_reduction_pooled(values, labels)
    unweighted = stats.variance_reduction_unweighted(values, labels)
    assert pooled == pytest.approx(_pooled(values, labels), abs=1e-12)
    assert unweighted == pytest.approx(_unweighted(values, labels), abs=1e-12)
    assert abs(pooled - unweighted) > 0.05
    points = np.stack([values, rng.standard_normal(len(values))], axis=1)
    assert stats.variance_reduction_pooled(points, labels) == pytest.approx(
        _pooled(points, labels), abs=1e-12)
    assert stats.variance_reduction_unweighted(points, labels) == pytest.approx(
        _unweighted(points, labels), abs=1e-12)


def test_unweighted_variance_reduction_can_be_negative():
    # A large tight cluster and a small spread one: the small one's variance exceeds the total's.
    values = np.array([0.0] * 8 + [0.1] * 8 + [-3.0, 3.0])
    clusters = [0] * 16 + [1, 1]
    assert stats.variance_reduction_unweighted(values, clusters) == pytest.approx(
        _unweighted(values, clusters)) and _unweighted(values, clusters) < 0
    assert stats.variance_reduction_pooled(values, clusters) > 0


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
    (lambda: stats.bootstrap_ci(stats.pearson, [1, 2], [1, 2], 10, 0, groups=[0]),
     "groups must have shape"),
    (lambda: stats.variance_reduction_pooled([1, 2], [0]), "cluster_ids must have shape"),
    (lambda: stats.variance_reduction_unweighted([1, 2], [0]), "cluster_ids must have shape"),
    (lambda: stats.variance_reduction_pooled([2, 2], [0, 1]), "values: all points are equal"),
    (lambda: stats.variance_reduction_unweighted([2, 2], [0, 1]), "values: all points are"),
    (lambda: stats.variance_reduction_unweighted([1, np.nan], [0, 1]), "values has a non-fin"),
    (lambda: stats.variance_reduction_pooled(np.ones((2, 2, 2)), [0, 1]), "values must be"),
    (lambda: stats.purity([], []), "labels must be a non-empty"),
    (lambda: stats.mean_interval([]), "values must be a non-empty"),
    (lambda: stats.mean_interval([1.0, np.inf]), "values has a non-finite"),
    (lambda: stats.mean_interval([1.0, 2.0], 1.0), "confidence"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
