"""Selections by embedding similarity: Sam et al.'s diversity-based pick, near-duplicate removal
and the rows nearest a target set. Embeddings may be numpy or memory-mapped `[N, d]` arrays.

- `threshold_diverse`: one representative from each of k clusters of an average-linkage threshold
  clustering (the diversity-based selection of Sam et al. 2025): `threshold_clusters`, then
  `one_per_cluster`.
- `dedup`: greedy near-duplicate removal by cosine similarity (returns the kept ids).
- `nearest_to_target`: the k pool rows most similar to any row of a target set.

Each returns a `select.Selection` (except `dedup`); bad input raises a ValueError naming the
argument, as in `jaxsel.select`.
"""

from __future__ import annotations

import numpy as np

from jaxsel import embed, linkage, search, select
from jaxsel.embed import check_embeddings

# dedup counts a similarity >= threshold - _SLACK as a duplicate, so that threshold 1 catches
# identical rows whose float64 cosine rounds to just below 1.
_SLACK = 1e-9


def _representatives(emb_NxD: np.ndarray, labels_N: np.ndarray, tie: float = 1e-12) -> np.ndarray:
    """Each cluster's (0..C-1) member nearest (squared L2, float64) the mean of its unit rows;
    within `tie` of the nearest is a tie (two members always tie), to the lower id. O(N) memory."""
    num_clusters = int(labels_N.max()) + 1
    norms_N = np.sqrt(np.einsum("nd,nd->n", emb_NxD, emb_NxD, dtype=np.float64))
    sizes_C = np.bincount(labels_N, minlength=num_clusters)
    dot_N, sq_mean_C = np.zeros(len(labels_N)), np.zeros(num_clusters)
    for column_N in emb_NxD.T:
        unit_N = column_N / norms_N
        mean_C = np.bincount(labels_N, unit_N, num_clusters) / sizes_C
        dot_N += unit_N * mean_C[labels_N]
        sq_mean_C += mean_C**2
    dist_N = 1 - 2 * dot_N + sq_mean_C[labels_N]  # |x - mean|^2 for a unit row x
    best_C = np.full(num_clusters, np.inf)
    np.minimum.at(best_C, labels_N, dist_N)
    near = np.flatnonzero(dist_N <= best_C[labels_N] + tie)
    return near[np.unique(labels_N[near], return_index=True)[1]]


def threshold_clusters(emb_NxD, k: int, num_neighbors: int = 64, missing_distance: float = 1.0,
                       scann_overrides: dict | None = None,
                       progress: bool = False) -> tuple[np.ndarray, dict]:
    """`[N]` labels (0..C-1, by lowest member id) of an average-linkage threshold clustering cut
    at k clusters, and the cut's params: rows are clustered by average linkage on cosine
    distance over their `num_neighbors`-nearest-neighbour graph (`linkage.knn_graph`,
    `linkage.rac`; a pair the graph lacks counts as `missing_distance` apart), cut at the
    threshold `epsilon` that leaves k clusters: after the N - k lowest merges, epsilon the height
    of the last (None when k = N). When the graph allows fewer than N - k merges (it is
    disconnected, or clusters lie `missing_distance` apart), more clusters remain
    (`num_clusters`). `pair_coverage` (`linkage.pair_coverage`): near 1 the clusters are those
    of exact average linkage; well below, `missing_distance` dominates their linkage (add
    neighbours). 64 neighbours: `benchmarks/diversity.py` measures ARI 0.95 against exact
    average linkage (0.87 with 32)."""
    emb_NxD = check_embeddings(emb_NxD, "emb_NxD", nonzero=True)
    n = len(emb_NxD)
    k = select.check_k(k, n)
    if not select.is_int(num_neighbors) or num_neighbors < 1:
        raise ValueError(f"num_neighbors must be an int >= 1, got {num_neighbors!r}")
    u_E, v_E, dist_E = linkage.knn_graph(emb_NxD, num_neighbors, scann_overrides, progress)
    dendrogram = linkage.rac(n, u_E, v_E, dist_E, missing_distance, progress)
    labels_N, epsilon = dendrogram.labels_for(k)
    params = dict(k=k, epsilon=epsilon, num_clusters=int(labels_N.max()) + 1,
                  num_neighbors=int(num_neighbors), missing_distance=missing_distance,
                  num_edges=len(u_E), pair_coverage=linkage.pair_coverage(labels_N, u_E, v_E),
                  scann_overrides=dict(scann_overrides or {}))
    return labels_N, params


def one_per_cluster(emb_NxD, labels_N, k: int, params: dict | None = None) -> select.Selection:
    """One representative from each of the k largest clusters `labels_N` (0..C-1; ties to the
    lowest label): the member nearest the mean of its members' unit vectors (ties, within 1e-12,
    to the lower id). The ids come largest cluster first; `scores` are the sizes of the clusters
    they represent; `params` (e.g. `threshold_clusters`' own) are recorded with the
    selection."""
    emb_NxD = check_embeddings(emb_NxD, "emb_NxD", nonzero=True)
    labels_N = np.asarray(labels_N)
    if labels_N.shape != (len(emb_NxD),) or not np.issubdtype(labels_N.dtype, np.integer):
        raise ValueError(f"labels_N must be {len(emb_NxD)} integer labels, one per row of "
                         f"emb_NxD, got {labels_N.dtype} of shape {labels_N.shape}")
    sizes_C = np.bincount(labels_N)
    if (sizes_C == 0).any():
        raise ValueError("labels_N must number the clusters 0..C-1 with none empty")
    k = select.check_k(k, len(sizes_C))
    chosen_C = np.lexsort((np.arange(len(sizes_C)), -sizes_C))[:k]
    ids = _representatives(emb_NxD, labels_N)[chosen_C]
    return select.Selection(ids, "threshold_diverse", len(emb_NxD), dict(params or {}),
                            sizes_C[chosen_C])


def threshold_diverse(emb_NxD, k: int, num_neighbors: int = 64, missing_distance: float = 1.0,
                      scann_overrides: dict | None = None,
                      progress: bool = False) -> select.Selection:
    """The diversity-based selection of Sam et al. 2025: one representative
    (`one_per_cluster`) from each of k clusters of an average-linkage threshold clustering
    (`threshold_clusters`, whose params the selection records)."""
    labels_N, params = threshold_clusters(emb_NxD, k, num_neighbors, missing_distance,
                                          scann_overrides, progress)
    return one_per_cluster(emb_NxD, labels_N, k, params)


def _pair_cosines(a_NxD, b_MxD, rows_NxT, chunk_elems: int = 1 << 22) -> np.ndarray:
    """`cos_NxT[i, t]`: the cosine similarity of `a_i` and `b_{rows[i, t]}`, in float64 from the
    given rows, in row chunks of at most about `chunk_elems` gathered values (so decisions below
    do not depend on the accelerator's matmul precision)."""
    n, t = rows_NxT.shape
    cos_NxT = np.empty((n, t), np.float64)
    step = max(1, chunk_elems // (t * a_NxD.shape[1]))
    for start in range(0, n, step):
        a_BxD = a_NxD[start : start + step].astype(np.float64)
        b_BxTxD = b_MxD[rows_NxT[start : start + step]].astype(np.float64)
        dots_BxT = np.einsum("bd,btd->bt", a_BxD, b_BxTxD)
        sq_a_B, sq_b_BxT = np.einsum("bd,bd->b", a_BxD, a_BxD), np.einsum(
            "btd,btd->bt", b_BxTxD, b_BxTxD)
        cos_NxT[start : start + step] = dots_BxT / np.sqrt(sq_a_B[:, None] * sq_b_BxT)
    return cos_NxT


def dedup(emb_NxD, threshold: float, order_N=None, num_neighbors: int = 16,
          scann_overrides: dict | None = None) -> np.ndarray:
    """The ids (sorted) kept by greedy near-duplicate removal by cosine similarity.

    Rows are visited in `order_N` (a permutation of 0..N-1; default 0..N-1, so put the
    preferred copy first); a row is kept unless its cosine similarity with an already kept row
    is >= `threshold`. Candidates are each row's `num_neighbors` nearest other rows
    (`search.neighbours` on the L2-normalised rows: exact and chunked below
    `search.BRUTE_FORCE_BELOW` rows, ScaNN above; no N x N matrix), rescored in float64 from the
    given rows (numpy or memory-mapped; a similarity within 1e-9 below `threshold` counts as
    reaching it, so `threshold=1` removes identical rows).

    This equals the exhaustive greedy whenever no row has more than `num_neighbors` rows at
    similarity >= `threshold`. In a larger group a row's kept duplicate may fall outside its
    candidates, so extra members may be kept; raise `num_neighbors` for such data. A dropped
    row always has a kept row earlier in the order at similarity >= `threshold`.
    """
    emb_NxD = check_embeddings(emb_NxD, "emb_NxD", nonzero=True)
    n = len(emb_NxD)
    if not (select.is_number(threshold) and -1 < threshold <= 1):
        raise ValueError(f"threshold must be in (-1, 1], got {threshold!r}")
    if not select.is_int(num_neighbors) or num_neighbors < 1:
        raise ValueError(f"num_neighbors must be an int >= 1, got {num_neighbors!r}")
    if order_N is None:
        order_N = np.arange(n)
    else:
        order_N = np.asarray(order_N)
        if (order_N.shape != (n,) or not np.issubdtype(order_N.dtype, np.integer)
                or not np.array_equal(np.sort(order_N), np.arange(n))):
            raise ValueError(f"order_N must be a permutation of 0..{n - 1} (one entry per row "
                             f"of emb_NxD), got shape {order_N.shape} and dtype {order_N.dtype}")
    rank_N = np.empty(n, np.int64)
    rank_N[order_N] = np.arange(n)
    # Self is usually the first hit, so ask for one more; drop self wherever it appears.
    ids_NxT = search.neighbours(emb_NxD, min(num_neighbors + 1, n), scann_overrides)
    cos_NxT = _pair_cosines(emb_NxD, emb_NxD, ids_NxT)
    # Only other rows visited earlier can block a row; a row with none is always kept.
    dup_NxT = ((cos_NxT >= threshold - _SLACK) & (ids_NxT != np.arange(n)[:, None])
               & (rank_N[ids_NxT] < rank_N[:, None]))
    kept_N = np.ones(n, bool)
    rows = np.flatnonzero(dup_NxT.any(axis=1))
    for row in rows[np.argsort(rank_N[rows])].tolist():  # in visiting order
        if kept_N[ids_NxT[row][dup_NxT[row]]].any():
            kept_N[row] = False
    return np.flatnonzero(kept_N)


def nearest_to_target(emb_NxD, target_TxD, k: int, query_batch: int = 1024,
                      chunk_rows: int = select.CHUNK_ROWS) -> select.Selection:
    """The k pool rows with the highest maximum cosine similarity to any target row, best
    first (ties to the lower id); `scores` are those similarities.

    Pool rows (numpy or memory-mapped) are read `chunk_rows` at a time; each row's nearest
    target is found by `search.exact_search` (`query_batch` queries at a time, against the
    target rows in chunks, so memory stays bounded) and its similarity recomputed exactly in
    float64. Every chunk size gives the same selection.
    """
    if np.ndim(emb_NxD) != 2 or 0 in np.shape(emb_NxD):
        raise ValueError(f"emb_NxD must be a non-empty [N, d] array, got shape "
                         f"{np.shape(emb_NxD)}")
    target_TxD = check_embeddings(target_TxD, "target_TxD", nonzero=True)
    if target_TxD.shape[1] != emb_NxD.shape[1]:
        raise ValueError(f"target_TxD has dimension {target_TxD.shape[1]} but emb_NxD has "
                         f"dimension {emb_NxD.shape[1]}")
    k = select.check_k(k, len(emb_NxD))
    if not select.is_int(query_batch) or query_batch < 1:
        raise ValueError(f"query_batch must be an int >= 1, got {query_batch!r}")
    unit_TxD = embed.l2_normalize(target_TxD)

    def similarities(rows: slice) -> np.ndarray:
        chunk_CxD = check_embeddings(emb_NxD[rows], "emb_NxD", nonzero=True,
                                     first_row=rows.start)
        nearest_Cx1, _ = search.exact_search(unit_TxD, embed.l2_normalize(chunk_CxD), 1,
                                             query_batch=query_batch)
        return _pair_cosines(chunk_CxD, target_TxD, nearest_Cx1.astype(np.int64))[:, 0]

    ids, sims = select.best_k(similarities, len(emb_NxD), k, chunk_rows)
    return select.Selection(ids, "nearest_to_target", len(emb_NxD),
                            dict(k=k, num_targets=len(target_TxD)), sims)
