"""MATES: model-aware data selection with a data influence model (Yu et al., NeurIPS 2024).

Pretraining runs in `mates.stages` equal stages on one learning-rate schedule. Stage 0 trains on
a random selection. Before each later stage s, with the model as stage s-1 left it (params, AdamW
moments, step):

1. candidates: `stage_size / selection_fraction` rows of the train pool that no earlier stage drew
   (seeded; the same for both arms);
2. oracle: the exact one-step influence (`probe.Prober.oracle_influence`) of `probe_size` of
   them on the reference set, LAMBADA-style cloze items from the held-out `reference_domain`;
3. the data influence model (`influence_model.fit`): the encoder with a regression head,
   fine-tuned on the probed candidates' text and z-scored influence, best validation Spearman
   kept;
4. it predicts every candidate's influence, and `select.gumbel_top_k` at `temperature` picks
   `stage_size` of them from the z-scored predictions (lower influence is better);
5. the stage trains on them, continuing stage s-1's state (`config.continue_from`).

The `random` arm trains the same stages from the same stage 0 on uniform random selections of the
same candidates. After every stage both are evaluated: held-out perplexity per domain and the
reference loss.

Writes into --workdir: config.json, report.json, report.md, and `stages/<s>-<arm>/` (stage 0:
`stages/0`) holding the stage's training run (checkpoints, metrics.jsonl), `selection.json`, and
for MATES `oracle.npz` (probed ids, influences), `encoder_inputs.npz`, `influence_model.json`
(fit history) and `predictions.npz`; `model.json` marks a finished stage. Every artifact is
written atomically once and reused, so a killed run resumes where it was.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np
from absl import app, logging

from experiments import launch, pretrain
from jaxsel import config as config_lib
from jaxsel import embed, influence_model, probe, report, select, train
from jaxsel.data import pool as pool_lib
from jaxsel.data import tokenizer as tokenizer_lib
from jaxsel.model import encoder as encoder_lib

ARMS = ("mates", "random")
# Separate random streams of config.seed.
_CANDIDATES, _PROBES, _RANDOM, _GUMBEL, _FIT = range(5)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`config_lib.validate` and the mates section; every message names the key."""
    config_lib.validate(config, num_devices)
    m, check = config.mates, config_lib.check
    config_lib.check_reference_apart(config, "mates")
    check(m.stages >= 2, "mates.stages", f"must be >= 2 (random, then selected), got {m.stages}")
    check(config.train.steps % m.stages == 0, "train.steps",
          f"{config.train.steps} is not divisible by mates.stages={m.stages}")
    check(config.train.stop_at == 0, "train.stop_at", "is set for each stage; leave it 0")
    check(not config.continue_from, "continue_from", "is set for each stage; leave it empty")
    check(0 < m.selection_fraction <= 1, "mates.selection_fraction",
          f"must be in (0, 1], got {m.selection_fraction}")
    for key in ("probe_size", "probe_chunk", "reference_items", "encoder_max_length",
                "fit_epochs", "fit_batch_size", "predict_batch_size", "eval_batch_size"):
        check(m[key] >= 1, f"mates.{key}", f"must be >= 1, got {m[key]}")
    check(m.fit_lr > 0, "mates.fit_lr", f"must be > 0, got {m.fit_lr}")
    check(m.temperature > 0, "mates.temperature", f"must be > 0, got {m.temperature}")
    check(0 < m.fit_val_fraction < 1, "mates.fit_val_fraction",
          f"must be in (0, 1), got {m.fit_val_fraction}")


def stage_dir(workdir: str, arm: str, stage: int) -> str:
    return os.path.join(workdir, "stages", "0" if stage == 0 else f"{stage}-{arm}")


def stage_candidates(config: ml_collections.ConfigDict, pool_size: int) -> list[np.ndarray]:
    """Each stage's candidate rows (sorted): disjoint seeded draws from the train pool."""
    m = config.mates
    stage_size = config.train.steps // m.stages * config.train.batch_size
    per_stage = math.ceil(stage_size / m.selection_fraction)
    config_lib.check(per_stage * m.stages <= pool_size, "mates.selection_fraction",
                     f"{m.stages} stages x {per_stage} candidates need {per_stage * m.stages} "
                     f"rows; the train pool has {pool_size}")
    config_lib.check(m.probe_size <= per_stage, "mates.probe_size",
                     f"{m.probe_size} exceeds the {per_stage} candidates of a stage")
    order = np.random.default_rng([config.seed, _CANDIDATES]).permutation(pool_size)
    return [np.sort(order[s * per_stage:(s + 1) * per_stage]) for s in range(m.stages)]


def predicted_influence(folder: str, section: ml_collections.ConfigDict, prober: probe.Prober,
                        encoder: encoder_lib.Encoder, state_fn, pool, candidates_N: np.ndarray,
                        tokens: dict[str, np.ndarray], reference: probe.Reference,
                        probe_seed: int, fit_seed: int) -> tuple[np.ndarray, dict]:
    """MATES' steps 2-4, each artifact cached in `folder`: the exact oracle influence of
    `section.probe_size` of the candidates (pool ids `candidates_N`, sorted) from the train state
    `state_fn()` (`oracle.npz`); the influence model fitted on them (`influence_model.json`);
    its z-scored predictions for every candidate, whose encoder inputs are `tokens`
    (`predictions.npz`). Returns (z_N, figures: the model's validation Spearman, the oracle's
    mean and spread). `section` holds probe_size, fit_* and predict_batch_size."""
    mesh = prober.trainer.mesh

    def oracle():
        rng = np.random.default_rng(probe_seed)
        ids = np.sort(rng.choice(candidates_N, section.probe_size, replace=False))
        return {"ids": ids, "influence": prober.oracle_influence(state_fn(), pool.rows(ids),
                                                                 reference)}

    probed = report.cached_npz(os.path.join(folder, "oracle.npz"), oracle)
    rows = np.searchsorted(candidates_N, probed["ids"])
    fit_config = influence_model.FitConfig(
        learning_rate=section.fit_lr, weight_decay=section.fit_weight_decay,
        epochs=section.fit_epochs, batch_size=section.fit_batch_size,
        val_fraction=section.fit_val_fraction, seed=fit_seed)

    def predictions():
        fit = influence_model.fit(encoder, tokens["ids"][rows], tokens["lengths"][rows],
                                  probed["influence"], fit_config, mesh=mesh)
        if jax.process_index() == 0:
            report.write_json(os.path.join(folder, "influence_model.json"), {
                "history": fit.history, "best_epoch": fit.best_epoch,
                "label_mean": fit.label_mean, "label_std": fit.label_std})
        predicted = influence_model.predict(encoder, fit.params, fit.label_mean, fit.label_std,
                                            tokens["ids"], tokens["lengths"],
                                            section.predict_batch_size, mesh=mesh)
        return {"influence": predicted, "z": (predicted - fit.label_mean) / fit.label_std,
                "val_spearman": np.float64(fit.history[fit.best_epoch]["val_spearman"])}

    predicted = report.cached_npz(os.path.join(folder, "predictions.npz"), predictions)
    return predicted["z"], {
        "probe_size": int(section.probe_size),
        "influence_model_val_spearman": float(predicted["val_spearman"]),
        "oracle_mean": float(probed["influence"].mean()),
        "oracle_std": float(probed["influence"].std())}


class Experiment:
    """The pools, the reference set, the encoder and the jitted probes of one MATES run."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir, m = config, workdir, config.mates
        self.pools = pool_lib.build_pools(config)
        self.train_pool = self.pools["train"]
        self.candidates = stage_candidates(config, len(self.train_pool))
        self.stage_steps = config.train.steps // m.stages
        self.stage_size = self.stage_steps * config.train.batch_size
        self.reference = probe.cloze_from_pool(self.pools["heldout"], m.reference_domain,
                                               m.reference_items)
        self.trainer = train.Trainer(config)
        self.prober = probe.Prober(self.trainer, chunk_size=m.probe_chunk,
                                   reference_batch_size=m.eval_batch_size)
        self.encoder = encoder_lib.load_encoder(m.encoder or None, m.encoder_max_length)
        self.lm_tokenizer = tokenizer_lib.load_tokenizer(self.train_pool.tokenizer_path)

    def selection(self, arm: str, stage: int) -> select.Selection:
        """The stage's selection (pool ids), saved in its folder once."""
        path = os.path.join(stage_dir(self.workdir, arm, stage), "selection.json")
        if os.path.exists(path):
            return select.Selection.load(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        candidates = self.candidates[stage]
        if arm == "mates" and stage > 0:
            scores, params = self.predicted_influence(stage)
            chosen = select.gumbel_top_k(scores, self.stage_size,
                                         config_lib.stream_seed(self.config.seed, _GUMBEL, stage),
                                         self.config.mates.temperature)
        else:
            chosen = select.random_ids(len(candidates), self.stage_size,
                                       config_lib.stream_seed(self.config.seed, _RANDOM, stage))
            params = {}
        selection = select.Selection(candidates[chosen.ids], chosen.method,
                                     len(self.train_pool), {**chosen.params, **params,
                                                            "stage": stage}, chosen.scores)
        if jax.process_index() == 0:
            selection.save(path)
        return selection

    def predicted_influence(self, stage: int) -> tuple[np.ndarray, dict]:
        """Steps 2-4 for `stage`, from the state stage - 1 left (`predicted_influence`)."""
        folder, candidates = stage_dir(self.workdir, "mates", stage), self.candidates[stage]
        tokens = report.cached_npz(os.path.join(folder, "encoder_inputs.npz"), lambda: dict(zip(
            ("ids", "lengths"), embed.encoder_inputs(
                self.encoder, self.train_pool.tokens[candidates],
                self.train_pool.segments[candidates], self.lm_tokenizer), strict=True)))
        previous = stage_dir(self.workdir, "mates", stage - 1)
        return predicted_influence(
            folder, self.config.mates, self.prober, self.encoder,
            lambda: train.load_state(self.trainer, previous)[0], self.train_pool, candidates,
            tokens, self.reference, config_lib.stream_seed(self.config.seed, _PROBES, stage),
            config_lib.stream_seed(self.config.seed, _FIT, stage))

    def train_stage(self, arm: str, stage: int) -> dict:
        """Trains `stage` of `arm` on its selection (once) and evaluates it."""
        folder = stage_dir(self.workdir, arm, stage)

        def train_model():
            selection = self.selection(arm, stage)
            c = ml_collections.ConfigDict(self.config.to_dict())
            c.train.stop_at = (stage + 1) * self.stage_steps
            c.continue_from = stage_dir(self.workdir, arm, stage - 1) if stage else ""
            c.init_from = "" if stage else self.config.init_from
            logging.info("stage %d (%s): %d sequences, steps %d-%d", stage, arm, len(selection),
                         stage * self.stage_steps + 1, c.train.stop_at)
            return pretrain.train_and_evaluate(
                c, folder, self.pools, selection.ids, lambda params: dict(
                    stage=stage, arm=arm, selection=selection.params,
                    reference_loss=self.prober.reference_loss(params, self.reference)))

        return pretrain.train_once(folder, train_model)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Every stage of both arms (stage 0 shared), then the comparison."""
    experiment = Experiment(config, workdir)
    shared = experiment.train_stage("random", 0)
    stages = {arm: [shared] + [experiment.train_stage(arm, s)
                               for s in range(1, config.mates.stages)] for arm in ARMS}
    final = {arm: stages[arm][-1] for arm in ARMS}
    return {
        "stage_steps": experiment.stage_steps, "stage_size": experiment.stage_size,
        "candidates_per_stage": int(len(experiment.candidates[0])),
        "reference_items": int(len(experiment.reference.tokens_RxL)),
        "stages": stages,
        "final": {arm: {"reference_loss": r["reference_loss"], "eval": r["eval"],
                        "downstream": r["downstream"]} for arm, r in final.items()},
        "reference_loss_gain": final["random"]["reference_loss"]
        - final["mates"]["reference_loss"],
    }


def to_markdown(result: dict) -> str:
    arms = list(ARMS)
    domains = list(result["final"]["mates"]["eval"])
    perplexity = [(d, *(result["final"][a]["eval"][d] for a in arms)) for d in domains]
    per_stage = []
    for s, (ours, base) in enumerate(zip(*(result["stages"][a] for a in arms), strict=True)):
        spearman = ours["selection"].get("influence_model_val_spearman", "-")  # Stage 0: none.
        per_stage.append((s, ours["reference_loss"], base["reference_loss"], spearman))
    return (
        "# MATES vs random selection\n\n"
        f"{len(per_stage)} stages of {result['stage_steps']} steps; each later stage selects "
        f"{result['stage_size']} of {result['candidates_per_stage']} fresh candidates. "
        f"Reference: {result['reference_items']} cloze items. Lower is better everywhere.\n\n"
        f"Final reference loss gain of MATES over random: "
        f"{result['reference_loss_gain']:+.4f} nats\n\n## Reference loss after each stage\n\n"
        + report.markdown_table(["stage", "mates", "random", "influence model val Spearman"],
                                per_stage)
        + "\n\n## Final held-out perplexity\n\n"
        + report.markdown_table(["domain", *arms], perplexity)
        + "\n## Final zero-shot tasks (higher is better)\n\n"
        + pretrain.downstream_markdown({a: result["final"][a]["downstream"] for a in arms}))


def main(argv):
    del argv
    result = launch.main(validate, run, to_markdown)
    logging.info("final reference loss: mates %.4f, random %.4f",
                 result["final"]["mates"]["reference_loss"],
                 result["final"]["random"]["reference_loss"])


if __name__ == "__main__":
    app.run(main)
