"""MATES' data influence model (Yu, Das, Xiong, NeurIPS 2024): a BERT encoder + regression head.

Oracle influences (reference loss after one optimizer step on a candidate minus before; LOWER IS
BETTER, see `jaxsel.probe`) are probed for a few thousand candidates. This module fine-tunes an
encoder to predict them from the candidates' text, then predicts the influence of every sequence
of the pool, which `select` turns into a selection (Gumbel-top-k of the best predicted):

    ids_NxM, lengths_N = embed.encoder_inputs(encoder, tokens_NxL, segments_NxL, lm_tokenizer)
    result = fit(encoder, ids_NxM[probed], lengths_N[probed], influences_P, FitConfig())
    predicted_N = predict(encoder, result.params, result.label_mean, result.label_std,
                          ids_NxM, lengths_N)

As in MATES' training script (Hugging Face `Trainer`): labels are z-scored with the training
split's mean and standard deviation (ddof 0); a seeded 90/10 train/validation split; AdamW
(lr 5e-5, weight decay 0.01 on matrices only, i.e. not on biases and LayerNorm parameters, as
`Trainer` does), a linear decay to 0 (after a linear warmup, none by default), gradient clipping
at global norm 1, dropout on, 5 epochs; the parameters kept are those of the epoch with the best
validation Spearman (MATES evaluates every 10 steps; here, after every epoch).

Dropout (the encoder's own rates, plus the hidden rate before the head, as
`BertForSequenceClassification` has) is on by default and deterministically seeded: step `s`
uses the key `fold_in(key(seed), s)` (threefry, whose bits do not depend on the sharding), so a
seed gives the same split, batches and dropout masks on any mesh. `FitConfig(dropout=False)`
turns it off. Batches are cut to their longest sequence rounded up to `length_multiple` (as
`embed.encoder_embed` does), so at most `M / length_multiple` shapes compile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh

from jaxsel import rowmap, sharding, stats, stream
from jaxsel.model import encoder as encoder_lib

Array = jax.Array
Batch = dict[str, Array]


class InfluenceRegressor(nn.Module):
    """`(ids_BxL, mask_BxL)` -> predicted (z-scored) influence `[B]` float32.

    `BertEncoder` (parameters under "encoder") reads the input in windows of `window` tokens
    (positions restart in each; one window when `L <= window`), as MATES' regressor reads 1024
    tokens as two windows of 512; the hidden states of all windows are pooled over the real
    tokens of `mask_BxL` with `pooling_mode` ("mean" or "cls": the first window's first token;
    never L2-normalised), dropout at the encoder's hidden rate, then a `Dense(1)` head
    (parameters under "head"). Dropout is active only with `deterministic=False` and a "dropout"
    rng.
    """

    config: encoder_lib.EncoderConfig
    pooling_mode: str = "mean"
    window: int = 512

    @nn.compact
    def __call__(self, ids_BxL, mask_BxL, deterministic: bool = True) -> Array:
        encoder = encoder_lib.BertEncoder(self.config, name="encoder")
        hidden_BxLxD = jnp.concatenate([
            encoder(ids_BxL[:, start:start + self.window], mask_BxL[:, start:start + self.window],
                    deterministic) for start in range(0, ids_BxL.shape[1], self.window)], axis=1)
        pooled_BxD = encoder_lib.pool(hidden_BxLxD, mask_BxL,
                                      encoder_lib.Pooling(self.pooling_mode, normalize=False))
        pooled_BxD = nn.Dropout(self.config.hidden_dropout)(pooled_BxD,
                                                            deterministic=deterministic)
        head = nn.Dense(1, kernel_init=nn.initializers.normal(0.02), name="head")
        return head(pooled_BxD)[:, 0].astype(jnp.float32)


def make_module(encoder: encoder_lib.Encoder) -> InfluenceRegressor:
    """The regressor of `encoder`'s architecture, pooling as the encoder does (mean or CLS), in
    windows of the encoder's `max_length`."""
    return InfluenceRegressor(encoder.config, encoder.pooling.mode, encoder.max_length)


def init_params(encoder: encoder_lib.Encoder, seed: int) -> dict:
    """`{"params": {"encoder": <encoder.params exactly>, "head": <fresh, from key(seed)>}}`.

    The head's kernel is drawn N(0, 0.02^2) (BERT's initializer range), its bias is 0; only the
    head is initialised, so the encoder's pretrained weights are not touched (nor re-drawn).
    """
    module = make_module(encoder)
    dim = encoder.config.hidden_size
    head = nn.Dense(1, kernel_init=nn.initializers.normal(0.02)).init(
        jax.random.key(seed), jnp.zeros((1, dim), jnp.float32))
    params = {"params": {"encoder": encoder.params["params"], "head": head["params"]}}
    # The structure must be the module's own (fails loudly if the two ever drift apart).
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                              jnp.ones((1, 2), bool))
    if jax.tree.structure(abstract) != jax.tree.structure(params):
        raise ValueError("encoder: its params do not have the structure of BertEncoder's")
    return params


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Hyperparameters of `fit` (defaults: MATES' training script).

    The validation rows are the first `ceil(val_fraction * N)` of
    `np.random.default_rng(seed).permutation(N)`, the rest are trained on for `epochs` passes in
    batches of `batch_size` (the last one padded with rows of weight 0); epoch `e` visits them in
    the order `np.random.default_rng((seed, e)).permutation(train_rows)`. The learning rate rises
    linearly from 0 over the first `warmup_fraction` of the steps, then falls linearly to 0 at
    the end; `max_grad_norm` clips the gradient's global norm (0: off); `dropout` turns dropout
    on (seeded, see the module docstring); `length_multiple` is what a batch's length is rounded
    up to; `seed` fixes the split, the shuffling, dropout and the head.
    """

    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    epochs: int = 5
    batch_size: int = 64
    val_fraction: float = 0.1
    warmup_fraction: float = 0.0
    max_grad_norm: float = 1.0
    dropout: bool = True
    length_multiple: int = 32
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)"),
            (self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: no clipping)"),
            (self.length_multiple >= 1, "length_multiple", "must be >= 1"),
            (0 <= self.seed < 2**31, "seed", "must be in [0, 2**31)"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"fit_config.{name} {rule}, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class FitResult:
    """What `fit` returns.

    `params`: the regressor's parameters (host numpy pytree) after the epoch with the best
    validation Spearman (`best_epoch`, 0-based; the earliest on ties); `label_mean` and
    `label_std`: the training labels' mean and standard deviation (ddof 0), which `predict` uses
    to return original units; `history`: one dict per epoch with `epoch`, `train_loss` (mean
    z-scored MSE of the epoch's training batches, as trained: with dropout if on), `val_mse`
    (z-scored units), `val_pearson` and `val_spearman`; `train_rows` and `val_rows`: the indices
    of the training and validation examples in the inputs.
    """

    params: Any
    label_mean: float
    label_std: float
    history: list[dict[str, float]]
    best_epoch: int
    train_rows: np.ndarray
    val_rows: np.ndarray


# ------------------------------------------------------------------------------------------------
# Pure functions.


def adamw(learning_rate, weight_decay, max_grad_norm) -> optax.GradientTransformation:
    """Global-norm clipping at `max_grad_norm` (inf: off), then AdamW (b1 0.9, b2 0.999,
    eps 1e-8) with weight decay on arrays of rank >= 2 only (not biases and LayerNorm)."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                    mask=decay_mask))


def make_optimizer(fit_config: FitConfig) -> optax.GradientTransformation:
    """`adamw` with its three numbers injected (`optax.inject_hyperparams`): they live in the
    optimizer state, so `train_step` sets each step's learning rate and one compiled step serves
    every schedule, weight decay and clipping norm."""
    clip = fit_config.max_grad_norm if fit_config.max_grad_norm > 0 else np.inf
    return optax.inject_hyperparams(adamw)(learning_rate=fit_config.learning_rate,
                                           weight_decay=fit_config.weight_decay,
                                           max_grad_norm=clip)


def make_schedule(fit_config: FitConfig, total_steps: int) -> optax.Schedule:
    """Learning rate by step: linear from 0 to `learning_rate` over the first
    `round(warmup_fraction * total_steps)` steps, then linear to 0 at `total_steps`."""
    lr = fit_config.learning_rate
    warmup = int(round(fit_config.warmup_fraction * total_steps))
    decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def mse_loss(params, batch: Batch, module: InfluenceRegressor, dropout_key: Array | None = None
             ) -> Array:
    """Weighted mean squared error of the predictions against `batch["targets_B"]` (z-scored):
    `sum_b w_b (pred_b - target_b)^2 / sum_b w_b`. Dropout is on iff `dropout_key` is given."""
    deterministic = dropout_key is None
    preds_B = module.apply(params, batch["ids_BxL"], batch["mask_BxL"], deterministic,
                           rngs=None if deterministic else {"dropout": dropout_key})
    weights_B = batch["weights_B"]
    return jnp.sum(weights_B * (preds_B - batch["targets_B"]) ** 2) / jnp.maximum(
        jnp.sum(weights_B), 1.0)


def train_step(params, opt_state, batch: Batch, learning_rate: Array, seed: Array, step: Array,
               *, module: InfluenceRegressor, tx: optax.GradientTransformation, dropout: bool
               ) -> tuple[Any, optax.OptState, Array]:
    """One step of `tx` (from `make_optimizer`) at `learning_rate` on `mse_loss` ->
    (params, opt_state, loss before the step). With `dropout`, dropout draws from the key
    `fold_in(key(seed), step)`. All three scalars are traced: one compiled step serves every
    schedule and seed."""
    key = jax.random.fold_in(jax.random.key(seed), step) if dropout else None
    value, grads = jax.value_and_grad(mse_loss)(params, batch, module, key)
    opt_state = opt_state._replace(
        hyperparams={**opt_state.hyperparams, "learning_rate": learning_rate})
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def forward(params, ids_BxL, mask_BxL, *, module: InfluenceRegressor) -> Array:
    """Predicted z-scored influence `[B]`, dropout off."""
    return module.apply(params, ids_BxL, mask_BxL)


# ------------------------------------------------------------------------------------------------
# Driving the data through them.


def fit(encoder: encoder_lib.Encoder, ids_NxM, lengths_N, influences_N,
        fit_config: FitConfig, mesh: Mesh | None = None,
        progress: bool = True) -> FitResult:
    """Fine-tunes `encoder` + a fresh head to predict `influences_N` from `ids_NxM` (from
    `embed.encoder_inputs`; row i has `lengths_N[i]` real tokens) and keeps the epoch with the
    best validation Spearman (see `FitConfig` and the module docstring).

    With a `mesh` (`sharding.make_mesh`) the parameters and optimizer state are replicated and the
    rows of each batch split over `data` x `fsdp` (`batch_size` must then be a multiple of that
    and of the process count; every process passes the same inputs); without, the default device.
    """
    ids_NxM, lengths_N = _check_tokens(encoder, ids_NxM, lengths_N)
    influences_N = np.asarray(influences_N, np.float64)
    if influences_N.shape != lengths_N.shape:
        raise ValueError(f"influences_N has shape {influences_N.shape}, expected "
                         f"{lengths_N.shape} (one per row of ids_NxM)")
    bad = np.flatnonzero(~np.isfinite(influences_N))
    if bad.size:
        raise ValueError(f"influences_N has {bad.size} non-finite values, e.g. rows {bad[:5]}")
    n = len(influences_N)
    n_val = math.ceil(n * fit_config.val_fraction)
    if n_val < 2 or n - n_val < 2:
        raise ValueError(f"influences_N: N={n} with val_fraction={fit_config.val_fraction} "
                         f"leaves {n - n_val} training and {n_val} validation examples; "
                         "need >= 2 of each")
    multiple = rowmap.batch_multiple(mesh)
    if fit_config.batch_size % multiple:
        raise ValueError(f"fit_config.batch_size={fit_config.batch_size} must be a multiple of "
                         f"{multiple} (the mesh's data x fsdp shards and the process count)")

    perm = np.random.default_rng(fit_config.seed).permutation(n)
    val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    label_mean = float(influences_N[train_rows].mean())
    label_std = float(influences_N[train_rows].std())
    if not label_std > 0:
        raise ValueError("influences_N is constant on the training split (std 0), so it cannot "
                         "be z-scored")
    targets_N = ((influences_N - label_mean) / label_std).astype(np.float32)

    module = make_module(encoder)
    batch_size = min(fit_config.batch_size, _round_up(len(train_rows), multiple))
    steps_per_epoch = -(-len(train_rows) // batch_size)
    total_steps = steps_per_epoch * fit_config.epochs
    tx = make_optimizer(fit_config)
    step_fn = _jitted_step(module, fit_config.dropout, mesh)
    learning_rates = np.asarray(jax.vmap(make_schedule(fit_config, total_steps))(
        jnp.arange(total_steps)), np.float32)
    forward_fn = _jitted_forward(module, mesh)
    initial = init_params(encoder, fit_config.seed)
    params, opt_state = _place(initial, mesh), _place(tx.init(initial), mesh)

    history, best_params, best_epoch, best_score = [], None, 0, -np.inf
    step = 0
    with tqdm.tqdm(total=total_steps, desc="influence model", unit="step",
                   disable=not progress) as bar:
        for epoch in range(fit_config.epochs):
            order = np.random.default_rng((fit_config.seed, epoch)).permutation(train_rows)
            loss_sum = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = _train_batch(ids_NxM, lengths_N, targets_N, idx, batch_size,
                                     fit_config.length_multiple)
                params, opt_state, loss = step_fn(
                    params, opt_state, rowmap.place(batch, mesh), learning_rates[step],
                    np.int32(fit_config.seed), np.int32(step))
                loss_value = float(loss)
                loss_sum += loss_value * idx.size
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}")
            preds_V = _predict_z(forward_fn, params, ids_NxM[val_rows], lengths_N[val_rows],
                                 batch_size, fit_config.length_multiple, mesh, progress=False)
            metrics = dict(epoch=epoch, train_loss=loss_sum / len(order),
                           **_val_metrics(preds_V, targets_N[val_rows]))
            history.append(metrics)
            bar.set_postfix(epoch=epoch, val_spearman=f"{metrics['val_spearman']:.4f}")
            score = metrics["val_spearman"] if np.isfinite(metrics["val_spearman"]) else -np.inf
            if best_params is None or score > best_score:
                best_params = jax.tree.map(np.array, jax.device_get(params))  # A copy.
                best_epoch, best_score = epoch, score
    return FitResult(params=best_params, label_mean=label_mean, label_std=label_std,
                     history=history, best_epoch=best_epoch, train_rows=train_rows,
                     val_rows=val_rows)


def predict(encoder: encoder_lib.Encoder, params, label_mean: float, label_std: float, ids_NxM,
            lengths_N, batch_size: int = 64, length_multiple: int = 32, mesh: Mesh | None = None,
            progress: bool = True, to: stream.Target | None = None) -> np.ndarray:
    """Predicted influence `[N]` float32 in the original units (`z * label_std + label_mean`),
    row i for row i of `ids_NxM`; lower is better. In memory, or streamed `to` a target
    (memory-mapped: `jaxsel.stream`).

    Rows are visited shortest first (`rowmap.map_rows`) in batches of `batch_size` rows (fewer
    when N is smaller; the last one padded) cut to their longest length rounded up to
    `length_multiple`, as `embed.encoder_embed` does. With a `mesh`, batch rows are split over
    `data` x `fsdp` and the parameters replicated.
    """
    ids_NxM, lengths_N = _check_tokens(encoder, ids_NxM, lengths_N)
    rowmap.check_batch_size(batch_size, mesh)
    if not (np.isfinite(label_mean) and np.isfinite(label_std) and label_std > 0):
        raise ValueError(f"label_mean={label_mean} must be finite and label_std={label_std} "
                         "finite and > 0")
    forward_fn = _jitted_forward(make_module(encoder), mesh)
    return _predict_z(forward_fn, _place(params, mesh), ids_NxM, lengths_N, batch_size,
                      length_multiple, mesh, progress, (label_std, label_mean), to)


def _predict_z(forward_fn, params, ids_NxM, lengths_N, batch_size: int, length_multiple: int,
               mesh: Mesh | None, progress: bool, scale_shift: tuple[float, float] = (1.0, 0.0),
               to: stream.Target | None = None) -> np.ndarray:
    """z-scored predictions `[N]` float32 (times `scale`, plus `shift`), in batches of
    `batch_size` rows or of N rounded up to `rowmap.batch_multiple(mesh)`, whichever is
    smaller."""
    n = len(lengths_N)
    batch_size = min(batch_size, _round_up(n, rowmap.batch_multiple(mesh)))
    scale, shift = (np.float32(x) for x in scale_shift)

    def fn(batch):
        return forward_fn(params, batch["ids_BxL"], batch["mask_BxL"]) * scale + shift

    z_N = stream.map_rows(fn, lambda idx: _rows(ids_NxM, lengths_N, idx), batch_size, mesh,
                          to=to, num_rows=n, lengths_N=lengths_N,
                          length_multiple=length_multiple, progress=progress,
                          desc="influence model predict")
    return z_N if to is not None else np.asarray(z_N, np.float32)


def _val_metrics(preds_V: np.ndarray, targets_V: np.ndarray) -> dict[str, float]:
    """MSE, Pearson and Spearman of z-scored predictions; NaN correlations where undefined
    (constant or non-finite predictions, e.g. after a diverged step)."""
    mse = float(np.mean((preds_V - targets_V) ** 2))
    if not np.isfinite(preds_V).all():
        return dict(val_mse=mse, val_pearson=float("nan"), val_spearman=float("nan"))
    return dict(val_mse=mse, val_pearson=stats.pearson(preds_V, targets_V),
                val_spearman=stats.spearman(preds_V, targets_V))


def _rows(ids_NxM, lengths_N, idx) -> dict[str, np.ndarray]:
    """Rows `idx` at the full width M: token ids `ids_BxL` int32 and their mask `mask_BxL`."""
    return {"ids_BxL": ids_NxM[idx].astype(np.int32),
            "mask_BxL": np.arange(ids_NxM.shape[1])[None, :] < lengths_N[idx, None]}


def _train_batch(ids_NxM, lengths_N, targets_N, idx, batch_size: int, length_multiple: int
                 ) -> dict[str, np.ndarray]:
    """Rows `idx` with their targets, padded to `batch_size` (repeating the last, with weight 0)
    and cut to the longest length rounded up to `length_multiple` (`rowmap.cut_to_length`)."""
    padded = np.pad(idx, (0, batch_size - idx.size), mode="edge")
    batch = {**_rows(ids_NxM, lengths_N, padded), "targets_B": targets_N[padded],
             "weights_B": (np.arange(batch_size) < idx.size).astype(np.float32)}
    return rowmap.cut_to_length(batch, lengths_N[idx], length_multiple)


def _check_tokens(encoder: encoder_lib.Encoder, ids_NxM, lengths_N
                  ) -> tuple[np.ndarray, np.ndarray]:
    ids_NxM, lengths_N = np.asarray(ids_NxM), np.asarray(lengths_N)
    if ids_NxM.ndim != 2 or 0 in ids_NxM.shape or not np.issubdtype(ids_NxM.dtype, np.integer):
        raise ValueError(f"ids_NxM must be a non-empty [N, M] integer array, got shape "
                         f"{ids_NxM.shape} and dtype {ids_NxM.dtype}")
    if lengths_N.shape != ids_NxM.shape[:1] or not np.issubdtype(lengths_N.dtype, np.integer):
        raise ValueError(f"lengths_N must be [N] integers with N={len(ids_NxM)} as ids_NxM, got "
                         f"shape {lengths_N.shape} and dtype {lengths_N.dtype}")
    bad = np.flatnonzero((lengths_N < 1) | (lengths_N > ids_NxM.shape[1]))
    if bad.size:
        raise ValueError(f"lengths_N must lie in [1, M={ids_NxM.shape[1]}], e.g. row {bad[0]} "
                         f"has {lengths_N[bad[0]]}")
    if ids_NxM.min() < 0 or ids_NxM.max() >= encoder.config.vocab_size:
        raise ValueError(f"ids_NxM: token ids (padding included) must lie in [0, vocab_size="
                         f"{encoder.config.vocab_size})")
    return ids_NxM, lengths_N


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _place(tree, mesh: Mesh | None):
    """A fresh device copy of `tree` (safe to donate): replicated on `mesh`, or on the default
    device."""
    host = jax.device_get(tree)
    if mesh is None:
        return jax.tree.map(lambda x: jnp.array(x, copy=True), host)
    replicated = sharding.replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(
        np.shape(x), replicated, lambda index: np.asarray(x)[index]), host)


def _jit(fn, mesh: Mesh | None, in_specs: tuple[str, ...], donate_argnums=()):
    """`jax.jit(fn)`; on a mesh with inputs "rep" (replicated) or "rows" (batch-split) and
    replicated outputs."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    kinds = {"rep": sharding.replicated(mesh), "rows": sharding.batch_sharding(mesh)}
    return jax.jit(fn, in_shardings=tuple(kinds[s] for s in in_specs),
                   out_shardings=sharding.replicated(mesh), donate_argnums=donate_argnums)


@functools.cache
def _jitted_step(module: InfluenceRegressor, dropout: bool, mesh: Mesh | None):
    """`train_step`, donating params and optimizer state. Its optimizer's numbers come from the
    optimizer state, so the default `FitConfig`'s optimizer serves every fit."""
    step = functools.partial(train_step, module=module, tx=make_optimizer(FitConfig()),
                             dropout=dropout)
    return _jit(step, mesh, in_specs=("rep", "rep", "rows", "rep", "rep", "rep"),
                donate_argnums=(0, 1))


@functools.cache
def _jitted_forward(module: InfluenceRegressor, mesh: Mesh | None):
    return _jit(functools.partial(forward, module=module), mesh,
                in_specs=("rep", "rows", "rows"))
