"""LESS (Xia et al., 2024): select the candidates whose Adam update direction best aligns with the
target items' gradients.

- A candidate's feature is its Adam-preconditioned gradient under the run's AdamW moments, as
  LESS forms it from a checkpoint's optimizer state: with the candidate's gradient g and the
  state's first and second moments m and v, `(b1 m + (1 - b1) g) / sqrt(b2 v + (1 - b2) g^2 +
  eps)` (`adam_direction`; no bias correction, eps inside the root, as LESS's code does).
- A target item's feature is the plain gradient of its own loss (the weighted cloze positions of
  `references.Reference`, the loss MATES probes).
- Both are projected by the same seeded random projection (`probe.GradProjection`, normalised)
  and a candidate scores the maximum over the target items of the cosine similarity
  (`max_cosine`); the k highest are selected. (LESS's matching code averages the cosine over a
  task's validation examples before the maximum over tasks; over single items the maximum
  enriched the synthetic corpus' target domain more: from 32% of the candidates to 49%, against
  45% for the mean.) The shared momentum term b1 m dilutes each candidate's own gradient
  ((1 - b1) g) in its direction, so early in training LESS separates candidates less sharply than
  the raw gradients of `first_order` do.

Deviations from the paper: one checkpoint (the seed model) instead of an average over the
warmup run's checkpoints (with their learning rates as weights), and no LoRA: the gradients are
of all parameters. A candidate with a zero gradient (no target token) carries no data (its
direction would be the momentum alone): it scores `ZERO_GRADIENT_SCORE`, below every cosine,
and is counted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils

from jaxsel import embed, probe, references, sharding, stream

ZERO_GRADIENT_SCORE = -2.0  # Below every cosine similarity.


def adam_direction(grads, mu, nu, b1: float, b2: float, eps: float):
    """The Adam update direction of `grads` from moments `mu` and `nu` (pytrees alike)."""
    return jax.tree.map(lambda g, m, v: (b1 * m + (1 - b1) * g)
                        / jnp.sqrt(b2 * v + (1 - b2) * g * g + eps), grads, mu, nu)


def chunk_adam_features(state, batch, projection: probe.GradProjection, *, model, b1: float,
                        b2: float, eps: float) -> tuple[jax.Array, jax.Array]:
    """`[B, k]` projected Adam directions of the rows of `batch` from `state`'s AdamW moments,
    and `[B]` the norms of their gradients."""
    mu = tree_utils.tree_get(state.opt_state, "mu")
    nu = tree_utils.tree_get(state.opt_state, "nu")
    grads_B = probe.per_example_grads(model, state.params, batch)
    directions_B = jax.vmap(lambda g: adam_direction(g, mu, nu, b1, b2, eps))(grads_B)
    return probe.project(directions_B, projection), jax.vmap(optax.tree.norm)(grads_B)


def item_features(params, reference: references.Reference, projection: probe.GradProjection, *,
                  model) -> jax.Array:
    """`[R, k]` projected gradients of each target item's own weighted loss."""
    def item_loss(p, tokens_L, segments_L, positions_K, weights_K):
        total, weight = probe.weighted_loss_sums(model, p, tokens_L[None], segments_L[None],
                                                  positions_K[None], weights_K[None])
        return total / jnp.maximum(weight, 1e-9)

    grads_R = jax.vmap(jax.grad(item_loss), in_axes=(None, 0, 0, 0, 0))(
        params, reference.tokens_RxL, reference.segments_RxL, reference.positions_RxK,
        reference.weights_RxK)
    return probe.project(grads_R, projection)


def max_cosine(candidates_NxK, targets_RxK, zero_N=None) -> tuple[np.ndarray, int]:
    """Each candidate's highest cosine similarity to any target row, `[N]` float64, and how many
    candidates are zero (a zero feature, or `zero_N`: a zero gradient) and score
    `ZERO_GRADIENT_SCORE`. A ValueError when every target row is zero: there is no direction to
    align with."""
    t_RxK = np.asarray(targets_RxK, np.float64)
    t_norms = np.linalg.norm(t_RxK, axis=1)
    if not (t_norms > 0).any():
        raise ValueError("less: every target item's gradient is zero, so there is no direction "
                         "to align the candidates with (do the target items hold answer tokens?)")
    t_RxK = t_RxK[t_norms > 0] / t_norms[t_norms > 0, None]
    scores = np.full(len(candidates_NxK), ZERO_GRADIENT_SCORE)
    zeros = 0
    chunk = embed.chunk_rows(candidates_NxK)  # Features (memory-mapped) read in chunks.
    for start in range(0, len(candidates_NxK), chunk):
        rows = slice(start, start + chunk)
        c_NxK = np.asarray(candidates_NxK[rows], np.float64)
        c_norms = np.linalg.norm(c_NxK, axis=1)
        zero = c_norms == 0
        if zero_N is not None:
            zero |= np.asarray(zero_N[rows], bool)
        scores[rows][~zero] = (c_NxK[~zero] / c_norms[~zero, None] @ t_RxK.T).max(axis=1)
        zeros += int(zero.sum())
    return scores, zeros


def scores(prober: probe.Prober, state, candidates, reference: references.Reference,
           projection: probe.GradProjection, progress: bool = True,
           to: stream.Target | None = None) -> tuple[np.ndarray, int]:
    """LESS's score of each candidate (`{"tokens", "segments"}` rows) from train state `state`
    towards the target items `reference`: `max_cosine` of their features (in memory, or
    streamed `to` a target), with the count of zero-gradient candidates."""
    trainer = prober.trainer
    optim = trainer.config.optim
    rows = {"tokens": sharding.batch_sharding(trainer.mesh),
            "segments": sharding.batch_sharding(trainer.mesh)}
    replicated = sharding.replicated(trainer.mesh)
    candidate_fn = jax.jit(
        functools.partial(chunk_adam_features, projection=projection, model=trainer.model,
                          b1=optim.b1, b2=optim.b2, eps=optim.eps),
        in_shardings=(trainer.state_shardings, rows), out_shardings=replicated)
    out = prober.map(lambda chunk: dict(zip(("features", "grad_norms"),
                                            candidate_fn(state, chunk), strict=True)),
                     candidates, "LESS features", progress, to)
    features_NxK, grad_norms_N = out["features"], out["grad_norms"]
    target_fn = jax.jit(functools.partial(item_features, projection=projection,
                                          model=trainer.model),
                        in_shardings=(trainer.param_shardings, replicated),
                        out_shardings=replicated)
    targets_RxK = np.asarray(target_fn(state.params, prober.put(reference)))
    return max_cosine(features_NxK, targets_RxK, zero_N=grad_norms_N == 0)
