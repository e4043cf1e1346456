"""Sequence embeddings `[N, d]` float32, row i = pool sequence i, and their post-processing.

Four embeddings of a pool given as `tokens_NxL` / `segments_NxL` int32 arrays (segment 0 marks
padding; numpy or memory-mapped), each computed in fixed-size jitted batches with a progress
bar, in memory or, given `to=stream.Target(...)`, streamed to disk (`stream.map_rows`: chunked,
resumable, memory bounded by a chunk):

- `lm_token_mean`: mean of the LM's input token-embedding rows over real tokens (no forward pass);
- `lm_output_mean`: mean of the LM's final hidden states over real tokens;
- `encoder_embed`: an off-the-shelf BERT-family encoder (`jaxsel.model.encoder`) on the decoded
  text, re-tokenised once by `encoder_inputs` (in memory or streamed, as the embeddings);
- `ngram_hash`: hashed unigram + bigram counts (DSIR style), the no-model baseline.

Post-processing as in Sam et al. (2025): `fit_postprocess` standardises each dimension and fits a
PCA on a sample; `apply_postprocess` projects and L2-normalises.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jaxsel import files, stream
from jaxsel.model import encoder as encoder_lib
from jaxsel.model import transformer


def check_embeddings(emb_NxD: np.ndarray, name: str, *, nonzero: bool = True,
                     first_row: int = 0) -> np.ndarray:
    """Returns `emb_NxD` as float32 after checking it is a non-empty 2-D array of finite rows
    (and, with `nonzero`, no all-zero row); otherwise a ValueError naming `name` and the rows
    (numbered from `first_row`, for a chunk of a larger array)."""
    emb_NxD = np.asarray(emb_NxD, dtype=np.float32)  # A float32 memory map stays one.
    if emb_NxD.ndim != 2 or 0 in emb_NxD.shape:
        raise ValueError(f"{name} must be a non-empty [N, d] array, got shape {emb_NxD.shape}")
    rows = chunk_rows(emb_NxD)
    bad = np.concatenate([start + np.flatnonzero(~np.isfinite(emb_NxD[start:start + rows])
                                                 .all(axis=1))
                          for start in range(0, len(emb_NxD), rows)])
    if bad.size:
        bad += first_row
        raise ValueError(f"{name} has {bad.size} rows with NaN or inf values, e.g. rows {bad[:5]}")
    if nonzero:
        bad = np.concatenate([start + np.flatnonzero(~emb_NxD[start:start + rows].any(axis=1))
                              for start in range(0, len(emb_NxD), rows)])
        if bad.size:
            bad += first_row
            raise ValueError(f"{name} has {bad.size} all-zero rows, e.g. rows {bad[:5]}")
    return emb_NxD


CHUNK_BYTES = 1 << 24  # How much of a (memory-mapped) array the embedding passes read at a time.


def chunk_rows(x_NxD) -> int:
    """Rows of `x_NxD` in about `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // max(1, x_NxD[:1].nbytes))


def _pool_rows(tokens_NxL, segments_NxL, vocab_size: int | None = None) -> tuple[Callable, int]:
    """(read(idx) -> (tokens, segments) of rows idx, N) over two `[N, L]` int arrays of one shape
    (numpy or memory-mapped: only the rows read are loaded). Each batch read is checked: a row
    without a real token, or (with `vocab_size`) a token id outside [0, vocab_size), is a
    ValueError naming the rows."""
    if np.ndim(tokens_NxL) != 2 or np.shape(tokens_NxL) != np.shape(segments_NxL):
        raise ValueError(
            f"tokens {np.shape(tokens_NxL)} and segments {np.shape(segments_NxL)} must be [N, L] "
            "arrays of one shape")

    def read(idx):
        tokens_BxL, segments_BxL = (files.read_rows(x, idx) for x in (tokens_NxL, segments_NxL))
        real_BxL = segments_BxL != 0
        empty = np.unique(np.asarray(idx)[~real_BxL.any(axis=1)])
        if empty.size:
            raise ValueError(f"{empty.size} sequences have no real token (all segment ids 0), "
                             f"e.g. rows {empty[:5]}")
        if vocab_size is not None:
            ids = tokens_BxL[real_BxL]
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise ValueError(f"token ids must lie in [0, {vocab_size}) (the table's rows)")
        return tokens_BxL, segments_BxL

    return read, len(tokens_NxL)


def _map_rows(fn: Callable, rows, num: int, batch_size: int, desc: str, progress: bool,
              to: stream.Target | None = None, **kwargs) -> np.ndarray:
    """`stream.map_rows` of `num` rows on the default device, in batches of
    `min(batch_size, num)` rows (a small pool is one batch): float32 in memory, or streamed
    `to` a target (memory-mapped)."""
    if callable(rows):
        kwargs["num_rows"] = num
    out = stream.map_rows(fn, rows, min(batch_size, num), to=to, progress=progress, desc=desc,
                          **kwargs)
    return out if to is not None else np.asarray(out, np.float32)


def _masked_mean(x_BxLxD, mask_BxL):
    weights_BxL = mask_BxL.astype(jnp.float32)
    return jnp.einsum("bld,bl->bd", x_BxLxD.astype(jnp.float32), weights_BxL) / weights_BxL.sum(
        axis=1, keepdims=True
    )


@jax.jit
def _token_mean_batch(table_VxD, tokens_BxL, segments_BxL):
    return _masked_mean(jnp.take(table_VxD, tokens_BxL, axis=0), segments_BxL != 0)


def token_mean(
    table_VxD, tokens_NxL, segments_NxL, batch_size: int = 1024, progress: bool = True,
    to: stream.Target | None = None,
) -> np.ndarray:
    """Mean of the rows of an embedding table `[V, D]` over each sequence's real tokens ->
    `[N, D]` float32."""
    table_VxD = jnp.asarray(table_VxD)
    if table_VxD.ndim != 2:
        raise ValueError(f"the embedding table must be [V, D], got shape {table_VxD.shape}")
    read, num = _pool_rows(tokens_NxL, segments_NxL, len(table_VxD))
    return _map_rows(lambda batch: _token_mean_batch(table_VxD, *batch), read, num, batch_size,
                     "lm_token_mean", progress, to)


def lm_token_mean(
    params, tokens_NxL, segments_NxL, batch_size: int = 1024, progress: bool = True,
    to: stream.Target | None = None,
) -> np.ndarray:
    """Mean of the LM's input token-embedding rows over real tokens -> `[N, D]` float32."""
    return token_mean(
        transformer.token_embedding(params), tokens_NxL, segments_NxL, batch_size, progress, to
    )


def lm_output_mean(
    model: nn.Module, params, tokens_NxL, segments_NxL, batch_size: int = 64,
    progress: bool = True, to: stream.Target | None = None,
) -> np.ndarray:
    """Mean of the LM's final hidden states (after the final norm) over real tokens ->
    `[N, D]` float32. `model(tokens, segments, return_hidden=True)` returns `(logits, hidden)`."""
    read, num = _pool_rows(tokens_NxL, segments_NxL)
    return _map_rows(lambda batch: _output_mean_batch(model, params, *batch), read, num,
                     batch_size, "lm_output_mean", progress, to)


@functools.partial(jax.jit, static_argnums=0)
def _output_mean_batch(model, params, tokens_BxL, segments_BxL):
    """One batch of `lm_output_mean` (jitted once per model and shape; the unused logits are
    dead code to XLA)."""
    _, hidden_BxLxD = model.apply(params, tokens_BxL, segments_BxL, return_hidden=True)
    return _masked_mean(hidden_BxLxD, segments_BxL != 0)


def decode_sequences(
    tokens_NxL, segments_NxL, tokenizer: tokenizers.Tokenizer, separator: str = "\n"
) -> list[str]:
    """The text of each pool sequence: each document (run of one nonzero segment id) decoded by
    the LM's tokenizer, joined by `separator`."""
    read, num = _pool_rows(tokens_NxL, segments_NxL)
    tokens_NxL, segments_NxL = read(np.arange(num))
    n, length = segments_NxL.shape
    starts_new_run_NxL = np.ones((n, length), bool)
    starts_new_run_NxL[:, 1:] = segments_NxL[:, 1:] != segments_NxL[:, :-1]
    starts_R = np.flatnonzero(starts_new_run_NxL)  # runs never cross rows: each row starts one
    ends_R = np.append(starts_R[1:], n * length)
    is_doc_R = segments_NxL.ravel()[starts_R] != 0
    doc_starts, doc_ends = starts_R[is_doc_R], ends_R[is_doc_R]
    flat_tokens = tokens_NxL.ravel()
    texts = tokenizer.decode_batch(
        [flat_tokens[a:b].tolist() for a, b in zip(doc_starts, doc_ends, strict=True)])
    bounds = np.concatenate([[0], np.cumsum(np.bincount(doc_starts // length, minlength=n))])
    return [separator.join(texts[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def encoder_inputs(
    encoder: encoder_lib.Encoder,
    tokens_NxL,
    segments_NxL,
    lm_tokenizer: tokenizers.Tokenizer,
    chunk_size: int = 8192,
    progress: bool = True,
    max_tokens: int | None = None,
    to: stream.Target | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pool sequences decoded to text and re-tokenised for the encoder ->
    `(ids_NxM int32, lengths_N int32)`, `M = max_tokens` (default `encoder.max_length`; explicit
    truncation, `encoder_lib.tokenize`), `chunk_size` sequences at a time so the texts of only
    one chunk are held in memory; in memory, or streamed `to` a target (memory-mapped).
    """
    read, num = _pool_rows(tokens_NxL, segments_NxL)
    max_tokens = encoder.max_length if max_tokens is None else max_tokens

    def tokenize(batch) -> dict[str, np.ndarray]:
        texts = decode_sequences(*(np.asarray(x) for x in batch), lm_tokenizer)
        ids_BxM, lengths_B = encoder_lib.tokenize(encoder, texts, max_tokens)
        return {"ids": ids_BxM, "lengths": lengths_B}

    out = stream.map_rows(tokenize, read, min(chunk_size, num), to=to, num_rows=num,
                          progress=progress, desc="decode + encoder tokenize")
    return out["ids"], out["lengths"]


def encoder_embed(
    encoder: encoder_lib.Encoder,
    ids_NxM,
    lengths_N,
    batch_size: int = 64,
    length_multiple: int = 32,
    progress: bool = True,
    to: stream.Target | None = None,
) -> np.ndarray:
    """Encoder embeddings `[N, D]` float32 of tokenised sequences (from `encoder_inputs`).

    Sequences are visited shortest first and each batch is cut to its longest length rounded up
    to `length_multiple`, so short texts cost little and only `M / length_multiple` shapes compile.
    """
    ids_NxM, lengths_N = np.asarray(ids_NxM), np.asarray(lengths_N)
    if ids_NxM.ndim != 2 or lengths_N.shape != ids_NxM.shape[:1]:
        raise ValueError(
            f"ids {ids_NxM.shape} must be [N, M] and lengths {lengths_N.shape} must be [N]"
        )
    if lengths_N.min() < 1 or lengths_N.max() > ids_NxM.shape[1]:
        raise ValueError(f"lengths must lie in [1, {ids_NxM.shape[1]}]")

    def read(idx):
        return ids_NxM[idx], np.arange(ids_NxM.shape[1]) < lengths_N[idx, None]

    return _map_rows(lambda batch: encoder_lib.embed_token_ids(encoder, *batch), read,
                     len(ids_NxM), batch_size, "encoder", progress, to, lengths_N=lengths_N,
                     length_multiple=length_multiple)


def _mix32(x):
    """murmur3's 32-bit finaliser (works on numpy and jax uint32 arrays)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


_BIGRAM_SALT = np.uint32(0x9E3779B9)


def ngram_keys(tokens_BxL, segments_BxL, num_buckets: int):
    """The hashed unigrams and bigrams of each row, numpy or jax alike: `keys_BxK` (int32 bucket
    ids, K = 2L - 1) and `real_BxK` (bool: a real token, or a pair of adjacent tokens within one
    document). Token t hashes to `mix32(t) % num_buckets`, the pair (t1, t2) to
    `mix32(mix32(t1) ^ (t2 + 0x9E3779B9)) % num_buckets` (mix32: murmur3's finaliser, uint32)."""
    xp = jnp if isinstance(tokens_BxL, jax.Array) else np
    tokens_BxL = tokens_BxL.astype(xp.uint32)
    unigram_BxL = _mix32(tokens_BxL)
    bigram_BxL1 = _mix32(unigram_BxL[:, :-1] ^ (tokens_BxL[:, 1:] + _BIGRAM_SALT))
    keys_BxK = xp.concatenate([unigram_BxL, bigram_BxL1], axis=1) % np.uint32(num_buckets)
    real_BxL = segments_BxL != 0
    bigram_real_BxL1 = real_BxL[:, 1:] & (segments_BxL[:, 1:] == segments_BxL[:, :-1])
    return keys_BxK.astype(xp.int32), xp.concatenate([real_BxL, bigram_real_BxL1], axis=1)


@functools.partial(jax.jit, static_argnames="num_buckets")
def _ngram_batch(tokens_BxL, segments_BxL, num_buckets: int):
    keys_BxK, real_BxK = ngram_keys(tokens_BxL, segments_BxL, num_buckets)
    return jax.vmap(
        lambda keys, weights: jnp.zeros(num_buckets, jnp.float32).at[keys].add(weights)
    )(keys_BxK, real_BxK.astype(jnp.float32))


def ngram_hash(
    tokens_NxL, segments_NxL, num_buckets: int = 4096, batch_size: int = 1024,
    progress: bool = True, to: stream.Target | None = None,
) -> np.ndarray:
    """Hashed n-gram counts `[N, num_buckets]` float32 (DSIR style): every real token and every
    pair of adjacent tokens within one document adds 1 to its bucket (`ngram_keys`)."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    read, num = _pool_rows(tokens_NxL, segments_NxL)
    return _map_rows(lambda batch: _ngram_batch(*batch, num_buckets=num_buckets), read, num,
                     batch_size, "ngram_hash", progress, to)


@dataclasses.dataclass(frozen=True)
class Postprocess:
    """Standardise with `mean_D` / `scale_D`, project on `components_DxK` (PCA), L2-normalise."""

    mean_D: np.ndarray
    scale_D: np.ndarray
    components_DxK: np.ndarray


@functools.partial(jax.jit, static_argnames="dims")
def _fit_pca(sample_SxD, dims: int):
    mean_D = sample_SxD.mean(axis=0)
    std_D = sample_SxD.std(axis=0)
    scale_D = jnp.where(std_D > 1e-6 * jnp.maximum(std_D.max(), 1e-30), std_D, 1.0)
    z_SxD = (sample_SxD - mean_D) / scale_D
    cov_DxD = z_SxD.T @ z_SxD / (z_SxD.shape[0] - 1)
    _, eigvecs_DxD = jnp.linalg.eigh(cov_DxD)  # ascending eigenvalues
    components_DxK = eigvecs_DxD[:, ::-1][:, :dims]
    # Fix each component's sign (largest-magnitude loading positive) so fits are reproducible.
    peak_K = components_DxK[jnp.argmax(jnp.abs(components_DxK), axis=0), jnp.arange(dims)]
    return mean_D, scale_D, components_DxK * jnp.sign(peak_K)


def fit_postprocess(
    emb_NxD, dims: int = 64, sample_size: int = 100_000, seed: int = 0
) -> Postprocess:
    """Fits standardisation and a `dims`-component PCA on a seeded sample of `sample_size` rows."""
    emb_NxD = check_embeddings(emb_NxD, "embeddings", nonzero=False)
    n, d = emb_NxD.shape
    if not 1 <= dims <= min(d, n):
        raise ValueError(f"dims={dims} must be in [1, min(d={d}, N={n})]")
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, sample_size), replace=False))
    mean_D, scale_D, components_DxK = _fit_pca(jnp.asarray(emb_NxD[rows]), dims)
    return Postprocess(np.asarray(mean_D), np.asarray(scale_D), np.asarray(components_DxK))


@jax.jit
def _project(mean_D, scale_D, components_DxK, emb_BxD):
    return ((emb_BxD - mean_D) / scale_D) @ components_DxK


def l2_normalize(emb_NxD, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); a NaN or all-zero row is an error naming it. Written
    chunk by chunk into one new array, or into `out` (e.g. a memory-mapped file), so a
    memory-mapped input is never held in memory twice."""
    emb_NxD = check_embeddings(emb_NxD, "embeddings to normalise")
    out = np.empty(emb_NxD.shape, np.float32) if out is None else out
    rows = chunk_rows(emb_NxD)
    for start in range(0, len(emb_NxD), rows):
        chunk = np.asarray(emb_NxD[start:start + rows])
        out[start:start + rows] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def apply_postprocess(
    post: Postprocess, emb_NxD, batch_size: int = 65536, progress: bool = True
) -> np.ndarray:
    """Standardise, project on the PCA components and L2-normalise -> `[N, K]` float32."""
    emb_NxD = check_embeddings(emb_NxD, "embeddings", nonzero=False)
    if emb_NxD.shape[1] != post.mean_D.shape[0]:
        raise ValueError(
            f"embeddings have dimension {emb_NxD.shape[1]}, the post-processing was fitted on "
            f"{post.mean_D.shape[0]}"
        )
    projected_NxK = _map_rows(
        lambda emb_BxD: _project(post.mean_D, post.scale_D, post.components_DxK, emb_BxD),
        emb_NxD, len(emb_NxD), batch_size, "postprocess", progress)
    return l2_normalize(projected_NxK)
