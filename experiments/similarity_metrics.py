"""Similarity metrics for data selection (Sam et al., 2025, arXiv 2502.02494).

Which embedding of pretraining sequences is a good similarity metric for data selection? A good
one puts sequences that an LM finds equally hard (similar loss) close together, and picks diverse
data when selection spreads over its clusters. This experiment measures both:

1. two LMs, named separately so the comparison is not circular: the `loss_model`, whose
   per-sequence losses the embeddings should explain, and the `embedding_model`, whose input
   token embeddings (`lm_token_mean`) and final hidden states (`lm_output_mean`) are embeddings
   under test. Each is pretrained here for its `steps` on its own seeded `fraction` of the train
   pool with its own `seed`, or taken from a finished run (`init_from`); by default they are two
   runs with other seeds on disjoint rows;
2. an analysis sample of `analysis_size` rows from the rest of the pool, and each row's mean
   token loss under the loss model (`probe.pool_losses`);
3. every embedding of `similarity.embeddings` (the embedding model's `lm_token_mean` /
   `lm_output_mean`, the off-the-shelf `encoder`, `ngram_hash`) of the sample, standardised,
   PCA-projected to `pca_dims` and L2-normalised (fitted on the sample), clustered by balanced
   k-means for each K of `num_clusters`; of each clustering:
   - the variance reduction of the losses in both forms, pooled (size-weighted,
     `stats.variance_reduction_pooled`) and unweighted (the plain mean of the per-cluster
     variances, `stats.variance_reduction_unweighted`): the share of the loss variance the
     clusters explain. Higher means the metric groups sequences of similar loss;
   - the purity of the clusters with respect to the domains (`stats.purity`);
   each with a 95% interval (`cluster_metrics`). Two reference rows: `random`, a seeded random
   assignment into K clusters of equal sizes (the floor), and `domain labels`, the domains as
   clusters;
4. diversity-based selection: `candidates` rows (the first rows of the same draw as the sample,
   so one holds the other and embeddings are computed once) embedded with `select_embedding`
   (PCA fitted on the candidates). Three arms pick `select_size` of them: `diverse` (Sam et al.:
   `similarity.threshold_diverse`, one representative per cluster of an average-linkage threshold
   clustering over the `select_neighbors`-nearest-neighbour graph, epsilon set so that there are
   `select_size` clusters), `cluster_stratified` (as evenly as possible over `select_clusters`
   balanced k-means clusters; a stratified sample, not the paper's method) and `random`. A fresh
   LM is pretrained on each for `select_steps` steps and evaluated on the held-out `eval` rows.

Writes into --workdir: config.json, report.json, report.md, variance_reduction.png, and
- `loss_model/`, `embedding_model/`: the two LMs' `evaluation.json` (unless `init_from`);
- `losses.npz`: the analysis sample's `ids`, `losses` (under the loss model) and `domains`;
- `embeddings/<name>.npz`: post-processed embeddings, `analysis` [analysis_size, pca_dims] (rows
  of `losses.npz`'s ids) and, for the selection embedding, `candidates`;
- `clusters/<name>.npz`: `k<K>`, the cluster of each sample row (`random`: the baseline);
- `selection/clusters.npz`: the candidates' `ids`, their balanced k-means clusters (`kmeans`),
  their threshold clusters (`threshold`, the clusters `diverse` represents) and the cut's params
  (`threshold_params`, JSON: its `epsilon`, edges, pair coverage);
- `arms/<arm>/`: `selection.json` and its model's `evaluation.json`.
The LMs' training runs are models of the model pool (`runs.model`, default `<workdir>/models`).
Every artifact is written atomically once (by process 0) and reused, so a killed run resumes
where it was. The report is drawn by `experiments.similarity_report`.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, logging

from experiments import similarity_report as report_lib
from jaxsel import (
    checkpoint,
    cluster,
    embed,
    files,
    launch,
    probe,
    report,
    runs,
    select,
    similarity,
    stats,
    stream,
    train,
)
from jaxsel import config as config_lib
from jaxsel.data import tokenizer as tokenizer_lib
from jaxsel.model import encoder as encoder_lib

EMBEDDINGS = ("lm_token_mean", "lm_output_mean", "encoder", "ngram_hash")
LM_EMBEDDINGS = ("lm_token_mean", "lm_output_mean")
MODELS = ("loss_model", "embedding_model")
RANDOM, DOMAINS = report_lib.RANDOM, report_lib.DOMAINS  # The clustering table's reference rows.
ARMS = ("diverse", "cluster_stratified", "random")
# Separate random streams of config.seed.
_SPLIT, _PCA, _KMEANS, _BASELINE, _BOOTSTRAP, _SELECT_KMEANS, _SELECT = range(7)


# ------------------------------------------------------------------------------------------------
# Config.


def parse_embeddings(names) -> tuple[str, ...]:
    """`similarity.embeddings`: known names, each once."""
    return config_lib.check_names(names, EMBEDDINGS, "similarity.embeddings")


def parse_num_clusters(ks) -> tuple[int, ...]:
    """`similarity.num_clusters`: distinct cluster counts K >= 2, e.g. (8, 32)."""
    ks = config_lib.check_tuple(ks, int, "similarity.num_clusters")
    config_lib.check(bool(ks) and min(ks) >= 2 and len(set(ks)) == len(ks),
                     "similarity.num_clusters", f"{ks}: each K must be >= 2 and appear once")
    return ks


def models_used(config: ml_collections.ConfigDict) -> list[str]:
    """The LMs the run needs: the loss model, and the embedding model when an LM embedding is
    measured or selects."""
    s = config.similarity
    used = set(parse_embeddings(s.embeddings)) | {s.select_embedding}
    return ["loss_model"] + (["embedding_model"] if used & set(LM_EMBEDDINGS) else [])


def trained_here(config: ml_collections.ConfigDict, role: str) -> bool:
    return role in models_used(config) and not config.similarity[role].init_from


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`config_lib.validate` and the similarity section; every message names the key. What
    depends on the pool's size is checked by `split_ids`, the encoder's width on loading it."""
    config_lib.validate(config, num_devices)
    s, check = config.similarity, config_lib.check
    check(config.train.stop_at == 0, "train.stop_at", "is not used here; leave it 0")
    for key in ("init_from", "continue_from"):
        check(not config[key], key, "is not used here; set similarity.loss_model.init_from or "
              "similarity.embedding_model.init_from to take a pretrained LM")
    names = parse_embeddings(s.embeddings)
    check(s.select_embedding in EMBEDDINGS, "similarity.select_embedding",
          f"{s.select_embedding!r} is not one of {', '.join(EMBEDDINGS)}")
    for role in MODELS:
        m, key = s[role], f"similarity.{role}"
        check(0 <= m.fraction < 1, f"{key}.fraction", f"must be in [0, 1), got {m.fraction}")
        check(m.fraction > 0 or not trained_here(config, role), f"{key}.fraction",
              f"must be > 0: the {role.replace('_', ' ')} is trained on this share (or set "
              f"{key}.init_from)")
        check(m.steps >= 1, f"{key}.steps", f"must be >= 1, got {m.steps}")
        check(m.seed >= 0, f"{key}.seed", f"must be >= 0, got {m.seed}")
        check(not m.init_from or (files.path(m.init_from) / "checkpoints").is_dir(),
              f"{key}.init_from", f"{m.init_from!r} is not a run folder with checkpoints/")
    fractions = s.loss_model.fraction + s.embedding_model.fraction
    check(fractions < 1, "similarity.embedding_model.fraction",
          f"similarity.loss_model.fraction + similarity.embedding_model.fraction = {fractions} "
          "leaves no rows to analyse; keep it < 1")
    ks = parse_num_clusters(s.num_clusters)
    for key in ("analysis_size", "candidates", "select_clusters", "select_size",
                "select_neighbors", "select_steps", "pca_dims", "ngram_buckets",
                "eval_batch_size"):
        check(s[key] >= 1, f"similarity.{key}", f"must be >= 1, got {s[key]}")
    check(s.encoder_max_length >= 2, "similarity.encoder_max_length",
          f"must be >= 2, got {s.encoder_max_length}")
    check(s.bootstrap >= 0, "similarity.bootstrap", f"must be >= 0 (0: no CIs), got {s.bootstrap}")
    check(s.analysis_size >= 2, "similarity.analysis_size", f"must be >= 2, got {s.analysis_size}")
    check(max(ks) <= s.analysis_size, "similarity.num_clusters",
          f"K={max(ks)} exceeds the similarity.analysis_size={s.analysis_size} sample rows")
    check(s.select_clusters <= s.candidates, "similarity.select_clusters",
          f"{s.select_clusters} exceeds the similarity.candidates={s.candidates} rows")
    check(s.select_size <= s.candidates, "similarity.select_size",
          f"{s.select_size} exceeds the similarity.candidates={s.candidates} rows")
    check(s.pca_dims <= min(s.analysis_size, s.candidates), "similarity.pca_dims",
          f"{s.pca_dims} exceeds the rows a PCA is fitted on (similarity.analysis_size="
          f"{s.analysis_size}, similarity.candidates={s.candidates})")
    used = set(names) | {s.select_embedding}
    if used & set(LM_EMBEDDINGS):
        check(s.pca_dims <= config.model.d_model, "similarity.pca_dims",
              f"{s.pca_dims} exceeds the LM embeddings' width model.d_model="
              f"{config.model.d_model}")
    if "ngram_hash" in used:
        check(s.pca_dims <= s.ngram_buckets, "similarity.pca_dims",
              f"{s.pca_dims} exceeds similarity.ngram_buckets={s.ngram_buckets}")
    check(s.eval_batch_size % jax.process_count() == 0, "similarity.eval_batch_size",
          f"{s.eval_batch_size} is not divisible by the {jax.process_count()} processes")


def model_config(config: ml_collections.ConfigDict, steps: int,
                 seed: int) -> ml_collections.ConfigDict:
    """The training config of one model trained from scratch for `steps` steps with `seed`
    (its initialisation and the order it visits its rows)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.steps, c.seed, c.init_from = steps, seed, ""
    return c


# ------------------------------------------------------------------------------------------------
# Pieces: the rows, the baseline, the metrics.


def split_ids(config: ml_collections.ConfigDict, pool_size: int) -> dict[str, np.ndarray]:
    """Sorted train-pool rows of one seeded permutation: `loss_model` (its first
    `loss_model.fraction`), `embedding_model` (the next `embedding_model.fraction`), and from the
    rest `candidates` (its first `candidates` rows) and `analysis` (its first `analysis_size`
    rows), so the smaller of the two is a subset of the larger."""
    s, check = config.similarity, config_lib.check
    order = np.random.default_rng([config.seed, _SPLIT]).permutation(pool_size)
    cuts = np.cumsum([int(round(s[role].fraction * pool_size)) for role in MODELS])
    for role, share in zip(MODELS, np.diff(cuts, prepend=0), strict=True):
        check(share >= 1 or not trained_here(config, role), f"similarity.{role}.fraction",
              f"{s[role].fraction} of {pool_size} train rows leaves the "
              f"{role.replace('_', ' ')} no data")
    rest = order[cuts[-1]:]
    for key in ("analysis_size", "candidates"):
        check(s[key] <= len(rest), f"similarity.{key}",
              f"{s[key]} exceeds the {len(rest)} train rows outside the models' shares (the "
              f"train pool has {pool_size})")
    return dict(loss_model=np.sort(order[:cuts[0]]),
                embedding_model=np.sort(order[cuts[0]:cuts[1]]),
                analysis=np.sort(rest[:s.analysis_size]), candidates=np.sort(rest[:s.candidates]))


# ------------------------------------------------------------------------------------------------
# The experiment.


class Experiment:
    """The pools, the rows, the two LMs and the encoder of one run; each method computes one
    artifact once (or reads it back) and returns it."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir, s = config, workdir, config.similarity
        self.names = parse_embeddings(s.embeddings)
        self.ks = parse_num_clusters(s.num_clusters)
        self.data = runs.load_data(config)
        self.train_pool = self.data.train_pool
        self.ids = split_ids(config, len(self.train_pool))
        self.trainer = train.Trainer(config)  # One architecture: the LMs' params load into it.
        self.progress = jax.process_index() == 0
        self.encoder = None
        if "encoder" in set(self.names) | {s.select_embedding}:
            self.encoder = encoder_lib.load_encoder(s.encoder or None, s.encoder_max_length)
            width = self.encoder.config.hidden_size
            config_lib.check(s.pca_dims <= width, "similarity.pca_dims",
                             f"{s.pca_dims} exceeds the encoder's width {width}")
        self.models = runs.model_pool(config, workdir)
        self._params, self._models = {}, {}

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def folder(self, role: str) -> str:
        """Where LM `role`'s checkpoints are: its `init_from`, or its folder in the model
        pool."""
        return self.config.similarity[role].init_from or self.model(role)["dir"]

    def model(self, role: str) -> dict:
        """What the report says of the LM `role`: for one trained here (once, in the model
        pool) its training record and held-out evaluation (once, in `role/`), its `seed` and
        train share (`share_fraction`); for `init_from`, its folder, the seed its config.json
        (an experiment's workdir) or model.json (a model of the pool) records (None: neither)
        and the step of its latest checkpoint."""
        if role in self._models:
            return self._models[role]
        m = self.config.similarity[role]
        if m.init_from:
            seed = None
            config_path = os.path.join(m.init_from, "config.json")
            model_path = os.path.join(m.init_from, runs.MODEL_FILE)
            if files.path(config_path).exists():
                seed = report.read_json(config_path).get("seed")
            elif files.path(model_path).exists():
                seed = report.read_json(model_path)["identity"]["seed"]
            mngr = checkpoint.manager(m.init_from, read_only=True)
            steps = mngr.latest_step()
            mngr.close()
            record = dict(dir=m.init_from, trained_here=False, seed=seed, steps=steps)
        else:
            config = model_config(self.config, m.steps, m.seed)
            trained = runs.model(config, self.data, self.ids[role], pool=self.models, name=role)
            record = {**trained, **runs.evaluation(config, self.data, trained, self.path(role)),
                      "trained_here": True, "seed": m.seed, "share_fraction": m.fraction}
        self._models[role] = record
        return record

    def params(self, role: str):
        """The params of LM `role` (after `model(role)` has trained it)."""
        if role not in self._params:
            self._params[role] = checkpoint.load_params(self.folder(role),
                                                        self.trainer.abstract_params())
        return self._params[role]

    def target(self, name: str, ids: np.ndarray, role: str = "", **settings) -> stream.Target:
        """Where a per-row computation `name` over train-pool rows `ids` (under LM `role`)
        streams to, resumable: `rows/<name>-<key>`, keyed by the pool, the rows, the model and
        the settings."""
        model = self.folder(role) if role else ""
        return stream.Target(self.path("rows"), name, {
            "pool": self.train_pool.key,
            "ids": stream.ids_key(ids), "model": model,
            **settings})

    def losses(self) -> dict[str, np.ndarray]:
        """The analysis sample: `ids`, `losses` (mean token loss under the loss model),
        `domains`."""
        def compute():
            ids = self.ids["analysis"]
            losses = probe.pool_losses(self.trainer, self.params("loss_model"), self.train_pool,
                                       self.config.similarity.eval_batch_size, ids,
                                       self.progress, self.target("losses", ids, "loss_model"))
            return {"ids": ids, "losses": losses,
                    "domains": np.asarray(self.train_pool.domains)[ids]}

        return report.cached_npz(self.path("losses.npz"), compute)

    def embeddings(self, name: str) -> dict[str, np.ndarray]:
        """Post-processed embeddings `name` of the analysis sample (`analysis`) and, for the
        selection embedding, of the candidates (`candidates`), each with its own PCA."""
        s = self.config.similarity
        parts = ["analysis"] + (["candidates"] if name == s.select_embedding else [])

        def compute():
            union = np.union1d(self.ids["analysis"], self.ids[parts[-1]])
            raw_NxD = self.raw_embeddings(name, union)
            out = {}
            for part in parts:
                rows = raw_NxD[np.searchsorted(union, self.ids[part])]
                post = embed.fit_postprocess(rows, s.pca_dims, sample_size=len(rows),
                                             seed=config_lib.stream_seed(self.config.seed, _PCA))
                out[part] = embed.apply_postprocess(post, rows, progress=False)
            return out

        return report.cached_npz(self.path("embeddings", f"{name}.npz"), compute)

    def raw_embeddings(self, name: str, ids: np.ndarray) -> np.ndarray:
        """`[len(ids), d]` embeddings `name` of train-pool rows `ids` (the LM embeddings under
        the embedding model)."""
        s, rows = self.config.similarity, self.train_pool.rows(ids)
        tokens, segments = rows["tokens"], rows["segments"]
        logging.info("embedding %d sequences: %s", len(ids), name)
        if name == "lm_token_mean":
            return embed.lm_token_mean(self.params("embedding_model"), tokens, segments,
                                       progress=self.progress,
                                       to=self.target(name, ids, "embedding_model"))
        if name == "lm_output_mean":
            return embed.lm_output_mean(self.trainer.model, self.params("embedding_model"),
                                        tokens, segments, s.eval_batch_size, self.progress,
                                        to=self.target(name, ids, "embedding_model"))
        if name == "ngram_hash":
            return embed.ngram_hash(tokens, segments, s.ngram_buckets, progress=self.progress,
                                    to=self.target(name, ids, buckets=s.ngram_buckets))
        ids_NxM, lengths_N = embed.encoder_inputs(
            self.encoder, tokens, segments,
            tokenizer_lib.load_tokenizer(self.train_pool.tokenizer_path), progress=self.progress,
            to=self.target("encoder_inputs", ids, encoder=str(self.encoder.folder),
                           max_length=self.encoder.max_length))
        return embed.encoder_embed(self.encoder, ids_NxM, lengths_N, s.eval_batch_size,
                                   progress=self.progress, to=self.target(
                                       name, ids, encoder=str(self.encoder.folder),
                                       max_length=self.encoder.max_length))

    def clusters(self, name: str) -> dict[int, np.ndarray]:
        """K -> the cluster of each sample row: balanced k-means of embedding `name`, or for
        `RANDOM` the equal-sized random baseline."""
        n, seed = self.config.similarity.analysis_size, self.config.seed

        def compute():
            if name == RANDOM:
                return {f"k{k}": stats.random_clusters(
                    n, k, config_lib.stream_seed(seed, _BASELINE, k)) for k in self.ks}
            x_NxD = self.embeddings(name)["analysis"]
            index = EMBEDDINGS.index(name)
            return {f"k{k}": cluster.balanced_kmeans(
                x_NxD, k, seed=config_lib.stream_seed(seed, _KMEANS, index, k)).assignments_N
                for k in self.ks}

        saved = report.cached_npz(self.path("clusters", f"{name}.npz"), compute)
        return {k: saved[f"k{k}"] for k in self.ks}

    def selection_clusters(self) -> dict[str, np.ndarray]:
        """The candidates' `ids`, their balanced k-means clusters (`kmeans`, `select_clusters`
        of them) and their threshold clusters cut at `select_size` (`threshold`, from
        `similarity.threshold_clusters`, with its params as JSON in `threshold_params`)."""
        s = self.config.similarity

        def compute():
            x_NxD = self.embeddings(s.select_embedding)["candidates"]
            kmeans = cluster.balanced_kmeans(
                x_NxD, s.select_clusters,
                seed=config_lib.stream_seed(self.config.seed, _SELECT_KMEANS)).assignments_N
            labels, params = similarity.threshold_clusters(
                x_NxD, s.select_size, s.select_neighbors, progress=self.progress)
            return {"ids": self.ids["candidates"], "kmeans": kmeans, "threshold": labels,
                    "threshold_params": np.array(json.dumps(params))}

        return report.cached_npz(self.path("selection", "clusters.npz"), compute)

    def selection(self, arm: str) -> select.Selection:
        """The arm's selection of `select_size` candidates (pool ids), saved once."""
        path = self.path("arms", arm, "selection.json")
        if files.path(path).exists():
            return select.Selection.load(path)
        s, candidates = self.config.similarity, self.ids["candidates"]
        seed = config_lib.stream_seed(self.config.seed, _SELECT, ARMS.index(arm))
        params = {"embedding": s.select_embedding}
        if arm == "diverse":
            clusters = self.selection_clusters()
            chosen = similarity.one_per_cluster(
                self.embeddings(s.select_embedding)["candidates"], clusters["threshold"],
                s.select_size, json.loads(str(clusters["threshold_params"])))
        elif arm == "cluster_stratified":
            chosen = select.cluster_stratified(self.selection_clusters()["kmeans"],
                                               s.select_size, seed)
        else:
            chosen, params = select.random_ids(len(candidates), s.select_size, seed), {}
        selection = select.Selection(candidates[chosen.ids], chosen.method, len(self.train_pool),
                                     {**chosen.params, **params, "candidates": len(candidates)},
                                     chosen.scores)
        if jax.process_index() == 0:
            selection.save(path)
        return selection

    def train_arm(self, arm: str) -> dict:
        """A fresh LM (seed `config.seed`) trained on the arm's selection for `select_steps`
        steps (once, in the model pool), evaluated on the held-out `eval` rows (once, in
        `arms/<arm>/`); with the selection's domains and how many threshold and k-means
        clusters of the candidates it covers."""
        s, selection = self.config.similarity, self.selection(arm)
        config = model_config(self.config, s.select_steps, self.config.seed)
        trained = runs.model(config, self.data, selection.ids, pool=self.models,
                             name=f"arm {arm}")
        clusters = self.selection_clusters()
        rows = np.searchsorted(clusters["ids"], selection.ids)
        return {**trained,
                **runs.evaluation(config, self.data, trained, self.path("arms", arm)),
                "arm": arm, "method": selection.method, "selection": selection.params,
                "domains": self.train_pool.domain_counts(selection.ids),
                "clusters_covered": {name: int(np.unique(clusters[name][rows]).size)
                                     for name in ("threshold", "kmeans")}}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Every stage (each resumed from what is saved), then the report's numbers."""
    s = config.similarity
    experiment = Experiment(config, workdir)
    models = {role: experiment.model(role) for role in models_used(config)}
    sample = experiment.losses()
    losses_N, domains_N = sample["losses"], sample["domains"]
    # One resampling seed: every clustering is resampled on the same draws of rows (paired).
    seed = config_lib.stream_seed(config.seed, _BOOTSTRAP)

    def row(name: str, clusters_N: np.ndarray) -> dict:
        interval = "permutation" if name == RANDOM else "bootstrap"
        return {"embedding": name, **stats.cluster_metrics(losses_N, domains_N, clusters_N,
                                                     s.bootstrap, seed, interval)}

    rows = [row(DOMAINS, domains_N)]
    for name in [RANDOM, *experiment.names]:
        clusters = experiment.clusters(name)
        rows += [row(name, clusters[k]) for k in experiment.ks]
        logging.info("%s: variance reduction (pooled) %s", name, {
            k: round(r["variance_reduction_pooled"], 4) for k, r in
            zip(experiment.ks, rows[-len(experiment.ks):], strict=True)})
    baseline = experiment.clusters(RANDOM)
    arms = {arm: experiment.train_arm(arm) for arm in ARMS}
    diverse = experiment.selection("diverse").params
    names = experiment.train_pool.domain_names
    return {
        "models": models,
        "splits": experiment.data.splits(),
        "sample": {"size": len(losses_N), "loss_mean": float(losses_N.mean()),
                   "loss_std": float(losses_N.std()),
                   "domains": {names[d]: int(c) for d, c in
                               zip(*np.unique(domains_N, return_counts=True), strict=True)}},
        "embeddings": experiment.names,
        "num_clusters": experiment.ks,
        "resample_seed": seed,
        "clustering": rows,
        "random_expected_variance_reduction": {
            str(k): stats.expected_random_variance_reduction(np.bincount(baseline[k]))
            for k in experiment.ks},
        "selection": {
            "embedding": s.select_embedding, "candidates": int(len(experiment.ids["candidates"])),
            "size": s.select_size, "steps": s.select_steps, "kmeans_clusters": s.select_clusters,
            "threshold": {"epsilon": diverse["epsilon"], "num_clusters": diverse["num_clusters"],
                          "neighbors": s.select_neighbors, "edges": diverse["num_edges"]},
            "arms": arms,
            "perplexity_gain": {arm: arms["random"]["eval"]["all"] - arms[arm]["eval"]["all"]
                                for arm in ARMS if arm != "random"}},
    }


STUDY = launch.Study(validate, run, report_lib.to_markdown,
                     {"variance_reduction.png": report_lib.plot_variance_reduction},
                     launch.Headline(r"selection\.arms\.(?P<arm>[^.]+)\.eval\.all",
                                     "held-out perplexity", "selection_perplexity.png"))


def main(argv):
    del argv
    launch.main(STUDY)


if __name__ == "__main__":
    app.run(main)
