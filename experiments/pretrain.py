"""Pretrains an LM on the pool (or a saved selection) and reports held-out perplexity per domain.

Writes config.json, metrics.jsonl, checkpoints/, report.json (`final_loss`, `eval`: domain ->
perplexity) and report.md into --workdir; running again on the same workdir resumes.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, logging

from experiments import launch
from jaxsel import config as config_lib
from jaxsel import evaluate, report, select, train
from jaxsel.data import pipeline, pool


def train_and_evaluate(config, workdir: str, pools: dict, ids: np.ndarray | None = None) -> dict:
    """Trains on `ids` of the train pool (default: all) and evaluates on the held-out pool."""
    train_pool = pools["train"]
    ids = np.arange(len(train_pool)) if ids is None else np.asarray(ids)
    batches = iter(pipeline.make_batches(
        train_pool, ids, config.train.batch_size, config.seed,
        jax.process_index(), jax.process_count()))
    trainer = train.Trainer(config)
    eval_fn = lambda params, step: evaluate.perplexity_by_domain(  # noqa: E731
        trainer, params, pools["heldout"], config.train.batch_size, config.train.eval_per_domain)
    result = train.run(config, workdir, batches, trainer, evaluate_fn=eval_fn)
    return {"final_loss": result["final_loss"], "steps": result["steps"],
            "train_sequences": int(ids.size),
            "eval": eval_fn(result["state"].params, result["steps"])}


def to_markdown(title: str, result: dict) -> str:
    rows = [(domain, ppl) for domain, ppl in result["eval"].items()]
    return (f"# {title}\n\nfinal train loss {result['final_loss']:.4f} after {result['steps']} "
            f"steps on {result['train_sequences']} sequences\n\n## Held-out perplexity\n\n"
            + report.markdown_table(["domain", "perplexity"], rows))


def main(argv):
    del argv
    config, workdir = launch.start()
    config_lib.validate(config, jax.device_count())
    done = report.open_workdir(workdir, config)
    if done is not None:
        logging.info("already finished: %s/report.json", workdir)
        return
    pools = pool.build_pools(config)
    ids = None
    if config.selection:
        selection = select.Selection.load(config.selection)
        config_lib.check(selection.pool_size == len(pools["train"]), "selection",
                         f"{config.selection} selects from a pool of {selection.pool_size} rows; "
                         f"this train pool has {len(pools['train'])}")
        ids = selection.ids
    result = train_and_evaluate(config, workdir, pools, ids)
    if jax.process_index() == 0:
        report.finish(workdir, result, to_markdown("Pretraining", result))
    logging.info("held-out perplexity: %s", result["eval"])


if __name__ == "__main__":
    app.run(main)
