"""Selections: which pool ids to train on, chosen by score, by chance, by cluster or by similarity.

Every selector is a pure function of numpy arrays that index one pool by its stable integer ids,
and returns a `Selection`: the ids in the order chosen, the method, the pool
size, the settings that produced it and the scores of the chosen ids. A `Selection` is the saved
artifact an experiment is re-run from (`save` / `Selection.load`, JSON with a top-level "ids").

- `random_ids`: uniform without replacement.
- `top_k`: the k best scores, ties broken by the lower id.
- `gumbel_top_k`: k ids without replacement from the Plackett-Luce distribution (MATES).
- `cluster_stratified`: k spread as evenly as possible over given clusters (a stratified sample).

The selectors by embedding similarity (Sam et al.'s diverse pick, dedup, nearest to a target) are
in `jaxsel.similarity`; they share this module's `Selection` and checks.

The same seed gives the same selection. Bad input (k outside [1, N], non-finite scores,
mismatched shapes, impossible options, empty arrays) raises a ValueError naming the argument.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxsel import report

_KEYS = ("ids", "method", "pool_size", "params", "scores")
CHUNK_ROWS = 1 << 20  # Rows of (possibly memory-mapped) scores read at a time.


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
        if not is_int(self.pool_size) or self.pool_size < 1:
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
        if not isinstance(ids, list) or not all(is_int(i) for i in ids):
            raise ValueError(f"{path} is not a valid selection: ids must be a list of ints")
        try:
            return cls(np.array(ids, np.int64), obj["method"], obj["pool_size"], obj["params"],
                       None if obj["scores"] is None else np.array(obj["scores"], np.float32))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid selection: {e}") from None


def is_int(x) -> bool:
    """An int or numpy integer, not a bool (the checks' notion of an integer option)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A real number (int, float or numpy scalar), not a bool."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _numpy_scalar(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


# ----------------------------------------------------------------------------- checks


def check_k(k, n: int, name: str = "k") -> int:
    """`k` as an int, or a ValueError naming `name` unless it is an integer in [1, n]."""
    if not is_int(k) or not 1 <= k <= n:
        raise ValueError(f"{name} must be in [1, {n}], got {k!r}")
    return int(k)


def _check_seed(seed) -> int:
    if not is_int(seed) or seed < 0:
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
    if not is_int(pool_size) or pool_size < 1:
        raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}")
    k, seed = check_k(k, pool_size), _check_seed(seed)
    ids = np.random.default_rng(seed).choice(pool_size, size=k, replace=False)
    return Selection(ids, "random", int(pool_size), dict(k=k, seed=seed))


def top_k(scores_N, k: int, lower_is_better: bool = True,
          chunk_rows: int = CHUNK_ROWS) -> Selection:
    """The k ids with the lowest (or, with `lower_is_better=False`, highest) scores, best first;
    ties go to the lower id. Deterministic. `scores_N` may be memory-mapped: it is read
    `chunk_rows` at a time (`_best_k`), with the same result for any chunk size."""
    scores_N = _vector(scores_N)
    n = len(scores_N)
    k = check_k(k, n)
    sign = 1.0 if lower_is_better else -1.0
    ids, _ = best_k(lambda rows: -sign * _scores(scores_N, rows), n, k, chunk_rows)
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
    k, seed = check_k(k, n), _check_seed(seed)
    if not (is_number(temperature) and np.isfinite(temperature)
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

    ids, _ = best_k(keys, n, k, chunk_rows)
    params = dict(k=k, seed=seed, temperature=float(temperature),
                  lower_is_better=bool(lower_is_better))
    return Selection(ids, "gumbel_top_k", n, params, _scores(scores_N, ids))


def best_k(keys_fn, n: int, k: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The k ids with the largest `keys_fn(rows)` (rows a slice of [0, n)), largest first, ties
    to the lower id, and their keys; computed a chunk of rows at a time, memory
    O(k + chunk_rows)."""
    if not is_int(chunk_rows) or chunk_rows < 1:
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
    k, seed = check_k(k, n), _check_seed(seed)
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
