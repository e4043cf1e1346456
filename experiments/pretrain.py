"""Pretrains an LM on the pool (or a saved selection) and reports held-out perplexity and bits per
byte per domain.

Writes config.json, metrics.jsonl, checkpoints/, report.json (`final_loss`, `eval` and
`eval_bpb`: domain -> perplexity and bits per byte of the held-out `eval` rows, `downstream`,
`splits`) and report.md into --workdir; running again on the same workdir resumes.
"""

from __future__ import annotations

from absl import app

from jaxsel import config as config_lib
from jaxsel import launch, report, runs, select


def run(config, workdir: str) -> dict:
    """Pretraining on the train pool, or on the rows of `config.selection` (a `select.Selection`
    drawn from this pool)."""
    data = runs.load_data(config)
    ids = None
    if config.selection:
        selection = select.Selection.load(config.selection)
        config_lib.check(selection.pool_size == len(data.train_pool), "selection",
                         f"{config.selection} selects from a pool of {selection.pool_size} rows; "
                         f"this train pool has {len(data.train_pool)}")
        ids = selection.ids
    record, trainer, params = runs.train_model(config, workdir, data, ids)
    return {**record, **runs.evaluate_model(config, trainer, params, data),
            "splits": data.splits()}


def to_markdown(result: dict) -> str:
    return (f"# Pretraining\n\nfinal train loss {result['final_loss']:.4f} after "
            f"{result['steps']} steps on {result['train_sequences']} sequences\n\n"
            "## Held-out perplexity and bits per byte\n\n"
            + report.heldout_tables({"model": result})
            + "\n## Zero-shot tasks\n\n" + report.downstream_table({"model": result["downstream"]})
            + "\n## Data\n\n" + report.splits_markdown(result["splits"]))


STUDY = launch.Study(config_lib.validate, run, to_markdown)


def main(argv):
    del argv
    launch.main(STUDY)


if __name__ == "__main__":
    app.run(main)
