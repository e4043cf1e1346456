"""Group-MATES (Yu et al. 2025, arXiv 2502.14709): group-level data selection, from one train state
to k chosen candidates, each artifact computed once into a folder (a killed run resumes):

1. **Oracle group influence** (`chunk_group_oracle`, `group_oracle`): from the pristine state,
   the members of a group are trained on one after the other, one step of the run's own
   optimizer (`train.train_step`: its loss, AdamW moments, schedule, clipping) per member, and
   the target loss (`probe.reference_loss`) is read after each step: the trajectory
   `[G, M]` of `loss after member m - loss before`. Its last column is the group's influence,
   its differences (`increments`) each member's marginal influence given those before it; the
   first column is MATES' one-step oracle of the first member. Vmapped over groups, scanned
   over members, as the paper's rollouts (one sequence per step, the state reloaded per rollout).
2. **Relational influence model** (`predicted_increments`): member `m`'s marginal influence is
   its individual prediction `u_m = scale * s_m + shift` (`s`: MATES' predictions) times the
   mean relationship weight `w_mj = alpha * (1 - beta * cos(e_m, e_j))` to the members `j < m`
   before it (the first member: `u_0`); the group's influence is their sum. `fit` learns
   `scale, shift, alpha, beta` with Adam on the oracle increments (and MATES' individual
   oracles, groups of one) and reports the held-out groups' Spearman and Pearson next to the
   baseline that sums the individual predictions.
3. **Selection** (`select`): the candidates are split into small clusters of their unit
   embeddings (balanced k-means: the relationship weight is a monotone function of the cosine,
   so a cluster holds the candidates that weigh on each other most), k is shared out over the
   clusters in proportion to their sizes (`quotas`; or, with `budget="global"`, to the clusters
   whose next pick is predicted best), and inside each cluster `greedy` adds, one at a time, the
   candidate whose predicted marginal influence given those already chosen is the lowest (lower
   is better, as in `jaxsel.probe`). Deterministic given the seed.

Deviations from the released code (facebookresearch/Group-MATES):

- The paper fine-tunes a BERT encoder (BGE, CLS of 4 chunks) jointly with the relation on
  rollout increments. Here the individual predictions are MATES' fitted influence model's
  (`selectors.Candidates.mates`, standardised) and the embeddings the encoder's frozen pooled
  ones (`Candidates.embeddings`), so only four scalars are fit: an affine calibration of the
  individual predictions (the paper's regression head) and the relation's `alpha` and
  `beta = 1 / temperature`.
- The paper z-scores the increments (mean removed) before the multiplicative relation; here
  they are only divided by their root mean square, so the relation scales the influence itself
  (a redundant member's effect shrinks towards 0) and `shift` takes the mean.
- The paper's second, bootstrapped oracle collection (groups from a beam search of the first
  model) is not run; instead half the oracle groups are drawn inside one cluster (related
  members, whose redundancy the relation must learn) and half uniformly (`draw_groups`), all
  of candidates MATES' influence model was not fit on (its predictions are out of sample there).
- The paper clusters with plain k-means (cosine, 10,000 clusters) and picks
  `int(ratio * size)` per cluster; here balanced k-means keeps every cluster small and the
  quotas sum to exactly k (`budget="global"`, sharing k by the model's marginals instead, is not
  in the paper). Its greedy rule (argmin of `u * mean relationship weight`) is unchanged.
"""

from __future__ import annotations

import functools
import heapq
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxsel import (
    cluster,
    embed,
    loss,
    probe,
    references,
    report,
    sharding,
    stats,
    stream,
    train,
)
from jaxsel import config as config_lib

Array = jax.Array
BUDGETS = ("cluster", "global")
_CLUSTERS, _GROUPS, _SPLIT = range(3)  # Random streams of the seed given to `relational_model`.


# ------------------------------------------------------------------------------------------------
# 1. Oracle group influence.


def trajectory_losses(state, tokens_MxL: Array, segments_MxL: Array,
                      reference: references.Reference, *, model, tx,
                      reference_batch_size: int) -> Array:
    """[M] reference loss after each of M `train.train_step`s from `state`, step m on row m
    alone (a batch of one)."""

    def step(state, row):
        batch = {"tokens": row[0][None], "segments": row[1][None]}
        state, _ = train.train_step(state, batch, model, tx)
        return state, probe.reference_loss(model, state.params, reference, reference_batch_size)

    _, after_M = jax.lax.scan(step, state, (tokens_MxL, segments_MxL))
    return after_M


def chunk_group_oracle(state, groups: loss.Batch, reference: references.Reference, *, model, tx,
                       reference_batch_size: int, eval_batch_size: int) -> Array:
    """[B, M] oracle trajectories of the B groups of `groups` (`tokens`, `segments` [B, M, L]),
    each from `state`: reference loss after member m's step minus before any. `eval_batch_size`
    groups run at once (vmapped), the rest scanned."""
    before = probe.reference_loss(model, state.params, reference, reference_batch_size)
    after_BxM = jax.lax.map(
        lambda g: trajectory_losses(state, g["tokens"], g["segments"], reference, model=model,
                                    tx=tx, reference_batch_size=reference_batch_size),
        groups, batch_size=eval_batch_size)
    return after_BxM - before


def group_oracle(prober: probe.Prober, state, read, num_groups: int,
                 reference: references.Reference, reference_batch_size: int,
                 eval_batch_size: int | None = None, progress: bool = True) -> np.ndarray:
    """[G, M] float32 `chunk_group_oracle` of `num_groups` groups, `read(idx_B)` giving their rows
    (`tokens`, `segments` [B, M, L]), `prober.chunk_size` groups per jitted call (split over
    `data` x `fsdp`, the state in the trainer's shardings). Lower is better."""
    trainer = prober.trainer
    mesh = trainer.mesh
    rows = {"tokens": sharding.batch_sharding(mesh), "segments": sharding.batch_sharding(mesh)}
    fn = jax.jit(functools.partial(
        chunk_group_oracle, model=trainer.model, tx=trainer.tx,
        reference_batch_size=reference_batch_size,
        eval_batch_size=eval_batch_size or prober.chunk_size),
        in_shardings=(trainer.state_shardings, rows, sharding.replicated(mesh)),
        out_shardings=sharding.replicated(mesh))
    reference = prober.put(reference)
    out = stream.map_rows(lambda chunk: fn(state, chunk, reference), read, prober.chunk_size,
                          mesh, num_rows=num_groups, progress=progress,
                          desc="group oracle influence")
    return np.asarray(out, np.float32)


def increments(trajectory_GxM) -> np.ndarray:
    """Each member's marginal influence given those before it: the trajectory's differences."""
    trajectory_GxM = np.asarray(trajectory_GxM)
    return np.diff(trajectory_GxM, axis=1, prepend=0.0).astype(trajectory_GxM.dtype)


# ------------------------------------------------------------------------------------------------
# 2. The relational influence model.


def relation_weights(params: dict, unit_GxMxD: Array) -> Array:
    """[G, M, M] relationship weights `alpha * (1 - beta * cos)` between a group's members
    (`unit_GxMxD`: L2-normalised embeddings)."""
    cos_GxMxM = jnp.einsum("gmd,gnd->gmn", unit_GxMxD, unit_GxMxD)
    return params["alpha"] * (1.0 - params["beta"] * cos_GxMxM)


def predicted_increments(params: dict, scores_GxM: Array, unit_GxMxD: Array) -> Array:
    """[G, M] predicted marginal influence of each member given those before it:
    `u_m * mean_{j<m} w_mj` (`u_m = scale * s_m + shift`; member 0: `u_0`)."""
    u_GxM = params["scale"] * scores_GxM + params["shift"]
    m = scores_GxM.shape[-1]
    before_MxM = jnp.tril(jnp.ones((m, m)), -1)
    mean_GxM = (relation_weights(params, unit_GxMxD) * before_MxM).sum(-1) / jnp.maximum(
        jnp.arange(m), 1)
    return u_GxM * jnp.where(jnp.arange(m) == 0, 1.0, mean_GxM)


def predicted_group_influence(params: dict, scores_GxM: Array, unit_GxMxD: Array) -> Array:
    """[G] predicted influence of each group (members in order): the sum of its increments."""
    return predicted_increments(params, scores_GxM, unit_GxMxD).sum(-1)


def _loss(params, scores_GxM, unit_GxMxD, labels_GxM, single_scores_P, single_labels_P):
    """Mean squared error over every group increment and every individual oracle."""
    group = (predicted_increments(params, scores_GxM, unit_GxMxD) - labels_GxM) ** 2
    single = (params["scale"] * single_scores_P + params["shift"] - single_labels_P) ** 2
    return (group.sum() + single.sum()) / (group.size + single.size)


@functools.partial(jax.jit, static_argnames=("steps",))
def _adam(params, data, learning_rate, *, steps: int):
    """`steps` full-batch Adam steps on `_loss`; (params, losses [steps])."""
    tx = optax.adam(learning_rate)

    def step(carry, _):
        params, opt_state = carry
        value, grads = jax.value_and_grad(_loss)(params, *data)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params, losses


def correlations(predicted, oracle) -> dict:
    """Spearman and Pearson of predicted against oracle influences (None where undefined)."""
    def plain(x):
        return None if not np.isfinite(x) else float(x)

    return {"spearman": plain(stats.spearman(predicted, oracle)),
            "pearson": plain(stats.pearson(predicted, oracle))}


def fit(scores_GxM, unit_GxMxD, trajectory_GxM, single_scores_P, single_oracle_P, *, steps: int,
        learning_rate: float, val_fraction: float, seed: int) -> dict:
    """The relational model fit on the oracle groups' increments (a seeded `val_fraction` of the
    groups held out, at least 3) and the individual oracles `single_*` (MATES' probes).

    Labels are divided by their root mean square (`label_scale`); `scale, shift` start at the
    least-squares fit of the individual oracles and first members, `alpha = 1, beta = 0` (the
    sum of calibrated individual predictions). Returns `params` (floats, in label units),
    `label_scale`, `loss` (first and last), and `val`: the held-out groups' Spearman and Pearson
    of the predicted group influence against the oracle's, and of the `baseline` (the sum of the
    members' individual predictions `s`)."""
    scores_GxM, unit_GxMxD = np.asarray(scores_GxM, np.float32), np.asarray(unit_GxMxD, np.float32)
    trajectory_GxM = np.asarray(trajectory_GxM, np.float32)
    single_scores_P = np.asarray(single_scores_P, np.float32)
    single_oracle_P = np.asarray(single_oracle_P, np.float32)
    num = len(scores_GxM)
    num_val = min(max(3, round(val_fraction * num)), num - 1)
    order = np.random.default_rng(seed).permutation(num)
    val, fit_groups = np.sort(order[:num_val]), np.sort(order[num_val:])
    labels_GxM = increments(trajectory_GxM)[fit_groups]
    label_scale = float(np.sqrt(np.mean(np.concatenate([labels_GxM.ravel(), single_oracle_P])
                                        ** 2)))
    label_scale = label_scale if label_scale > 0 else 1.0
    first_s = np.concatenate([scores_GxM[fit_groups, 0], single_scores_P])
    first_y = np.concatenate([labels_GxM[:, 0], single_oracle_P]) / label_scale
    (scale, shift), *_ = np.linalg.lstsq(np.stack([first_s, np.ones_like(first_s)], 1), first_y)
    params = {"scale": scale, "shift": shift, "alpha": 1.0, "beta": 0.0}
    params = {k: jnp.float32(v) for k, v in params.items()}
    data = (scores_GxM[fit_groups], unit_GxMxD[fit_groups], labels_GxM / label_scale,
            single_scores_P, single_oracle_P / label_scale)
    params, losses = _adam(params, data, learning_rate, steps=steps)
    params = {k: float(v) for k, v in params.items()}
    predicted = np.asarray(predicted_group_influence(params, scores_GxM[val], unit_GxMxD[val]))
    oracle = trajectory_GxM[val, -1]
    return {"params": params, "label_scale": label_scale,
            "loss": {"first": float(losses[0]), "last": float(losses[-1])},
            "val": {"groups": int(num_val), **correlations(predicted, oracle),
                    "baseline": correlations(scores_GxM[val].sum(-1), oracle)}}


# ------------------------------------------------------------------------------------------------
# 3. Influence-aware clustering and greedy selection.


def draw_groups(clusters_N, eligible_N, num_groups: int, group_size: int,
                seed: int) -> np.ndarray:
    """[G, M] candidate positions (distinct within a group, in training order) among the
    `eligible_N` ones: the first half of the groups drawn uniformly, the rest each inside one
    uniformly chosen cluster of at least M eligible members (uniformly again if there is none)."""
    clusters_N, eligible_N = np.asarray(clusters_N), np.asarray(eligible_N, bool)
    allowed = np.flatnonzero(eligible_N)
    if len(allowed) < group_size:
        raise ValueError(f"group_mates: {len(allowed)} eligible candidates cannot make a group "
                         f"of {group_size}")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero((clusters_N == c) & eligible_N) for c in np.unique(clusters_N)]
    members = [m for m in members if len(m) >= group_size]
    groups = []
    for g in range(num_groups):
        if g < num_groups // 2 or not members:
            groups.append(rng.choice(allowed, group_size, replace=False))
        else:
            groups.append(rng.choice(members[rng.integers(len(members))], group_size,
                                     replace=False))
    return np.stack(groups).astype(np.int64)


def quotas(sizes_C, k: int) -> np.ndarray:
    """[C] how many of k to pick in each cluster: proportional to its size, rounded by largest
    remainder (ties to the lower cluster), so they sum to k and none exceeds its size."""
    sizes_C = np.asarray(sizes_C, np.int64)
    if not 0 <= k <= sizes_C.sum():
        raise ValueError(f"k must be in [0, {sizes_C.sum()}], got {k}")
    exact = k * sizes_C / sizes_C.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[:k - counts.sum()]] += 1
    return counts


class _Greedy:
    """One cluster's greedy state: each candidate's mean relationship weight to those chosen."""

    def __init__(self, u_N, unit_NxD, alpha: float, beta: float):
        self.u_N, self.unit_NxD = np.asarray(u_N, np.float64), np.asarray(unit_NxD, np.float64)
        self.alpha, self.beta, self.count = alpha, beta, 0
        self.mean_w_N = np.zeros(len(self.u_N))
        self.taken_N = np.zeros(len(self.u_N), bool)

    def best(self) -> tuple[float, int]:
        """(the lowest predicted marginal influence given those chosen, its position)."""
        marginal_N = np.where(self.taken_N, np.inf,
                              self.u_N if self.count == 0 else self.u_N * self.mean_w_N)
        best = int(np.argmin(marginal_N))
        return float(marginal_N[best]), best

    def take(self, position: int) -> None:
        w_N = self.alpha * (1.0 - self.beta * (self.unit_NxD @ self.unit_NxD[position]))
        self.mean_w_N = (self.count * self.mean_w_N + w_N) / (self.count + 1)
        self.taken_N[position], self.count = True, self.count + 1


def greedy(u_N, unit_NxD, k: int, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """k positions chosen one at a time, each the lowest predicted marginal influence
    (`predicted_increments`) given those chosen before it (ties to the lower position); returns
    (positions [k] in the order chosen, their marginals [k])."""
    state, chosen, marginals = _Greedy(u_N, unit_NxD, alpha, beta), [], []
    for _ in range(k):
        marginal, best = state.best()
        state.take(best)
        chosen.append(best)
        marginals.append(marginal)
    return np.array(chosen, np.int64), np.array(marginals)


def select(u_N, unit_NxD, clusters_N, k: int, alpha: float, beta: float,
           budget: str = "cluster") -> tuple[np.ndarray, np.ndarray]:
    """k distinct positions by `greedy` inside each cluster; (positions [k], their predicted
    marginals [k]). `budget` shares k out over the clusters:

    - "cluster" (the paper's): each cluster its `quotas` share, clusters in label order;
    - "global": one pick at a time from the cluster whose next greedy pick has the lowest
      marginal (ties to the lower label), i.e. the greedy on the sum of the clusters' group
      influences, each cluster a group of its own; the clusters' shares follow the model.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget {budget!r} is not one of {BUDGETS}")
    clusters_N, u_N, unit_NxD = np.asarray(clusters_N), np.asarray(u_N), np.asarray(unit_NxD)
    labels, sizes = np.unique(clusters_N, return_counts=True)
    rows = [np.flatnonzero(clusters_N == label) for label in labels]
    if budget == "cluster":
        picks = [greedy(u_N[r], unit_NxD[r], count, alpha, beta)
                 for r, count in zip(rows, quotas(sizes, k), strict=True)]
        return (np.concatenate([r[p] for r, (p, _) in zip(rows, picks, strict=True)]),
                np.concatenate([m for _, m in picks]))
    states = [_Greedy(u_N[r], unit_NxD[r], alpha, beta) for r in rows]
    heap = [(marginal, c, position) for c, (marginal, position) in
            enumerate(state.best() for state in states)]
    heapq.heapify(heap)
    chosen, marginals = [], []
    for _ in range(k):
        marginal, c, position = heapq.heappop(heap)
        states[c].take(position)
        chosen.append(rows[c][position])
        marginals.append(marginal)
        if states[c].count < len(rows[c]):
            marginal, position = states[c].best()
            heapq.heappush(heap, (marginal, c, position))
    return np.array(chosen, np.int64), np.array(marginals)


# ------------------------------------------------------------------------------------------------
# The steps, cached.


def relational_model(folder: str, section: ml_collections.ConfigDict, prober: probe.Prober,
                     state_fn, pool, candidates_N: np.ndarray, scores_N: np.ndarray,
                     emb_NxD: np.ndarray, single_ids: np.ndarray, single_oracle: np.ndarray,
                     reference: references.Reference, seed: int, progress: bool = True) -> dict:
    """Steps 1-2 for the candidates (pool ids `candidates_N`, sorted) with MATES' scores
    `scores_N`, embeddings `emb_NxD` and individual oracles (`single_ids`, `single_oracle`), from
    `state_fn()` (called only if the oracle must be computed) on the target items `reference`:

    `clusters.npz` (balanced k-means, `group_clusters`, of the unit embeddings), `oracle.npz`
    (`group_probes` groups of `group_size`: `positions`, `ids`, `trajectory`, `seconds`) and
    `relational_model.json` (`fit` with `group_fit_steps`, `group_fit_lr`, `group_val_fraction`).
    Returns {"unit", "clusters", "u" (calibrated individual predictions), "fit", "oracle"}."""
    unit_NxD = embed.l2_normalize(emb_NxD)
    clusters = report.cached_npz(os.path.join(folder, "clusters.npz"), lambda: {
        "ids": candidates_N, "clusters": cluster.balanced_kmeans(
            unit_NxD, section.group_clusters,
            seed=config_lib.stream_seed(seed, _CLUSTERS)).assignments_N})["clusters"]

    singles = np.searchsorted(candidates_N, single_ids)
    # Groups only of candidates MATES' influence model was not fit on, so that the held-out
    # correlations of both the relational model and the plain sum are out of sample.
    unseen_N = np.ones(len(candidates_N), bool)
    unseen_N[singles] = False

    def oracle():
        positions = draw_groups(clusters, unseen_N, section.group_probes, section.group_size,
                                config_lib.stream_seed(seed, _GROUPS))
        ids = candidates_N[positions]

        def read(idx):
            rows = pool.rows(ids[idx].ravel())
            return {k: v.reshape(len(idx), section.group_size, -1) for k, v in rows.items()}

        start = time.perf_counter()
        trajectory = group_oracle(prober, state_fn(), read, len(ids), reference,
                                  section.eval_batch_size, progress=progress)
        return {"positions": positions, "ids": ids, "trajectory": trajectory,
                "seconds": np.float64(time.perf_counter() - start)}

    probed = report.cached_npz(os.path.join(folder, "oracle.npz"), oracle)
    positions = probed["positions"]
    fitted = report.cached_json(os.path.join(folder, "relational_model.json"), lambda: fit(
        scores_N[positions], unit_NxD[positions], probed["trajectory"], scores_N[singles],
        single_oracle, steps=section.group_fit_steps, learning_rate=section.group_fit_lr,
        val_fraction=section.group_val_fraction, seed=config_lib.stream_seed(seed, _SPLIT)))
    p = fitted["params"]
    return {"unit": unit_NxD, "clusters": clusters, "u": p["scale"] * scores_N + p["shift"],
            "fit": fitted, "oracle": probed}
