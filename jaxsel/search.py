"""Nearest-neighbour search and clustering over embeddings `[N, d]`.

- `exact_search`: chunked matmul + top-k in JAX; the ground truth for recall.
- `build_index` / `search_index` / `save_index` / `load_index`: a ScaNN index (tree partitioning,
  anisotropic hashing, exact reordering) whose parameters come from `scann_params(n, overrides)`,
  with defaults that scale with N (brute force below `BRUTE_FORCE_BELOW` points).
- `kmeans` (k-means++ seeding on a sample, Lloyd iterations) and `balanced_kmeans` (the same, with
  undersized clusters re-seeded, then a repair pass that keeps every cluster size within
  `[avg * min_ratio, avg * max_ratio]`, by default `[avg / 5, 5 * avg]` as in Sam et al. 2025).
  Both assign points in jitted chunks and hold no N x k array, so they scale to millions of points.

Metrics: "dot_product" (scores are similarities, best first; meant for L2-normalised embeddings,
where it ranks as cosine) and "squared_l2" (scores are squared distances, nearest first).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from scann.scann_ops.py import scann_ops_pybind

from jaxsel.embed import check_embeddings

METRICS = ("dot_product", "squared_l2")
BRUTE_FORCE_BELOW = 4096
_INDEX_META = "jaxsel_index.json"


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; choose from {METRICS}")


def _check_queries(queries_QxD, dim: int, n: int, k: int, metric: str, target: str):
    """Validated float32 queries: finite rows (nonzero for dot product) of dimension `dim`, and
    `1 <= k <= n`, `n` the number of points in `target`."""
    queries_QxD = check_embeddings(queries_QxD, "queries", nonzero=metric == "dot_product")
    if queries_QxD.shape[1] != dim:
        raise ValueError(
            f"queries have dimension {queries_QxD.shape[1]} but the {target} has dimension {dim}"
        )
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, N={n}] (the number of points in the {target})")
    return queries_QxD


# ----------------------------------------------------------------------------- exact search


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def _exact_block(db_CxBxD, db_sq_CxB, queries_QxD, k: int, metric: str):
    """Top-k of one query block against a chunked database (padding rows have -inf score)."""
    num_q = queries_QxD.shape[0]
    chunk = db_CxBxD.shape[1]

    def body(carry, inputs):
        best_QxK, ids_QxK = carry
        index, x_BxD, x_sq_B = inputs
        scores_QxB = queries_QxD @ x_BxD.T
        if metric == "squared_l2":
            scores_QxB = 2 * scores_QxB - x_sq_B  # -||q - x||^2 + ||q||^2
        else:
            scores_QxB = jnp.where(jnp.isfinite(x_sq_B), scores_QxB, -jnp.inf)
        top_QxK, pos_QxK = jax.lax.top_k(scores_QxB, k)
        merged_Qx2K = jnp.concatenate([best_QxK, top_QxK], axis=1)
        merged_ids_Qx2K = jnp.concatenate([ids_QxK, pos_QxK + index * chunk], axis=1)
        best_QxK, pick_QxK = jax.lax.top_k(merged_Qx2K, k)
        return (best_QxK, jnp.take_along_axis(merged_ids_Qx2K, pick_QxK, axis=1)), None

    init = (jnp.full((num_q, k), -jnp.inf, jnp.float32), jnp.zeros((num_q, k), jnp.int32))
    (best_QxK, ids_QxK), _ = jax.lax.scan(
        body, init, (jnp.arange(db_CxBxD.shape[0]), db_CxBxD, db_sq_CxB)
    )
    if metric == "squared_l2":
        q_sq_Q = jnp.sum(queries_QxD * queries_QxD, axis=1, keepdims=True)
        best_QxK = jnp.maximum(q_sq_Q - best_QxK, 0.0)
    return ids_QxK, best_QxK


def _exact_search(db_NxD, queries_QxD, k, metric, chunk_size, query_batch, progress=False):
    """`exact_search` without input checks (callers have validated)."""
    n, d = db_NxD.shape
    chunk = min(chunk_size, n)
    num_chunks = -(-n // chunk)
    db_padded = np.zeros((num_chunks * chunk, d), np.float32)
    db_padded[:n] = db_NxD
    db_sq = np.full(num_chunks * chunk, np.inf, np.float32)  # +inf marks padding rows
    db_sq[:n] = np.einsum("nd,nd->n", db_NxD, db_NxD)
    db_CxBxD = jnp.asarray(db_padded.reshape(num_chunks, chunk, d))
    db_sq_CxB = jnp.asarray(db_sq.reshape(num_chunks, chunk))
    num_q = len(queries_QxD)
    query_batch = min(query_batch, 1 << (num_q - 1).bit_length())  # few shapes: few compiles
    ids_QxK = np.empty((num_q, k), np.int32)
    scores_QxK = np.empty((num_q, k), np.float32)
    with tqdm.tqdm(total=num_q, desc="exact search", unit="query", disable=not progress) as bar:
        for start in range(0, num_q, query_batch):
            block = queries_QxD[start : start + query_batch]
            padded = np.zeros((query_batch, d), np.float32)
            padded[: len(block)] = block
            ids, scores = _exact_block(db_CxBxD, db_sq_CxB, jnp.asarray(padded), k, metric)
            ids_QxK[start : start + len(block)] = np.asarray(ids)[: len(block)]
            scores_QxK[start : start + len(block)] = np.asarray(scores)[: len(block)]
            bar.update(len(block))
    return ids_QxK, scores_QxK


def exact_search(
    db_NxD,
    queries_QxD,
    k: int,
    metric: str = "dot_product",
    chunk_size: int = 16384,
    query_batch: int = 1024,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k: `(ids_QxK int32, scores_QxK float32)`, best first.

    The database is scanned in chunks of `chunk_size` rows (a jitted `lax.scan` of matmul +
    `top_k`, merging a running top-k), `query_batch` queries at a time, so memory stays at
    `query_batch * chunk_size` scores whatever N is.
    """
    _check_metric(metric)
    db_NxD = check_embeddings(db_NxD, "database", nonzero=metric == "dot_product")
    queries_QxD = _check_queries(queries_QxD, db_NxD.shape[1], len(db_NxD), k, metric, "database")
    return _exact_search(db_NxD, queries_QxD, k, metric, chunk_size, query_batch, progress)


# ----------------------------------------------------------------------------- ScaNN


@dataclasses.dataclass(frozen=True)
class ScannParams:
    """ScaNN configuration. `num_leaves == 0` means no partitioning and exact float scoring;
    otherwise a tree of `num_leaves` partitions (`leaves_to_search` probed per query), scored by
    anisotropic hashing with `dims_per_block` dimensions per 4-bit code, and the best `reorder`
    candidates rescored exactly."""

    num_leaves: int
    leaves_to_search: int
    reorder: int
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    training_sample_size: int = 100_000

    def __post_init__(self):
        if self.num_leaves < 0 or (self.num_leaves and not
                                   1 <= self.leaves_to_search <= self.num_leaves):
            raise ValueError(
                f"need num_leaves >= 0 and 1 <= leaves_to_search <= num_leaves, got "
                f"num_leaves={self.num_leaves}, leaves_to_search={self.leaves_to_search}"
            )
        if self.num_leaves and (self.reorder < 1 or self.dims_per_block < 1):
            raise ValueError(
                f"reorder ({self.reorder}) and dims_per_block ({self.dims_per_block}) must be >= 1"
            )


def scann_params(n: int, overrides: dict | None = None) -> ScannParams:
    """Defaults for `n` points, with `overrides` (e.g. a config dict) applied by field name.

    Below `BRUTE_FORCE_BELOW` points: brute force. Above: about sqrt(N) leaves (of at least 128
    points each), 4.5 * N^0.2 of them searched (71 of 1000 at 1M, 45 of 316 at 100k: neighbours
    lie relatively closer at larger N, so a smaller fraction suffices), 300 candidates reordered.
    On the overlapping Gaussian mixtures of `benchmarks/search_embed.py` (d = 64) this gives
    recall@10 of about 0.97 from 20k to 1M points.
    """
    if n < BRUTE_FORCE_BELOW:
        defaults = dict(num_leaves=0, leaves_to_search=0, reorder=0)
    else:
        num_leaves = max(16, min(int(round(math.sqrt(n))), n // 128))
        defaults = dict(
            num_leaves=num_leaves,
            leaves_to_search=min(num_leaves, math.ceil(4.5 * n**0.2)),
            reorder=300,
            training_sample_size=min(n, 250_000),
        )
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(ScannParams)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ScaNN parameters {unknown}; valid: {sorted(fields)}")
    return ScannParams(**{**defaults, **overrides})


@dataclasses.dataclass
class ScannIndex:
    """A built (or loaded) ScaNN searcher and what it was built from."""

    searcher: scann_ops_pybind.ScannSearcher
    params: ScannParams
    metric: str
    num_points: int
    dim: int


def build_index(
    db_NxD, metric: str = "dot_product", params: ScannParams | None = None
) -> ScannIndex:
    """Builds a ScaNN index over `db_NxD` (params default to `scann_params(N)`)."""
    _check_metric(metric)
    db_NxD = check_embeddings(db_NxD, "database", nonzero=metric == "dot_product")
    n, d = db_NxD.shape
    params = params or scann_params(n)
    builder = scann_ops_pybind.builder(db_NxD, 10, metric)
    if params.num_leaves == 0:
        builder = builder.score_brute_force()
    else:
        if params.num_leaves > n:
            raise ValueError(f"num_leaves={params.num_leaves} exceeds N={n}")
        threshold = params.anisotropic_threshold if metric == "dot_product" else float("nan")
        builder = (
            builder.tree(
                num_leaves=params.num_leaves,
                num_leaves_to_search=params.leaves_to_search,
                training_sample_size=min(params.training_sample_size, n),
            )
            .score_ah(params.dims_per_block, anisotropic_quantization_threshold=threshold)
            .reorder(params.reorder)
        )
    return ScannIndex(builder.build(), params, metric, n, d)


def search_index(
    index: ScannIndex, queries_QxD, k: int, batch_size: int = 16384, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k: `(ids_QxK int32, scores_QxK float32)`, best first, searched in
    batches of `batch_size` queries on all cores."""
    queries_QxD = _check_queries(queries_QxD, index.dim, index.num_points, k, index.metric,
                                 "index")
    pre_reorder = max(index.params.reorder, k) if index.params.num_leaves else None
    ids_QxK = np.empty((len(queries_QxD), k), np.int32)
    scores_QxK = np.empty((len(queries_QxD), k), np.float32)
    with tqdm.tqdm(total=len(queries_QxD), desc="scann search", unit="query",
                   disable=not progress) as bar:
        for start in range(0, len(queries_QxD), batch_size):
            block = queries_QxD[start : start + batch_size]
            ids, scores = index.searcher.search_batched_parallel(
                block, final_num_neighbors=k, pre_reorder_num_neighbors=pre_reorder
            )
            ids_QxK[start : start + len(block)] = ids
            scores_QxK[start : start + len(block)] = scores
            bar.update(len(block))
    return ids_QxK, scores_QxK


def save_index(index: ScannIndex, directory: str | pathlib.Path) -> None:
    """Writes the searcher's assets and `jaxsel_index.json` (metric, params, N, d) to
    `directory` (created if needed; paths inside are relative, so it can be moved)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index.searcher.serialize(str(directory), relative_path=True)
    meta = dict(metric=index.metric, num_points=index.num_points, dim=index.dim,
                params=dataclasses.asdict(index.params))
    (directory / _INDEX_META).write_text(json.dumps(meta, indent=2) + "\n")


def load_index(directory: str | pathlib.Path) -> ScannIndex:
    """Loads an index written by `save_index`."""
    directory = pathlib.Path(directory)
    meta_path = directory / _INDEX_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved index: {_INDEX_META} is missing")
    meta = json.loads(meta_path.read_text())
    return ScannIndex(
        searcher=scann_ops_pybind.load_searcher(str(directory)),
        params=ScannParams(**meta["params"]),
        metric=meta["metric"],
        num_points=meta["num_points"],
        dim=meta["dim"],
    )


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
def _cluster_means(x_NxD, assignments_N, previous_KxD, k: int):
    """Mean of each cluster's points; an empty cluster keeps its previous centroid."""
    sums_KxD = jax.ops.segment_sum(x_NxD, assignments_N, num_segments=k)
    counts_K = jax.ops.segment_sum(jnp.ones_like(assignments_N, jnp.float32), assignments_N,
                                   num_segments=k)
    return jnp.where(counts_K[:, None] > 0, sums_KxD / jnp.maximum(counts_K, 1)[:, None],
                     previous_KxD)


def _nearest_centroid(x_NxD, centroids_KxD):
    """`(assignments_N, sq_dist_N)`: each point's nearest centroid by squared L2 distance."""
    ids_Nx1, d2_Nx1 = _exact_search(centroids_KxD, x_NxD, 1, "squared_l2",
                                    chunk_size=4096, query_batch=1024)
    return ids_Nx1[:, 0], d2_Nx1[:, 0]


def _check_kmeans_inputs(x_NxD, k: int) -> np.ndarray:
    x_NxD = check_embeddings(x_NxD, "points", nonzero=False)
    if not 1 <= k <= len(x_NxD):
        raise ValueError(f"k={k} must be in [1, N={len(x_NxD)}] (the number of points)")
    return x_NxD


def _lloyd(x_NxD, x_device, centroids_KxD, num_iters, tol, progress):
    """Lloyd iterations from `centroids_KxD` -> `KMeansResult` (the last assignment, the means of
    its clusters, and the inertia of each iteration's assignment)."""
    k = len(centroids_KxD)
    history: list[float] = []
    for _ in tqdm.trange(num_iters, desc="k-means", disable=not progress):
        assignments_N, d2_N = _nearest_centroid(x_NxD, centroids_KxD)
        history.append(float(d2_N.sum(dtype=np.float64)))
        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
            break
        centroids_KxD = np.asarray(_cluster_means(x_device, assignments_N, centroids_KxD, k))
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
    return _lloyd(x_NxD, jnp.asarray(x_NxD), centroids_KxD, num_iters, tol, progress)


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
        near_ids_MxT, near_d2_MxT = _exact_search(
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


@jax.jit
def _sq_dist_to_point(x_NxD, c_D):
    return jnp.sum((x_NxD - c_D) ** 2, axis=1)


def _grow_undersized(x_device, centroids_KxD, assignments_N, d2_N, low):
    """Pulls into every cluster smaller than `low` the points whose move costs least, taken only
    from clusters larger than `low` (in place). Never makes a cluster exceed its size or `low`."""
    sizes_K = np.bincount(assignments_N, minlength=len(centroids_KxD))
    for j in np.flatnonzero(sizes_K < low):
        d2_to_j_N = np.asarray(_sq_dist_to_point(x_device, jnp.asarray(centroids_KxD[j])))
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
    d2_N = np.sum((x_NxD - result.centroids_KxD[result.assignments_N]) ** 2, axis=1)
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
    x_device = jnp.asarray(x_NxD)
    rng = np.random.default_rng(seed)
    for _ in range(reseed_rounds):
        if result.sizes_K.min() >= low:
            break
        centroids_KxD = _reseed_undersized(x_NxD, result, low, rng)
        result = _lloyd(x_NxD, x_device, centroids_KxD, num_iters, tol, progress)
    centroids_KxD, history = result.centroids_KxD, []
    for _ in range(max(balance_iters, 1)):
        assignments_N, d2_N = _nearest_centroid(x_NxD, centroids_KxD)
        _shrink_oversized(x_NxD, centroids_KxD, assignments_N, d2_N, high)
        _grow_undersized(x_device, centroids_KxD, assignments_N, d2_N, low)
        history.append(float(d2_N.sum(dtype=np.float64)))
        centroids_KxD = np.asarray(_cluster_means(x_device, assignments_N, centroids_KxD, k))
    return KMeansResult(centroids_KxD, assignments_N, np.array(history))
