"""DSIR against numpy: hashed n-gram counts by a Python loop, the importance log-weights by the
formula, chunking invisible; a target without n-grams; resampling enriches the target's kind."""

import numpy as np
import pytest

from jaxsel import dsir, embed, select

MASK = 0xFFFFFFFF


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK
    return x ^ (x >> 16)


def _ngrams(tokens_L, segments_L, buckets):
    """The bucket of every real unigram and in-document bigram of one row, by a loop."""
    out = [_mix32(int(t)) % buckets for t, s in zip(tokens_L, segments_L, strict=True) if s]
    for i in range(1, len(tokens_L)):
        if segments_L[i] and segments_L[i] == segments_L[i - 1]:
            key = _mix32(_mix32(int(tokens_L[i - 1])) ^ ((int(tokens_L[i]) + 0x9E3779B9) & MASK))
            out.append(key % buckets)
    return out


def _rows(rng, n, length, vocab):
    tokens = rng.integers(vocab[0], vocab[1], (n, length)).astype(np.int32)
    segments = np.ones((n, length), np.int32)
    segments[:, length // 2:] = 2  # Two documents per row: no bigram across them.
    segments[0, -3:] = 0  # Padding.
    return {"tokens": tokens, "segments": segments}


def test_weights_equal_the_formula_over_loop_counts():
    rng = np.random.default_rng(0)
    buckets = 97
    target = _rows(rng, 5, 12, (0, 40))
    raw = _rows(rng, 23, 12, (0, 80))
    count = lambda rows: np.bincount(  # noqa: E731
        [b for t, s in zip(rows["tokens"], rows["segments"], strict=True)
         for b in _ngrams(t, s, buckets)], minlength=buckets)
    t_counts, r_counts = count(target), count(raw)
    np.testing.assert_array_equal(dsir.bucket_counts(target["tokens"], target["segments"],
                                                     buckets, chunk_rows=2), t_counts)
    np.testing.assert_array_equal(
        embed.ngram_hash(raw["tokens"], raw["segments"], buckets, progress=False).sum(0),
        r_counts)  # The jax hashing is the same hashing.
    for smoothing in (0.0, 1.0):  # The package's default, and a Laplace pseudo-count.
        p_t = (t_counts + smoothing) / (t_counts + smoothing).sum()
        p_r = r_counts / r_counts.sum()
        ratio = np.log(p_t + 1e-8) - np.log(p_r + 1e-8)
        expected = [sum(ratio[b] for b in _ngrams(t, s, buckets))
                    for t, s in zip(raw["tokens"], raw["segments"], strict=True)]
        for chunk in (1, 4, 100):
            found = dsir.importance_weights(target, raw, buckets, smoothing, chunk_rows=chunk)
            np.testing.assert_allclose(found, expected, rtol=1e-12)


def test_resampling_enriches_the_rows_like_the_target():
    rng = np.random.default_rng(1)
    like = _rows(rng, 100, 32, (0, 300))  # The target's kind of rows: tokens 0..299.
    unlike = _rows(rng, 100, 32, (200, 1000))
    raw = {k: np.concatenate([like[k], unlike[k]]) for k in like}
    target = _rows(rng, 8, 32, (0, 300))
    weights = dsir.importance_weights(target, raw)
    picked = select.gumbel_top_k(weights, 50, seed=0, lower_is_better=False).ids
    assert np.mean(picked < 100) > 0.9


def test_a_target_without_ngrams_is_named():
    rng = np.random.default_rng(2)
    raw = _rows(rng, 4, 8, (0, 10))
    empty = {"tokens": raw["tokens"], "segments": np.zeros_like(raw["segments"])}
    with pytest.raises(ValueError, match="dsir: the target items hold no n-gram"):
        dsir.importance_weights(empty, raw)
    with pytest.raises(ValueError, match="dsir: the candidates hold no n-gram"):
        dsir.importance_weights(raw, empty)
    with pytest.raises(ValueError, match="dsir: smoothing must be >= 0"):
        dsir.importance_weights(raw, raw, smoothing=-1.0)
