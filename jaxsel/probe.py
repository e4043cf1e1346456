"""Vmapped per-example probing: losses, gradient features and exact one-step oracle influence.

The engine under MATES and the similarity analysis. Everything below is a pure function of a
params / train-state pytree and arrays; `Prober` jits them once per run with the run's shardings
(parameters and optimizer state keep the `train.Trainer`'s layouts, candidate chunks are split over
`data` x `fsdp`, reference sets and results are replicated) and feeds a pool through them in chunks.

- Per-example loss: `pool_losses` (the project's one eval function, `evaluate.sequence_loss_sums`).
- Per-example gradients: `per_example_grads`, `jax.vmap(jax.grad(example_loss))`.
- Gradient features (TRAK / LESS style): `project` maps each example's gradient to `k` dimensions
  with a seeded random matrix that is never materialised: each leaf is projected block by block
  with Gaussian / Rademacher blocks drawn from `fold_in(fold_in(key(seed), leaf), block)`, and the
  per-leaf projections are summed. Memory is `chunk_size x num_params` for the gradients plus one
  `block_size x k` block, never `[N, num_params]` or `[num_params, k]`.
- Exact oracle influence (MATES): from one pristine `TrainState`, one update of the run's own optax
  transformation (real AdamW moments and step count, the schedule's learning rate at that step,
  clipping, weight decay) on a single candidate, then the reference loss. Vmapped over a chunk of
  candidates; the state is an input of the jitted function, never mutated or re-read from disk.
- First-order influence: `<grad L_ref(params), update(x)>`, i.e. `-lr * <grad L_ref, direction>`,
  and `first_order_spearman` to report how well it ranks like the exact one.
- Reference sets (`references.Reference`: rows plus the positions whose next-token losses count
  and their weights) are scored by one loss function, `reference_loss`, which runs the LM head
  at those positions alone.

Influence is `reference loss after the step - before`: negative means the candidate helps the
reference set, so LOWER IS BETTER.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from jaxsel import evaluate, loss, references, rowmap, sharding, stream
from jaxsel.model.transformer import matmul_flops_per_token

Array = jax.Array
PROJECTION_KINDS = ("rademacher", "gaussian")


# ------------------------------------------------------------------------------------------------
# Pure functions: losses, gradients, projections, influence.


def example_loss(model, params, tokens_L: Array, segments_L: Array) -> Array:
    """Mean token loss of one sequence: the training objective on a batch of that sequence alone."""
    batch = {"tokens": tokens_L[None], "segments": segments_L[None]}
    return loss.make_loss_fn(model)(params, batch)[0]


def reference_loss(model, params, reference: references.Reference, batch_size: int) -> Array:
    """Weighted mean next-token loss of `reference` (see `references.Reference`), float32 scalar.

    Rows are scanned in batches of `batch_size` (padded with empty rows), so activation memory is
    that of one batch even when this is vmapped over many candidates' parameters.
    """

    def add(sums, batch):
        return sums + jnp.stack(weighted_loss_sums(model, params, *batch)), None

    sums, _ = jax.lax.scan(add, jnp.zeros(2, jnp.float32), _batches(reference, batch_size))
    return sums[0] / sums[1]


def reference_grad(model, params, reference: references.Reference, batch_size: int):
    """The gradient of `reference_loss` with respect to `params`, accumulated batch by batch
    (memory of one batch of activations, not of the whole reference set)."""
    value_and_grad = jax.value_and_grad(weighted_loss_sums, argnums=1, has_aux=True)

    def add(carry, batch):
        grads, weight = carry
        (_, batch_weight), batch_grads = value_and_grad(model, params, *batch)
        return (jax.tree.map(jnp.add, grads, batch_grads), weight + batch_weight), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, weight), _ = jax.lax.scan(add, (zeros, jnp.zeros((), jnp.float32)),
                                      _batches(reference, batch_size))
    return jax.tree.map(lambda g: g / weight, grads)


def _batches(reference: references.Reference, batch_size: int) -> tuple[Array, ...]:
    """The reference's fields as [num_batches, batch_size, ...], padded with empty rows."""
    num_rows = reference.tokens_RxL.shape[0]
    batch_size = min(batch_size, num_rows)
    num_batches = -(-num_rows // batch_size)

    def split(x_RxN):
        padded = jnp.pad(x_RxN, ((0, num_batches * batch_size - num_rows), (0, 0)))
        return padded.reshape(num_batches, batch_size, x_RxN.shape[1])

    return tuple(split(x) for x in (reference.tokens_RxL, reference.segments_RxL,
                                    reference.positions_RxK, reference.weights_RxK))


def weighted_loss_sums(model, params, tokens_BxL, segments_BxL, positions_BxK, weights_BxK
                        ) -> tuple[Array, Array]:
    """(sum of weighted next-token losses, sum of weights) of one batch of reference rows, with
    logits computed at the weighted positions only (`loss.losses_at`)."""
    losses_BxK, _, mask_BxK = loss.losses_at(model, params, tokens_BxL, segments_BxL,
                                             positions_BxK)
    w_BxK = mask_BxK * weights_BxK
    return (losses_BxK * w_BxK).sum(), w_BxK.sum()


def per_example_grads(model, params, batch: loss.Batch):
    """The gradient of `example_loss` for each row of `batch`: params' pytree with a leading [B]."""
    grad = jax.grad(functools.partial(example_loss, model))
    return jax.vmap(grad, in_axes=(None, 0, 0))(params, batch["tokens"], batch["segments"])


def candidate_updates(model, tx: optax.GradientTransformation, state, tokens_L: Array,
                      segments_L: Array):
    """The parameter update (a pytree like `state.params`) that one step of `tx` from `state`
    (its moments, step count and hence learning rate) applies when trained on this row alone."""
    grads = jax.grad(functools.partial(example_loss, model))(state.params, tokens_L, segments_L)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    return updates


def chunk_oracle_influence(state, batch: loss.Batch, reference: references.Reference, *, model, tx,
                           reference_batch_size: int, eval_batch_size: int) -> Array:
    """[B] exact one-step influence: reference loss after one `tx` step on each row of `batch`
    alone, minus the reference loss at `state`. Lower (more negative) is better.

    The B updated parameter sets are computed vmapped; their reference losses are evaluated
    `eval_batch_size` candidates at a time (vmapped within a batch, batches scanned).
    """
    before = reference_loss(model, state.params, reference, reference_batch_size)

    def updated(tokens_L, segments_L):
        updates = candidate_updates(model, tx, state, tokens_L, segments_L)
        return optax.apply_updates(state.params, updates)

    params_B = jax.vmap(updated)(batch["tokens"], batch["segments"])
    after_B = jax.lax.map(lambda params: reference_loss(model, params, reference,
                                                        reference_batch_size),
                          params_B, batch_size=eval_batch_size)
    return after_B - before


def chunk_first_order_influence(state, batch: loss.Batch, reference: references.Reference, *,
                                model, tx, reference_batch_size: int) -> Array:
    """[B] first-order influence `<grad L_ref(params), update(x)>`, the linearisation of
    `chunk_oracle_influence` (optax updates already carry the `-lr`). Lower is better."""
    grad_ref = reference_grad(model, state.params, reference, reference_batch_size)

    def dot(tokens_L, segments_L):
        return optax.tree.vdot(grad_ref, candidate_updates(model, tx, state, tokens_L, segments_L))

    return jax.vmap(dot)(batch["tokens"], batch["segments"])


@dataclasses.dataclass(frozen=True)
class GradProjection:
    """A seeded random projection of gradients to `k` dimensions, E[<Pu, Pv>] = <u, v>.

    The matrix has i.i.d. entries `kind` (Rademacher +-1 or standard Gaussian) scaled by
    1/sqrt(k). Block `j` of leaf `i` (rows `j*block_size ...` of the leaf's flattened parameters,
    leaves in `jax.tree.leaves` order) is drawn from `fold_in(fold_in(key(seed), i), j)`, so it is
    a pure function of these fields. `normalize` L2-normalises each feature row (as LESS does).
    """

    k: int
    seed: int = 0
    kind: str = "rademacher"
    normalize: bool = False
    block_size: int = 4096

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"projection.k must be >= 1, got {self.k}")
        if self.kind not in PROJECTION_KINDS:
            raise ValueError(f"projection.kind {self.kind!r} is not one of {PROJECTION_KINDS}")
        if self.block_size < 1:
            raise ValueError(f"projection.block_size must be >= 1, got {self.block_size}")


def project(grads_B, projection: GradProjection) -> Array:
    """[B, k] float32 features of a pytree of per-example gradients (each leaf [B, ...])."""
    key = jax.random.key(projection.seed)
    leaves = jax.tree.leaves(grads_B)
    features_BxK = sum(
        _project_leaf(leaf.reshape(leaf.shape[0], -1).astype(jnp.float32),
                      jax.random.fold_in(key, i), projection)
        for i, leaf in enumerate(leaves))
    if projection.normalize:
        norms_Bx1 = jnp.linalg.norm(features_BxK, axis=-1, keepdims=True)
        features_BxK = features_BxK / jnp.maximum(norms_Bx1, jnp.finfo(jnp.float32).tiny)
    return features_BxK


def _project_leaf(g_BxP: Array, key: Array, projection: GradProjection) -> Array:
    """`g_BxP @ R_PxK`, generating R one `block x k` block at a time inside a loop."""
    num, size = g_BxP.shape
    block = min(projection.block_size, size)
    num_blocks = -(-size // block)
    g_BxP = jnp.pad(g_BxP, ((0, 0), (0, num_blocks * block - size)))
    draw = jax.random.rademacher if projection.kind == "rademacher" else jax.random.normal
    scale = 1.0 / np.sqrt(projection.k)

    def add(j, acc_BxK):
        g_block = jax.lax.dynamic_slice_in_dim(g_BxP, j * block, block, axis=1)
        r_block = draw(jax.random.fold_in(key, j), (block, projection.k), jnp.float32)
        return acc_BxK + g_block @ r_block

    return jax.lax.fori_loop(0, num_blocks, add, jnp.zeros((num, projection.k), jnp.float32)) \
        * scale


def chunk_grad_features(params, batch: loss.Batch, projection: GradProjection, *, model) -> Array:
    """[B, k] projected per-example gradients of the rows of `batch`."""
    return project(per_example_grads(model, params, batch), projection)


# ------------------------------------------------------------------------------------------------
# Driving a pool through the jitted functions.


def oracle_matmul_flops(cfg, seq_len: int, reference: references.Reference) -> int:
    """Matmul FLOPs of one exact probe: a train step on `seq_len` tokens (forward + backward, 3x
    the forward) and the reference forward with the LM head at its target positions only."""
    head = 2 * cfg.d_model * cfg.vocab_size
    rows, length = reference.tokens_RxL.shape
    blocks = (matmul_flops_per_token(cfg, length) - head) * rows * length
    return 3 * matmul_flops_per_token(cfg, seq_len) * seq_len + blocks + head * int(
        np.asarray(reference.positions_RxK).size)


class Prober:
    """The probes of one run (`train.Trainer`: model, optimizer, mesh, shardings), jitted once.

    Candidates are given as `{"tokens", "segments"}` [N, L] arrays with `L = config.data.seq_len`
    (e.g. `pool.rows(ids)`, or a pool's memory-mapped `tokens` / `segments`: only one chunk is
    read at a time) and processed in chunks of `chunk_size` rows (`rowmap.map_rows`), vmapped and
    split over `data` x `fsdp`; the last chunk is padded with rows whose results are dropped.
    Memory is about `chunk_size x num_params`: the chunk size is the knob. Every process passes
    the same candidates and gets all results; results are numpy arrays aligned with the
    candidates' rows, or, given `to=stream.Target(...)`, memory-mapped arrays streamed to disk
    (resumable, split across processes: `jaxsel.stream`).

    Reference sets are evaluated `reference_batch_size` rows at a time, and the oracle evaluates
    them for `eval_batch_size` candidates at once (default: the whole chunk, vmapped, which is
    what accelerators and meshes want; on a CPU, where batching raises no utilisation, 1 is
    fastest). Activation memory scales with their product.
    """

    def __init__(self, trainer, chunk_size: int = 16, reference_batch_size: int = 16,
                 eval_batch_size: int | None = None):
        mesh = trainer.mesh
        rowmap.check_batch_size(chunk_size, mesh, "chunk_size")
        if reference_batch_size < 1:
            raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size}")
        eval_batch_size = chunk_size if eval_batch_size is None else eval_batch_size
        if not 1 <= eval_batch_size <= chunk_size:
            raise ValueError(f"eval_batch_size must be in [1, chunk_size={chunk_size}], got "
                             f"{eval_batch_size}")
        self.trainer, self.chunk_size = trainer, chunk_size
        self.seq_len = trainer.config.data.seq_len
        rows = {"tokens": sharding.batch_sharding(mesh), "segments": sharding.batch_sharding(mesh)}
        replicated = sharding.replicated(mesh)
        influence = dict(model=trainer.model, tx=trainer.tx,
                         reference_batch_size=reference_batch_size)
        jit_influence = functools.partial(
            jax.jit, in_shardings=(trainer.state_shardings, rows, replicated),
            out_shardings=replicated)
        self._oracle = jit_influence(functools.partial(
            chunk_oracle_influence, **influence, eval_batch_size=eval_batch_size))
        self._first_order = jit_influence(
            functools.partial(chunk_first_order_influence, **influence))
        self._reference_loss = jax.jit(
            functools.partial(reference_loss, trainer.model, batch_size=reference_batch_size),
            in_shardings=(trainer.param_shardings, replicated), out_shardings=replicated)
        self._features = jax.jit(
            functools.partial(chunk_grad_features, model=trainer.model), static_argnums=2,
            in_shardings=(trainer.param_shardings, rows), out_shardings=replicated)

    def reference_loss(self, params, reference: references.Reference) -> float:
        """The loss of `reference` under `params` (`reference_loss`), e.g. to evaluate a model on
        the reference set its data was selected for."""
        return float(self._reference_loss(params, self.put(reference)))

    def oracle_influence(self, state, candidates: Mapping[str, np.ndarray],
                         reference: references.Reference, progress: bool = True,
                         to: stream.Target | None = None) -> np.ndarray:
        """[N] float32 exact one-step influence of each candidate on `reference` from `state`
        (`chunk_oracle_influence`): reference loss after - before. Lower is better."""
        reference = self.put(reference)
        return self.map(lambda chunk: self._oracle(state, chunk, reference), candidates,
                        "oracle influence", progress, to)

    def first_order_influence(self, state, candidates: Mapping[str, np.ndarray],
                              reference: references.Reference, progress: bool = True,
                              to: stream.Target | None = None) -> np.ndarray:
        """[N] float32 first-order influence (`chunk_first_order_influence`). Lower is better."""
        reference = self.put(reference)
        return self.map(lambda chunk: self._first_order(state, chunk, reference), candidates,
                        "first-order influence", progress, to)

    def grad_features(self, params, candidates: Mapping[str, np.ndarray],
                      projection: GradProjection, progress: bool = True,
                      to: stream.Target | None = None) -> np.ndarray:
        """[N, k] float32 projected per-example gradients (`project`)."""
        return self.map(lambda chunk: self._features(params, chunk, projection), candidates,
                        "gradient features", progress, to)

    def put(self, reference: references.Reference) -> references.Reference:
        """Checks `reference` (`evaluate.check_rows`) and makes it a replicated global array on
        the mesh."""
        rows = evaluate.check_rows(self.trainer, "reference", reference.tokens_RxL,
                                   reference.segments_RxL, reference.positions_RxK,
                                   reference.weights_RxK, every_row=False)
        replicated = sharding.replicated(self.trainer.mesh)
        return references.Reference(*(jax.make_array_from_process_local_data(replicated, x)
                                      for x in rows))

    def map(self, fn, candidates, desc: str, progress: bool,
            to: stream.Target | None = None) -> np.ndarray:
        """`fn(chunk)` over the candidates' chunks (`stream.map_rows`): an array, or a pytree of
        arrays, aligned with the candidates' rows: float32 in memory, or streamed `to` a target
        (memory-mapped)."""
        tokens, segments = references.check_token_rows(candidates, "candidates", self.seq_len)

        def read(idx):
            return {"tokens": np.asarray(tokens[idx], np.int32),
                    "segments": np.asarray(segments[idx], np.int32)}

        results = stream.map_rows(fn, read, self.chunk_size, self.trainer.mesh, to=to,
                                  num_rows=len(tokens), progress=progress, desc=desc)
        return results if to is not None else jax.tree.map(
            lambda x: np.asarray(x, np.float32), results)


def pool_losses(trainer, params, pool, batch_size: int, ids: np.ndarray | None = None,
                progress: bool = True, to: stream.Target | None = None) -> np.ndarray:
    """Mean token loss of each sequence, [len(ids)] float32 aligned with `ids` (default: the whole
    pool, so row i is pool id i); 0 for a sequence without a target. Uses the one eval function,
    `evaluate.sequence_loss_sums` (`Trainer.sequence_losses`, jitted and sharded), streamed `to`
    a target when given (the sums on disk; the [N] means in memory)."""
    ids = np.arange(len(pool)) if ids is None else np.asarray(ids)
    sums = evaluate.sequence_loss_sums(trainer, params, pool, ids, batch_size, progress, to)
    means = np.empty(len(ids), np.float32)
    for start in range(0, len(ids), 1 << 20):  # Bounded memory over memory-mapped sums.
        rows = np.asarray(sums[start:start + (1 << 20)], np.float64)
        means[start:start + len(rows)] = rows[:, 0] / np.maximum(rows[:, 1], 1.0)
    return means


def first_order_spearman(exact_N: np.ndarray, first_order_N: np.ndarray) -> float:
    """Spearman rank correlation of first-order and exact influences of the same candidates
    (1: the cheap approximation ranks candidates exactly like the oracle)."""
    exact_N, first_order_N = np.asarray(exact_N), np.asarray(first_order_N)
    if exact_N.ndim != 1 or exact_N.shape != first_order_N.shape or exact_N.size < 2:
        raise ValueError(f"exact_N {exact_N.shape} and first_order_N {first_order_N.shape} must "
                         "be [N] arrays of one shape with N >= 2")
    return float(scipy.stats.spearmanr(exact_N, first_order_N).statistic)
