"""MATES: model-aware data selection with a data influence model (Yu et al., NeurIPS 2024).

Pretraining runs in `mates.stages` equal stages of `train.steps / stages` steps. Stage 0 trains
on a random selection. Before each later stage s, with the model as stage s-1 left it (params,
AdamW moments, step, on the stable phase of a warmup-stable-decay schedule):

1. candidates: `stage_size / selection_fraction` rows of the train pool that no earlier stage drew
   (seeded; the same for both arms);
2. MATES' selection step (`jaxsel.mates`): the exact oracle influence of `probe_size` candidates
   on the `target` items, the data influence model fitted on them, its predictions for every
   candidate, and Gumbel-top-k at `temperature` (MATES: 0.5) picks `stage_size` of them;
3. the stage trains on them, continuing stage s-1's state (`config.continue_from`).

The `random` arm trains the same stages from the same stage 0 on uniform random picks of the
same candidates. With `optim.schedule = "wsd"` (the default here, as in MATES) every stage is
evaluated as MATES evaluates its checkpoints: a copy of the stage's state decays its learning
rate over `optim.decay_steps` steps (on the stage's own pick, in another order) and is evaluated;
training goes on from the stable state. Every evaluation (`runs.evaluate_model`) gives the target
loss (in sample), the target-eval loss (out of sample: arms are compared on it), held-out
perplexity and bits per byte, and the zero-shot suite. Each stage also reports MATES'
diagnostics (the target share of a plain top-k on the oracle labels, the influence model's
validation Spearman, the target share of the pick) and the run its selection overhead against
training, in FLOPs and seconds.

Writes into --workdir: config.json, report.json, report.md, stages.png, and `stages/<s>-<arm>/`
(stage 0: `stages/0`) holding the stage's `selection.json`, for MATES the selection step's
artifacts (`jaxsel.mates`) and the candidates' encoder inputs (streamed into `rows/`), and its
`evaluation.json`. The stages' training runs and their decayed copies are models of the model
pool (`runs.model`, default `<workdir>/models`). Every artifact is written once and reused, so a
killed run resumes where it was.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np
from absl import app, logging
from matplotlib.figure import Figure

from jaxsel import (
    composition,
    embed,
    files,
    launch,
    mates,
    probe,
    references,
    report,
    runs,
    select,
    stream,
    train,
)
from jaxsel import config as config_lib
from jaxsel.data import tokenizer as tokenizer_lib
from jaxsel.model import encoder as encoder_lib
from jaxsel.model.transformer import ModelConfig

ARMS = ("mates", "random")
# Separate random streams of config.seed.
_CANDIDATES, _PROBES, _RANDOM, _GUMBEL, _FIT, _DECAY = range(6)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`config_lib.validate` and the mates section; every message names the key."""
    config_lib.validate(config, num_devices)
    config_lib.require_target(config)
    m, check = config.mates, config_lib.check
    check(m.stages >= 2, "mates.stages", f"must be >= 2 (random, then selected), got {m.stages}")
    check(config.train.steps % m.stages == 0, "train.steps",
          f"{config.train.steps} is not divisible by mates.stages={m.stages}")
    check(config.train.stop_at == 0, "train.stop_at", "is set for each stage; leave it 0")
    check(not config.continue_from, "continue_from", "is set for each stage; leave it empty")
    check(config.optim.schedule != "wsd" or config.optim.warmup_steps
          <= config.train.steps // m.stages, "optim.warmup_steps",
          f"{config.optim.warmup_steps} exceeds a stage ({config.train.steps // m.stages} steps): "
          "the first decayed copy would decay during warmup")
    check(0 < m.selection_fraction <= 1, "mates.selection_fraction",
          f"must be in (0, 1], got {m.selection_fraction}")
    for key in ("probe_size", "probe_chunk", "encoder_max_length", "encoder_windows",
                "fit_epochs", "fit_batch_size", "predict_batch_size", "eval_batch_size"):
        check(m[key] >= 1, f"mates.{key}", f"must be >= 1, got {m[key]}")
    check(m.probe_size >= 2, "mates.probe_size", f"must be >= 2 to fit on, got {m.probe_size}")
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


def stage_config(config: ml_collections.ConfigDict, stage: int, continue_from: str = "",
                 decayed: bool = False) -> ml_collections.ConfigDict:
    """The training config of `stage`: its steps on a schedule whose decay (wsd) starts after
    the last stage, or, `decayed`, the copy whose decay starts when the stage ends."""
    c = ml_collections.ConfigDict(config.to_dict())
    end = (stage + 1) * config.train.steps // config.mates.stages
    wsd = config.optim.schedule == "wsd"
    c.train.steps = (end if decayed else config.train.steps) + (
        config.optim.decay_steps if wsd else 0)
    c.train.stop_at = 0 if decayed else end
    c.continue_from = continue_from
    c.init_from = "" if continue_from else config.init_from
    return c


def planned_overhead(config: ml_collections.ConfigDict, encoder_config) -> dict:
    """The selection overhead a config plans, before any data: every selection stage probes
    `probe_size` candidates on `roles.target_items` items of `roles.item_len` tokens (the LM head
    counted at one target position each), fits on them and scores `stage_size /
    selection_fraction` candidates, each read in full windows (an upper bound: real candidates
    may decode to fewer encoder tokens); against the training of
    `train.steps` steps. `mates.overhead_summary`'s FLOPs part."""
    m, length = config.mates, config.data.seq_len
    model_cfg = ModelConfig.from_config(config.model)
    rows = config.roles.target_items
    items_RxL = np.zeros((rows, config.roles.item_len or length), np.int32)
    reference = references.Reference(items_RxL, items_RxL, np.zeros((rows, 1), np.int32),
                                      np.ones((rows, 1), np.float32))
    tokens = mates.encoder_tokens(m)
    candidates = math.ceil(config.train.steps // m.stages * config.train.batch_size
                           / m.selection_fraction)
    per_stage = mates.overhead(model_cfg, encoder_config, seq_len=length, reference=reference,
                               probes=m.probe_size, fit_tokens=m.probe_size * tokens,
                               fit_epochs=m.fit_epochs, scored_tokens=candidates * tokens,
                               window=m.encoder_max_length)
    flops = {step: value * (m.stages - 1) for step, value in per_stage.items()}
    train_flops = mates.training_flops(model_cfg, length, config.train.steps,
                                       config.train.batch_size)
    return {**flops, "train": train_flops, "ratio": sum(flops.values()) / train_flops}


class Experiment:
    """The data, the candidates, the encoder and the jitted probes of one MATES run."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir, m = config, workdir, config.mates
        self.data = runs.load_data(config)
        self.pool = self.data.train_pool
        self.candidates = stage_candidates(config, len(self.pool))
        self.stage_steps = config.train.steps // m.stages
        self.stage_size = self.stage_steps * config.train.batch_size
        self.wsd = config.optim.schedule == "wsd"
        self.trainer = train.Trainer(stage_config(config, m.stages - 1))
        self.prober = probe.Prober(self.trainer, chunk_size=m.probe_chunk,
                                   reference_batch_size=m.eval_batch_size)
        self.encoder = encoder_lib.load_encoder(m.encoder or None, m.encoder_max_length)
        self.models = runs.model_pool(config, workdir)
        self._trained: dict[tuple[str, int], dict] = {}

    def encoder_inputs(self, stage: int) -> dict[str, np.ndarray]:
        """The stage's candidates decoded and tokenised for the influence model (streamed to
        the stage folder's `rows/`)."""
        ids, max_tokens = self.candidates[stage], mates.encoder_tokens(self.config.mates)
        rows = self.pool.view(ids)
        target = stream.Target(os.path.join(stage_dir(self.workdir, "mates", stage), "rows"),
                               "encoder_inputs", {
                                   "pool": self.pool.key, "ids": stream.ids_key(ids),
                                   "encoder": self.config.mates.encoder, "max_tokens": max_tokens})
        ids_NxM, lengths_N = embed.encoder_inputs(
            self.encoder, rows["tokens"], rows["segments"],
            tokenizer_lib.load_tokenizer(self.pool.tokenizer_path), max_tokens=max_tokens,
            to=target)
        return {"ids": ids_NxM, "lengths": lengths_N}

    def predicted_influence(self, stage: int) -> tuple[np.ndarray, dict]:
        """MATES' selection step for `stage` from the state stage - 1 left."""
        previous = lambda: self.stage_model("mates", stage - 1)["dir"]  # noqa: E731
        return mates.predicted_influence(
            stage_dir(self.workdir, "mates", stage), self.config.mates, self.prober,
            self.encoder, lambda: train.load_state(self.trainer, previous())[0], self.pool,
            self.candidates[stage], self.encoder_inputs(stage), self.data.items["target"],
            config_lib.stream_seed(self.config.seed, _PROBES, stage),
            config_lib.stream_seed(self.config.seed, _FIT, stage))

    def selection(self, arm: str, stage: int) -> select.Selection:
        """The stage's selection (pool ids), saved in its folder once."""
        path = os.path.join(stage_dir(self.workdir, arm, stage), "selection.json")
        if files.path(path).exists():
            return select.Selection.load(path)
        candidates, params = self.candidates[stage], {}
        if arm == "mates" and stage > 0:
            scores, info = self.predicted_influence(stage)
            chosen = select.gumbel_top_k(scores, self.stage_size,
                                         config_lib.stream_seed(self.config.seed, _GUMBEL, stage),
                                         self.config.mates.temperature)
            params = dict(val_spearman=info["val_spearman"], probe_size=info["probe_size"])
        else:
            chosen = select.random_ids(len(candidates), self.stage_size,
                                       config_lib.stream_seed(self.config.seed, _RANDOM, stage))
        selection = select.Selection(candidates[chosen.ids], chosen.method, len(self.pool),
                                     {**chosen.params, **params, "stage": stage}, chosen.scores)
        if jax.process_index() == 0:
            selection.save(path)
        return selection

    def stage_model(self, arm: str, stage: int) -> dict:
        """`stage` of `arm` trained on its selection, continuing stage - 1 (once, in the model
        pool; stage 0 is one model for both arms)."""
        key = ("random" if stage == 0 else arm, stage)
        if key not in self._trained:
            parent = self.stage_model(arm, stage - 1) if stage else None
            selection = self.selection(arm, stage)
            c = stage_config(self.config, stage, parent["dir"] if parent else "")
            logging.info("stage %d (%s): %d sequences, steps %d-%d", stage, arm, len(selection),
                         stage * self.stage_steps + 1, c.train.stop_at)
            self._trained[key] = runs.model(c, self.data, selection.ids, pool=self.models,
                                            name=f"stage {stage} ({key[0]})", parent=parent)
        return self._trained[key]

    def train_stage(self, arm: str, stage: int) -> dict:
        """`stage` of `arm` trained, and evaluated (once, in its stage folder) from its decayed
        copy (wsd) or at its own state, with what its selection is made of."""
        trained, selection = self.stage_model(arm, stage), self.selection(arm, stage)
        evaluated = trained
        if self.wsd:
            evaluated = runs.model(
                stage_config(self.config, stage, trained["dir"], decayed=True), self.data,
                selection.ids, pool=self.models, name=f"{trained['name']} decayed",
                parent=trained,
                data_seed=config_lib.stream_seed(self.config.seed, _DECAY, stage))
        evaluation = runs.evaluation(stage_config(self.config, stage), self.data, evaluated,
                                     stage_dir(self.workdir, arm, stage))
        return {**trained, **evaluation, "stage": stage, "arm": arm,
                "selection": selection.params, "evaluated_dir": evaluated["dir"],
                "composition": composition.shares(self.pool, selection.ids,
                                                  self.config.roles.target_domain)}

    def selection_report(self, stage: int, record: dict) -> dict:
        """MATES' diagnostics and overhead of `stage`'s selection step (read back)."""
        m, target = self.config.mates, self.config.roles.target_domain
        _, info = self.predicted_influence(stage)
        k = max(1, round(m.selection_fraction * len(info["probed_ids"])))
        top = info["probed_ids"][np.argsort(info["oracle"], kind="stable")[:k]]
        lengths = self.encoder_inputs(stage)["lengths"]
        probed = np.searchsorted(self.candidates[stage], info["probed_ids"])
        flops = mates.overhead(
            self.trainer.model.cfg, self.encoder.config, seq_len=self.config.data.seq_len,
            reference=self.data.items["target"], probes=len(probed),
            fit_tokens=int(lengths[probed].sum()), fit_epochs=m.fit_epochs,
            scored_tokens=int(lengths.sum()), window=m.encoder_max_length)
        return {"oracle_top_k_target_share": composition.shares(self.pool, top, target)["target"],
                "val_spearman": info["val_spearman"],
                "pick_target_share": record["composition"]["target"],
                "flops": flops, "seconds": info["seconds"]}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Every stage of both arms (stage 0 shared), then the comparison."""
    experiment = Experiment(config, workdir)
    shared = experiment.train_stage("random", 0)
    stages = {arm: [shared] + [experiment.train_stage(arm, s)
                               for s in range(1, config.mates.stages)] for arm in ARMS}
    selection = [experiment.selection_report(s, stages["mates"][s])
                 for s in range(1, config.mates.stages)]
    final = {arm: stages[arm][-1] for arm in ARMS}
    train_flops = mates.training_flops(experiment.trainer.model.cfg, config.data.seq_len,
                                       config.train.steps, config.train.batch_size)
    return {
        "stage_steps": experiment.stage_steps, "stage_size": experiment.stage_size,
        "candidates_per_stage": int(len(experiment.candidates[0])),
        "decay_steps": config.optim.decay_steps if experiment.wsd else 0,
        "splits": experiment.data.splits(),
        "stages": stages, "selection": selection,
        "planned_overhead": planned_overhead(config, experiment.encoder.config),
        "overhead": mates.overhead_summary(
            {step: sum(s["flops"][step] for s in selection) for step in ("probe", "fit", "score")},
            {step: sum(s["seconds"][step] for s in selection)
             for step in ("probe", "fit", "score")},
            train_flops, sum(s["train_seconds"] for s in stages["mates"])),
        "final": {arm: {key: r[key] for key in ("target_loss", "target_eval_loss", "eval",
                                                 "eval_bpb", "downstream")}
                  for arm, r in final.items()},
        "target_eval_loss_gain": final["random"]["target_eval_loss"]
        - final["mates"]["target_eval_loss"],
    }


def to_markdown(result: dict) -> str:
    arms, stages, o = list(ARMS), result["stages"], result["overhead"]
    per_stage = [(s, stages["mates"][s]["target_eval_loss"], stages["random"][s]
                  ["target_eval_loss"], stages["mates"][s]["target_loss"],
                  stages["random"][s]["target_loss"]) for s in range(len(stages["mates"]))]
    diagnostics = [(s + 1, _pct(d["oracle_top_k_target_share"]), d["val_spearman"],
                    _pct(d["pick_target_share"])) for s, d in enumerate(result["selection"])]
    evaluated = (f"each after a decay of {result['decay_steps']} steps from a copy of its state"
                 if result["decay_steps"] else "each at its own state")
    return (
        "# MATES vs random selection\n\n"
        f"{len(per_stage)} stages of {result['stage_steps']} steps; each later stage selects "
        f"{result['stage_size']} of {result['candidates_per_stage']} fresh candidates. Stages "
        f"are evaluated {evaluated}. Arms are compared on the **target-eval loss** (cloze items "
        "of target-domain documents no selector saw); the **target loss** is on the items MATES "
        "aimed at (in sample). Lower is better for both.\n\n"
        f"Final target-eval loss gain of MATES over random: "
        f"{result['target_eval_loss_gain']:+.4f} nats\n\n![stages](stages.png)\n\n"
        "## Loss after each stage\n\n"
        + report.markdown_table(["stage", "mates target-eval", "random target-eval",
                                 "mates target (in sample)", "random target (in sample)"],
                                per_stage)
        + "\n## MATES' selection at each stage\n\n"
        + report.markdown_table(["stage", "target share of top-k on the oracle",
                                 "influence model val Spearman", "target share of the pick"],
                                diagnostics)
        + "\n## Selection overhead against training\n\n"
        + report.markdown_table(["step", "FLOPs", "seconds"], [
            (step, f"{o['flops'][step]:.3g}", f"{o['seconds'][step]:.1f}")
            for step in ("probe", "fit", "score", "train")]
            + [("selection / training", f"{o['flops']['ratio']:.3f}",
                "-" if o["seconds"]["ratio"] is None else f"{o['seconds']['ratio']:.3f}")])
        + f"\nAs planned from the config (every candidate read in full windows): "
        f"{result['planned_overhead']['ratio']:.3f} of training's FLOPs.\n"
        + "\n## Final held-out perplexity and bits per byte (eval role)\n\n"
        + report.heldout_tables({a: result["final"][a] for a in arms})
        + "\n## Final zero-shot tasks (higher is better)\n\n"
        + report.downstream_table({a: result["final"][a]["downstream"] for a in arms})
        + "\n## Data\n\n" + report.splits_markdown(result["splits"]))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def plot_stages(result: dict, path: str) -> None:
    """Target-eval loss of both arms after every stage (left) and the target share of MATES'
    pick against a plain top-k on its oracle labels (right); atomic."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for arm, style in zip(ARMS, ("-o", "--s"), strict=True):
        values = [s["target_eval_loss"] for s in result["stages"][arm]]
        left.plot(np.arange(len(values)), values, style, label=arm)
    left.set(xlabel="stage", ylabel="target-eval loss (nats)", title="after each stage")
    left.legend(fontsize=8)
    sel = result["selection"]
    stages = np.arange(1, len(sel) + 1)
    for key, label in (("oracle_top_k_target_share", "top-k on the oracle"),
                       ("pick_target_share", "MATES' pick")):
        right.plot(stages, [s[key] or 0.0 for s in sel], "-o", label=label)
    right.set(xlabel="stage", ylabel="target-domain share", ylim=(0, 1),
              title="what MATES picks")
    right.legend(fontsize=8)
    report.write_figure(path, fig)


STUDY = launch.Study(validate, run, to_markdown, {"stages.png": plot_stages},
                     launch.Headline(r"final\.(?P<arm>[^.]+)\.target_eval_loss",
                                     "final target-eval loss", "final_target_eval_loss.png"))


def main(argv):
    del argv
    launch.main(STUDY)


if __name__ == "__main__":
    app.run(main)
