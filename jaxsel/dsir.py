"""Data Selection with Importance Resampling (DSIR; Xie et al., 2023) over hashed n-grams.

The target and the raw candidates are each modelled as a bag of hashed unigrams and bigrams of
the pool's tokens (`embed.ngram_keys`, 10,000 buckets as in the paper): the raw distribution is
the candidates' bucket counts normalised, the target's is its counts plus a Laplace pseudo-count
(`smoothing`, default 0) normalised, as the reference package (`data-selection`,
`HashedNgramDSIR`) fits them. A
candidate's importance log-weight is the sum over its n-grams of log p_target(b) - log p_raw(b)
(both with the package's 1e-8 floor), and DSIR resamples k candidates without replacement with
Gumbel-top-k on those log-weights (`select.gumbel_top_k`, temperature 1, higher is better).

Rows are read and hashed `chunk_rows` at a time (numpy), so memory stays bounded by the chunk and
the bucket table, never by `[N, num_buckets]`. Deviation from the paper: it hashes words of the
raw text; here the n-grams are of the pool's BPE tokens, which every pool has.
"""

from __future__ import annotations

import numpy as np

from jaxsel import embed

NUM_BUCKETS = 10_000
_FLOOR = 1e-8  # The reference package's floor inside both logs.


def _chunks(tokens_NxL, segments_NxL, num_buckets: int, chunk_rows: int):
    for start in range(0, len(tokens_NxL), chunk_rows):
        rows = slice(start, start + chunk_rows)
        yield embed.ngram_keys(np.asarray(tokens_NxL[rows]), np.asarray(segments_NxL[rows]),
                               num_buckets)


def bucket_counts(tokens_NxL, segments_NxL, num_buckets: int = NUM_BUCKETS,
                  chunk_rows: int = 4096) -> np.ndarray:
    """`[num_buckets]` int64: how many n-grams of all the rows fall in each bucket."""
    counts_B = np.zeros(num_buckets, np.int64)
    for keys_CxK, real_CxK in _chunks(tokens_NxL, segments_NxL, num_buckets, chunk_rows):
        counts_B += np.bincount(keys_CxK[real_CxK], minlength=num_buckets)
    return counts_B


def log_ratio(target_counts_B, raw_counts_B, smoothing: float = 0.0) -> np.ndarray:
    """`[num_buckets]` log p_target - log p_raw: the raw counts normalised, the target's plus
    `smoothing` normalised. A ValueError when the target holds no n-gram (nothing to match) or
    the raw candidates none (nothing to weigh)."""
    target_B = np.asarray(target_counts_B, np.float64)
    raw_B = np.asarray(raw_counts_B, np.float64)
    if target_B.shape != raw_B.shape or target_B.ndim != 1:
        raise ValueError(f"target and raw counts must be two equally long 1-D arrays, got "
                         f"shapes {target_B.shape} and {raw_B.shape}")
    if not target_B.sum() > 0:
        raise ValueError("dsir: the target items hold no n-gram (no real token), so there is no "
                         "target distribution to resample towards")
    if smoothing < 0:
        raise ValueError(f"dsir: smoothing must be >= 0, got {smoothing}")
    if not raw_B.sum() > 0:
        raise ValueError("dsir: the candidates hold no n-gram (no real token) to weigh")
    p_target = (target_B + smoothing) / (target_B + smoothing).sum()
    p_raw = raw_B / raw_B.sum()
    return np.log(p_target + _FLOOR) - np.log(p_raw + _FLOOR)


def log_importance_weights(tokens_NxL, segments_NxL, log_ratio_B,
                           chunk_rows: int = 4096) -> np.ndarray:
    """`[N]` float64: each row's importance log-weight, the sum of `log_ratio_B` over its
    n-grams (the dot product of its bucket counts with the log ratio)."""
    log_ratio_B = np.asarray(log_ratio_B, np.float64)
    weights = [np.where(real_CxK, log_ratio_B[keys_CxK], 0.0).sum(axis=1)
               for keys_CxK, real_CxK in _chunks(tokens_NxL, segments_NxL, len(log_ratio_B),
                                                  chunk_rows)]
    return np.concatenate(weights) if weights else np.zeros(0)


def importance_weights(target_rows, candidate_rows, num_buckets: int = NUM_BUCKETS,
                       smoothing: float = 0.0, chunk_rows: int = 4096) -> np.ndarray:
    """`[N]` the importance log-weights of the candidates (`{"tokens", "segments"}`, `[N, L]`,
    numpy or memory-mapped) towards the target items (the same, `[R, L']`)."""
    ratio_B = log_ratio(
        bucket_counts(target_rows["tokens"], target_rows["segments"], num_buckets, chunk_rows),
        bucket_counts(candidate_rows["tokens"], candidate_rows["segments"], num_buckets,
                      chunk_rows), smoothing)
    return log_importance_weights(candidate_rows["tokens"], candidate_rows["segments"], ratio_B,
                                  chunk_rows)
