"""Nearest-neighbour search over embeddings `[N, d]` (clustering is in `jaxsel.cluster`).

- `exact_search`: chunked matmul + top-k in JAX; the ground truth for recall.
- `build_index` / `search_index` / `save_index` / `load_index`: a ScaNN index (tree partitioning,
  anisotropic hashing, exact reordering) whose parameters come from `scann_params(n, overrides)`,
  with defaults that scale with N (brute force below `BRUTE_FORCE_BELOW` points).

Metrics: "dot_product" (scores are similarities, best first; meant for L2-normalised embeddings,
where it ranks as cosine) and "squared_l2" (scores are squared distances, nearest first).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from scann.scann_ops.py import scann_ops_pybind

from jaxsel.embed import check_embeddings, l2_normalize

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


def neighbours(x_NxD, t: int, scann_overrides: dict | None = None,
               progress: bool = False) -> np.ndarray:
    """`[N, t]` int64 ids of each row's `t` nearest rows by cosine similarity, itself usually
    among them. Below `BRUTE_FORCE_BELOW` rows: `exact_search` on the normalised rows. Above: a
    ScaNN index with `scann_params(N, scann_overrides)` (approximate, and as its build is not
    bit-reproducible a few rows' neighbours may differ from one build to the next) over the
    normalised rows written to a temporary memory-mapped file (under `$TMPDIR`), so the index
    holds the one in-memory copy of them and the queries are read from the file in batches."""
    n = len(x_NxD)
    if n < BRUTE_FORCE_BELOW:
        unit_NxD = l2_normalize(x_NxD)
        return exact_search(unit_NxD, unit_NxD, t, progress=progress)[0].astype(np.int64)
    with tempfile.TemporaryDirectory(prefix="jaxsel-unit-") as folder:
        unit_NxD = l2_normalize(x_NxD, np.lib.format.open_memmap(
            os.path.join(folder, "unit.npy"), "w+", np.float32, np.shape(x_NxD)))
        index = build_index(unit_NxD, "dot_product", scann_params(n, scann_overrides))
        ids_NxT, _ = search_index(index, unit_NxD, t, progress=progress)
        del unit_NxD, index
    return ids_NxT.astype(np.int64)


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
