"""The selectors a data-selection paper compares, under one budget, from one seed model.

1. seed: the LM trains `compare.seed_steps` steps on a seeded random share (`seed_size` rows) of
   the train pool, on a schedule spanning `seed_steps + select_steps` (`train.steps`), stopping
   at `seed_steps` (`train.stop_at`);
2. candidates: `compare.candidates` rows of the rest of the same seeded draw (disjoint from the
   seed's share);
3. every selector of `compare.selectors` (`jaxsel.selectors`) picks `select_size` candidates with
   the seed model; target-aware selectors see the `target` role's cloze items only;
4. every arm continues the seed model's whole state (`continue_from`: params, AdamW moments,
   step) for `select_steps` steps on its pick, and is evaluated (`runs.evaluate_model`):
   `target_loss` (in sample, on the items the selectors aimed at), `target_eval_loss` (out of
   sample, on other documents of the target domain: arms are ranked by it), held-out perplexity
   and bits per byte, and the zero-shot suite on the `eval` role.

The report also gives each pick's composition against the candidates (`jaxsel.composition`: the
share of the target domain and of junk rows, the planted near-duplicate pairs kept whole, and
the deduplicators' precision and recall), MATES' diagnostics (the target share of a plain
top-k on its oracle labels, its influence model's validation Spearman) and its selection
overhead against training, in FLOPs and seconds.

Writes into --workdir: config.json, report.json, report.md, the figures (target_eval_loss.png,
curves.png, domains.png), `candidates/` (encoder inputs and embeddings), `seed/` and
`arms/<selector>/` (`selection.json`, the selector's artifacts, the model's `evaluation.json`).
The seed and the arms' training runs are models of the model pool (`runs.model`, default
`<workdir>/models`). Every artifact is written once and reused, so a killed run resumes where it
was.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import app, logging

from jaxsel import (
    composition,
    figures,
    files,
    launch,
    mates,
    report,
    runs,
    select,
    selectors,
    train,
)
from jaxsel import config as config_lib

_SPLIT, _SELECT = 0, 1  # Random streams of config.seed (selectors.py has its own).


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`config_lib.validate` and the compare section; every message names the key. What depends
    on the pool's size is checked by `split_ids`."""
    config_lib.validate(config, num_devices)
    config_lib.require_target(config)
    c, check = config.compare, config_lib.check
    check(config.train.steps == c.seed_steps + c.select_steps, "train.steps",
          f"is compare.seed_steps + compare.select_steps = {c.seed_steps + c.select_steps} (one "
          f"schedule for the seed and every arm), got {config.train.steps}; set those instead")
    check(config.train.stop_at == 0, "train.stop_at", "is set for the seed run; leave it 0")
    check(not config.continue_from, "continue_from",
          "is set for each arm (the seed model); leave it empty")
    config_lib.check_names(c.selectors, selectors.NAMES, "compare.selectors")
    for key in ("seed_size", "seed_steps", "candidates", "select_size", "select_steps",
                "clusters", "probe_size", "probe_chunk", "fit_epochs", "encoder_windows",
                "fit_batch_size", "predict_batch_size", "eval_batch_size", "dsir_buckets",
                "less_dims", "minhash_shingle"):
        check(c[key] >= 1, f"compare.{key}", f"must be >= 1, got {c[key]}")
    check(c.encoder_max_length >= 2, "compare.encoder_max_length",
          f"must be >= 2, got {c.encoder_max_length}")
    for key in ("select_size", "probe_size", "clusters"):
        check(c[key] <= c.candidates, f"compare.{key}",
              f"{c[key]} exceeds the compare.candidates={c.candidates} rows")
    check(c.probe_size >= 2, "compare.probe_size", f"must be >= 2 to fit on, got {c.probe_size}")
    check(-1 < c.dedup_threshold <= 1, "compare.dedup_threshold",
          f"must be in (-1, 1], got {c.dedup_threshold}")
    check(c.dsir_smoothing >= 0, "compare.dsir_smoothing",
          f"must be >= 0, got {c.dsir_smoothing}")
    check(0 < c.minhash_threshold <= 1, "compare.minhash_threshold",
          f"must be in (0, 1], got {c.minhash_threshold}")
    check(c.fit_lr > 0, "compare.fit_lr", f"must be > 0, got {c.fit_lr}")
    check(c.temperature > 0, "compare.temperature", f"must be > 0, got {c.temperature}")
    check(0 < c.fit_val_fraction < 1, "compare.fit_val_fraction",
          f"must be in (0, 1), got {c.fit_val_fraction}")
    check(c.eval_batch_size % jax.process_count() == 0, "compare.eval_batch_size",
          f"{c.eval_batch_size} is not divisible by the {jax.process_count()} processes")
    for key in ("group_size", "group_clusters", "group_fit_steps"):
        check(c[key] >= 1, f"compare.{key}", f"must be >= 1, got {c[key]}")
    for key in ("group_size", "group_clusters"):
        check(c[key] <= c.candidates, f"compare.{key}",
              f"{c[key]} exceeds the compare.candidates={c.candidates} rows")
    check(c.group_probes >= 4, "compare.group_probes",
          f"must be >= 4 (3 held out, the rest to fit on), got {c.group_probes}")
    check(c.group_fit_lr > 0, "compare.group_fit_lr", f"must be > 0, got {c.group_fit_lr}")
    check(0 < c.group_val_fraction < 1, "compare.group_val_fraction",
          f"must be in (0, 1), got {c.group_val_fraction}")
    budgets = selectors.group_mates.BUDGETS
    check(c.group_budget in budgets, "compare.group_budget",
          f"{c.group_budget!r} is not one of {budgets}")


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


class Experiment:
    """The data, the rows, the seed model and the candidates' selectors of one run."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        self.names = config_lib.check_names(config.compare.selectors, selectors.NAMES,
                                            "compare.selectors")
        self.data = runs.load_data(config)
        self.ids = split_ids(config, len(self.data.train_pool))
        self.trainer = train.Trainer(model_config(config))
        self.pool = runs.model_pool(config, workdir)
        self._state = self._seed = None
        self.candidates = selectors.Candidates(
            workdir, config.compare, self.data.train_pool, self.ids["candidates"], self.trainer,
            self.state, lambda: self.seed()["dir"], self.data.items["target"], config.seed,
            jax.process_index() == 0)

    def state(self) -> train.TrainState:
        """The seed model's train state (params, optimizer, step)."""
        if self._state is None:
            self._state, _ = train.load_state(self.trainer, self.seed()["dir"])
        return self._state

    def seed(self) -> dict:
        """The seed model: `seed_steps` steps on its share (once, in the model pool)."""
        if self._seed is None:
            config = model_config(self.config, stop_at=self.config.compare.seed_steps)
            self._seed = runs.model(config, self.data, self.ids["seed"], pool=self.pool,
                                    name="seed")
        return self._seed

    def selection(self, name: str) -> select.Selection:
        """The selector's `select_size` candidates (pool ids), saved once."""
        path = os.path.join(self.workdir, "arms", name, "selection.json")
        if files.path(path).exists():
            return select.Selection.load(path)
        logging.info("selecting %d of %d candidates: %s", self.config.compare.select_size,
                     len(self.ids["candidates"]), name)
        chosen = selectors.pick(self.candidates, name, self.config.compare.select_size,
                                config_lib.stream_seed(self.config.seed, _SELECT,
                                                       selectors.NAMES.index(name)))
        if jax.process_index() == 0:
            chosen.save(path)
        return chosen

    def evaluation(self, name: str, trained: dict) -> dict:
        """A model's evaluation under this run's roles, once, in `<workdir>/<name>`."""
        return runs.evaluation(model_config(self.config), self.data, trained,
                               os.path.join(self.workdir, name))

    def arm(self, name: str) -> dict:
        """The seed model continued `select_steps` steps on the selector's pick (once, in the
        model pool), evaluated, with what the pick is made of."""
        c, pool = self.config.compare, self.data.train_pool
        selection, seed = self.selection(name), self.seed()
        logging.info("arm %s: %d sequences, steps %d-%d", name, len(selection),
                     c.seed_steps + 1, c.seed_steps + c.select_steps)
        trained = runs.model(model_config(self.config, continue_from=seed["dir"]), self.data,
                             selection.ids, pool=self.pool, name=f"arm {name}", parent=seed)
        return {**trained, **self.evaluation(os.path.join("arms", name), trained),
                "arm": name, "method": selection.method, "selection": selection.params,
                "domains": pool.domain_counts(selection.ids),
                "composition": composition.shares(pool, selection.ids,
                                                  self.config.roles.target_domain),
                "pairs_kept": int(len(composition.whole_pairs(pool, selection.ids)))}

    def mates_report(self, seed: dict, arm: dict) -> dict:
        """MATES' diagnostics and overhead against the training of its arm's model (the seed's
        steps and the arm's); the selection's artifacts are read back."""
        c, cands = self.config.compare, self.candidates
        _, info = cands.mates()
        fraction = c.select_size / len(self.ids["candidates"])
        top = info["probed_ids"][np.argsort(info["oracle"], kind="stable")[
            :max(1, round(fraction * len(info["probed_ids"])))]]
        target = self.config.roles.target_domain
        lengths = cands.encoder_inputs()["lengths"]
        probed_rows = np.searchsorted(self.ids["candidates"], info["probed_ids"])
        flops = mates.overhead(
            self.trainer.model.cfg, cands.encoder.config, seq_len=self.config.data.seq_len,
            reference=cands.reference, probes=len(info["probed_ids"]),
            fit_tokens=int(lengths[probed_rows].sum()), fit_epochs=c.fit_epochs,
            scored_tokens=int(lengths.sum()), window=c.encoder_max_length)
        train_flops = mates.training_flops(self.trainer.model.cfg, self.config.data.seq_len,
                                           self.config.train.steps, self.config.train.batch_size)
        return {
            "oracle_top_k_target_share": composition.shares(
                self.data.train_pool, top, target)["target"],
            "val_spearman": info["val_spearman"],
            "pick_target_share": arm["composition"]["target"],
            "overhead": mates.overhead_summary(flops, info["seconds"], train_flops,
                                               seed["train_seconds"] + arm["train_seconds"])}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The seed, every selector's arm (each resumed from what is saved), then the comparison."""
    c, target = config.compare, config.roles.target_domain
    experiment = Experiment(config, workdir)
    seed = {**experiment.seed(), **experiment.evaluation("seed", experiment.seed())}
    arms = {name: experiment.arm(name) for name in experiment.names}
    pool, candidates = experiment.data.train_pool, experiment.ids["candidates"]
    result = {
        "seed": seed, "splits": experiment.data.splits(),
        "seed_steps": c.seed_steps, "select_steps": c.select_steps,
        "seed_size": int(len(experiment.ids["seed"])), "candidates": int(len(candidates)),
        "select_size": c.select_size,
        "candidate_domains": pool.domain_counts(candidates),
        "composition": {"candidates": {**composition.shares(pool, candidates, target),
                                       "pairs_kept": int(len(composition.whole_pairs(
                                           pool, candidates)))},
                        **{name: {**arm["composition"], "pairs_kept": arm["pairs_kept"]}
                           for name, arm in arms.items()}},
        "arms": {name: {key: arm[key] for key in (
            "target_loss", "target_eval_loss", "target_eval_accuracy", "eval", "eval_bpb",
            "downstream", "final_loss", "method", "domains", "selection", "train_seconds")}
            for name, arm in arms.items()},
        "ranking": sorted(arms, key=lambda a: arms[a]["target_eval_loss"]),
        "folders": {"seed": seed["dir"], **{name: arm["dir"] for name, arm in arms.items()}},
    }
    kept = {"semdedup": experiment.candidates.kept,
            "minhash": lambda: experiment.candidates.minhash_kept()["kept"]}
    result["dedup"] = {name: composition.dedup_quality(pool, candidates, candidates[kept[name]()])
                       for name in kept if name in arms}
    if "mates" in arms:
        result["mates"] = experiment.mates_report(seed, arms["mates"])
    return result


# ------------------------------------------------------------------------------------------------
# Report.


def to_markdown(result: dict) -> str:
    arms, ranking, seed = result["arms"], result["ranking"], result["seed"]
    base = arms["random"]["target_eval_loss"] if "random" in arms else None
    table = [(name, arms[name]["method"], arms[name]["target_eval_loss"],
              "-" if base is None else f"{base - arms[name]['target_eval_loss']:+.4f}",
              arms[name]["target_loss"], arms[name]["eval"]["all"],
              report.heldout_bpb(arms[name])) for name in ranking]
    mix = sorted(set(result["candidate_domains"]) | {d for a in arms for d in arms[a]["domains"]})
    counts = [(d, result["candidate_domains"].get(d, 0),
               *(arms[a]["domains"].get(d, 0) for a in ranking)) for d in mix]
    comp = result["composition"]
    shares = [(name, _pct(comp[name]["target"]), _pct(comp[name]["junk"]),
               comp[name]["pairs_kept"]) for name in ["candidates", *ranking]]
    parts = [
        "# Data selectors compared\n",
        f"Seed model: {result['seed_steps']} steps on {result['seed_size']} random sequences "
        f"(target-eval loss {seed['target_eval_loss']:.4f}, held-out perplexity "
        f"{seed['eval']['all']:.2f}). Each selector picks {result['select_size']} of "
        f"{result['candidates']} candidates with it; each arm continues the seed's state for "
        f"{result['select_steps']} steps on its pick.\n",
        "Arms are ranked by the **target-eval loss**: the cloze loss on documents of the target "
        "domain that no selector saw (out of sample). The **target loss** is on the items the "
        "target-aware selectors aimed at (in sample). Lower is better for both.\n",
        "## Arms by target-eval loss\n",
        report.markdown_table(["arm", "method", "target-eval loss", "gain over random",
                               "target loss (in sample)", "held-out perplexity (all)",
                               "held-out bits per byte (all)"], table),
        "\n![target-eval loss](target_eval_loss.png)\n",
        "## What each pick is made of\n",
        report.markdown_table(["pick", "target domain", "junk", "near-duplicate pairs kept "
                               "whole"], shares),
    ]
    if result["dedup"]:
        pairs = next(iter(result["dedup"].values()))["pairs"]
        parts += [f"\n### Deduplicators against the {pairs} planted near-duplicate pairs among "
                  f"the candidates\n" if pairs else "\n### Deduplicators (the pool plants no "
                  "near-duplicates to measure them against)\n",
                  report.markdown_table(["deduplicator", "rows removed", "precision", "recall"],
                                        [(name, q["removed"], _num(q["precision"]),
                                          _num(q["recall"]))
                                         for name, q in result["dedup"].items()])]
    if "mates" in result:
        m = result["mates"]
        o = m["overhead"]
        parts += ["\n## MATES\n",
                  f"Target share of a plain top-k on the oracle labels: "
                  f"{_pct(m['oracle_top_k_target_share'])}; influence model validation "
                  f"Spearman {m['val_spearman']:.3f}; target share of the pick "
                  f"{_pct(m['pick_target_share'])}.\n",
                  report.markdown_table(["step", "FLOPs", "seconds"], [
                      (step, f"{o['flops'][step]:.3g}", f"{o['seconds'][step]:.1f}")
                      for step in ("probe", "fit", "score", "train")]
                      + [("selection / training", f"{o['flops']['ratio']:.3f}",
                          _num(o["seconds"]["ratio"]))])]
    if "group_mates" in arms:
        g = arms["group_mates"]["selection"]
        parts += ["\n## Group-MATES\n",
                  f"The relational model (alpha {g['alpha']:.3f}, beta {g['beta']:.3f}) on "
                  f"{g['val_groups']} held-out group oracles, against the plain sum of MATES' "
                  f"predictions over the group:\n",
                  report.markdown_table(["group influence model", "Spearman", "Pearson"], [
                      ("relational", _num(g["val_spearman"]), _num(g["val_pearson"])),
                      ("sum of individual predictions", _num(g["baseline_spearman"]),
                       _num(g["baseline_pearson"]))])]
    parts += [
        "\n## Held-out perplexity and bits per byte per domain (eval role)\n",
        report.heldout_tables({"seed": seed, **{a: arms[a] for a in ranking}}),
        "\n![training and held-out loss](curves.png)\n",
        "\n## Selected sequences per domain\n\n![domain mix](domains.png)\n",
        report.markdown_table(["domain", "candidates", *ranking], counts),
        "\n## Zero-shot tasks (higher is better)\n",
        report.downstream_table({"seed": seed["downstream"],
                                 **{a: arms[a]["downstream"] for a in ranking}}),
        "\n## Data\n", report.splits_markdown(result["splits"])]
    return "\n".join(parts)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot_curves(result: dict, path: str) -> None:
    """The seed's and every arm's training loss, and their held-out loss at evaluations."""
    figures.loss_curves({name: report.read_jsonl(os.path.join(folder, "metrics.jsonl"))
                         for name, folder in result["folders"].items()}, path,
                        "seed and arms")


def plot_domains(result: dict, path: str) -> None:
    """The domain mix of each pick against the candidates'."""
    figures.domain_mix({"candidates": result["candidate_domains"],
                        **{a: result["arms"][a]["domains"] for a in result["ranking"]}}, path)


STUDY = launch.Study(
    validate, run, to_markdown,
    {"curves.png": plot_curves, "domains.png": plot_domains},
    launch.Headline(r"arms\.(?P<arm>[^.]+)\.target_eval_loss", "target-eval loss",
                    "target_eval_loss.png"))


def main(argv):
    del argv
    launch.main(STUDY)


if __name__ == "__main__":
    app.run(main)
