"""Pretrains an LM on the pool (or a saved selection) and reports held-out perplexity per domain.

Writes config.json, metrics.jsonl, checkpoints/, report.json (`final_loss`, `eval`: domain ->
perplexity) and report.md into --workdir; running again on the same workdir resumes.

`train_once` is how every experiment trains one of its models: in its own folder, resumed if cut
short, and marked finished by `model.json`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, logging

from experiments import launch
from jaxsel import config as config_lib
from jaxsel import downstream, evaluate, report, select, train
from jaxsel.data import pipeline, pool

MODEL_FILE = "model.json"  # Written into a model's folder by `train_once` when it is finished.


def train_and_evaluate(config, workdir: str, pools: dict, ids: np.ndarray | None = None,
                       describe: Callable[..., dict] | None = None) -> dict:
    """Trains on `ids` of the train pool (default: all) and evaluates on the held-out pool:
    `final_loss`, `steps`, `train_sequences`, `eval` (held-out perplexity per domain),
    `downstream` (the zero-shot suite, `jaxsel.downstream`), plus `describe(params)`'s fields,
    computed from the final params (e.g. a reference loss), and the wall `seconds` it took."""
    start = time.perf_counter()
    suite = downstream.build(config, pools["heldout"])  # Before training: fails early.
    train_pool = pools["train"]
    ids = np.arange(len(train_pool)) if ids is None else np.asarray(ids)
    batches = iter(pipeline.make_batches(
        train_pool, ids, config.train.batch_size, config.seed,
        jax.process_index(), jax.process_count()))
    trainer = train.Trainer(config)
    eval_fn = lambda params, step: evaluate.perplexity_by_domain(  # noqa: E731
        trainer, params, pools["heldout"], config.train.batch_size, config.train.eval_per_domain)
    result = train.run(config, workdir, batches, trainer, evaluate_fn=eval_fn)
    params = result["state"].params
    return {"final_loss": result["final_loss"], "steps": result["steps"],
            "train_sequences": int(ids.size), "eval": eval_fn(params, result["steps"]),
            "downstream": downstream.run(trainer, params, suite, config.downstream.batch_size),
            "seconds": round(time.perf_counter() - start, 1),
            **(describe(params) if describe else {})}


def train_once(folder: str, train_model: Callable[[], dict]) -> dict:
    """The record of the model that `train_model()` trains in `folder` (e.g. by
    `train_and_evaluate`): read back from `folder/model.json` when finished, so a finished model
    is never trained (nor its data selected) again; else `train_model()`'s, written there."""
    return report.cached_json(os.path.join(folder, MODEL_FILE), train_model)


def run(config, workdir: str) -> dict:
    """Pretraining on the train pool, or on the rows of `config.selection` (a `select.Selection`
    drawn from this pool)."""
    pools = pool.build_pools(config)
    ids = None
    if config.selection:
        selection = select.Selection.load(config.selection)
        config_lib.check(selection.pool_size == len(pools["train"]), "selection",
                         f"{config.selection} selects from a pool of {selection.pool_size} rows; "
                         f"this train pool has {len(pools['train'])}")
        ids = selection.ids
    return train_and_evaluate(config, workdir, pools, ids)


def to_markdown(result: dict) -> str:
    rows = [(domain, ppl) for domain, ppl in result["eval"].items()]
    return (f"# Pretraining\n\nfinal train loss {result['final_loss']:.4f} after "
            f"{result['steps']} steps on {result['train_sequences']} sequences\n\n"
            "## Held-out perplexity\n\n" + report.markdown_table(["domain", "perplexity"], rows)
            + "\n## Zero-shot tasks\n\n" + downstream_markdown({"model": result["downstream"]}))


def downstream_markdown(by_model: dict[str, dict]) -> str:
    """One table of `downstream` results: a row per task, a column per model (e.g. per arm)."""
    first = next(iter(by_model.values()))
    rows = [(f"average {kind}", *(r["average"].get(kind, float("nan")) for r in by_model.values()))
            for kind in first["average"]]
    for name, numbers in first["tasks"].items():
        field = "accuracy" if name.startswith("cloze/") else "acc"
        rows.append((f"{name} ({numbers['items']} items)",
                     *(r["tasks"][name][field] for r in by_model.values())))
    skipped = "".join(f"\n- {name}: {why}" for name, why in first["skipped"].items())
    return (report.markdown_table(["task (accuracy)", *by_model], rows)
            + (f"\nLeft out:{skipped}\n" if skipped else ""))


def main(argv):
    del argv
    result = launch.main(config_lib.validate, run, to_markdown)
    logging.info("held-out perplexity: %s", result["eval"])


if __name__ == "__main__":
    app.run(main)
