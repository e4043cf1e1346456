"""Decoder-only transformer LM in Flax linen.

Pre-norm (RMSNorm) blocks with RoPE attention and a gated (SwiGLU) or GELU MLP. Sequences are
packed: `segments_BxL` numbers the documents in a row (0 = padding), positions restart at every
document and attention never crosses a document boundary (`jaxsel.model.attention` holds the
kernels). The blocks run under `nn.scan`: their params are stacked on a leading `layers` axis and
compile time does not grow with depth. Every parameter carries logical axis names (`layers`,
`vocab`, `embed`, `heads`, `kv`, `mlp`) that `jaxsel.sharding` maps onto the mesh.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxsel.model import attention, cpu_matmul

Array = jax.Array
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.dots_saveable}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_seq_len: int
    mlp: str = "gated"  # gated | gelu
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # none | full | dots_saveable: what a block keeps for the backward pass
    attention: str = "auto"  # auto | xla | cudnn | splash (`jaxsel.model.attention`)
    max_segments: int = 16  # cudnn: the most documents in a row (padding counted as one)
    # Blocks per iteration of the layer scan; 0 unrolls them all (same params, compile time grows
    # with depth: XLA:CPU runs a looped block about 13% slower).
    scan_unroll: int = 1
    matmul: str = "xla"  # xla | row_major (XLA:CPU's fast weight gradients: `cpu_matmul`)

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in model_config.items() if k in names})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _init(names: tuple[str, ...], scale: float = 0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(scale), names)


def positions_from_segments(segments_BxL: Array) -> Array:
    """Position of each token within its document: 0 at every segment start."""
    length = segments_BxL.shape[-1]
    index = jnp.arange(length)
    previous = jnp.pad(segments_BxL[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts = jnp.where(segments_BxL != previous, index, 0)
    return index - jax.lax.cummax(starts, axis=1)


def _dot_general(cfg: ModelConfig):
    """The projections' contraction: `cpu_matmul`'s under `matmul="row_major"`, else flax's."""
    return cpu_matmul.dot_general if cfg.matmul == "row_major" else jax.lax.dot_general


def apply_rope(x_BxLxNxH: Array, positions_BxL: Array, theta: float) -> Array:
    half = x_BxLxNxH.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_BxL[..., None].astype(jnp.float32) * freqs  # [B, L, H/2]
    sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxH.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    implementation: str  # xla | cudnn | splash, resolved for the backend
    mesh: jax.sharding.Mesh | None = None

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, context):
        cfg = self.cfg
        dense = lambda name, feats, axis, names: nn.DenseGeneral(  # noqa: E731
            feats, axis=axis, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_init(names), dot_general=_dot_general(cfg), name=name)
        qkv_shape = (cfg.num_heads, cfg.head_dim)
        q = dense("query", qkv_shape, -1, ("embed", "heads", "kv"))(x_BxLxD)
        k = dense("key", qkv_shape, -1, ("embed", "heads", "kv"))(x_BxLxD)
        v = dense("value", qkv_shape, -1, ("embed", "heads", "kv"))(x_BxLxD)
        q = apply_rope(q, positions_BxL, cfg.rope_theta)
        k = apply_rope(k, positions_BxL, cfg.rope_theta)
        out_BxLxNxH = attention.attend(self.implementation, q, k, v, context, self.mesh)
        return dense("out", cfg.d_model, (-2, -1), ("heads", "kv", "embed"))(out_BxLxNxH)


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        dense = lambda name, feats, names: nn.Dense(  # noqa: E731
            feats, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_init(names), dot_general=_dot_general(cfg), name=name)
        if cfg.mlp == "gated":
            h = nn.silu(dense("gate", cfg.mlp_dim, ("embed", "mlp"))(x_BxLxD))
            h = h * dense("up", cfg.mlp_dim, ("embed", "mlp"))(x_BxLxD)
        else:
            h = nn.gelu(dense("up", cfg.mlp_dim, ("embed", "mlp"))(x_BxLxD))
        return dense("down", cfg.d_model, ("mlp", "embed"))(h)


class Block(nn.Module):
    """One pre-norm block, in `nn.scan`'s form: (x, positions, context) -> (x, None)."""

    cfg: ModelConfig
    implementation: str
    mesh: jax.sharding.Mesh | None = None

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, context):
        norm = lambda name: nn.RMSNorm(  # noqa: E731
            dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype, name=name,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))
        x_BxLxD = x_BxLxD + Attention(self.cfg, self.implementation, self.mesh, name="attention")(
            norm("attention_norm")(x_BxLxD), positions_BxL, context)
        return x_BxLxD + Mlp(self.cfg, name="mlp")(norm("mlp_norm")(x_BxLxD)), None


class Transformer(nn.Module):
    """`__call__(tokens_BxL, segments_BxL)` -> logits_BxLxV (and the final hidden states), in the
    compute dtype; the losses (`jaxsel.loss`) take them to float32 inside their softmax.

    With `logit_positions_BxK`, the final norm and the LM head run only at those positions of each
    row: logits (and hidden states) are [B, K, ...], the same values as the full call's at those
    positions, for K / L of the head's cost (e.g. a cloze item's few target positions).
    """

    cfg: ModelConfig
    mesh: jax.sharding.Mesh | None = None  # Splash attention splits its kernel over this mesh.

    @nn.compact
    def __call__(self, tokens_BxL, segments_BxL, return_hidden: bool = False,
                 logit_positions_BxK: Array | None = None):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, embedding_init=_init(("vocab", "embed")),
                         name="embed")
        # Rows gathered from the float32 table, then cast: the gradient is a float32 scatter-add
        # (a bfloat16 one has no native atomics on GPUs: 9 ms of a 410m step on an H200).
        x_BxLxD = jnp.take(embed.embedding, tokens_BxL, axis=0).astype(cfg.dtype)
        positions_BxL = positions_from_segments(segments_BxL)
        implementation = attention.resolve(cfg.attention, jax.default_backend(), cfg.dtype,
                                           cfg.head_dim, tokens_BxL.shape[-1])
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        # One compiled block for every layer: params stacked on a leading `layers` axis.
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                         unroll=cfg.scan_unroll or cfg.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        context = attention.context(implementation, segments_BxL, cfg.max_segments)
        x_BxLxD, _ = blocks(cfg, implementation, self.mesh, name="blocks")(
            x_BxLxD, positions_BxL, context)
        if logit_positions_BxK is not None:  # From here on, L stands for those K positions.
            x_BxLxD = jnp.take_along_axis(x_BxLxD, logit_positions_BxK[..., None], axis=1)
        hidden_BxLxD = nn.RMSNorm(
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="final_norm",
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))(x_BxLxD)
        if cfg.tie_embeddings:
            logits_BxLxV = (cpu_matmul.attend(embed, hidden_BxLxD) if cfg.matmul == "row_major"
                            else embed.attend(hidden_BxLxD))
        else:
            logits_BxLxV = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                kernel_init=_init(("embed", "vocab")), dot_general=_dot_general(cfg),
                name="lm_head")(hidden_BxLxD)
        return (logits_BxLxV, hidden_BxLxD) if return_hidden else logits_BxLxV


def token_embedding(params) -> Array:
    """The input token-embedding matrix [V, D] of `Transformer` params."""
    return nn.unbox(params)["params"]["embed"]["embedding"]


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))


def matmul_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward matmul FLOPs per token: projections, attention scores and values, MLP, LM head.

    Attention counts the full L x L score matrix (what the kernel computes, masked or not).
    Training costs 3x this (backward = 2x forward).
    """
    d, h = cfg.d_model, cfg.num_heads * cfg.head_dim
    mlp_matrices = 3 if cfg.mlp == "gated" else 2
    per_layer = 2 * (4 * d * h) + 2 * (2 * seq_len * h) + 2 * mlp_matrices * d * cfg.mlp_dim
    return cfg.num_layers * per_layer + 2 * d * cfg.vocab_size
