"""Selections: which pool ids to train on, chosen by score, by chance, by cluster or by similarity.

Every selector is a pure function of numpy arrays that index one pool by its stable integer ids,
and (except `dedup`) returns a `Selection`: the ids in the order chosen, the method, the pool
size, the settings that produced it and the scores of the chosen ids. A `Selection` is the saved
artifact an experiment is re-run from (`save` / `Selection.load`, JSON with a top-level "ids").

- `random_ids`: uniform without replacement.
- `top_k`: the k best scores, ties broken by the lower id.
- `gumbel_top_k`: k ids without replacement from the Plackett-Luce distribution (MATES).
- `cluster_stratified`: k spread as evenly as possible over given clusters (a stratified sample).
- `threshold_diverse`: one representative from each of k clusters of an average-linkage threshold
  clustering (the diversity-based selection of Sam et al. 2025).
- `dedup`: greedy near-duplicate removal by cosine similarity.
- `nearest_to_target`: the k pool rows most similar to any row of a target set.

The same seed gives the same selection. Bad input (k outside [1, N], non-finite scores,
mismatched shapes, impossible options, empty arrays) raises a ValueError naming the argument.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxsel import cluster, embed, report, search
from jaxsel.embed import check_embeddings

_KEYS = ("ids", "method", "pool_size", "params", "scores")
CHUNK_ROWS = 1 << 20  # Rows of (possibly memory-mapped) scores read at a time.
# dedup counts a similarity >= threshold - _SLACK as a duplicate, so that threshold 1 catches
# identical rows whose float64 cosine rounds to just below 1.
_SLACK = 1e-9


# ----------------------------------------------------------------------------- the artifact


@dataclasses.dataclass(frozen=True, eq=False)
class Selection:
    """A selection of `len(ids)` distinct ids of a pool of `pool_size` sequences.

    `ids` (int64 [k], read-only) are in the order chosen; `scores` (float32 [k], read-only, or
    None) are the scores of the chosen ids; `params` holds the settings that produced it (seed,
    temperature, k, ...) as plain JSON values. Construction validates all of it: ids unique and
    in [0, pool_size), scores finite and as long as ids, params JSON-serialisable.
    """

    ids: np.ndarray
    method: str
    pool_size: int
    params: dict
    scores: np.ndarray | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a non-empty string, got {self.method!r}")
        if not _is_int(self.pool_size) or self.pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, got {self.pool_size!r}")
        ids = np.array(self.ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a non-empty 1-D integer array, got shape {ids.shape} "
                             f"and dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        outside = ids[(ids < 0) | (ids >= self.pool_size)]
        if outside.size:
            raise ValueError(f"ids must lie in [0, pool_size={self.pool_size}), got "
                             f"{outside.size} outside, e.g. {outside[:5].tolist()}")
        unique, counts = np.unique(ids, return_counts=True)
        if unique.size != ids.size:
            repeats = unique[counts > 1]
            raise ValueError(f"ids must be unique, got {repeats.size} repeated, e.g. "
                             f"{repeats[:5].tolist()}")
        ids.setflags(write=False)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "pool_size", int(self.pool_size))
        if self.scores is not None:
            scores = np.array(self.scores, np.float32)
            if scores.shape != ids.shape:
                raise ValueError(f"scores must have shape {ids.shape} like ids, got {scores.shape}")
            if not np.isfinite(scores).all():
                raise ValueError("scores must be finite")
            scores.setflags(write=False)
            object.__setattr__(self, "scores", scores)
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a dict, got {type(self.params).__name__}")
        try:  # a deep copy in plain JSON values (numpy scalars become Python numbers)
            params = json.loads(json.dumps(self.params, default=_numpy_scalar, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"params must be JSON-serialisable: {e}") from None
        object.__setattr__(self, "params", params)

    def __len__(self) -> int:
        return len(self.ids)

    def to_json(self) -> dict:
        """The JSON object `save` writes: keys "ids", "method", "pool_size", "params", "scores"."""
        scores = None if self.scores is None else [float(s) for s in self.scores]
        return dict(ids=self.ids.tolist(), method=self.method, pool_size=self.pool_size,
                    params=self.params, scores=scores)

    def save(self, path: str | os.PathLike) -> None:
        """Writes `to_json()` to `path` atomically (temp file in the same folder, then rename)."""
        report.write_json(os.fspath(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Selection:
        """Reads a file written by `save`; a ValueError naming `path` if it is not valid JSON,
        lacks a key, or holds an invalid selection (e.g. repeated or out-of-range ids)."""
        path = os.fspath(path)
        try:
            obj = report.read_json(path)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path} is not a valid selection: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path} is not a valid selection: not a JSON object")
        missing = [key for key in _KEYS if key not in obj]
        if missing:
            raise ValueError(f"{path} is not a valid selection: missing keys {missing}")
        ids = obj["ids"]
        if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
            raise ValueError(f"{path} is not a valid selection: ids must be a list of ints")
        try:
            return cls(np.array(ids, np.int64), obj["method"], obj["pool_size"], obj["params"],
                       None if obj["scores"] is None else np.array(obj["scores"], np.float32))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid selection: {e}") from None


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _numpy_scalar(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


# ----------------------------------------------------------------------------- checks


def _check_k(k, n: int, name: str = "k") -> int:
    if not _is_int(k) or not 1 <= k <= n:
        raise ValueError(f"{name} must be in [1, {n}], got {k!r}")
    return int(k)


def _check_seed(seed) -> int:
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_scores(scores_N, name: str = "scores_N") -> np.ndarray:
    """`scores_N` as a float64 non-empty 1-D array of finite numbers."""
    return _scores(_vector(scores_N, name), slice(None), name)


def _vector(scores_N, name: str = "scores_N") -> np.ndarray:
    """`scores_N` as an array (numpy or memory-mapped, its values not read), after checking it
    is non-empty and 1-D."""
    if not isinstance(scores_N, np.ndarray):
        try:
            scores_N = np.asarray(scores_N)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an array of numbers") from None
    if scores_N.ndim != 1 or scores_N.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {scores_N.shape}")
    return scores_N


def _scores(scores_N, rows, name: str = "scores_N") -> np.ndarray:
    """`scores_N[rows]` as float64, after checking they are finite numbers."""
    try:
        values = np.asarray(scores_N[rows], np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of numbers") from None
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        ids = np.arange(len(scores_N))[rows][bad] if isinstance(rows, slice) else \
            np.asarray(rows)[bad]
        raise ValueError(f"{name} has {bad.size} non-finite values, e.g. at ids "
                         f"{ids[:5].tolist()}")
    return values


# ----------------------------------------------------------------------------- selectors


def random_ids(pool_size: int, k: int, seed: int) -> Selection:
    """k distinct ids drawn uniformly from [0, pool_size) (`default_rng(seed).choice`), in the
    order drawn."""
    if not _is_int(pool_size) or pool_size < 1:
        raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}")
    k, seed = _check_k(k, pool_size), _check_seed(seed)
    ids = np.random.default_rng(seed).choice(pool_size, size=k, replace=False)
    return Selection(ids, "random", int(pool_size), dict(k=k, seed=seed))


def top_k(scores_N, k: int, lower_is_better: bool = True,
          chunk_rows: int = CHUNK_ROWS) -> Selection:
    """The k ids with the lowest (or, with `lower_is_better=False`, highest) scores, best first;
    ties go to the lower id. Deterministic. `scores_N` may be memory-mapped: it is read
    `chunk_rows` at a time (`_best_k`), with the same result for any chunk size."""
    scores_N = _vector(scores_N)
    n = len(scores_N)
    k = _check_k(k, n)
    sign = 1.0 if lower_is_better else -1.0
    ids, _ = _best_k(lambda rows: -sign * _scores(scores_N, rows), n, k, chunk_rows)
    return Selection(ids, "top_k", n, dict(k=k, lower_is_better=bool(lower_is_better)),
                     _scores(scores_N, ids))


def gumbel_top_k(scores_N, k: int, seed: int, temperature: float = 1.0,
                 lower_is_better: bool = True, chunk_rows: int = CHUNK_ROWS) -> Selection:
    """k ids drawn without replacement from the Plackett-Luce distribution with weights
    `exp(-score / temperature)` (`exp(+score / temperature)` when higher is better).

    The Gumbel-top-k trick: perturb `-score / temperature` with independent standard Gumbel
    noise (`default_rng(seed).gumbel`) and take the k largest, in decreasing order. The i-th id
    is then drawn with probability `w_i / (sum of the weights not yet drawn)`, so the ids come in
    the order Plackett-Luce draws them. As `temperature -> 0` this becomes `top_k`; as it grows,
    `random_ids`. `scores_N` may be memory-mapped: it is read `chunk_rows` at a time, the noise
    of rows `a...b` drawn from the generator advanced by `a` draws (one per row), so every chunk
    size gives the same selection.

    MATES (Yu et al. 2024) selects this way from the predictions of its data influence model,
    trained on z-scored oracle influences (the reference loss after one step on a candidate, so
    lower is better), with temperature 1. Its released code adds Gumbel noise to the predictions
    and keeps the k smallest, i.e. the k largest of `-score - G`; `-G` is not Gumbel(max)
    distributed, so that is close to, but not exactly, the Plackett-Luce draw made here.
    """
    scores_N = _vector(scores_N)
    n = len(scores_N)
    k, seed = _check_k(k, n), _check_seed(seed)
    if not (_is_number(temperature) and np.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    sign = -1.0 if lower_is_better else 1.0

    def keys(rows: slice) -> np.ndarray:
        scores = _scores(scores_N, rows)
        with np.errstate(over="ignore"):
            logits = sign * scores / temperature
        if not np.isfinite(logits).all():
            raise ValueError(f"temperature={temperature} is too small for scores of magnitude "
                             f"{np.abs(scores).max():.3g}: score / temperature overflows")
        generator = np.random.PCG64(seed)  # default_rng(seed)'s, advanced to the chunk's rows
        generator.advance(rows.start)
        return logits + np.random.Generator(generator).gumbel(size=len(logits))

    ids, _ = _best_k(keys, n, k, chunk_rows)
    params = dict(k=k, seed=seed, temperature=float(temperature),
                  lower_is_better=bool(lower_is_better))
    return Selection(ids, "gumbel_top_k", n, params, _scores(scores_N, ids))


def _best_k(keys_fn, n: int, k: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The k ids with the largest `keys_fn(rows)` (rows a slice of [0, n)), largest first, ties
    to the lower id, and their keys; computed a chunk of rows at a time, memory
    O(k + chunk_rows)."""
    if not _is_int(chunk_rows) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    best_ids, best_keys = np.zeros(0, np.int64), np.zeros(0)
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(n, start + chunk_rows))
        ids = np.concatenate([best_ids, np.arange(rows.start, rows.stop)])
        keys = np.concatenate([best_keys, keys_fn(rows)])
        keep = np.lexsort((ids, -keys))[:k]
        best_ids, best_keys = ids[keep], keys[keep]
    return best_ids, best_keys


def _water_fill(sizes_C, k: int) -> tuple[int, np.ndarray]:
    """`(level, counts_C)`: the largest level L with `sum(min(sizes_C, L)) <= k`, and the
    counts `min(sizes_C, L)` it gives each cluster (before the `k - sum` leftover units, fewer
    than the number of clusters larger than L, are handed out one per cluster)."""
    sizes_C = np.asarray(sizes_C, np.int64)
    sorted_C = np.sort(sizes_C)
    c = len(sorted_C)
    prefix_C = np.concatenate([[0], np.cumsum(sorted_C)[:-1]])
    # Filling every cluster up to level sorted_C[i] costs prefix_C[i] + sorted_C[i] * (c - i),
    # non-decreasing in i; the first i it exceeds k is the first cluster the level stays below.
    cost_C = prefix_C + sorted_C * (c - np.arange(c))
    i = int(np.searchsorted(cost_C, k, side="right"))
    level = int(sorted_C[-1]) if i == c else int((k - prefix_C[i]) // (c - i))
    return level, np.minimum(sizes_C, level)


def cluster_stratified(cluster_ids_N, k: int, seed: int, scores_N=None,
                       lower_is_better: bool = True) -> Selection:
    """k ids spread as evenly as possible over the clusters: a sample stratified by cluster.

    Allocation by water-filling (`_water_fill`): every cluster gets `min(size, L)` for the
    largest level L that fits in k; the leftover units (fewer than the clusters larger than L)
    go one each to clusters larger than L, in a random order drawn from `default_rng(seed)`.
    Within a cluster, the best-scored members are taken when `scores_N` is given (ties to the
    lower id), otherwise a uniform random sample (the same generator). The ids come grouped by
    cluster (in increasing label order), best or first drawn first within a cluster.
    `cluster_ids_N` are integer labels (any values; each distinct value is one cluster).
    """
    clusters_N = np.asarray(cluster_ids_N)
    if clusters_N.ndim != 1 or clusters_N.size == 0:
        raise ValueError(f"cluster_ids_N must be a non-empty 1-D array, got shape "
                         f"{clusters_N.shape}")
    if not np.issubdtype(clusters_N.dtype, np.integer):
        raise ValueError(f"cluster_ids_N must be integer labels, got dtype {clusters_N.dtype}")
    n = len(clusters_N)
    k, seed = _check_k(k, n), _check_seed(seed)
    if scores_N is not None:
        scores_N = _check_scores(scores_N)
        if len(scores_N) != n:
            raise ValueError(f"scores_N has {len(scores_N)} entries but cluster_ids_N has {n}")
    _, index_N, sizes_C = np.unique(clusters_N, return_inverse=True, return_counts=True)
    level, counts_C = _water_fill(sizes_C, k)
    rng = np.random.default_rng(seed)
    open_C = np.flatnonzero(sizes_C > level)
    counts_C[rng.permutation(open_C)[: k - counts_C.sum()]] += 1
    key_N = rng.random(n) if scores_N is None else (scores_N if lower_is_better else -scores_N)
    # Sort by cluster, then key, then id (lexsort is stable); keep each cluster's first counts.
    order_N = np.lexsort((key_N, index_N))
    starts_C = np.concatenate([[0], np.cumsum(sizes_C)[:-1]])
    rank_N = np.arange(n) - starts_C[index_N[order_N]]
    ids = order_N[rank_N < counts_C[index_N[order_N]]]
    params = dict(k=k, seed=seed, lower_is_better=bool(lower_is_better),
                  scored=scores_N is not None, num_clusters=len(sizes_C), level=level)
    return Selection(ids, "cluster_stratified", n, params,
                     None if scores_N is None else scores_N[ids])


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
    distance over their `num_neighbors`-nearest-neighbour graph (`cluster.knn_graph`,
    `cluster.rac`; a pair the graph lacks counts as `missing_distance` apart), cut at the
    threshold `epsilon` that leaves k clusters: after the N - k lowest merges, epsilon the height
    of the last (None when k = N). When the graph allows fewer than N - k merges (it is
    disconnected, or clusters lie `missing_distance` apart), more clusters remain
    (`num_clusters`). `pair_coverage` (`cluster.pair_coverage`): near 1 the clusters are those of
    exact average linkage; well below, `missing_distance` dominates their linkage (add
    neighbours). 64 neighbours: `benchmarks/diversity.py` measures ARI 0.95 against exact
    average linkage (0.87 with 32)."""
    emb_NxD = check_embeddings(emb_NxD, "emb_NxD", nonzero=True)
    n = len(emb_NxD)
    k = _check_k(k, n)
    if not _is_int(num_neighbors) or num_neighbors < 1:
        raise ValueError(f"num_neighbors must be an int >= 1, got {num_neighbors!r}")
    u_E, v_E, dist_E = cluster.knn_graph(emb_NxD, num_neighbors, scann_overrides, progress)
    dendrogram = cluster.rac(n, u_E, v_E, dist_E, missing_distance, progress)
    labels_N, epsilon = dendrogram.labels_for(k)
    params = dict(k=k, epsilon=epsilon, num_clusters=int(labels_N.max()) + 1,
                  num_neighbors=int(num_neighbors), missing_distance=missing_distance,
                  num_edges=len(u_E), pair_coverage=cluster.pair_coverage(labels_N, u_E, v_E),
                  scann_overrides=dict(scann_overrides or {}))
    return labels_N, params


def one_per_cluster(emb_NxD, labels_N, k: int, params: dict | None = None) -> Selection:
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
    k = _check_k(k, len(sizes_C))
    chosen_C = np.lexsort((np.arange(len(sizes_C)), -sizes_C))[:k]
    ids = _representatives(emb_NxD, labels_N)[chosen_C]
    return Selection(ids, "threshold_diverse", len(emb_NxD), dict(params or {}), sizes_C[chosen_C])


def threshold_diverse(emb_NxD, k: int, num_neighbors: int = 64, missing_distance: float = 1.0,
                      scann_overrides: dict | None = None, progress: bool = False) -> Selection:
    """The diversity-based selection of Sam et al. 2025: one representative
    (`one_per_cluster`) from each of k clusters of an average-linkage threshold clustering
    (`threshold_clusters`, whose params the selection records)."""
    labels_N, params = threshold_clusters(emb_NxD, k, num_neighbors, missing_distance,
                                          scann_overrides, progress)
    return one_per_cluster(emb_NxD, labels_N, k, params)


# ----------------------------------------------------------------------------- similarity


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
    if not (_is_number(threshold) and -1 < threshold <= 1):
        raise ValueError(f"threshold must be in (-1, 1], got {threshold!r}")
    if not _is_int(num_neighbors) or num_neighbors < 1:
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
                      chunk_rows: int = CHUNK_ROWS) -> Selection:
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
    k = _check_k(k, len(emb_NxD))
    if not _is_int(query_batch) or query_batch < 1:
        raise ValueError(f"query_batch must be an int >= 1, got {query_batch!r}")
    unit_TxD = embed.l2_normalize(target_TxD)

    def similarities(rows: slice) -> np.ndarray:
        chunk_CxD = check_embeddings(emb_NxD[rows], "emb_NxD", nonzero=True,
                                     first_row=rows.start)
        nearest_Cx1, _ = search.exact_search(unit_TxD, embed.l2_normalize(chunk_CxD), 1,
                                             query_batch=query_batch)
        return _pair_cosines(chunk_CxD, target_TxD, nearest_Cx1.astype(np.int64))[:, 0]

    ids, sims = _best_k(similarities, len(emb_NxD), k, chunk_rows)
    return Selection(ids, "nearest_to_target", len(emb_NxD),
                     dict(k=k, num_targets=len(target_TxD)), sims)