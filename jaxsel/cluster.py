"""Clustering of embeddings `[N, d]`: k-means, balanced k-means and threshold clustering.

- `kmeans` (k-means++ seeding on a sample, Lloyd iterations) and `balanced_kmeans` (the same, with
  undersized clusters re-seeded, then a repair pass that keeps every cluster size within
  `[avg * min_ratio, avg * max_ratio]`, by default `[avg / 5, 5 * avg]` as in Sam et al. 2025).
  Both read the points (numpy or memory-mapped) in chunks, assign them in jitted chunks and hold
  no N x k array nor a second copy of the points, so they scale to millions of points.
- `knn_graph` + `rac` -> `Dendrogram`: average-linkage agglomerative clustering on cosine distance
  over a k-nearest-neighbour graph, by reciprocal agglomerative clustering (RAC; Sumengen et al.
  2021). `Dendrogram.labels_at(epsilon)` cuts it at a distance threshold, `labels_for(k)` at a
  budget of k clusters (the threshold clustering of Sam et al. 2025's diversity selection);
  `pair_coverage` says how much of the clusters' linkage the graph's edges hold.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from jaxsel import search
from jaxsel.embed import check_embeddings, chunk_rows

# ----------------------------------------------------------------------------- k-means


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """Centroids, each point's cluster, and the inertia (sum of squared distances to the
    assigned centroid) after each iteration."""

    centroids_KxD: np.ndarray
    assignments_N: np.ndarray
    inertia_history: np.ndarray

    @property
    def sizes_K(self) -> np.ndarray:
        return np.bincount(self.assignments_N, minlength=len(self.centroids_KxD))


@functools.partial(jax.jit, static_argnames="k")
def _kmeans_plus_plus(key, sample_SxD, k: int):
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    sq_S = jnp.sum(sample_SxD * sample_SxD, axis=1)

    def sq_dist_to(c_D):
        return jnp.maximum(sq_S - 2 * sample_SxD @ c_D + c_D @ c_D, 0.0)

    key, first_key = jax.random.split(key)
    first_D = sample_SxD[jax.random.randint(first_key, (), 0, len(sample_SxD))]
    centroids_KxD = jnp.zeros((k, sample_SxD.shape[1]), sample_SxD.dtype).at[0].set(first_D)

    def body(i, state):
        centroids_KxD, d2_S, key = state
        key, draw_key = jax.random.split(key)
        logits_S = jnp.where(d2_S > 0, jnp.log(jnp.where(d2_S > 0, d2_S, 1.0)), -jnp.inf)
        logits_S = jnp.where(jnp.any(d2_S > 0), logits_S, 0.0)  # all covered: draw uniformly
        c_D = sample_SxD[jax.random.categorical(draw_key, logits_S)]
        return centroids_KxD.at[i].set(c_D), jnp.minimum(d2_S, sq_dist_to(c_D)), key

    centroids_KxD, _, _ = jax.lax.fori_loop(1, k, body, (centroids_KxD, sq_dist_to(first_D), key))
    return centroids_KxD


@functools.partial(jax.jit, static_argnames="k")
def _chunk_sums(x_CxD, assignments_C, k: int):
    """Each cluster's sum and count over a chunk of points (assignment k: a padding row)."""
    sums_KxD = jax.ops.segment_sum(x_CxD, assignments_C, num_segments=k + 1)[:k]
    counts_K = jax.ops.segment_sum(jnp.ones_like(assignments_C, jnp.float32), assignments_C,
                                   num_segments=k + 1)[:k]
    return sums_KxD, counts_K


def _cluster_means(x_NxD, assignments_N, previous_KxD, k: int) -> np.ndarray:
    """Mean of each cluster's points, summed chunk by chunk (one compiled chunk shape; float64
    across chunks); an empty cluster keeps its previous centroid."""
    sums_KxD, counts_K = np.zeros((k, x_NxD.shape[1])), np.zeros(k)
    rows = min(len(x_NxD), chunk_rows(x_NxD))
    for start in range(0, len(x_NxD), rows):
        part = np.asarray(x_NxD[start:start + rows])
        chunk_CxD = np.zeros((rows, x_NxD.shape[1]), np.float32)
        chunk_CxD[:len(part)] = part
        labels_C = np.full(rows, k, np.int32)
        labels_C[:len(part)] = assignments_N[start:start + rows]
        sums, counts = _chunk_sums(chunk_CxD, labels_C, k)
        sums_KxD += np.asarray(sums)
        counts_K += np.asarray(counts)
    means_KxD = sums_KxD / np.maximum(counts_K, 1)[:, None]
    return np.where(counts_K[:, None] > 0, means_KxD, previous_KxD).astype(np.float32)


def _sq_dists(x_NxD, centres_of) -> np.ndarray:
    """`[N]` float32 squared distance of each point to its centre, `centres_of(rows)` (`[D]`, or
    `[C, D]` for the chunk's C points), chunk by chunk."""
    d2_N = np.empty(len(x_NxD), np.float32)
    rows = chunk_rows(x_NxD)
    for start in range(0, len(x_NxD), rows):
        chunk = slice(start, start + rows)
        d2_N[chunk] = np.sum((np.asarray(x_NxD[chunk]) - centres_of(chunk)) ** 2, axis=1)
    return d2_N


def _nearest_centroid(x_NxD, centroids_KxD):
    """`(assignments_N, sq_dist_N)`: each point's nearest centroid by squared L2 distance."""
    ids_Nx1, d2_Nx1 = search.exact_search(centroids_KxD, x_NxD, 1, "squared_l2",
                                    chunk_size=4096, query_batch=1024)
    return ids_Nx1[:, 0], d2_Nx1[:, 0]


def _check_kmeans_inputs(x_NxD, k: int) -> np.ndarray:
    x_NxD = check_embeddings(x_NxD, "points", nonzero=False)
    if not 1 <= k <= len(x_NxD):
        raise ValueError(f"k={k} must be in [1, N={len(x_NxD)}] (the number of points)")
    return x_NxD


def _lloyd(x_NxD, centroids_KxD, num_iters, tol, progress):
    """Lloyd iterations from `centroids_KxD` -> `KMeansResult` (the last assignment, the means of
    its clusters, and the inertia of each iteration's assignment)."""
    k = len(centroids_KxD)
    history: list[float] = []
    for _ in tqdm.trange(num_iters, desc="k-means", disable=not progress):
        assignments_N, d2_N = _nearest_centroid(x_NxD, centroids_KxD)
        history.append(float(d2_N.sum(dtype=np.float64)))
        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
            break
        centroids_KxD = _cluster_means(x_NxD, assignments_N, centroids_KxD, k)
    return KMeansResult(centroids_KxD, assignments_N, np.array(history))


def kmeans(
    x_NxD,
    k: int,
    seed: int = 0,
    num_iters: int = 25,
    tol: float = 1e-4,
    init_sample_size: int = 100_000,
    progress: bool = False,
) -> KMeansResult:
    """Lloyd's k-means from k-means++ seeds drawn on a seeded sample of `init_sample_size` points.

    Stops after `num_iters` iterations or when the inertia falls by less than a fraction `tol`.
    Each iteration assigns every point to its nearest centroid (chunked, jitted) and moves each
    centroid to its cluster's mean, so the inertia never increases.
    """
    x_NxD = _check_kmeans_inputs(x_NxD, k)
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    rows = np.sort(np.random.default_rng(seed).choice(
        len(x_NxD), min(len(x_NxD), max(init_sample_size, k)), replace=False))
    centroids_KxD = np.asarray(_kmeans_plus_plus(jax.random.key(seed), jnp.asarray(x_NxD[rows]), k))
    return _lloyd(x_NxD, centroids_KxD, num_iters, tol, progress)


def size_bounds(n: int, k: int, min_ratio: float = 0.2, max_ratio: float = 5.0) -> tuple[int, int]:
    """Integer cluster-size bounds `[ceil(avg * min_ratio), floor(avg * max_ratio)]`,
    `avg = n / k`; refused when no partition of n points into k clusters can meet them."""
    if not 0 <= min_ratio <= 1 <= max_ratio:
        raise ValueError(f"need 0 <= min_ratio <= 1 <= max_ratio, got {min_ratio}, {max_ratio}")
    low, high = math.ceil(n / k * min_ratio), math.floor(n / k * max_ratio)
    if not k * low <= n <= k * high:
        raise ValueError(f"no partition of N={n} into k={k} clusters has sizes in [{low}, {high}]")
    return low, high


def _shrink_oversized(x_NxD, centroids_KxD, assignments_N, d2_N, high, neighbours=8):
    """Moves the cheapest points out of every cluster larger than `high` into the nearest
    cluster with room (in place). Never makes a cluster exceed `high` or fall below its size."""
    k = len(centroids_KxD)
    sizes_K = np.bincount(assignments_N, minlength=k)
    for j in np.flatnonzero(sizes_K > high):
        members_M = np.flatnonzero(assignments_N == j)
        near_ids_MxT, near_d2_MxT = search.exact_search(
            centroids_KxD, x_NxD[members_M], min(neighbours, k), "squared_l2", 4096, 8192)
        open_MxT = (near_ids_MxT != j) & (sizes_K[near_ids_MxT] < high)
        cost_M = np.where(open_MxT, near_d2_MxT, np.inf).min(axis=1) - d2_N[members_M]
        for m in np.argsort(cost_M, kind="stable"):
            if sizes_K[j] <= high:
                break
            room_T = (near_ids_MxT[m] != j) & (sizes_K[near_ids_MxT[m]] < high)
            if room_T.any():
                target, d2 = near_ids_MxT[m][room_T][0], near_d2_MxT[m][room_T][0]
            else:  # all near clusters are full: look at every centroid
                d2_K = np.sum((centroids_KxD - x_NxD[members_M[m]]) ** 2, axis=1)
                d2_K[(sizes_K >= high) | (np.arange(k) == j)] = np.inf
                target, d2 = int(np.argmin(d2_K)), d2_K.min()
            point = members_M[m]
            assignments_N[point], d2_N[point] = target, d2
            sizes_K[j] -= 1
            sizes_K[target] += 1


def _grow_undersized(x_NxD, centroids_KxD, assignments_N, d2_N, low):
    """Pulls into every cluster smaller than `low` the points whose move costs least, taken only
    from clusters larger than `low` (in place). Never makes a cluster exceed its size or `low`."""
    sizes_K = np.bincount(assignments_N, minlength=len(centroids_KxD))
    for j in np.flatnonzero(sizes_K < low):
        d2_to_j_N = _sq_dists(x_NxD, lambda rows, j=j: centroids_KxD[j])
        cost_N = np.where(assignments_N == j, np.inf, d2_to_j_N - d2_N)
        for point in np.argsort(cost_N, kind="stable"):
            if sizes_K[j] >= low:
                break
            donor = assignments_N[point]
            if donor != j and sizes_K[donor] > low:
                assignments_N[point], d2_N[point] = j, d2_to_j_N[point]
                sizes_K[donor] -= 1
                sizes_K[j] += 1


def _reseed_undersized(x_NxD, result: KMeansResult, low: int, rng) -> np.ndarray:
    """Centroids where each cluster smaller than `low` is given up and its centroid moved to a
    random point of one of the clusters with the largest squared error (splitting it)."""
    k = len(result.centroids_KxD)
    sizes_K = result.sizes_K
    d2_N = _sq_dists(x_NxD, lambda rows: result.centroids_KxD[result.assignments_N[rows]])
    sse_K = np.bincount(result.assignments_N, weights=d2_N, minlength=k)
    small = np.flatnonzero(sizes_K < low)
    splittable = [t for t in np.argsort(-sse_K, kind="stable") if sizes_K[t] >= low]
    centroids_KxD = result.centroids_KxD.copy()
    for j, target in zip(small, splittable, strict=False):
        centroids_KxD[j] = x_NxD[rng.choice(np.flatnonzero(result.assignments_N == target))]
    return centroids_KxD


def balanced_kmeans(
    x_NxD,
    k: int,
    seed: int = 0,
    num_iters: int = 25,
    reseed_rounds: int = 3,
    balance_iters: int = 3,
    min_ratio: float = 0.2,
    max_ratio: float = 5.0,
    tol: float = 1e-4,
    init_sample_size: int = 100_000,
    progress: bool = False,
) -> KMeansResult:
    """k-means whose cluster sizes all lie in `size_bounds(N, k, min_ratio, max_ratio)`.

    1. `kmeans`; then up to `reseed_rounds` times, while a cluster is smaller than the lower
       bound, its centroid is moved into one of the clusters with the largest squared error and
       Lloyd's iterations run again (so small clusters merge and big ones split).
    2. `balance_iters` rounds of: assign each point to its nearest centroid, repair the sizes
       (move the cheapest points out of oversized clusters into the nearest cluster with room,
       then into undersized clusters from clusters that can spare them), and move the centroids
       to the repaired clusters' means.

    The returned assignment is the last repaired one (so it meets the bounds), the centroids are
    its clusters' means, and `inertia_history` holds the inertia of the repaired assignments.
    """
    x_NxD = _check_kmeans_inputs(x_NxD, k)
    low, high = size_bounds(len(x_NxD), k, min_ratio, max_ratio)
    result = kmeans(x_NxD, k, seed, num_iters, tol, init_sample_size, progress)
    rng = np.random.default_rng(seed)
    for _ in range(reseed_rounds):
        if result.sizes_K.min() >= low:
            break
        centroids_KxD = _reseed_undersized(x_NxD, result, low, rng)
        result = _lloyd(x_NxD, centroids_KxD, num_iters, tol, progress)
    centroids_KxD, history = result.centroids_KxD, []
    for _ in range(max(balance_iters, 1)):
        assignments_N, d2_N = _nearest_centroid(x_NxD, centroids_KxD)
        _shrink_oversized(x_NxD, centroids_KxD, assignments_N, d2_N, high)
        _grow_undersized(x_NxD, centroids_KxD, assignments_N, d2_N, low)
        history.append(float(d2_N.sum(dtype=np.float64)))
        centroids_KxD = _cluster_means(x_NxD, assignments_N, centroids_KxD, k)
    return KMeansResult(centroids_KxD, assignments_N, np.array(history))


# ----------------------------------------------------------------------------- threshold clustering


def _cosine_distances(x_NxD: np.ndarray, u_E, v_E, chunk: int = 1 << 18) -> np.ndarray:
    """`1 - cos(x_u, x_v)` in float64 from the given rows, clipped to [0, 2] as scipy's
    `pdist(x, "cosine")` is, computed `chunk` edges at a time."""
    norms_N = np.sqrt(np.einsum("nd,nd->n", x_NxD, x_NxD, dtype=np.float64))
    dist_E = np.empty(len(u_E))
    for start in range(0, len(u_E), chunk):
        u, v = u_E[start : start + chunk], v_E[start : start + chunk]
        dots = np.einsum("ed,ed->e", x_NxD[u].astype(np.float64), x_NxD[v].astype(np.float64))
        dist_E[start : start + chunk] = 1.0 - dots / (norms_N[u] * norms_N[v])
    return np.clip(dist_E, 0.0, 2.0)


def knn_graph(x_NxD, num_neighbors: int, scann_overrides: dict | None = None,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The undirected k-nearest-neighbour graph of the rows by cosine similarity.

    Returns `(u_E, v_E, dist_E)`: each pair once, `u < v`, sorted, with its cosine distance
    `1 - cos` (float64 from the given rows, clipped to [0, 2] as scipy's `pdist(x, "cosine")`).
    A pair is an edge when either row is among the other's `min(num_neighbors, N - 1)` nearest
    (so `num_neighbors >= N - 1` gives the complete graph), as `search.neighbours` finds them.
    The rows (numpy or memory-mapped) are read in chunks besides the one normalised copy.
    """
    x_NxD = check_embeddings(x_NxD, "x_NxD", nonzero=True)
    if not isinstance(num_neighbors, int | np.integer) or num_neighbors < 1:
        raise ValueError(f"num_neighbors must be an int >= 1, got {num_neighbors!r}")
    n = len(x_NxD)
    t = min(int(num_neighbors), n - 1) + 1  # one more: a row is usually its own first hit
    ids_NxT = search.neighbours(x_NxD, t, scann_overrides, progress)
    rows_E, cols_E = np.repeat(np.arange(n), t), ids_NxT.ravel()
    ok = (rows_E != cols_E) & (cols_E >= 0) & (cols_E < n)
    rows_E, cols_E = rows_E[ok], cols_E[ok]
    u_E, v_E, _ = _combine(np.minimum(rows_E, cols_E), np.maximum(rows_E, cols_E),
                           np.ones(len(rows_E)), n)
    return u_E, v_E, _cosine_distances(x_NxD, u_E, v_E)


@dataclasses.dataclass(frozen=True)
class Dendrogram:
    """The merges of an agglomerative clustering of `num_points` points, lowest first.

    `merges_Mx4` rows are `(a, b, height, size)` in scipy's linkage convention (ids below N are
    points, `N + i` the cluster made by row i, `a < b`): heights non-decreasing, children before
    parents. `leaves_Mx2` holds one point of each child. M <= N - 1 (fewer when the graph leaves
    clusters that never merge).
    """

    merges_Mx4: np.ndarray
    leaves_Mx2: np.ndarray
    num_points: int

    def labels(self, num_merges: int) -> np.ndarray:
        """Labels `[N]` after the first `num_merges` merges; clusters are numbered 0, 1, ... in
        the order of their lowest point."""
        n, (a_M, b_M) = self.num_points, self.leaves_Mx2[:num_merges].T
        graph = coo_matrix((np.ones(len(a_M)), (a_M, b_M)), shape=(n, n))
        return connected_components(graph, directed=False)[1]

    def labels_at(self, epsilon: float) -> np.ndarray:
        """Labels after every merge at height <= `epsilon` (as scipy's `fcluster(Z, epsilon,
        "distance")`)."""
        return self.labels(int(np.searchsorted(self.merges_Mx4[:, 2], epsilon, side="right")))

    def labels_for(self, k: int) -> tuple[np.ndarray, float | None]:
        """`(labels_N, epsilon)` after the N - k lowest merges: exactly k clusters when there are
        that many merges, otherwise (the graph is disconnected, or clusters are at least
        `missing_distance` apart) all of them and more than k clusters. `epsilon` is the height
        of the last merge applied (None when none is), so `labels_at(epsilon)` gives the same
        clusters unless another merge ties at that height."""
        if not isinstance(k, int | np.integer) or not 1 <= k <= self.num_points:
            raise ValueError(f"k must be in [1, {self.num_points}], got {k!r}")
        m = min(self.num_points - int(k), len(self.merges_Mx4))
        return self.labels(m), float(self.merges_Mx4[m - 1, 2]) if m else None


def pair_coverage(labels_N, u_E, v_E) -> float:
    """The share of point pairs within clusters that are edges of the graph `(u_E, v_E)` (each
    pair once): 1 when the clusters' linkages use no `missing_distance`."""
    sizes_C = np.bincount(labels_N).astype(np.float64)
    pairs = float(np.sum(sizes_C * (sizes_C - 1) / 2))
    return np.count_nonzero(labels_N[u_E] == labels_N[v_E]) / pairs if pairs else 1.0


def _combine(lo_E, hi_E, value_E, num_ids: int):
    """Parallel edges `(lo, hi)` combined into one, their values added: `(lo, hi, value)` sorted
    by `(lo, hi)` (a sparse matrix's duplicate summing: linear time, no global sort)."""
    summed = coo_matrix((value_E, (lo_E, hi_E)), shape=(num_ids, num_ids)).tocsr()
    lo = np.repeat(np.arange(num_ids, dtype=summed.indices.dtype), np.diff(summed.indptr))
    return lo.astype(lo_E.dtype), summed.indices.astype(lo_E.dtype), summed.data


def rac(num_points: int, u_E, v_E, dist_E, missing_distance: float = 1.0,
        progress: bool = False) -> Dendrogram:
    """Average-linkage agglomerative clustering over a graph, by reciprocal nearest neighbours.

    The dissimilarity d' of two points is the distance on their edge, or `missing_distance` (c)
    for a pair the graph lacks; the linkage of clusters A, B is the exact average of d' over
    their |A| |B| point pairs, `c - G / (|A| |B|)` with G the sum of `c - dist` over the edges
    between them. Each round, every cluster finds its nearest cluster over its edges (ties to
    the lower id), every reciprocal pair merges, and the merged clusters' edges are summed per
    cluster pair. Memory: the edges and O(N) arrays; time: a few passes over the edges a round.

    Why a fixed c (1 by default: orthogonal, unrelated): d' is then one fixed dissimilarity,
    whose average linkage is reducible (a merged cluster is never nearer a third than the nearer
    of its parts), so the merges are exactly those of sequential average-linkage HAC on d' (up
    to the order of tied merges; with a complete graph, on the distances themselves) and heights
    never decrease along the tree (clamped to the children's to absorb float rounding). Clusters
    without an edge are exactly c apart, so the tree is built below c only: a cluster with no
    linkage below c never merges again, and is left unmerged. The cost: once clusters far
    outgrow the neighbour count most of their pairs are missing (`pair_coverage` falls), their
    linkage tends to c, and they merge later than under the true distances.
    """
    if not isinstance(num_points, int | np.integer) or num_points < 1:
        raise ValueError(f"num_points must be an int >= 1, got {num_points!r}")
    if not (isinstance(missing_distance, int | float | np.integer | np.floating)
            and 0 < missing_distance < np.inf):
        raise ValueError(f"missing_distance must be a finite number > 0, got {missing_distance!r}")
    n, c, total = int(num_points), float(missing_distance), 2 * int(num_points) - 1
    u_E, v_E = np.asarray(u_E, np.int64), np.asarray(v_E, np.int64)
    dist_E = np.asarray(dist_E, np.float64)
    if not u_E.ndim == 1 or u_E.shape != v_E.shape or u_E.shape != dist_E.shape:
        raise ValueError(f"u_E, v_E and dist_E must be 1-D arrays of one length, got shapes "
                         f"{u_E.shape}, {v_E.shape}, {dist_E.shape}")
    if len(u_E) and (min(u_E.min(), v_E.min()) < 0 or max(u_E.max(), v_E.max()) >= n
                     or (u_E == v_E).any()):
        raise ValueError(f"u_E, v_E must be pairs of distinct point ids in [0, {n})")
    if not (np.isfinite(dist_E) & (dist_E >= 0)).all():
        raise ValueError("dist_E must be finite and >= 0")
    ids = np.int32 if total < 2**31 else np.int64
    size_C, height_C = np.ones(total), np.zeros(total)
    leaf_C, parent_C = np.arange(total, dtype=ids), np.arange(total, dtype=ids)
    best_C, nn_C = np.empty(total), np.empty(total, ids)
    lo, hi, gain = _combine(np.minimum(u_E, v_E).astype(ids), np.maximum(u_E, v_E).astype(ids),
                            c - dist_E, total)
    rounds, next_id = [], n
    bar = tqdm.tqdm(total=n - 1, desc="RAC merges", disable=not progress)
    while len(lo):
        near = gain > 0  # the edges with a linkage below c
        lo_n, hi_n = lo[near], hi[near]
        link_n = c - gain[near] / (size_C[lo_n] * size_C[hi_n])
        best_C.fill(np.inf)
        np.minimum.at(best_C, lo_n, link_n)
        np.minimum.at(best_C, hi_n, link_n)
        nn_C.fill(total)
        for x, y in ((lo_n, hi_n), (hi_n, lo_n)):
            tie = link_n == best_C[x]
            np.minimum.at(nn_C, x[tie], y[tie])
        a = np.flatnonzero(nn_C < total)
        a = a[(nn_C[nn_C[a]] == a) & (a < nn_C[a])]
        if not len(a):
            break
        b, new = nn_C[a], next_id + np.arange(len(a), dtype=ids)
        height_C[new] = np.maximum(best_C[a], np.maximum(height_C[a], height_C[b]))
        size_C[new], leaf_C[new] = size_C[a] + size_C[b], np.minimum(leaf_C[a], leaf_C[b])
        rounds.append((a, b, new, leaf_C[a], leaf_C[b]))
        parent_C[a], parent_C[b] = new, new
        # A cluster with no linkage below c never merges again: drop its edges.
        live = (nn_C[lo] < total) & (nn_C[hi] < total)
        lo, hi, gain = parent_C[lo[live]], parent_C[hi[live]], gain[live]
        moved = np.maximum(lo, hi) >= next_id
        join = moved & (lo != hi)
        joined = _combine(np.minimum(lo[join], hi[join]), np.maximum(lo[join], hi[join]),
                          gain[join], total)
        lo, hi, gain = (np.concatenate([x[~moved], y]) for x, y in zip((lo, hi, gain), joined,
                                                                        strict=True))
        next_id += len(a)
        bar.update(len(a))
    bar.close()
    a, b, new, leaf_a, leaf_b = (np.concatenate([r[i] for r in rounds] or [np.zeros(0, int)])
                                 for i in range(5))
    order = np.lexsort((new, height_C[new]))  # by height; ties in creation order
    rank = np.arange(total)
    rank[new[order]] = n + np.arange(len(order))
    a, b = rank[a[order]], rank[b[order]]
    merges = np.stack([np.minimum(a, b), np.maximum(a, b), height_C[new[order]],
                       size_C[new[order]]], axis=1).astype(np.float64)
    return Dendrogram(merges, np.stack([leaf_a[order], leaf_b[order]], axis=1), n)
