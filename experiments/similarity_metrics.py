"""Similarity metrics for data selection (Sam et al., 2025, arXiv 2502.02494).

Which embedding of pretraining sequences is a good similarity metric for data selection? A good
one puts sequences that an LM finds equally hard (similar loss) close together, and picks diverse
data when selection spreads over its clusters. This experiment measures both:

1. a proxy LM: the tiny LM pretrained for `similarity.proxy_steps` steps on a seeded share
   (`proxy_fraction`) of the train pool, or `config.init_from`'s params (a pretrained proxy);
2. an analysis sample of `analysis_size` rows from the rest of the pool, and each row's mean
   token loss under the proxy (`probe.pool_losses`): the pretraining loss whose structure a good
   embedding should explain;
3. every embedding of `similarity.embeddings` (the proxy's `lm_token_mean` / `lm_output_mean`,
   the off-the-shelf `encoder`, `ngram_hash`) of the sample, standardised, PCA-projected to
   `pca_dims` and L2-normalised (fitted on the sample), clustered by balanced k-means for each K
   of `num_clusters`; of each clustering:
   - the variance reduction of the losses, `1 - mean within-cluster variance / total variance`
     (`stats.variance_reduction`): the share of the loss variance the clusters explain. Higher
     means the metric groups sequences of similar loss;
   - the purity of the clusters with respect to the domains (`stats.purity`): the share of rows
     whose domain is the majority domain of their cluster;
   both with 95% percentile bootstrap CIs over the sample's rows (the clusters held fixed).
   Two reference rows: `random`, a seeded random assignment into K clusters of equal sizes (the
   floor: its expected variance reduction is `(K - 1) / (N - 1)` whatever the sizes), and
   `domain labels`, the domains themselves as clusters;
4. diversity-based selection: `candidates` rows (the first rows of the same draw as the sample,
   so one holds the other and embeddings are computed once) embedded with `select_embedding`
   (PCA fitted on the candidates), cut into `select_clusters` balanced clusters, and
   `select_size` of them picked by `select.cluster_diverse` (as evenly as possible over the
   clusters); beside it `select_size` candidates drawn uniformly. A fresh LM is pretrained on
   each for `select_steps` steps, and both are evaluated: held-out perplexity per domain.

Writes into --workdir: config.json, report.json, report.md, variance_reduction.png, and
- `proxy/`: the proxy's training run; `model.json` marks it finished;
- `losses.npz`: the analysis sample's `ids`, `losses` (under the proxy) and `domains`;
- `embeddings/<name>.npz`: post-processed embeddings, `analysis` [analysis_size, pca_dims] (rows
  of `losses.npz`'s ids) and, for the selection embedding, `candidates`;
- `clusters/<name>.npz`: `k<K>`, the cluster of each sample row (`random`: the baseline);
- `selection/clusters.npz`: the candidates' `ids` and their `clusters`;
- `models/<arm>/` (arms `diverse`, `random`): `selection.json`, the training run, `model.json`.
Every artifact is written atomically once (by process 0) and reused, so a killed run resumes
where it was.
"""

from __future__ import annotations

import json
import os

import jax
import matplotlib
import ml_collections
import numpy as np
from absl import app, logging
from matplotlib.figure import Figure

from experiments import launch, pretrain
from jaxsel import checkpoint, embed, probe, report, search, select, stats, train
from jaxsel import config as config_lib
from jaxsel.data import pool as pool_lib
from jaxsel.data import tokenizer as tokenizer_lib
from jaxsel.model import encoder as encoder_lib

EMBEDDINGS = ("lm_token_mean", "lm_output_mean", "encoder", "ngram_hash")
LM_EMBEDDINGS = ("lm_token_mean", "lm_output_mean")
RANDOM, DOMAINS = "random", "domain labels"  # The reference rows of the clustering table.
ARMS = ("diverse", "random")
# Separate random streams of config.seed.
_SPLIT, _PCA, _KMEANS, _BASELINE, _BOOTSTRAP, _SELECT_KMEANS, _SELECT = range(7)


# ------------------------------------------------------------------------------------------------
# Config.


def parse_embeddings(spec: str) -> list[str]:
    """`"encoder,ngram_hash"` -> ["encoder", "ngram_hash"]: known names, each once."""
    return config_lib.parse_names(spec, EMBEDDINGS, "similarity.embeddings")


def parse_num_clusters(spec: str) -> list[int]:
    """`"8,32"` -> [8, 32]: distinct cluster counts K >= 2."""
    parts = config_lib.split_list(spec)
    config_lib.check(bool(parts) and all(p.isdigit() for p in parts), "similarity.num_clusters",
                     f"{spec!r} is not a comma-separated list of cluster counts, e.g. 8,32")
    ks = [int(p) for p in parts]
    config_lib.check(min(ks) >= 2 and len(set(ks)) == len(ks), "similarity.num_clusters",
                     f"{spec!r}: each K must be >= 2 and appear once")
    return ks


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`config_lib.validate` and the similarity section; every message names the key. What
    depends on the pool's size is checked by `split_ids`, the encoder's width on loading it."""
    config_lib.validate(config, num_devices)
    s, check = config.similarity, config_lib.check
    check(config.train.stop_at == 0, "train.stop_at", "is not used here; leave it 0")
    check(not config.continue_from, "continue_from",
          "is not used here; set init_from to take a pretrained proxy LM")
    check(0 <= s.proxy_fraction < 1 and (s.proxy_fraction > 0 or bool(config.init_from)),
          "similarity.proxy_fraction",
          f"must be in (0, 1) (or 0 with init_from), got {s.proxy_fraction}")
    names = parse_embeddings(s.embeddings)
    check(s.select_embedding in EMBEDDINGS, "similarity.select_embedding",
          f"{s.select_embedding!r} is not one of {', '.join(EMBEDDINGS)}")
    ks = parse_num_clusters(s.num_clusters)
    for key in ("proxy_steps", "analysis_size", "candidates", "select_clusters", "select_size",
                "select_steps", "pca_dims", "ngram_buckets", "eval_batch_size"):
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


def model_config(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    """The training config of one model trained from scratch for `steps` steps."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.steps, c.init_from = steps, ""
    return c


# ------------------------------------------------------------------------------------------------
# Pieces: the rows, the baseline, the metrics.


def split_ids(config: ml_collections.ConfigDict, pool_size: int) -> dict[str, np.ndarray]:
    """Sorted train-pool rows: `proxy` (the proxy LM's share), and from one seeded draw of the
    rest, `candidates` (its first `candidates` rows) and `analysis` (its first `analysis_size`
    rows), so the smaller of the two is a subset of the larger."""
    s, check = config.similarity, config_lib.check
    order = np.random.default_rng([config.seed, _SPLIT]).permutation(pool_size)
    cut = int(round(s.proxy_fraction * pool_size))
    check(cut >= 1 or bool(config.init_from), "similarity.proxy_fraction",
          f"{s.proxy_fraction} of {pool_size} train rows leaves the proxy LM no data")
    rest = order[cut:]
    for key in ("analysis_size", "candidates"):
        check(s[key] <= len(rest), f"similarity.{key}",
              f"{s[key]} exceeds the {len(rest)} train rows outside the proxy's share (the train "
              f"pool has {pool_size}; similarity.proxy_fraction={s.proxy_fraction})")
    return dict(proxy=np.sort(order[:cut]), analysis=np.sort(rest[:s.analysis_size]),
                candidates=np.sort(rest[:s.candidates]))


def random_clusters(n: int, k: int, seed: int) -> np.ndarray:
    """[n] labels: a seeded random assignment of n points to k clusters of sizes n // k or
    n // k + 1."""
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def expected_random_variance_reduction(n: int, k: int) -> float:
    """`(k - 1) / (n - 1)`: the expected variance reduction of a uniformly random assignment of
    n values to k clusters of any fixed sizes (each cluster of size m keeps (m - 1) / (n - 1) of
    the total sum of squares, in expectation)."""
    return (k - 1) / (n - 1)


def cluster_metrics(losses_N: np.ndarray, domains_N: np.ndarray, clusters_N: np.ndarray,
                    num_resamples: int, seed: int, interval: str = "bootstrap") -> dict:
    """Variance reduction of the losses and domain purity of one clustering, the range of its
    cluster sizes, and (with `num_resamples`) a 95% interval of both (`<metric>_ci`):

    - `bootstrap`: the percentile bootstrap over the rows, the clusters held fixed. It runs high
      by about (K - 1) / (N - 1) for variance reduction (a resampled row's copies share a
      cluster), which matters only next to the random floor;
    - `permutation`: the 2.5% and 97.5% quantiles over random permutations of the cluster labels,
      the null distribution of clusters of these sizes that know nothing (for the floor itself).
    """
    sizes = np.unique(clusters_N, return_counts=True)[1]
    out = dict(k=int(sizes.size), sizes=[int(sizes.min()), int(sizes.max())],
               variance_reduction=stats.variance_reduction(losses_N, clusters_N),
               purity=stats.purity(domains_N, clusters_N), interval=interval)
    for name, fn, values in (("variance_reduction", stats.variance_reduction, losses_N),
                             ("purity", stats.purity, domains_N)):
        out[f"{name}_ci"] = _interval(fn, values, clusters_N, num_resamples, seed, interval)
    return out


def _interval(fn, values_N, clusters_N, num_resamples: int, seed: int,
              kind: str) -> list[float] | None:
    """The 95% interval of `fn(values_N, clusters_N)` that `cluster_metrics` describes."""
    if kind not in ("bootstrap", "permutation"):
        raise ValueError(f"interval must be bootstrap or permutation, got {kind!r}")
    if not num_resamples:
        return None
    if kind == "bootstrap":
        return list(stats.bootstrap_ci(fn, values_N, clusters_N, num_resamples, seed))
    rng = np.random.default_rng(seed)
    null = [fn(values_N, rng.permutation(clusters_N)) for _ in range(num_resamples)]
    return [float(q) for q in np.quantile(null, [0.025, 0.975])]


# ------------------------------------------------------------------------------------------------
# The experiment.


class Experiment:
    """The pools, the rows, the proxy LM and the encoder of one run; each method computes one
    artifact once (or reads it back) and returns it."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir, s = config, workdir, config.similarity
        self.names = parse_embeddings(s.embeddings)
        self.ks = parse_num_clusters(s.num_clusters)
        self.pools = pool_lib.build_pools(config)
        self.train_pool = self.pools["train"]
        self.ids = split_ids(config, len(self.train_pool))
        self.trainer = train.Trainer(model_config(config, s.proxy_steps))
        self.progress = jax.process_index() == 0
        self.encoder = None
        if "encoder" in set(self.names) | {s.select_embedding}:
            self.encoder = encoder_lib.load_encoder(s.encoder or None, s.encoder_max_length)
            width = self.encoder.config.hidden_size
            config_lib.check(s.pca_dims <= width, "similarity.pca_dims",
                             f"{s.pca_dims} exceeds the encoder's width {width}")
        self._params = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def proxy(self) -> dict:
        """The proxy LM: trained once in `proxy/` on its share, or `config.init_from`."""
        if self.config.init_from:
            return {"init_from": self.config.init_from}
        folder, steps = self.path("proxy"), self.config.similarity.proxy_steps

        def train_model():
            logging.info("proxy LM: %d steps on %d sequences", steps, len(self.ids["proxy"]))
            return pretrain.train_and_evaluate(model_config(self.config, steps), folder,
                                               self.pools, self.ids["proxy"])

        return pretrain.train_once(folder, train_model)

    def params(self):
        """The proxy's params (after `proxy()` has trained it)."""
        if self._params is None:
            folder = self.config.init_from or self.path("proxy")
            self._params = checkpoint.load_params(folder, self.trainer.abstract_params())
        return self._params

    def losses(self) -> dict[str, np.ndarray]:
        """The analysis sample: `ids`, `losses` (mean token loss under the proxy), `domains`."""
        def compute():
            ids = self.ids["analysis"]
            losses = probe.pool_losses(self.trainer, self.params(), self.train_pool,
                                       self.config.similarity.eval_batch_size, ids,
                                       self.progress)
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
        """`[len(ids), d]` embeddings `name` of train-pool rows `ids`."""
        s, rows = self.config.similarity, self.train_pool.rows(ids)
        tokens, segments = rows["tokens"], rows["segments"]
        logging.info("embedding %d sequences: %s", len(ids), name)
        if name == "lm_token_mean":
            return embed.lm_token_mean(self.params(), tokens, segments, progress=self.progress)
        if name == "lm_output_mean":
            return embed.lm_output_mean(self.trainer.model, self.params(), tokens, segments,
                                        s.eval_batch_size, self.progress)
        if name == "ngram_hash":
            return embed.ngram_hash(tokens, segments, s.ngram_buckets, progress=self.progress)
        ids_NxM, lengths_N = embed.encoder_inputs(
            self.encoder, tokens, segments,
            tokenizer_lib.load_tokenizer(self.train_pool.tokenizer_path), progress=self.progress)
        return embed.encoder_embed(self.encoder, ids_NxM, lengths_N, s.eval_batch_size,
                                   progress=self.progress)

    def clusters(self, name: str) -> dict[int, np.ndarray]:
        """K -> the cluster of each sample row: balanced k-means of embedding `name`, or for
        `RANDOM` the equal-sized random baseline."""
        n, seed = self.config.similarity.analysis_size, self.config.seed

        def compute():
            if name == RANDOM:
                return {f"k{k}": random_clusters(n, k, config_lib.stream_seed(seed, _BASELINE, k))
                        for k in self.ks}
            x_NxD = self.embeddings(name)["analysis"]
            index = EMBEDDINGS.index(name)
            return {f"k{k}": search.balanced_kmeans(
                x_NxD, k, seed=config_lib.stream_seed(seed, _KMEANS, index, k)).assignments_N
                for k in self.ks}

        saved = report.cached_npz(self.path("clusters", f"{name}.npz"), compute)
        return {k: saved[f"k{k}"] for k in self.ks}

    def selection_clusters(self) -> dict[str, np.ndarray]:
        """The candidates' `ids` and their `clusters` (balanced k-means of the selection
        embedding into `select_clusters`)."""
        s = self.config.similarity

        def compute():
            x_NxD = self.embeddings(s.select_embedding)["candidates"]
            clusters = search.balanced_kmeans(
                x_NxD, s.select_clusters,
                seed=config_lib.stream_seed(self.config.seed, _SELECT_KMEANS)).assignments_N
            return {"ids": self.ids["candidates"], "clusters": clusters}

        return report.cached_npz(self.path("selection", "clusters.npz"), compute)

    def selection(self, arm: str) -> select.Selection:
        """The arm's selection of `select_size` candidates (pool ids), saved once."""
        path = self.path("models", arm, "selection.json")
        if os.path.exists(path):
            return select.Selection.load(path)
        s, candidates = self.config.similarity, self.ids["candidates"]
        seed = config_lib.stream_seed(self.config.seed, _SELECT, ARMS.index(arm))
        if arm == "diverse":
            chosen = select.cluster_diverse(self.selection_clusters()["clusters"], s.select_size,
                                            seed)
            params = dict(embedding=s.select_embedding)
        else:
            chosen = select.random_ids(len(candidates), s.select_size, seed)
            params = {}
        selection = select.Selection(candidates[chosen.ids], chosen.method, len(self.train_pool),
                                     {**chosen.params, **params, "candidates": len(candidates)},
                                     chosen.scores)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            selection.save(path)
        return selection

    def train_model(self, arm: str) -> dict:
        """A fresh LM trained on the arm's selection for `select_steps` steps (once), evaluated
        on the held-out pool; with the selection's domains and the clusters it covers."""
        folder, steps = self.path("models", arm), self.config.similarity.select_steps

        def train_model():
            selection = self.selection(arm)
            logging.info("model %s: %d steps on %d sequences", arm, steps, len(selection))
            clusters = self.selection_clusters()
            chosen = clusters["clusters"][np.searchsorted(clusters["ids"], selection.ids)]
            return pretrain.train_and_evaluate(
                model_config(self.config, steps), folder, self.pools, selection.ids,
                lambda _: dict(arm=arm, method=selection.method, selection=selection.params,
                               domains=self.train_pool.domain_counts(selection.ids),
                               clusters_covered=int(np.unique(chosen).size)))

        return pretrain.train_once(folder, train_model)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Every stage (each resumed from what is saved), then the report's numbers."""
    s = config.similarity
    experiment = Experiment(config, workdir)
    proxy = experiment.proxy()
    sample = experiment.losses()
    losses_N, domains_N = sample["losses"], sample["domains"]
    n = len(losses_N)
    # One bootstrap seed: every clustering is resampled on the same draws of rows (paired).
    seed = config_lib.stream_seed(config.seed, _BOOTSTRAP)

    def row(name: str, clusters_N: np.ndarray) -> dict:
        interval = "permutation" if name == RANDOM else "bootstrap"
        return {"embedding": name, **cluster_metrics(losses_N, domains_N, clusters_N,
                                                     s.bootstrap, seed, interval)}

    rows = [row(DOMAINS, domains_N)]
    for name in [RANDOM, *experiment.names]:
        clusters = experiment.clusters(name)
        rows += [row(name, clusters[k]) for k in experiment.ks]
        if name != RANDOM:
            logging.info("%s: variance reduction %s", name, {
                k: round(r["variance_reduction"], 4) for k, r in
                zip(experiment.ks, rows[-len(experiment.ks):], strict=True)})
    arms = {arm: experiment.train_model(arm) for arm in ARMS}
    names = experiment.train_pool.domain_names
    return {
        "proxy": proxy,
        "sample": {"size": n, "loss_mean": float(losses_N.mean()),
                   "loss_std": float(losses_N.std()),
                   "domains": {names[d]: int(c) for d, c in
                               zip(*np.unique(domains_N, return_counts=True), strict=True)}},
        "embeddings": experiment.names,
        "num_clusters": experiment.ks,
        "clustering": rows,
        "random_expected_variance_reduction": {
            str(k): expected_random_variance_reduction(n, k) for k in experiment.ks},
        "selection": {
            "embedding": s.select_embedding, "clusters": s.select_clusters,
            "candidates": int(len(experiment.ids["candidates"])), "size": s.select_size,
            "steps": s.select_steps, "arms": arms,
            "perplexity_gain": arms["random"]["eval"]["all"] - arms["diverse"]["eval"]["all"]},
    }


# ------------------------------------------------------------------------------------------------
# Report.


def _fmt_ci(ci) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def to_markdown(result: dict) -> str:
    sel, sample = result["selection"], result["sample"]
    arms = list(sel["arms"])
    clustering = [(r["embedding"], r["k"], r["variance_reduction"],
                   _fmt_ci(r["variance_reduction_ci"]), r["purity"], _fmt_ci(r["purity_ci"]),
                   f"{r['sizes'][0]}-{r['sizes'][1]}") for r in result["clustering"]]
    expected = ", ".join(f"K={k}: {v:.4f}" for k, v in
                         result["random_expected_variance_reduction"].items())
    domains = list(sel["arms"][arms[0]]["eval"])
    perplexity = [(d, *(sel["arms"][a]["eval"].get(d, float("nan")) for a in arms))
                  for d in domains]
    mix = sorted({d for a in arms for d in sel["arms"][a]["domains"]})
    composition = [(d, *(sel["arms"][a]["domains"].get(d, 0) for a in arms)) for d in mix]
    proxy = result["proxy"]
    proxy_line = (f"the params of `{proxy['init_from']}`" if "init_from" in proxy else
                  f"trained {proxy['steps']} steps on {proxy['train_sequences']} sequences, "
                  f"held-out perplexity {proxy['eval']['all']:.2f}")
    return (
        "# Similarity metrics for data selection\n\n"
        f"Proxy LM: {proxy_line}. Analysis sample: {sample['size']} other train sequences, "
        f"mean proxy loss {sample['loss_mean']:.4f} (std {sample['loss_std']:.4f}).\n\n"
        "## Clusters of each embedding: variance reduction of the proxy loss, domain purity\n\n"
        "Variance reduction = 1 - mean within-cluster variance / total variance of the proxy's "
        "per-sequence loss (higher: the embedding groups sequences of similar loss). Purity = "
        "share of sequences in their cluster's majority domain. `random`: equal-sized random "
        f"clusters, expected variance reduction (K-1)/(N-1) ({expected}); its interval is the "
        "95% range over random permutations of its labels (the null). Other intervals: 95% "
        "percentile bootstrap over the sample's sequences, clusters fixed (for variance "
        "reduction it runs high by about (K-1)/(N-1)). `domain labels`: the domains as "
        "clusters.\n\n"
        + report.markdown_table(["embedding", "K", "variance reduction", "95% interval",
                                 "purity", "95% interval", "cluster sizes"], clustering)
        + f"\n![variance reduction](variance_reduction.png)\n\n"
        f"## Diversity-based selection vs random\n\n"
        f"{sel['size']} of {sel['candidates']} candidates: `diverse` spread evenly over "
        f"{sel['clusters']} balanced clusters of `{sel['embedding']}` embeddings, `random` "
        f"uniform; a fresh LM trained {sel['steps']} steps on each. Clusters covered: "
        + ", ".join(f"{a} {sel['arms'][a]['clusters_covered']}" for a in arms)
        + f". Held-out perplexity gain of diverse over random (all): "
        f"{sel['perplexity_gain']:+.3f}.\n\n### Held-out perplexity (lower is better)\n\n"
        + report.markdown_table(["domain", *arms], perplexity)
        + "\n### Selected sequences per domain\n\n"
        + report.markdown_table(["domain", *arms], composition)
        + "\n### Zero-shot tasks (higher is better)\n\n"
        + pretrain.downstream_markdown({a: sel["arms"][a]["downstream"] for a in arms}))


def plot_variance_reduction(result: dict, path: str) -> None:
    """Variance reduction (left) and purity (right) per embedding and K, with 95% CIs, the
    random baseline among the bars and the domain labels' variance reduction as a line;
    written atomically."""
    ks = result["num_clusters"]
    names = [RANDOM, *result["embeddings"]]
    by = {(r["embedding"], r["k"]): r for r in result["clustering"]}
    fig = Figure(figsize=(12.5, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    width = 0.8 / len(names)
    colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(names))]
    for ax, metric in zip(axes, ("variance_reduction", "purity"), strict=True):
        for i, (name, color) in enumerate(zip(names, colors, strict=True)):
            values = [by[name, k][metric] for k in ks]
            cis = [by[name, k][f"{metric}_ci"] for k in ks]
            errors = None if None in cis else np.abs(np.array(cis).T - np.array(values))
            ax.bar(np.arange(len(ks)) + (i - (len(names) - 1) / 2) * width, values, width,
                   yerr=errors, color=color, label=name, capsize=2)
        ax.set(xticks=np.arange(len(ks)), xticklabels=[f"K={k}" for k in ks],
               ylabel=metric.replace("_", " "), title=metric.replace("_", " ") + " by clusters")
    domains = next(r for r in result["clustering"] if r["embedding"] == DOMAINS)
    axes[0].axhline(domains["variance_reduction"], color="gray", linestyle="--", linewidth=1,
                    label=f"domain labels (K={domains['k']})")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    report.write_figure(path, fig)


def main(argv):
    del argv
    result = launch.main(validate, run, to_markdown,
                         {"variance_reduction.png": plot_variance_reduction})
    logging.info("variance reduction: %s", json.dumps(
        {f"{r['embedding']}/K={r['k']}": round(r["variance_reduction"], 4)
         for r in result["clustering"]}))
    logging.info("held-out perplexity (all): diverse %.3f, random %.3f",
                 result["selection"]["arms"]["diverse"]["eval"]["all"],
                 result["selection"]["arms"]["random"]["eval"]["all"])


if __name__ == "__main__":
    app.run(main)
