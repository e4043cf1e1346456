"""The selectors a data-selection study compares, each picking k of one set of candidates (pool
rows) with one seed model, and the artifacts they are computed from, each written once into a
folder and reused (a killed run resumes where it was).

`Candidates` holds what the selectors share: the candidates' pool ids, the seed model's train
state, the target items (the `target` role only: no selector reads `target_eval` or `eval`
rows), the encoder, and the cached artifacts (per-sequence losses, first-order influence,
encoder inputs and embeddings, near-duplicates, clusters, MATES' predictions). The per-candidate
computations (losses, first-order influence, encoder embeddings, LESS features) stream to disk
(`jaxsel.stream`) under `rows/<name>-<key>`, keyed by the pool, the candidates, the seed model,
the target items and the settings: resumable chunk by chunk, memory-mapped when read.
`pick(candidates, name, k, seed)` returns the selector's `select.Selection` of pool ids.

- `random`: uniform without replacement;
- `low_loss`: the lowest mean token loss under the seed model (perplexity filtering);
- `semdedup`: near-duplicates of the encoder embeddings removed (`similarity.dedup`), then uniform;
- `nearest`: the most similar to any target item (encoder embeddings; DSIR-like matching);
- `cluster_stratified`: uniform within balanced k-means clusters, spread evenly over them;
- `diverse` (Sam et al. 2025): one representative per cluster of an average-linkage threshold
  clustering cut at k clusters (`similarity.threshold_diverse`);
- `first_order`: the lowest first-order influence on the target items from the seed state;
- `dsir` (Xie et al. 2023): importance resampling towards the target items' hashed n-grams
  (`jaxsel.dsir`), Gumbel-top-k on the log-weights;
- `less` (Xia et al. 2024): the highest cosine of the candidate's Adam update direction with any
  target item's gradient (`jaxsel.less`);
- `minhash`: MinHash-LSH near-duplicates over word shingles removed (`jaxsel.minhash`), then
  uniform;
- `mates` (Yu et al. 2024): oracle -> data influence model -> Gumbel-top-k (`jaxsel.mates`);
- `group_mates` (Yu et al. 2025): group oracles -> a relational model over MATES' predictions
  and the encoder embeddings -> greedy inside small clusters (`jaxsel.group_mates`).
"""

from __future__ import annotations

import functools
import hashlib
import os

import jax
import ml_collections
import numpy as np

from jaxsel import (
    cluster,
    dsir,
    embed,
    group_mates,
    less,
    mates,
    minhash,
    probe,
    references,
    report,
    select,
    similarity,
    stream,
)
from jaxsel import config as config_lib
from jaxsel.data import tokenizer as tokenizer_lib
from jaxsel.model import encoder as encoder_lib

NAMES = ("random", "low_loss", "semdedup", "nearest", "cluster_stratified", "diverse",
         "first_order", "mates", "dsir", "less", "minhash", "group_mates")
ENCODER_NAMES = ("semdedup", "nearest", "cluster_stratified", "diverse", "mates", "group_mates")
# Separate random streams of the study's seed.
_KMEANS, _PROBES, _FIT, _LESS = range(4)
_GROUP_MATES = 16  # group_mates' clusters, oracle groups and validation split.


class Candidates:
    """The candidates (sorted pool ids) of one study and what its selectors compute from them,
    cached under `folder` (`candidates/` for shared artifacts, `arms/<name>/` for one arm's).

    `section` holds the selectors' settings (`eval_batch_size`, `dedup_threshold`, `clusters`,
    `encoder`, `encoder_max_length`, `encoder_windows`, `probe_size`, `probe_chunk`, `fit_*`,
    `predict_batch_size`); `state_fn()` gives the seed model's train state and `model_fn()` its
    identity (its folder in the model pool); `reference` is the target items
    (`runs.Data.items["target"]`).
    """

    def __init__(self, folder: str, section: ml_collections.ConfigDict, pool, ids: np.ndarray,
                 trainer, state_fn, model_fn, reference: references.Reference, seed: int,
                 progress: bool = True):
        self.folder, self.section, self.pool, self.ids = folder, section, pool, ids
        self.trainer, self.state_fn, self.model_fn = trainer, state_fn, model_fn
        self.reference = reference
        self.seed, self.progress = seed, progress
        self.prober = probe.Prober(trainer, chunk_size=section.probe_chunk,
                                   reference_batch_size=section.eval_batch_size)

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def target(self, name: str, **settings) -> stream.Target:
        """Where the per-candidate computation `name` streams to: `rows/<name>-<key>`, keyed by
        the pool, the candidates, the seed model, the target items and `settings`."""
        reference = hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in
                                            jax.tree.leaves(self.reference))).hexdigest()[:16]
        return stream.Target(self.path("rows"), name, {
            "pool": self.pool.key,
            "ids": stream.ids_key(self.ids), "model": os.path.basename(self.model_fn()),
            "reference": reference, **settings})

    @functools.cached_property
    def encoder(self) -> encoder_lib.Encoder:
        return encoder_lib.load_encoder(self.section.encoder or None,
                                        self.section.encoder_max_length)

    def losses(self) -> np.ndarray:
        """Each candidate's mean token loss under the seed model (streamed)."""
        return probe.pool_losses(self.trainer, self.state_fn().params, self.pool,
                                 self.section.eval_batch_size, self.ids, self.progress,
                                 self.target("losses"))

    def first_order(self) -> np.ndarray:
        """Each candidate's first-order influence on the target items from the seed state
        (streamed)."""
        return self.prober.first_order_influence(
            self.state_fn(), self.pool.view(self.ids), self.reference, self.progress,
            self.target("first_order", probe_chunk=self.section.probe_chunk))

    def dsir_weights(self) -> np.ndarray:
        """Each candidate's DSIR importance log-weight towards the target items."""
        return report.cached_npz(self.path("arms", "dsir", "weights.npz"), lambda: {
            "ids": self.ids, "log_weights": dsir.importance_weights(
                {"tokens": np.asarray(self.reference.tokens_RxL),
                 "segments": np.asarray(self.reference.segments_RxL)},
                self.pool.view(self.ids), self.section.dsir_buckets,
                self.section.dsir_smoothing)})["log_weights"]

    def less_scores(self) -> dict[str, np.ndarray]:
        """LESS' `scores` of the candidates from the seed state and its `zero_gradients`."""
        def compute():
            projection = probe.GradProjection(self.section.less_dims, normalize=True,
                                              seed=config_lib.stream_seed(self.seed, _LESS))
            scores, zero = less.scores(self.prober, self.state_fn(), self.pool.view(self.ids),
                                       self.reference, projection, self.progress,
                                       self.target("less_features", dims=self.section.less_dims,
                                                   seed=self.seed))
            return {"ids": self.ids, "scores": scores, "zero_gradients": np.int64(zero)}

        return report.cached_npz(self.path("arms", "less", "scores.npz"), compute)

    def minhash_kept(self) -> dict[str, np.ndarray]:
        """The candidate positions MinHash-LSH dedup keeps (`kept`) and its `empty` texts."""
        def compute():
            rows = self.pool.rows(self.ids)
            texts = embed.decode_sequences(rows["tokens"], rows["segments"], tokenizer_lib
                                           .load_tokenizer(self.pool.tokenizer_path))
            kept, info = minhash.dedup(texts, self.section.minhash_threshold,
                                       self.section.minhash_shingle)
            return {"kept": kept, "empty": np.int64(info["empty"])}

        return report.cached_npz(self.path("arms", "minhash", "kept.npz"), compute)

    def encoder_inputs(self) -> dict[str, np.ndarray]:
        """The candidates decoded and tokenised for the encoder, `encoder_windows` windows long
        (streamed): `ids`, `lengths`."""
        max_tokens = mates.encoder_tokens(self.section)
        return self._encoder_inputs(self.pool.view(self.ids), max_tokens, self.target(
            "encoder_inputs", encoder=self.section.encoder, max_tokens=max_tokens))

    def _encoder_inputs(self, rows, max_tokens: int,
                        to: stream.Target | None = None) -> dict[str, np.ndarray]:
        ids, lengths = embed.encoder_inputs(
            self.encoder, rows["tokens"], rows["segments"],
            tokenizer_lib.load_tokenizer(self.pool.tokenizer_path), progress=self.progress,
            max_tokens=max_tokens, to=to)
        return {"ids": ids, "lengths": lengths}

    def embeddings(self) -> dict[str, np.ndarray]:
        """Encoder embeddings (one window) of the candidates (`candidates`, aligned with `ids`,
        streamed) and of the target items' rows (`target`)."""
        window, batch = self.section.encoder_max_length, self.section.eval_batch_size

        def target():
            inputs = self._encoder_inputs({"tokens": np.asarray(self.reference.tokens_RxL),
                                           "segments": np.asarray(self.reference.segments_RxL)},
                                          window)
            return {"target": embed.encoder_embed(self.encoder, inputs["ids"], inputs["lengths"],
                                                  batch, progress=False)}

        inputs = self.encoder_inputs()
        candidates = embed.encoder_embed(
            self.encoder, inputs["ids"][:, :window], np.minimum(inputs["lengths"], window),
            batch, progress=self.progress,
            to=self.target("embeddings", encoder=self.section.encoder, window=window))
        return {"ids": self.ids, "candidates": candidates,
                "target": report.cached_npz(self.path("candidates", "target_embeddings.npz"),
                                            target)["target"]}

    def kept(self) -> np.ndarray:
        """The candidate positions `similarity.dedup` keeps at `dedup_threshold`."""
        return report.cached_npz(self.path("arms", "semdedup", "kept.npz"), lambda: {
            "kept": similarity.dedup(self.embeddings()["candidates"],
                                     self.section.dedup_threshold)})["kept"]

    def clusters(self) -> np.ndarray:
        """Balanced k-means clusters (`section.clusters`) of the L2-normalised embeddings."""
        return report.cached_npz(self.path("arms", "cluster_stratified", "clusters.npz"), lambda: {
            "ids": self.ids, "clusters": cluster.balanced_kmeans(
                embed.l2_normalize(self.embeddings()["candidates"]), self.section.clusters,
                seed=config_lib.stream_seed(self.seed, _KMEANS)).assignments_N})["clusters"]

    def mates(self) -> tuple[np.ndarray, dict]:
        """MATES' scores of every candidate from the seed state (`mates.predicted_influence`)."""
        return mates.predicted_influence(
            self.path("arms", "mates"), self.section, self.prober, self.encoder, self.state_fn,
            self.pool, self.ids, self.encoder_inputs(), self.reference,
            config_lib.stream_seed(self.seed, _PROBES), config_lib.stream_seed(self.seed, _FIT))

    def group_mates(self) -> dict:
        """Group-MATES' clusters, group oracles and relational model over MATES' predictions and
        the encoder embeddings, under `arms/group_mates/` (`group_mates.relational_model`)."""
        scores, info = self.mates()
        return group_mates.relational_model(
            self.path("arms", "group_mates"), self.section, self.prober, self.state_fn,
            self.pool, self.ids, scores, self.embeddings()["candidates"], info["probed_ids"],
            info["oracle"], self.reference, config_lib.stream_seed(self.seed, _GROUP_MATES),
            self.progress)


def pick(candidates: Candidates, name: str, k: int, seed: int) -> select.Selection:
    """Selector `name`'s k candidates as a `select.Selection` of pool ids (`params` records the
    selector's settings and `selector`, `candidates`)."""
    if name not in NAMES:
        raise ValueError(f"selector {name!r} is not one of {', '.join(NAMES)}")
    c, n = candidates, len(candidates.ids)
    chosen = _PICKERS[name](c, k, seed)
    return select.Selection(c.ids[chosen.ids], chosen.method, len(c.pool),
                            {**chosen.params, "selector": name, "candidates": n}, chosen.scores)


def _dedup_then_random(kept: np.ndarray, k: int, seed: int, num: int, name: str,
                       threshold_key: str, params: dict) -> select.Selection:
    """k of the `kept` candidate positions, uniformly."""
    config_lib.check(k <= len(kept), "compare.select_size",
                     f"{k} exceeds the {len(kept)} candidates {name} keeps at "
                     f"compare.{threshold_key}={params['threshold']}")
    drawn = select.random_ids(len(kept), k, seed)
    return select.Selection(kept[drawn.ids], "dedup_random", num,
                            dict(drawn.params, **params, kept=len(kept)))


def _semdedup(c: Candidates, k: int, seed: int) -> select.Selection:
    return _dedup_then_random(c.kept(), k, seed, len(c.ids), "semdedup", "dedup_threshold",
                              {"threshold": c.section.dedup_threshold})


def _minhash(c: Candidates, k: int, seed: int) -> select.Selection:
    kept = c.minhash_kept()
    return _dedup_then_random(kept["kept"], k, seed, len(c.ids), "minhash",
                              "minhash_threshold", {
                                  "threshold": c.section.minhash_threshold,
                                  "shingle": c.section.minhash_shingle,
                                  "empty": int(kept["empty"])})


def _less(c: Candidates, k: int, seed: int) -> select.Selection:
    scored = c.less_scores()
    chosen = select.top_k(scored["scores"], k, lower_is_better=False)
    return select.Selection(chosen.ids, "less_top_k", len(c.ids), dict(
        chosen.params, dims=c.section.less_dims,
        zero_gradients=int(scored["zero_gradients"])), chosen.scores)


def _mates(c: Candidates, k: int, seed: int) -> select.Selection:
    scores, info = c.mates()
    chosen = select.gumbel_top_k(scores, k, seed, c.section.temperature)
    return select.Selection(chosen.ids, chosen.method, len(c.ids), dict(
        chosen.params, val_spearman=info["val_spearman"], probe_size=info["probe_size"]),
        chosen.scores)


def _group_mates(c: Candidates, k: int, seed: int) -> select.Selection:
    model = c.group_mates()
    fit, section = model["fit"], c.section
    positions, marginals = group_mates.select(model["u"], model["unit"], model["clusters"], k,
                                              fit["params"]["alpha"], fit["params"]["beta"],
                                              section.group_budget)
    val = fit["val"]
    return select.Selection(positions, "group_mates_greedy", len(c.ids), dict(
        k=k, seed=seed, group_size=section.group_size, group_probes=section.group_probes,
        clusters=section.group_clusters, budget=section.group_budget, **fit["params"],
        val_groups=val["groups"],
        val_spearman=val["spearman"], val_pearson=val["pearson"],
        baseline_spearman=val["baseline"]["spearman"],
        baseline_pearson=val["baseline"]["pearson"]), marginals)


_PICKERS = {
    "random": lambda c, k, seed: select.random_ids(len(c.ids), k, seed),
    "low_loss": lambda c, k, seed: select.top_k(c.losses(), k),
    "semdedup": _semdedup,
    "nearest": lambda c, k, seed: similarity.nearest_to_target(
        c.embeddings()["candidates"], c.embeddings()["target"], k),
    "cluster_stratified": lambda c, k, seed: select.cluster_stratified(c.clusters(), k, seed),
    "diverse": lambda c, k, seed: similarity.threshold_diverse(c.embeddings()["candidates"], k),
    "first_order": lambda c, k, seed: select.top_k(c.first_order(), k),
    "mates": _mates,
    "dsir": lambda c, k, seed: select.gumbel_top_k(c.dsir_weights(), k, seed, 1.0,
                                                   lower_is_better=False),
    "less": _less,
    "minhash": _minhash,
    "group_mates": _group_mates,
}
