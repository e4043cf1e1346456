"""Attention kernels (`jaxsel.model.attention`) against a hand-written loop: causal, within one
segment of a packed row, padding included; the choice of kernel per backend and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsel import config as config_lib
from jaxsel.model import attention

SEGMENTS = [[1] * 40 + [2] * 50 + [3] * 30 + [0] * 8,
            [4] * 128,
            [1] * 3 + [2] * 100 + [0] * 25]


def _reference(q, k, v, segments):
    """Loop over rows, heads and queries: softmax over the keys at or before the query with the
    query's segment id."""
    batch, length, heads, dim = q.shape
    out = np.zeros_like(q)
    for b in range(batch):
        for n in range(heads):
            for t in range(length):
                keys = [s for s in range(t + 1) if segments[b][s] == segments[b][t]]
                scores = np.array([q[b, t, n] @ k[b, s, n] for s in keys]) / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                out[b, t, n] = (weights / weights.sum()) @ v[b, keys, n]
    return out


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(3, 128, 2, 16)).astype(np.float32) for _ in range(3))
    segments = np.asarray(SEGMENTS, np.int32)
    return q, k, v, segments, _reference(q, k, v, segments)


def _attend(implementation, q, k, v, segments, **kw):
    ctx = attention.context(implementation, jnp.asarray(segments), max_runs=8)
    return attention.attend(implementation, q, k, v, ctx, **kw)


def test_xla_equals_the_loop(qkv):
    q, k, v, segments, expected = qkv
    with jax.default_matmul_precision("float32"):  # Not TF32 on a GPU.
        np.testing.assert_allclose(_attend("xla", q, k, v, segments), expected, atol=2e-5)


def test_splash_equals_the_loop_and_xla_in_gradient(qkv):
    """The TPU kernel, run by the Pallas interpreter: its output, and its gradients (its own
    backward kernels) against XLA's."""
    q, k, v, segments, expected = qkv
    np.testing.assert_allclose(_attend("splash", q, k, v, segments, interpret=True), expected,
                               atol=2e-5)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(implementation, *qkv_, **kw):
        return jnp.sum(_attend(implementation, *qkv_, segments, **kw) * weights)

    grads = jax.grad(lambda *a: loss("splash", *a, interpret=True), argnums=(0, 1, 2))(q, k, v)
    expected_grads = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5)


def test_packed_offsets_list_every_run_and_flag_rows_with_too_many():
    """cuDNN's packed layout, checked against the runs listed by a Python loop; a row of more runs
    than the bound is flagged (its attention becomes NaN), and the host check refuses it."""
    segments = np.asarray([[1, 1, 2, 2, 2, 0, 0, 0], [5] * 8, [1, 2, 3, 3, 3, 3, 3, 0],
                           [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    max_runs = 4
    lengths, starts, overflow = map(np.asarray, attention.packed_offsets(jnp.asarray(segments),
                                                                         max_runs))
    np.testing.assert_array_equal(overflow, [False, False, False, True])
    for row, got_lengths, got_starts in zip(segments[:3], lengths, starts, strict=False):
        expected = [i for i in range(len(row)) if i == 0 or row[i] != row[i - 1]]
        sizes = np.diff(expected + [len(row)])
        pad = max_runs - len(expected)
        np.testing.assert_array_equal(got_lengths, list(sizes) + [-1] * pad)
        np.testing.assert_array_equal(got_starts, expected + [-1] * (pad + 1))
    # The overflowing row lists its first M runs only: every row has as many starts as lengths.
    np.testing.assert_array_equal(starts[3], [0, 1, 2, 3, -1])
    np.testing.assert_array_equal(lengths[3], [1, 1, 1, 1])
    attention.check_runs(segments[:3], max_runs)
    with pytest.raises(ValueError, match="8 documents.*model.max_segments=4"):
        attention.check_runs(segments, max_runs)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on a GPU (device check)")
def test_cudnn_equals_xla_on_gpu(qkv):
    q, k, v, segments, _ = qkv
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    got = _attend("cudnn", q, k, v, segments).astype(jnp.float32)
    want = _attend("xla", q, k, v, segments).astype(jnp.float32)
    np.testing.assert_allclose(got, want, atol=2e-2)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.bfloat16)
    grads = {impl: jax.grad(lambda q_, impl=impl: jnp.sum(
        _attend(impl, q_, k, v, segments).astype(jnp.float32) * weights))(q)
        for impl in ("cudnn", "xla")}
    np.testing.assert_allclose(grads["cudnn"].astype(jnp.float32),
                               grads["xla"].astype(jnp.float32), atol=5e-2)
    # Rows of more runs than the kernel was compiled for give NaN, the others are unchanged.
    ctx = attention.context("cudnn", jnp.asarray(segments), max_runs=3)  # Row 0 has 4 runs.
    bounded = np.asarray(attention.attend("cudnn", q, k, v, ctx).astype(jnp.float32))
    assert np.isnan(bounded[0]).all() and not np.isnan(bounded[1:]).any()
    np.testing.assert_allclose(bounded[1:], want[1:], atol=2e-2)


@pytest.mark.parametrize("name,backend,dtype,head_dim,expected", [
    ("auto", "cpu", "float32", 64, "xla"),
    ("auto", "gpu", "bfloat16", 64, "cudnn"),
    ("auto", "gpu", "float32", 64, "xla"),       # cuDNN's fused kernel is 16-bit only.
    ("auto", "gpu", "bfloat16", 256, "xla"),
    ("auto", "tpu", "bfloat16", 128, "xla"),
    ("xla", "gpu", "bfloat16", 64, "xla"),
    ("cudnn", "gpu", "float16", 128, "cudnn"),
    ("splash", "tpu", "bfloat16", 128, "splash"),
])
def test_resolve_picks_a_kernel_the_backend_runs(name, backend, dtype, head_dim, expected):
    assert attention.resolve(name, backend, dtype, head_dim, 1024) == expected


@pytest.mark.parametrize("name,backend,dtype,words", [
    ("cudnn", "cpu", "bfloat16", ["model.attention", "'cpu'"]),
    ("cudnn", "gpu", "float32", ["model.attention", "float32"]),
    ("splash", "gpu", "bfloat16", ["model.attention", "'gpu'"]),
    ("flash", "gpu", "bfloat16", ["model.attention", "'flash'"]),
])
def test_resolve_refuses_what_the_backend_cannot_run(name, backend, dtype, words):
    with pytest.raises(ValueError) as e:
        attention.resolve(name, backend, dtype, 64, 1024)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_config_refuses_a_kernel_this_backend_cannot_run_before_any_work():
    config = config_lib.base_config("tiny")
    config.model.attention = "cudnn" if jax.default_backend() != "gpu" else "splash"
    with pytest.raises(config_lib.ConfigError, match="config.model.attention"):
        config_lib.validate(config, jax.device_count())
