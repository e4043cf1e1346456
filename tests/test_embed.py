"""Tests of jaxsel.embed against numpy computations and the MiniLM reference fixture."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsel import embed, stream
from jaxsel.model import encoder as encoder_lib
from jaxsel.model import transformer

REFERENCE = json.loads((pathlib.Path(__file__).parent / "data" / "minilm_reference.json")
                       .read_text())


def random_pool(rng, n=37, length=12, vocab=50):
    """Packed rows: 1-3 documents each, then padding (segment 0); row 0 is one full document."""
    tokens = rng.integers(0, vocab, size=(n, length)).astype(np.int32)
    segments = np.zeros((n, length), np.int32)
    for row in range(n):
        used = length if row == 0 else rng.integers(1, length + 1)
        cuts = np.sort(rng.choice(np.arange(1, used), size=min(rng.integers(0, 3), used - 1),
                                  replace=False))
        for doc, (a, b) in enumerate(zip([0, *cuts], [*cuts, used], strict=True)):
            segments[row, a:b] = doc + 1
    return tokens, segments


@pytest.fixture(scope="module")
def lm():
    cfg = transformer.ModelConfig(vocab_size=50, d_model=16, num_layers=1, num_heads=2,
                                  mlp_dim=32, max_seq_len=12)
    model = transformer.Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 12), jnp.int32),
                                 jnp.ones((1, 12), jnp.int32))
    return model, params


def numpy_masked_mean(values_NxLxD, segments_NxL):
    mask = (segments_NxL != 0)[..., None]
    return (values_NxLxD * mask).sum(1) / mask.sum(1)


def test_lm_token_mean_equals_numpy(lm):
    _, params = lm
    tokens, segments = random_pool(np.random.default_rng(0))
    table = np.asarray(transformer.token_embedding(params))
    got = embed.lm_token_mean(params, tokens, segments, batch_size=8, progress=False)
    assert got.shape == (37, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, numpy_masked_mean(table[tokens], segments), atol=1e-6)
    # The core function takes any [V, D] table.
    other = np.random.default_rng(1).standard_normal((50, 5)).astype(np.float32)
    np.testing.assert_allclose(embed.token_mean(other, tokens, segments, 16, progress=False),
                               numpy_masked_mean(other[tokens], segments), atol=1e-6)


def test_lm_output_mean_equals_masked_mean_of_hidden(lm):
    model, params = lm
    tokens, segments = random_pool(np.random.default_rng(2))
    got = embed.lm_output_mean(model, params, tokens, segments, batch_size=8, progress=False)
    _, hidden = jax.jit(model.apply, static_argnames="return_hidden")(
        params, tokens, segments, return_hidden=True)
    np.testing.assert_allclose(got, numpy_masked_mean(np.asarray(hidden), segments), atol=1e-5)


def mix32(x: int) -> int:
    """murmur3's 32-bit finaliser on Python ints (an independent copy of the documented hash)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & m
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


def test_ngram_hash_counts_unigrams_and_in_document_bigrams():
    tokens, segments = random_pool(np.random.default_rng(3), vocab=1000)
    buckets = 64
    got = embed.ngram_hash(tokens, segments, num_buckets=buckets, batch_size=16, progress=False)
    want = np.zeros((len(tokens), buckets), np.float32)
    for row in range(len(tokens)):
        for i in range(tokens.shape[1]):
            if segments[row, i]:
                want[row, mix32(int(tokens[row, i])) % buckets] += 1
                if i + 1 < tokens.shape[1] and segments[row, i + 1] == segments[row, i]:
                    key = mix32(mix32(int(tokens[row, i])) ^ ((int(tokens[row, i + 1])
                                                               + 0x9E3779B9) & 0xFFFFFFFF))
                    want[row, key % buckets] += 1
    np.testing.assert_array_equal(got, want)


def test_postprocess_is_standardised_pca_then_unit_norm():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))
         * rng.uniform(0.1, 10, 12) + 3).astype(np.float32)
    x[:, 7] = 2.0  # a constant dimension must not divide by zero
    post = embed.fit_postprocess(x, dims=4, sample_size=500)
    got = embed.apply_postprocess(post, x, batch_size=128, progress=False)
    # numpy: z-score, SVD, project on the top-4 right singular vectors, normalise.
    std = x.std(0)
    z = (x - x.mean(0)) / np.where(std > 0, std, 1)
    vt = np.linalg.svd(z.astype(np.float64), full_matrices=False)[2][:4]
    want = z @ vt.T
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    signs = np.sign(np.sum(got * want, axis=0))  # components are defined up to sign
    np.testing.assert_allclose(got, want * signs, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # Fitting on a seeded sample is reproducible.
    a, b = (embed.fit_postprocess(x, dims=4, sample_size=100, seed=7) for _ in range(2))
    np.testing.assert_array_equal(a.components_DxK, b.components_DxK)


def test_bad_embeddings_and_pools_are_named():
    x = np.ones((10, 4), np.float32) + np.arange(10, dtype=np.float32)[:, None]
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"1 rows with NaN or inf values, e.g. rows \[3\]"):
        embed.fit_postprocess(x, dims=2)
    x[3, 2] = 0
    with pytest.raises(ValueError, match=r"dims=5 must be in \[1, min\(d=4, N=10\)\]"):
        embed.fit_postprocess(x, dims=5)
    post = embed.fit_postprocess(x, dims=2)
    with pytest.raises(ValueError, match="dimension 3, the post-processing was fitted on 4"):
        embed.apply_postprocess(post, x[:, :3], progress=False)
    x[6] = 0
    with pytest.raises(ValueError, match=r"1 all-zero rows, e.g. rows \[6\]"):
        embed.l2_normalize(x)
    tokens, segments = random_pool(np.random.default_rng(5))
    segments[4] = 0
    with pytest.raises(ValueError, match=r"1 sequences have no real token .* rows \[4\]"):
        embed.token_mean(np.ones((50, 3)), tokens, segments, progress=False)
    with pytest.raises(ValueError, match="must be \\[N, L\\] arrays of one shape"):
        embed.ngram_hash(tokens, segments[:, :5], progress=False)


@pytest.fixture(scope="module")
def minilm():
    return encoder_lib.load_encoder()


def pack_texts(tokenizer, texts_per_row, length):
    """Rows of documents tokenised (no special tokens) by `tokenizer`, packed and padded."""
    tokens = np.zeros((len(texts_per_row), length), np.int32)
    segments = np.zeros((len(texts_per_row), length), np.int32)
    for row, texts in enumerate(texts_per_row):
        at = 0
        for doc, text in enumerate(texts):
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            tokens[row, at : at + len(ids)] = ids
            segments[row, at : at + len(ids)] = doc + 1
            at += len(ids)
    return tokens, segments


def test_encoder_inputs_decode_pack_and_stream(minilm, tmp_path, monkeypatch):
    # The MiniLM tokenizer stands in for the LM's tokenizer (decode then re-encode).
    lm_tokenizer = minilm.tokenizer
    rows = [["the cat sat on the mat.", "a second document here."], ["one document only."]]
    tokens, segments = pack_texts(lm_tokenizer, rows, 24)
    assert embed.decode_sequences(tokens, segments, lm_tokenizer) == [
        "the cat sat on the mat.\na second document here.", "one document only."]
    want_ids, want_lengths = encoder_lib.tokenize(minilm, ["\n".join(r) for r in rows])
    target = stream.Target(tmp_path, "encoder_inputs", {"pool": "two rows"})
    for to in (None, target):  # In memory, and streamed to disk.
        ids, lengths = embed.encoder_inputs(minilm, tokens, segments, lm_tokenizer,
                                            chunk_size=1, progress=False, to=to)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(lengths, want_lengths)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the target holds the result")

    monkeypatch.setattr(embed, "decode_sequences", no_decoding)
    again, _ = embed.encoder_inputs(minilm, tokens, segments, lm_tokenizer, chunk_size=1,
                                    progress=False, to=target)
    np.testing.assert_array_equal(again, want_ids)
    with pytest.raises(AssertionError, match="decoded again"):  # Another pool, another target.
        embed.encoder_inputs(minilm, tokens, segments, lm_tokenizer, chunk_size=1,
                             progress=False,
                             to=stream.Target(tmp_path, "encoder_inputs", {"pool": "other"}))


def test_encoder_embed_matches_reference_in_pool_order(minilm):
    ids, lengths = encoder_lib.tokenize(minilm, REFERENCE["texts"])
    # Batches of 4 visited shortest first and cut to multiples of 32 tokens (widths 32 and 256);
    # rows come back in pool order.
    got = embed.encoder_embed(minilm, ids, lengths, batch_size=4, progress=False)
    ref = np.asarray(REFERENCE["embeddings"])
    cosine = np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.all(cosine >= 0.999), cosine
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 256\]"):
        embed.encoder_embed(minilm, ids, np.zeros_like(lengths), progress=False)
