"""Clustering of embeddings `[N, d]`: k-means and balanced k-means (the threshold clustering of
Sam et al.'s diversity selection is `jaxsel.linkage`).

- `kmeans` (k-means++ seeding on a sample, Lloyd iterations) and `balanced_kmeans` (the same, with
  undersized clusters re-seeded, then a repair pass that keeps every cluster size within
  `[avg * min_ratio, avg * max_ratio]`, by default `[avg / 5, 5 * avg]` as in Sam et al. 2025).
  Both read the points (numpy or memory-mapped) in chunks, assign them in jitted chunks and hold
  no N x k array nor a second copy of the points, so they scale to millions of points.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

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
