"""Tests of jaxsel.cluster: k-means against numpy's inertia, balanced k-means against its size
bounds, the k-nearest-neighbour graph against brute force, and RAC against scipy's exact
average-linkage HAC (on the cosine distances, or on the graph's modified dissimilarity)."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from scipy.cluster import hierarchy
from scipy.spatial.distance import pdist, squareform

from jaxsel import cluster, linkage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blobs(rng, n, d=8, centres=12, spread=0.5):
    """float32 points around random centres (structure at several scales)."""
    c = rng.standard_normal((centres, d))
    return (c[rng.integers(centres, size=n)] + spread * rng.standard_normal((n, d))).astype(
        np.float32)


def same_partition(a, b) -> bool:
    """Whether two labellings of the same points are equal up to renaming the labels."""
    pairs = np.unique(np.stack([a, b]), axis=1).shape[1]
    return pairs == len(np.unique(a)) == len(np.unique(b))


def test_complete_graph_equals_scipy_average_linkage():
    x = blobs(np.random.default_rng(0), 300)
    u, v, dist = linkage.knn_graph(x, 299)
    assert len(u) == 300 * 299 // 2
    # With every pair an edge nothing is missing; missing_distance=2 (the largest cosine
    # distance) only lets the dendrogram run to the end.
    tree = linkage.rac(300, u, v, dist, missing_distance=2.0)
    z = hierarchy.linkage(pdist(x.astype(np.float64), "cosine"), "average")
    assert tree.merges_Mx4.shape == (299, 4)
    assert hierarchy.is_valid_linkage(tree.merges_Mx4) and hierarchy.is_monotonic(tree.merges_Mx4)
    np.testing.assert_allclose(tree.merges_Mx4[:, 2], np.sort(z[:, 2]), rtol=0, atol=1e-9)
    for epsilon in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5):
        labels = tree.labels_at(epsilon)
        assert same_partition(labels, hierarchy.fcluster(z, epsilon, "distance")), epsilon
        starts = [np.flatnonzero(labels == c)[0] for c in range(labels.max() + 1)]
        assert np.all(np.diff(starts) > 0), "labels go in the order of the lowest member"
    for k in (1, 7, 40, 150, 300):
        labels, epsilon = tree.labels_for(k)
        assert labels.max() + 1 == k
        assert same_partition(labels, hierarchy.fcluster(z, k, "maxclust"))
        assert epsilon == (None if k == 300 else tree.merges_Mx4[299 - k, 2])
        if k < 300:
            assert same_partition(tree.labels_at(epsilon), labels)


def test_knn_graph_is_the_union_of_nearest_neighbour_lists():
    x = blobs(np.random.default_rng(1), 200)
    u, v, dist = linkage.knn_graph(x, 6)
    x64 = x.astype(np.float64)
    cos = squareform(pdist(x64, "cosine"))
    np.fill_diagonal(cos, np.inf)
    near = np.argsort(cos, axis=1)[:, :6]
    want = {(min(i, j), max(i, j)) for i in range(200) for j in near[i]}
    assert list(zip(u.tolist(), v.tolist(), strict=True)) == sorted(want)
    np.testing.assert_allclose(dist, cos[u, v], rtol=0, atol=1e-12)


def test_sparse_graph_is_exact_hac_of_the_modified_dissimilarity():
    # Below missing_distance the merges are those of exact average linkage on the matrix whose
    # pairs missing from the graph are set to missing_distance.
    x = blobs(np.random.default_rng(2), 300, spread=0.8)
    u, v, dist = linkage.knn_graph(x, 5)
    missing = 0.2  # some clusters stay apart: their edges average at least 0.2
    tree = linkage.rac(300, u, v, dist, missing_distance=missing)
    modified = np.full((300, 300), missing)
    modified[u, v] = modified[v, u] = dist
    np.fill_diagonal(modified, 0)
    z = hierarchy.linkage(squareform(modified), "average")
    below = np.sort(z[:, 2])[np.sort(z[:, 2]) < missing - 1e-9]
    assert 0 < len(below) < 299 and np.all(tree.merges_Mx4[:, 2] < missing)
    np.testing.assert_allclose(tree.merges_Mx4[:, 2], below, rtol=0, atol=1e-9)
    for epsilon in (0.05, 0.1, 0.15, missing - 1e-6):
        assert same_partition(tree.labels_at(epsilon), hierarchy.fcluster(z, epsilon, "distance"))


def test_ties_are_broken_by_the_lower_id():
    u, v = np.array([0, 0, 0, 1, 1, 2]), np.array([1, 2, 3, 2, 3, 3])
    tree = linkage.rac(4, u, v, np.full(6, 0.5))
    # Round 1: 0 and 1 pick each other (1 is 0's lowest tied neighbour); 2 and 3 pick 0.
    # Round 2: 2 and 3 pick each other (3 < 4); round 3: the two pairs.
    np.testing.assert_array_equal(tree.merges_Mx4, [[0, 1, 0.5, 2], [2, 3, 0.5, 2],
                                                    [4, 5, 0.5, 4]])
    again = linkage.rac(4, u, v, np.full(6, 0.5))
    np.testing.assert_array_equal(again.leaves_Mx2, tree.leaves_Mx2)


def test_disconnected_graph_leaves_more_clusters_than_the_budget():
    rng = np.random.default_rng(3)
    centres = 10 * np.eye(8)[:3]
    x = np.concatenate([c + 0.1 * rng.standard_normal((s, 8)) for c, s in
                        zip(centres, (12, 10, 8), strict=True)]).astype(np.float32)
    tree = linkage.rac(30, *linkage.knn_graph(x, 4))
    assert len(tree.merges_Mx4) == 27  # three components: 29 - 2 merges are impossible
    labels, epsilon = tree.labels_for(2)
    assert labels.max() + 1 == 3 and epsilon == tree.merges_Mx4[-1, 2]
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], [12, 10, 8]))
    assert tree.labels_for(3)[0].tolist() == labels.tolist()
    one = linkage.rac(1, [], [], [])
    assert one.merges_Mx4.shape == (0, 4) and one.labels_for(1)[0].tolist() == [0]


@pytest.mark.parametrize("call, message", [
    (lambda: linkage.knn_graph(np.zeros((0, 4)), 3), "x_NxD"),
    (lambda: linkage.knn_graph([[1.0, np.nan], [1.0, 2.0]], 1), "x_NxD has 1 rows with NaN"),
    (lambda: linkage.knn_graph([[0.0, 0.0], [1.0, 2.0]], 1), "x_NxD has 1 all-zero rows"),
    (lambda: linkage.knn_graph(np.ones((3, 2)), 0), "num_neighbors must be an int >= 1"),
    (lambda: linkage.rac(0, [], [], []), "num_points"),
    (lambda: linkage.rac(3, [0], [1], [0.5], missing_distance=0), "missing_distance"),
    (lambda: linkage.rac(3, [0], [1], [0.5], missing_distance=np.inf), "missing_distance"),
    (lambda: linkage.rac(3, [0, 1], [1], [0.5]), "one length"),
    (lambda: linkage.rac(3, [0], [3], [0.5]), r"distinct point ids in \[0, 3\)"),
    (lambda: linkage.rac(3, [1], [1], [0.5]), "distinct point ids"),
    (lambda: linkage.rac(3, [0], [1], [np.nan]), "dist_E"),
    (lambda: linkage.rac(3, [0], [1], [-0.1]), "dist_E"),
    (lambda: linkage.rac(3, [0], [1], [0.5]).labels_for(4), r"k must be in \[1, 3\]"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- k-means


def numpy_inertia(x, centroids, assignments):
    return float(((x.astype(np.float64) - centroids[assignments]) ** 2).sum())


def test_kmeans_lowers_inertia_and_finds_clusters():
    rng = np.random.default_rng(3)
    centres = 10 * rng.standard_normal((8, 6)).astype(np.float32)
    labels = rng.integers(8, size=4000)
    x = centres[labels] + rng.standard_normal((4000, 6)).astype(np.float32)
    result = cluster.kmeans(x, 8, seed=0, num_iters=30, tol=0)
    history = result.inertia_history
    assert len(history) >= 2
    assert np.all(np.diff(history) <= 1e-5 * history[:-1])
    assert history[-1] < history[0]
    # The last inertia is that of the returned assignment to the centroids it was computed with;
    # recomputed here in float64 it matches, and every point sits at its nearest centroid.
    d2 = ((x[:, None, :].astype(np.float64) - result.centroids_KxD[None]) ** 2).sum(-1)
    np.testing.assert_allclose(numpy_inertia(x, result.centroids_KxD, result.assignments_N),
                               d2.min(1).sum(), rtol=1e-5)
    assert np.mean(result.assignments_N == d2.argmin(1)) > 0.999
    # Well-separated clusters are recovered: each true cluster maps to one found cluster.
    for c in range(8):
        assert np.bincount(result.assignments_N[labels == c]).max() >= 0.99 * (labels == c).sum()
    again = cluster.kmeans(x, 8, seed=0, num_iters=30, tol=0)
    np.testing.assert_array_equal(again.assignments_N, result.assignments_N)


def check_balanced(x, k, balanced):
    """Sizes within the bounds, and centroids are the means of their clusters."""
    low, high = cluster.size_bounds(len(x), k)
    sizes = balanced.sizes_K
    assert sizes.sum() == len(x) and sizes.min() >= low and sizes.max() <= high
    for j in range(k):
        np.testing.assert_allclose(balanced.centroids_KxD[j],
                                   x[balanced.assignments_N == j].mean(0), atol=1e-4)


def test_balanced_kmeans_respects_bounds_on_adversarial_data():
    rng = np.random.default_rng(4)
    # 2500 near-duplicates (one cluster far above 5 * avg), a blob, and 15 far outliers
    # (singleton clusters far below avg / 5).
    x = np.concatenate([
        np.float32(5) + 1e-3 * rng.standard_normal((2500, 4)).astype(np.float32),
        rng.standard_normal((2000, 4)).astype(np.float32),
        40 * rng.standard_normal((15, 4)).astype(np.float32),
    ])
    k = 40
    low, high = cluster.size_bounds(len(x), k)
    assert (low, high) == (int(np.ceil(len(x) / k / 5)), int(np.floor(5 * len(x) / k)))
    plain = cluster.kmeans(x, k, seed=0)
    assert plain.sizes_K.min() < low and plain.sizes_K.max() > high, "data must need balancing"
    check_balanced(x, k, cluster.balanced_kmeans(x, k, seed=0))


def test_balanced_kmeans_stays_close_to_kmeans():
    rng = np.random.default_rng(5)
    # Groups of very different sizes: plain k-means leaves some clusters below avg / 5.
    x = np.concatenate([
        rng.standard_normal((4000, 4)).astype(np.float32),
        30 * rng.standard_normal((12, 4)).astype(np.float32)[rng.integers(12, size=600)]
        + 0.1 * rng.standard_normal((600, 4)).astype(np.float32),
    ])
    k = 40
    plain = cluster.kmeans(x, k, seed=0)
    assert plain.sizes_K.min() < cluster.size_bounds(len(x), k)[0], "data must need balancing"
    balanced = cluster.balanced_kmeans(x, k, seed=0)
    check_balanced(x, k, balanced)
    balanced_inertia = numpy_inertia(x, balanced.centroids_KxD, balanced.assignments_N)
    assert balanced_inertia <= 1.05 * numpy_inertia(x, plain.centroids_KxD, plain.assignments_N)


def test_kmeans_bad_input():
    x = np.ones((10, 3), np.float32)
    with pytest.raises(ValueError, match=r"k=11 must be in \[1, N=10\]"):
        cluster.kmeans(x, 11)
    x[4, 1] = np.inf
    with pytest.raises(ValueError, match=r"points has 1 rows with NaN or inf.*\[4\]"):
        cluster.balanced_kmeans(x, 2)
    with pytest.raises(ValueError, match="min_ratio"):
        cluster.size_bounds(100, 10, min_ratio=2.0)


def test_selectors_hold_no_copy_of_memory_mapped_points():
    """Over a memory-mapped [200k, 64] float32 array (51 MB) read in 1 MB chunks, in a process of
    its own: balanced k-means grows its anonymous memory by far less than the points (a copy
    would be 51 MB); dedup by no more than its neighbour search (ScaNN's index, which copies the
    normalised rows from a temporary file) plus its [N, 5] neighbour arrays and a chunk."""
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            [sys.executable, "-m", "tests.workers.memmap_worker",
             os.path.join(folder, "points.npy"), "200000", "64"],
            cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    size, growth = found["bytes"], found["growth"]
    assert growth["balanced_kmeans"] < 0.4 * size, growth
    neighbour_arrays = 200_000 * 5 * (8 + 8 + 1)
    assert growth["dedup"] < growth["neighbours"] + neighbour_arrays + (8 << 20), growth
