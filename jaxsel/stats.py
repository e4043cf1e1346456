"""Correlations with bootstrap confidence intervals, and clustering quality metrics.

- `pearson`, `spearman` (Pearson of average ranks, so ties share a rank) and `kendall` (tau-b,
  which corrects for ties in either variable) take two equally long 1-D sequences of finite
  numbers and return a float in [-1, 1], or NaN where the correlation is undefined (a constant
  input, as scipy.stats does).
- `bootstrap_ci(fn, x, y, ...)`: the percentile bootstrap over (x_i, y_i) pairs of any of them,
  or over groups of pairs (a cluster bootstrap, for pairs that are not independent).
- `variance_reduction_pooled` / `variance_reduction_unweighted(values, cluster_ids)` (the
  size-weighted and the plain mean of the within-cluster variances over the total variance) and
  `purity(labels, cluster_ids)`: how well a clustering explains a per-point value or label
  (Sam et al., 2025); `cluster_metrics` gives all three (`CLUSTER_METRICS`) of one clustering
  with intervals, against the floor of `random_clusters` (`expected_random_variance_reduction`).
- `mean_interval(values)`: the mean of independent runs (e.g. seeds) with its Student-t interval.

Bad input (other lengths, too few points, non-finite numbers, impossible options) raises a
ValueError naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.stats

Correlation = Callable[[np.ndarray, np.ndarray], float]


def pearson(x, y) -> float:
    """The Pearson correlation of `x` and `y`; NaN if either is constant."""
    x_N, y_N = _paired(x, y)
    dx, dy = x_N - x_N.mean(), y_N - y_N.mean()
    denominator = np.sqrt((dx @ dx) * (dy @ dy))
    if denominator == 0:
        return float("nan")
    return float(np.clip((dx @ dy) / denominator, -1.0, 1.0))


def spearman(x, y) -> float:
    """The Spearman rank correlation: Pearson of the ranks, ties given their average rank."""
    x_N, y_N = _paired(x, y)
    return pearson(average_ranks(x_N), average_ranks(y_N))


def kendall(x, y) -> float:
    """Kendall's tau-b: `sum_{i<j} sgn(dx) sgn(dy) / sqrt(#pairs untied in x * #untied in y)`.

    Exact and O(N^2) in time and memory (fine for the thousands of points of a correlation
    table); NaN if either input is constant.
    """
    x_N, y_N = _paired(x, y)
    upper = np.triu_indices(len(x_N), k=1)
    sx_P = np.sign(x_N[:, None] - x_N[None, :])[upper]
    sy_P = np.sign(y_N[:, None] - y_N[None, :])[upper]
    denominator = np.sqrt(np.count_nonzero(sx_P) * np.count_nonzero(sy_P))
    if denominator == 0:
        return float("nan")
    return float((sx_P @ sy_P) / denominator)


def average_ranks(values) -> np.ndarray:
    """Ranks 1..N of `values` (1-D), tied values sharing the mean of their ranks."""
    values_N = np.asarray(values)
    order = np.argsort(values_N, kind="stable")
    sorted_N = values_N[order]
    # Each run of equal values [start, end) gets rank (start + 1 + end) / 2.
    starts = np.flatnonzero(np.r_[True, sorted_N[1:] != sorted_N[:-1]])
    ends = np.r_[starts[1:], len(values_N)]
    ranks = np.empty(len(values_N))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def bootstrap_ci(fn: Correlation, x, y, num_resamples: int, seed: int,
                 confidence: float = 0.95, groups=None) -> tuple[float, float]:
    """The percentile bootstrap confidence interval of `fn(x, y)` over (x_i, y_i) pairs.

    Draws `num_resamples` samples of N pairs with replacement (seeded by `seed`), evaluates `fn`
    on each and returns the `(1 - confidence) / 2` and `(1 + confidence) / 2` quantiles of the
    results. With `groups` (one label per pair) the unit drawn is a group (a cluster bootstrap,
    for pairs of one group that are not independent, e.g. all eval sets of one mixture): each
    resample draws G of the G groups with replacement (index g: the group of the g-th smallest
    label) and takes all pairs of each drawn group. Distinct labels draw exactly as pairs do, so
    `groups=range(N)` gives the pair bootstrap's interval. Resamples where `fn` is undefined
    (NaN, e.g. all draws of one point) are left out; if all are, the interval is (NaN, NaN).
    """
    x_N, y_N = _paired(x, y)
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    if groups is None:
        resamples = rng.integers(0, len(x_N), size=(num_resamples, len(x_N)))
    else:
        members = _group_members(groups, len(x_N))
        draws_RxG = rng.integers(0, len(members), size=(num_resamples, len(members)))
        resamples = [np.concatenate([members[g] for g in draw_G]) for draw_G in draws_RxG]
    values_R = np.array([fn(x_N[i], y_N[i]) for i in resamples], np.float64)
    values_R = values_R[~np.isnan(values_R)]
    if values_R.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values_R, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _group_members(groups, n: int) -> list[np.ndarray]:
    """The indices of each group's members (ascending), groups in the order of their labels'
    sorted values: `_group_members(["b", "a", "b"], 3)` -> [[1], [0, 2]]."""
    _, inverse = np.unique(_labels(groups, n, "groups"), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def variance_reduction_pooled(values, cluster_ids) -> float:
    """The size-weighted (pooled) variance reduction of `values` ([N] or [N, D] vectors):

        1 - sum_c SS_c / SS,   SS_c = sum_{i in c} |x_i - mean_c|^2,   SS = sum_i |x_i - mean|^2,

    i.e. `1 - sum_c (n_c / N) var_c / var` (each cluster's variance weighted by its size; the
    share of the total sum of squares the clusters explain, as in an ANOVA). 1 means the clusters
    explain all the variance, 0 none of it; never negative.
    """
    ss_C, _, total_ss, _ = _sums_of_squares(values, cluster_ids)
    return float(1.0 - ss_C.sum() / total_ss)


def variance_reduction_unweighted(values, cluster_ids) -> float:
    """The unweighted variance reduction of `values` ([N] or [N, D] vectors):

        1 - ((1 / C) sum_c var_c) / var,   var_c = SS_c / n_c,   var = SS / N,

    the plain mean of the C per-cluster variances (ddof 0; `SS_c`, `SS` as in
    `variance_reduction_pooled`) over the total variance: every cluster counts once, whatever
    its size. A singleton cluster has variance 0 (ddof 0) and counts as one of the C clusters,
    so it pulls the mean down. Equal to the pooled form when all clusters have one size; unlike
    it, it can be negative (small clusters more spread out than the whole).
    """
    ss_C, counts_C, total_ss, n = _sums_of_squares(values, cluster_ids)
    return float(1.0 - np.mean(ss_C / counts_C) / (total_ss / n))


def _sums_of_squares(values, cluster_ids) -> tuple[np.ndarray, np.ndarray, float, int]:
    """`(SS_C, n_C, SS, N)`: each cluster's sum of squared distances to its mean and its size
    (clusters in the order of their sorted labels), the total sum of squares and N."""
    values_NxD = np.asarray(values, np.float64)
    if values_NxD.ndim not in (1, 2):
        raise ValueError(f"values must be [N] or [N, D], got shape {values_NxD.shape}")
    values_NxD = values_NxD.reshape(len(values_NxD), -1)
    _check_finite(values_NxD, "values")
    clusters_N = _labels(cluster_ids, len(values_NxD), "cluster_ids")
    total = float(np.sum((values_NxD - values_NxD.mean(axis=0)) ** 2))
    if total == 0:
        raise ValueError("values: all points are equal, so the variance reduction is undefined")
    _, inverse, counts_C = np.unique(clusters_N, return_inverse=True, return_counts=True)
    sums_CxD = np.zeros((len(counts_C), values_NxD.shape[1]))
    np.add.at(sums_CxD, inverse, values_NxD)
    deviations_N = np.sum((values_NxD - (sums_CxD / counts_C[:, None])[inverse]) ** 2, axis=1)
    return np.bincount(inverse, deviations_N, len(counts_C)), counts_C, total, len(values_NxD)


def purity(labels, cluster_ids) -> float:
    """The share of points whose label is the majority label of their cluster:
    `sum over clusters of (count of its most common label) / N`."""
    labels_N = np.asarray(labels)
    if labels_N.ndim != 1 or labels_N.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels_N.shape}")
    clusters_N = _labels(cluster_ids, len(labels_N), "cluster_ids")
    _, cluster_index = np.unique(clusters_N, return_inverse=True)
    _, label_index = np.unique(labels_N, return_inverse=True)
    counts_CxL = np.zeros((cluster_index.max() + 1, label_index.max() + 1), np.int64)
    np.add.at(counts_CxL, (cluster_index, label_index), 1)
    return float(counts_CxL.max(axis=1).sum() / len(labels_N))


def mean_interval(values, confidence: float = 0.95) -> dict:
    """`n`, `mean`, `std` (ddof 1) and the Student-t `confidence` interval of the mean (`low`,
    `high`) of independent measurements, e.g. one per seed; `std` and the interval are None (JSON
    null) for a single value."""
    x_N = np.asarray(values, np.float64)
    if x_N.ndim != 1 or x_N.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x_N.shape}")
    _check_finite(x_N, "values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    out = {"n": int(x_N.size), "mean": float(x_N.mean()), "std": None, "low": None,
           "high": None}
    if x_N.size >= 2:
        std = float(x_N.std(ddof=1))
        half = float(scipy.stats.t.ppf((1 + confidence) / 2, x_N.size - 1)) * std / np.sqrt(
            x_N.size)
        out.update(std=std, low=out["mean"] - half, high=out["mean"] + half)
    return out


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    """`x` and `y` as float64 1-D arrays of one length >= 2 with finite entries."""
    x_N, y_N = np.asarray(x, np.float64), np.asarray(y, np.float64)
    for name, array in (("x", x_N), ("y", y_N)):
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
        _check_finite(array, name)
    if len(x_N) != len(y_N):
        raise ValueError(f"x and y must have one length, got {len(x_N)} and {len(y_N)}")
    if len(x_N) < 2:
        raise ValueError(f"x and y need at least 2 points, got {len(x_N)}")
    return x_N, y_N


def _check_finite(array: np.ndarray, name: str) -> None:
    bad = np.flatnonzero(~np.isfinite(array.reshape(-1)))
    if bad.size:
        raise ValueError(f"{name} has a non-finite entry at flat index {bad[0]}: "
                         f"{array.reshape(-1)[bad[0]]}")


def _labels(ids, n: int, name: str) -> np.ndarray:
    ids_N = np.asarray(ids)
    if ids_N.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like the points, got {ids_N.shape}")
    return ids_N


# Each clustering metric and whether it is of the losses (else of the domains).
CLUSTER_METRICS = {"variance_reduction_pooled": (variance_reduction_pooled, True),
                   "variance_reduction_unweighted": (variance_reduction_unweighted, True),
                   "purity": (purity, False)}


def random_clusters(n: int, k: int, seed: int) -> np.ndarray:
    """[n] labels: a seeded random assignment of n points to k clusters of sizes n // k or
    n // k + 1."""
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def expected_random_variance_reduction(sizes_C) -> dict[str, float]:
    """The expected variance reductions of a uniformly random assignment of N values to
    clusters of the given sizes. A cluster of m values drawn without replacement keeps, in
    expectation, (m - 1) / (N - 1) of the total sum of squares, so its variance is
    (1 - 1 / m) N / (N - 1) times the total's: `pooled` is (C - 1) / (N - 1) whatever the sizes,
    `unweighted` is 1 - N / (N - 1) mean_c (1 - 1 / m_c) (the same for equal sizes)."""
    sizes_C = np.asarray(sizes_C, np.float64)
    n = sizes_C.sum()
    return {"pooled": float((len(sizes_C) - 1) / (n - 1)),
            "unweighted": float(1 - n / (n - 1) * np.mean(1 - 1 / sizes_C))}


def cluster_metrics(losses_N: np.ndarray, domains_N: np.ndarray, clusters_N: np.ndarray,
                    num_resamples: int, seed: int, interval: str = "bootstrap") -> dict:
    """Both variance reductions of the losses and the domain purity of one clustering
    (`CLUSTER_METRICS`), its number of clusters `k`, the range of their `sizes`, its
    `singletons`, and (with
    `num_resamples`) a 95% interval of each metric (`<metric>_ci`), every metric resampled with
    the same `seed`:

    - `bootstrap`: `bootstrap_ci(metric, values, clusters, num_resamples, seed)`, the
      percentile bootstrap over the rows, the clusters held fixed (a cluster no row of a
      resample falls in is left out of it). It runs high by about (K - 1) / (N - 1) for variance
      reduction (a resampled row's copies share a cluster), which matters only next to the floor;
    - `permutation`: the 2.5% and 97.5% quantiles of the metric over `num_resamples` draws of
      `default_rng(seed).permutation(clusters)`, the null distribution of clusters of these
      sizes that know nothing (for the random floor itself).
    """
    if interval not in ("bootstrap", "permutation"):
        raise ValueError(f"interval must be bootstrap or permutation, got {interval!r}")
    sizes = np.unique(clusters_N, return_counts=True)[1]
    out = dict(k=int(sizes.size), sizes=[int(sizes.min()), int(sizes.max())],
               singletons=int((sizes == 1).sum()), interval=interval)
    for name, (fn, of_losses) in CLUSTER_METRICS.items():
        values = losses_N if of_losses else domains_N
        out[name] = fn(values, clusters_N)
        out[f"{name}_ci"] = None
        if num_resamples and interval == "bootstrap":
            out[f"{name}_ci"] = list(bootstrap_ci(fn, values, clusters_N, num_resamples,
                                                        seed))
        elif num_resamples:
            rng = np.random.default_rng(seed)
            null = [fn(values, rng.permutation(clusters_N)) for _ in range(num_resamples)]
            out[f"{name}_ci"] = [float(q) for q in np.quantile(null, [0.025, 0.975])]
    return out
