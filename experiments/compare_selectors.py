"""The selectors a data-selection paper compares, under one budget, from one seed model.

1. seed: the LM trains `compare.seed_steps` steps on a seeded random share (`seed_size` rows) of
   the train pool, on a schedule spanning `seed_steps + select_steps` (`train.steps`), stopping
   at `seed_steps` (`train.stop_at`);
2. candidates: `compare.candidates` rows of the rest of the same seeded draw (disjoint from the
   seed's share); reference: LAMBADA-style cloze items from the held-out `reference_domain`;
3. every selector of `compare.selectors` picks `select_size` candidates with the seed model (see
   SELECTORS), saved as a `select.Selection` of pool ids;
4. every arm continues the seed model's whole state (`continue_from`: params, AdamW moments,
   step) for `select_steps` steps on its selection, and is evaluated: the reference loss
   (`Prober.reference_loss`) and held-out perplexity per domain.

Writes into --workdir: config.json, report.json, report.md, reference_loss.png, and
- `seed/`: the seed's training run; `model.json` marks it finished;
- `candidates/encoder_inputs.npz` (MiniLM token ids and lengths of the candidates) and
  `candidates/embeddings.npz` (`candidates` [C, D], `reference` [R, D] MiniLM embeddings of the
  candidates and of the reference items' rows), shared by the embedding selectors;
- `arms/<selector>/`: `selection.json`, the selector's scores (`low_loss`: `losses.npz`;
  `first_order`: `influence.npz`; `semdedup`: `kept.npz`; `diverse`: `clusters.npz`; `mates`:
  `oracle.npz`, `predictions.npz`, `influence_model.json`), the arm's training run, and
  `model.json` when it is finished.
Every artifact is written atomically once (by process 0) and reused, so a killed run resumes
where it was.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import app, logging
from matplotlib.figure import Figure

from experiments import launch, mates, pretrain
from jaxsel import config as config_lib
from jaxsel import embed, probe, report, search, select, train
from jaxsel.data import pool as pool_lib
from jaxsel.data import tokenizer as tokenizer_lib
from jaxsel.model import encoder as encoder_lib

# Every selector, in the report's order. Each picks `select_size` of the candidates:
SELECTORS = (
    "random",  # select.random_ids
    "low_loss",  # lowest mean token loss under the seed model (perplexity filtering)
    "semdedup",  # select.dedup of MiniLM embeddings, then a random draw of the kept rows
    "nearest",  # select.nearest_to_target: most similar to the reference items (MiniLM)
    "diverse",  # select.cluster_diverse over balanced k-means clusters of MiniLM (Sam et al.)
    "first_order",  # top-k (lowest) first-order influence on the reference under the seed state
    "mates",  # oracle on probe_size candidates -> influence model -> Gumbel-top-k (Yu et al.)
)
ENCODER_SELECTORS = ("semdedup", "nearest", "diverse", "mates")
# Separate random streams of config.seed.
_SPLIT, _SELECT, _KMEANS, _PROBES, _GUMBEL, _FIT = range(6)


# ------------------------------------------------------------------------------------------------
# Config.


def parse_selectors(spec: str) -> list[str]:
    """`"random,mates"` -> ["random", "mates"]: known names, each once."""
    return config_lib.parse_names(spec, SELECTORS, "compare.selectors")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`config_lib.validate` and the compare section; every message names the key. What depends
    on the pool's size is checked by `split_ids`."""
    config_lib.validate(config, num_devices)
    c, check = config.compare, config_lib.check
    config_lib.check_reference_apart(config, "compare")
    check(config.train.steps == c.seed_steps + c.select_steps, "train.steps",
          f"is compare.seed_steps + compare.select_steps = {c.seed_steps + c.select_steps} (one "
          f"schedule for the seed and every arm), got {config.train.steps}; set those instead")
    check(config.train.stop_at == 0, "train.stop_at", "is set for the seed run; leave it 0")
    check(not config.continue_from, "continue_from",
          "is set for each arm (the seed model); leave it empty")
    parse_selectors(c.selectors)
    for key in ("seed_size", "seed_steps", "candidates", "select_size", "select_steps",
                "reference_items", "clusters", "probe_size", "probe_chunk", "fit_epochs",
                "fit_batch_size", "predict_batch_size", "eval_batch_size"):
        check(c[key] >= 1, f"compare.{key}", f"must be >= 1, got {c[key]}")
    check(c.encoder_max_length >= 2, "compare.encoder_max_length",
          f"must be >= 2, got {c.encoder_max_length}")
    check(c.select_size <= c.candidates, "compare.select_size",
          f"{c.select_size} exceeds the compare.candidates={c.candidates} rows")
    check(c.probe_size <= c.candidates, "compare.probe_size",
          f"{c.probe_size} exceeds the compare.candidates={c.candidates} rows")
    check(c.probe_size >= 2, "compare.probe_size", f"must be >= 2 to fit on, got {c.probe_size}")
    check(c.clusters <= c.candidates, "compare.clusters",
          f"{c.clusters} exceeds the compare.candidates={c.candidates} rows")
    check(-1 < c.dedup_threshold <= 1, "compare.dedup_threshold",
          f"must be in (-1, 1], got {c.dedup_threshold}")
    check(c.fit_lr > 0, "compare.fit_lr", f"must be > 0, got {c.fit_lr}")
    check(c.temperature > 0, "compare.temperature", f"must be > 0, got {c.temperature}")
    check(0 < c.fit_val_fraction < 1, "compare.fit_val_fraction",
          f"must be in (0, 1), got {c.fit_val_fraction}")
    check(c.eval_batch_size % jax.process_count() == 0, "compare.eval_batch_size",
          f"{c.eval_batch_size} is not divisible by the {jax.process_count()} processes")


def model_config(config: ml_collections.ConfigDict, stop_at: int = 0,
                 continue_from: str = "") -> ml_collections.ConfigDict:
    """The training config of the seed (`stop_at=seed_steps`) or of an arm (`continue_from`
    the seed): one schedule over `seed_steps + select_steps`."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.stop_at, c.continue_from = stop_at, continue_from
    if continue_from:
        c.init_from = ""
    return c


def split_ids(config: ml_collections.ConfigDict, pool_size: int) -> dict[str, np.ndarray]:
    """Sorted train-pool rows from one seeded permutation: `seed` (its first `seed_size`) and
    `candidates` (the next `candidates`), disjoint."""
    c, check = config.compare, config_lib.check
    check(c.seed_size <= pool_size, "compare.seed_size",
          f"{c.seed_size} exceeds the {pool_size} rows of the train pool")
    check(c.seed_size + c.candidates <= pool_size, "compare.candidates",
          f"{c.candidates} exceeds the {pool_size - c.seed_size} train rows outside the seed's "
          f"share (the train pool has {pool_size}; compare.seed_size={c.seed_size})")
    order = np.random.default_rng([config.seed, _SPLIT]).permutation(pool_size)
    return dict(seed=np.sort(order[:c.seed_size]),
                candidates=np.sort(order[c.seed_size:c.seed_size + c.candidates]))


# ------------------------------------------------------------------------------------------------
# The experiment.


class Experiment:
    """The pools, the rows, the reference set, the seed model and the encoder of one run; each
    method computes one artifact once (or reads it back) and returns it."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir, c = config, workdir, config.compare
        self.selectors = parse_selectors(c.selectors)
        self.pools = pool_lib.build_pools(config)
        self.train_pool = self.pools["train"]
        self.ids = split_ids(config, len(self.train_pool))
        self.candidates = self.ids["candidates"]
        self.reference = probe.cloze_from_pool(self.pools["heldout"], c.reference_domain,
                                               c.reference_items)
        self.trainer = train.Trainer(model_config(config))
        self.prober = probe.Prober(self.trainer, chunk_size=c.probe_chunk,
                                   reference_batch_size=c.eval_batch_size)
        self.progress = jax.process_index() == 0
        self.encoder = None
        if set(self.selectors) & set(ENCODER_SELECTORS):
            self.encoder = encoder_lib.load_encoder(c.encoder or None, c.encoder_max_length)
        self._state = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    # -- the seed model --------------------------------------------------------------------------

    def seed(self) -> dict:
        """The seed model: `seed_steps` steps on its share (once), evaluated."""
        folder, c = self.path("seed"), self.config.compare

        def train_model():
            logging.info("seed model: %d steps on %d sequences", c.seed_steps,
                         len(self.ids["seed"]))
            return pretrain.train_and_evaluate(
                model_config(self.config, stop_at=c.seed_steps), folder, self.pools,
                self.ids["seed"], self.describe)

        return pretrain.train_once(folder, train_model)

    def describe(self, params) -> dict:
        """What the report says of a trained model besides its perplexity: its reference loss."""
        return dict(reference_loss=self.prober.reference_loss(params, self.reference))

    def state(self) -> train.TrainState:
        """The seed model's train state (params, optimizer, step)."""
        if self._state is None:
            self._state, _ = train.load_state(self.trainer, self.path("seed"))
        return self._state

    # -- shared candidate artifacts --------------------------------------------------------------

    def encoder_inputs(self) -> dict[str, np.ndarray]:
        """The candidates decoded and tokenised for the encoder: `ids`, `lengths`."""
        def compute():
            rows = self.train_pool.rows(self.candidates)
            return self._encoder_inputs(rows["tokens"], rows["segments"])

        return report.cached_npz(self.path("candidates", "encoder_inputs.npz"), compute)

    def _encoder_inputs(self, tokens, segments) -> dict[str, np.ndarray]:
        ids, lengths = embed.encoder_inputs(
            self.encoder, tokens, segments,
            tokenizer_lib.load_tokenizer(self.train_pool.tokenizer_path), progress=self.progress)
        return {"ids": ids, "lengths": lengths}

    def embeddings(self) -> dict[str, np.ndarray]:
        """MiniLM embeddings of the candidates (`candidates`, rows aligned with their sorted
        ids) and of the reference items' rows (`reference`)."""
        def compute():
            batch = self.config.compare.eval_batch_size
            inputs = self.encoder_inputs()
            logging.info("embedding %d candidates", len(self.candidates))
            cand = embed.encoder_embed(self.encoder, inputs["ids"], inputs["lengths"], batch,
                                       progress=self.progress)
            ref = self._encoder_inputs(np.asarray(self.reference.tokens_RxL),
                                       np.asarray(self.reference.segments_RxL))
            return {"ids": self.candidates, "candidates": cand,
                    "reference": embed.encoder_embed(self.encoder, ref["ids"], ref["lengths"],
                                                     batch, progress=False)}

        return report.cached_npz(self.path("candidates", "embeddings.npz"), compute)

    # -- the selectors ---------------------------------------------------------------------------

    def selection(self, name: str) -> select.Selection:
        """The selector's `select_size` candidates (pool ids), saved once."""
        path = self.path("arms", name, "selection.json")
        if os.path.exists(path):
            return select.Selection.load(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        c, n = self.config.compare, len(self.candidates)
        k, seed = c.select_size, config_lib.stream_seed(self.config.seed, _SELECT,
                                                          SELECTORS.index(name))
        logging.info("selecting %d of %d candidates: %s", k, n, name)
        rows, params = None, {}
        if name == "random":
            chosen = select.random_ids(n, k, seed)
        elif name == "low_loss":
            chosen = select.top_k(self.losses()["losses"], k)
        elif name == "first_order":
            chosen = select.top_k(self.first_order()["influence"], k)
        elif name == "nearest":
            emb = self.embeddings()
            chosen = select.nearest_to_target(emb["candidates"], emb["reference"], k)
        elif name == "diverse":
            chosen = select.cluster_diverse(self.clusters()["clusters"], k, seed)
            params = dict(clusters=c.clusters)
        elif name == "semdedup":
            kept = self.dedup()["kept"]
            config_lib.check(k <= len(kept), "compare.select_size",
                             f"{k} exceeds the {len(kept)} candidates semdedup keeps at "
                             f"compare.dedup_threshold={c.dedup_threshold}")
            chosen, rows = select.random_ids(len(kept), k, seed), kept
            params = dict(threshold=c.dedup_threshold, kept=len(kept))
        else:  # mates
            scores, params = self.mates_predictions()
            chosen = select.gumbel_top_k(scores, k, config_lib.stream_seed(
                self.config.seed, _GUMBEL), c.temperature)
        picked = chosen.ids if rows is None else rows[chosen.ids]
        method = "dedup_random" if name == "semdedup" else chosen.method
        selection = select.Selection(self.candidates[picked], method,
                                     len(self.train_pool), {**chosen.params, **params,
                                                            "selector": name, "candidates": n},
                                     chosen.scores)
        if jax.process_index() == 0:
            selection.save(path)
        return selection

    def losses(self) -> dict[str, np.ndarray]:
        """Each candidate's mean token loss under the seed model."""
        def compute():
            losses = probe.pool_losses(self.trainer, self.state().params, self.train_pool,
                                       self.config.compare.eval_batch_size, self.candidates,
                                       self.progress)
            return {"ids": self.candidates, "losses": losses}

        return report.cached_npz(self.path("arms", "low_loss", "losses.npz"), compute)

    def first_order(self) -> dict[str, np.ndarray]:
        """Each candidate's first-order influence on the reference set from the seed state."""
        def compute():
            influence = self.prober.first_order_influence(
                self.state(), self.train_pool.rows(self.candidates), self.reference,
                self.progress)
            return {"ids": self.candidates, "influence": influence}

        return report.cached_npz(self.path("arms", "first_order", "influence.npz"), compute)

    def dedup(self) -> dict[str, np.ndarray]:
        """The candidate rows (indices into the candidates) semdedup keeps."""
        def compute():
            kept = select.dedup(self.embeddings()["candidates"],
                                self.config.compare.dedup_threshold)
            return {"kept": kept}

        return report.cached_npz(self.path("arms", "semdedup", "kept.npz"), compute)

    def clusters(self) -> dict[str, np.ndarray]:
        """Balanced k-means clusters of the L2-normalised candidate embeddings."""
        def compute():
            x_NxD = embed.l2_normalize(self.embeddings()["candidates"])
            result = search.balanced_kmeans(
                x_NxD, self.config.compare.clusters,
                seed=config_lib.stream_seed(self.config.seed, _KMEANS))
            return {"ids": self.candidates, "clusters": result.assignments_N}

        return report.cached_npz(self.path("arms", "diverse", "clusters.npz"), compute)

    def mates_predictions(self) -> tuple[np.ndarray, dict]:
        """MATES from the seed state (`mates.predicted_influence`): z-scored predicted influence
        of every candidate, and the influence model's validation figures."""
        return mates.predicted_influence(
            self.path("arms", "mates"), self.config.compare, self.prober, self.encoder,
            self.state, self.train_pool, self.candidates, self.encoder_inputs(), self.reference,
            config_lib.stream_seed(self.config.seed, _PROBES),
            config_lib.stream_seed(self.config.seed, _FIT))

    # -- the arms --------------------------------------------------------------------------------

    def train_arm(self, name: str) -> dict:
        """The seed model continued `select_steps` steps on the selector's pick (once), evaluated:
        held-out perplexity per domain and the reference loss; with the selection's domains."""
        folder, c = self.path("arms", name), self.config.compare

        def train_model():
            selection = self.selection(name)
            logging.info("arm %s: %d sequences, steps %d-%d", name, len(selection),
                         c.seed_steps + 1, c.seed_steps + c.select_steps)
            return pretrain.train_and_evaluate(
                model_config(self.config, continue_from=self.path("seed")), folder, self.pools,
                selection.ids, lambda params: dict(
                    self.describe(params), arm=name, method=selection.method,
                    selection=selection.params,
                    domains=self.train_pool.domain_counts(selection.ids)))

        return pretrain.train_once(folder, train_model)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The seed, every selector's arm (each resumed from what is saved), then the comparison."""
    c = config.compare
    experiment = Experiment(config, workdir)
    seed = experiment.seed()
    arms = {name: experiment.train_arm(name) for name in experiment.selectors}
    ranking = sorted(arms, key=lambda a: arms[a]["reference_loss"])
    return {
        "seed": seed,
        "seed_steps": c.seed_steps, "select_steps": c.select_steps,
        "seed_size": int(len(experiment.ids["seed"])),
        "candidates": int(len(experiment.candidates)), "select_size": c.select_size,
        "reference_items": int(len(experiment.reference.tokens_RxL)),
        "candidate_domains": experiment.train_pool.domain_counts(experiment.candidates),
        "arms": {name: {"reference_loss": r["reference_loss"], "eval": r["eval"],
                        "downstream": r["downstream"],
                        "final_loss": r["final_loss"], "method": r["method"],
                        "domains": r["domains"], "selection": r["selection"]}
                 for name, r in arms.items()},
        "ranking": ranking,
    }


# ------------------------------------------------------------------------------------------------
# Report.


def to_markdown(result: dict) -> str:
    arms, ranking, seed = result["arms"], result["ranking"], result["seed"]
    base = arms["random"]["reference_loss"] if "random" in arms else None
    table = [(name, arms[name]["method"], arms[name]["reference_loss"],
              "-" if base is None else f"{base - arms[name]['reference_loss']:+.4f}",
              arms[name]["eval"]["all"]) for name in ranking]
    domains = list(seed["eval"])
    perplexity = [(d, seed["eval"][d], *(arms[a]["eval"].get(d, float("nan")) for a in ranking))
                  for d in domains]
    mix = sorted(set(result["candidate_domains"]) | {d for a in arms for d in arms[a]["domains"]})
    composition = [(d, result["candidate_domains"].get(d, 0),
                    *(arms[a]["domains"].get(d, 0) for a in ranking)) for d in mix]
    return (
        "# Data selectors compared\n\n"
        f"Seed model: {result['seed_steps']} steps on {result['seed_size']} random sequences "
        f"(reference loss {seed['reference_loss']:.4f}, held-out perplexity "
        f"{seed['eval']['all']:.2f}). Each selector picks {result['select_size']} of "
        f"{result['candidates']} candidates with it; each arm continues the seed's state for "
        f"{result['select_steps']} steps on its pick. Reference: {result['reference_items']} "
        "cloze items. Lower is better everywhere.\n\n"
        "## Arms by reference loss\n\n"
        + report.markdown_table(["arm", "method", "reference loss", "gain over random",
                                 "held-out perplexity (all)"], table)
        + "\n![reference loss](reference_loss.png)\n\n## Held-out perplexity per domain\n\n"
        + report.markdown_table(["domain", "seed", *ranking], perplexity)
        + "\n## Selected sequences per domain\n\n"
        + report.markdown_table(["domain", "candidates", *ranking], composition)
        + "\n## Zero-shot tasks (higher is better)\n\n"
        + pretrain.downstream_markdown({"seed": seed["downstream"],
                                        **{a: arms[a]["downstream"] for a in ranking}}))


def plot_reference_loss(result: dict, path: str) -> None:
    """Reference loss per arm (bars, best first) and the seed model's (a line); atomic."""
    ranking, arms = result["ranking"], result["arms"]
    values = [arms[a]["reference_loss"] for a in ranking]
    fig = Figure(figsize=(max(4.0, 1.0 * len(ranking) + 2), 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(len(ranking)), values, color="tab:blue")
    ax.axhline(result["seed"]["reference_loss"], color="gray", linestyle="--", linewidth=1,
               label="seed model")
    low, high = min(values + [result["seed"]["reference_loss"]]), max(values)
    pad = max(high - low, 1e-3) * 0.5
    ax.set(xticks=np.arange(len(ranking)), ylim=(low - pad, high + pad),
           ylabel="reference loss (nats)", title="reference loss per selector (lower is better)")
    ax.set_xticklabels(ranking, rotation=30, ha="right")
    ax.legend(fontsize=8)
    report.write_figure(path, fig)


def main(argv):
    del argv
    result = launch.main(validate, run, to_markdown, {"reference_loss.png": plot_reference_loss})
    logging.info("reference loss: %s", {a: round(result["arms"][a]["reference_loss"], 4)
                                        for a in result["ranking"]})


if __name__ == "__main__":
    app.run(main)
