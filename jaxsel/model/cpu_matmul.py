"""Row-major projections for XLA:CPU: the one place where backend-specific code lives.

Chosen by `model.matmul = "row_major"` (the `tiny` preset's default, for 2-core CPUs);
`"xla"` (every other preset) keeps flax's `lax.dot_general` and plain autodiff, which is what
accelerators want and what forward-mode `jax.jvp` needs.

Autodiff of `x_BxLxD @ w_DxF` gives a weight gradient that contracts the two leading (token) axes
of `x` and `g` and then transposes; XLA:CPU lowers it with a transposed copy of the activation
gradient (recomputing the elementwise ops before it) and hands the `x^T @ g` form to its Eigen
fallback, which runs at about half the rate of the row-major `a @ b` and `a @ b^T` it gives to
YNNPACK (float32 MLP shapes, one core: 37 vs 73 GFLOP/s). So here every projection is `_matmul`
on 2-D [tokens, features] views, a `jax.custom_vjp` whose weight gradient is a row-major matmul
on an explicitly transposed operand (an `optimization_barrier` keeps XLA from folding the
transpose back into the dot): the same products, summed in another order, for the cost of
transposing the smaller side. `jax.grad`, `jax.vmap` and forward-over-reverse (`jax.jvp` of a
gradient) work through it; plain forward-mode `jax.jvp` of the model does not.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

Array = jax.Array


def _at_b(a_TxM: Array, b_TxN: Array) -> Array:
    """`a^T @ b` [M, N] as one row-major matmul, transposing whichever side moves fewer values."""
    barrier = jax.lax.optimization_barrier
    t, m = a_TxM.shape
    n = b_TxN.shape[1]
    if t * m <= t * n + m * n:
        return barrier(a_TxM.T) @ b_TxN
    return barrier(barrier(b_TxN.T) @ a_TxM).T  # (b^T a)^T: transposes b and the [N, M] result.


@jax.custom_vjp
def _matmul(x_TxK: Array, w_KxN: Array) -> Array:
    return x_TxK @ w_KxN


def _matmul_fwd(x_TxK, w_KxN):
    return x_TxK @ w_KxN, (x_TxK, w_KxN)


def _matmul_bwd(residuals, g_TxN):
    x_TxK, w_KxN = residuals
    return g_TxN @ w_KxN.T, _at_b(x_TxK, g_TxN)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def _matmul_t(x_TxK: Array, w_NxK: Array) -> Array:
    """`x @ w^T` (the tied LM head against the [V, D] embedding)."""
    return x_TxK @ w_NxK.T


def _matmul_t_fwd(x_TxK, w_NxK):
    return x_TxK @ w_NxK.T, (x_TxK, w_NxK)


def _matmul_t_bwd(residuals, g_TxN):
    x_TxK, w_NxK = residuals
    return g_TxN @ w_NxK, _at_b(g_TxN, x_TxK)


_matmul_t.defvjp(_matmul_t_fwd, _matmul_t_bwd)


def dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense` / `nn.DenseGeneral`: a contraction of the last k axes of
    `x` with the first k of `kernel` runs as `_matmul` on 2-D views (same values)."""
    (x_contract, k_contract), batch = dimension_numbers
    k = len(x_contract)
    plain = (tuple(x_contract) == tuple(range(x.ndim - k, x.ndim))
             and tuple(k_contract) == tuple(range(k)) and not any(batch))
    if not plain or precision is not None or preferred_element_type is not None:
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    contracted = math.prod(kernel.shape[:k])
    y = _matmul(x.reshape(-1, contracted), kernel.reshape(contracted, -1))
    return y.reshape(*x.shape[:x.ndim - k], *kernel.shape[k:])


def attend(embed: nn.Embed, x_BxLxD: Array) -> Array:
    """`embed.attend(x)` (logits against the [V, D] embedding), through `_matmul_t`."""
    x_BxLxD, embedding_VxD = embed.promote_dtype(x_BxLxD, embed.embedding, dtype=embed.dtype)
    logits_TxV = _matmul_t(x_BxLxD.reshape(-1, x_BxLxD.shape[-1]), embedding_VxD)
    return logits_TxV.reshape(*x_BxLxD.shape[:-1], -1)
