"""Causal attention within packed documents, by one of several kernels (`model.attention`).

A row of `segments_BxL` numbers its documents (0 = padding); a token attends to the tokens at or
before it with the same segment id. Every implementation computes exactly that:

- `xla`: `jax.nn.dot_product_attention(implementation="xla")` under a [B, 1, L, L] boolean mask.
  Runs everywhere; its scores take memory in L².
- `cudnn`: cuDNN's fused flash attention in its packed layout: each run of equal segment ids is one
  cuDNN segment (start offsets and lengths per row), causal inside it. No L x L tensor: its
  softmax statistics take [B * max_runs, N, L] floats, and its backward pass works through all of
  them, so `model.max_segments` bounds the runs of a row (documents, padding counted as one):
  keep it as small as the data allows (at the `410m` preset on an H200, 64 costs 15% of the step
  time, 16 about 4%). A row with more gets NaN outputs, never a silently
  wrong attention; the training loop refuses such a batch first (`check_runs`). Needs a GPU and a
  16-bit dtype. `jax.nn.dot_product_attention` does not take the offsets, so this calls the
  function it wraps, `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`.
- `splash`: the Pallas splash-attention kernel (TPU) with `SegmentIds` and a causal mask, under
  `shard_map` over the batch axes of the mesh the model is given. No L x L tensor.
- `auto`: `cudnn` on a GPU where it can run (bfloat16 or float16, head dimension a multiple of 8 up
  to 128), `xla` elsewhere. It never fails.

`resolve` turns the configured name into one of the three for a backend, or fails naming the
config key and the backend; `config.validate` calls it before any work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Array = jax.Array
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)  # Splash's q/kv block: the largest that divides the length.


def _cudnn_runs(dtype: str, head_dim: int) -> bool:
    return dtype in ("bfloat16", "float16") and head_dim % 8 == 0 and head_dim <= 128


def resolve(name: str, backend: str, dtype: str, head_dim: int, seq_len: int) -> str:
    """`model.attention` as run on `backend` (`jax.default_backend()`): xla, cudnn or splash."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention: {name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if name == "auto":
        return "cudnn" if backend == "gpu" and _cudnn_runs(dtype, head_dim) else "xla"
    if name == "cudnn" and not (backend == "gpu" and _cudnn_runs(dtype, head_dim)):
        raise ValueError(
            f"model.attention='cudnn' cannot run on backend {backend!r} with model.dtype={dtype} "
            f"and head dimension {head_dim}: it needs a GPU, bfloat16 or float16, and a head "
            "dimension that is a multiple of 8 up to 128 (use 'auto' or 'xla')")
    if name == "splash" and backend != "tpu":
        raise ValueError(f"model.attention='splash' is a TPU kernel; the backend is {backend!r} "
                         "(use 'auto' or 'xla')")
    if name == "splash" and seq_len % 128:
        raise ValueError(f"model.attention='splash' needs the sequence length ({seq_len}) to be a "
                         "multiple of 128")
    return name


def context(implementation: str, segments_BxL: Array, max_runs: int = 0):
    """What `attend` needs besides q, k, v, computed once for all layers (`max_runs`: cudnn's
    bound on the runs of a row)."""
    if implementation == "xla":
        length = segments_BxL.shape[-1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        same = segments_BxL[:, :, None] == segments_BxL[:, None, :]
        return (causal & same)[:, None]
    if implementation == "cudnn":
        return packed_offsets(segments_BxL, max_runs)
    return segments_BxL


def packed_offsets(segments_BxL: Array, max_runs: int) -> tuple[Array, Array, Array]:
    """cuDNN's packed layout of each row's runs of equal segment ids (padding is a run too, so every
    token is covered): `(lengths_BxM, starts_Bx(M+1), overflow_B)` with M = `max_runs`: run `m`'s
    length and start, -1 past the last run (the starts' extra column is always -1: the function
    that takes them shifts every row's valid entries left into one list); `overflow_B` marks the
    rows with more than M runs (not covered)."""
    starts_BxL = jnp.ones(segments_BxL.shape, bool).at[:, 1:].set(
        segments_BxL[:, 1:] != segments_BxL[:, :-1])
    run_BxL = jnp.cumsum(starts_BxL, axis=1) - 1
    runs_B = run_BxL[:, -1] + 1
    sizes_BxM = jax.vmap(lambda r: jnp.bincount(r, length=max_runs))(run_BxL)
    index = jnp.arange(max_runs + 1)
    starts = jnp.pad(jnp.cumsum(sizes_BxM, axis=1), ((0, 0), (1, 0)))
    starts = jnp.where(index < jnp.minimum(runs_B, max_runs)[:, None], starts, -1)
    lengths = jnp.where(index[:-1] < runs_B[:, None], sizes_BxM, -1)
    return lengths.astype(jnp.int32), starts.astype(jnp.int32), runs_B > max_runs


def most_runs(segments_BxL) -> int:
    """The most runs of equal segment ids in a row of the batch (on the host)."""
    segments_BxL = np.asarray(segments_BxL)
    return 1 + int((segments_BxL[:, 1:] != segments_BxL[:, :-1]).sum(axis=1).max(initial=0))


def check_runs(segments_BxL, max_runs: int) -> None:
    """Refuses (on the host) a batch with a row of more than `max_runs` runs, for `cudnn`."""
    runs = most_runs(segments_BxL)
    if runs > max_runs:
        raise ValueError(f"a row holds {runs} documents (padding counted as one), more than "
                         f"model.max_segments={max_runs} that cuDNN attention is compiled for; "
                         "raise model.max_segments or use model.attention='xla'")


def attend(implementation: str, q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array, ctx,
           mesh=None, interpret: bool = False) -> Array:
    """Softmax attention (softmax in float32) of each query over its keys under `ctx`."""
    scale = q_BxLxNxH.shape[-1] ** -0.5
    if implementation == "xla":
        return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask=ctx,
                                            scale=scale, implementation="xla")
    if implementation == "cudnn":
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        lengths, starts, overflow_B = ctx
        out = cudnn.dot_product_attention(
            q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, q_seqlen=lengths, kv_seqlen=lengths,
            q_offsets=starts, kv_offsets=starts, scale=scale,
            mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
        return jnp.where(overflow_B[:, None, None, None], jnp.nan, out)
    return splash(q_BxLxNxH * scale, k_BxLxNxH, v_BxLxNxH, ctx, mesh, interpret)


def splash(q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array, segments_BxL: Array,
           mesh=None, interpret: bool = False) -> Array:
    """Splash attention (queries already scaled), per row; split over the mesh's batch axes (and
    heads over `tensor`) when the batch divides them."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    def rows(q, k, v, seg):
        heads, length = q.shape[2], q.shape[1]
        block = next((b for b in SPLASH_BLOCKS if length % b == 0), length)
        kernel = sk.make_splash_mha(
            sm.MultiHeadMask([sm.CausalMask((length, length))] * heads),
            block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                      block_q_dkv=block, block_kv_dkv=block,
                                      block_kv_dkv_compute=block, block_q_dq=block,
                                      block_kv_dq=block),
            head_shards=1, q_seq_shards=1, interpret=interpret)
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s))  # noqa: E731
        out = jax.vmap(one)(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), seg)
        return jnp.swapaxes(out, 1, 2)

    batch_axes = ("data", "fsdp")
    if (mesh is None or mesh.size == 1
            or q_BxLxNxH.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"])
            or q_BxLxNxH.shape[2] % mesh.shape["tensor"]):
        return rows(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segments_BxL)
    qkv = P(batch_axes, None, "tensor", None)
    return jax.shard_map(rows, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch_axes, None)),
                         out_specs=qkv, check_vma=False)(
        q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segments_BxL)
