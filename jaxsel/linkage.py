"""Average-linkage threshold clustering of embeddings `[N, d]` over a k-nearest-neighbour graph.

`knn_graph` + `rac` -> `Dendrogram`: average-linkage agglomerative clustering on cosine distance
over a k-nearest-neighbour graph, by reciprocal agglomerative clustering (RAC; Sumengen et al.
2021). `Dendrogram.labels_at(epsilon)` cuts it at a distance threshold, `labels_for(k)` at a
budget of k clusters (the threshold clustering of Sam et al. 2025's diversity selection);
`pair_coverage` says how much of the clusters' linkage the graph's edges hold.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tqdm
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from jaxsel import search
from jaxsel.embed import check_embeddings


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
