"""What every experiment does with its data and models: load the pools and the held-out roles
once (`load_data`), train a model on rows of the train pool, evaluate it the same way everywhere
(`evaluate_model`), and train each model once (`train_once`: a finished model is read back from
its `model.json`, never trained again).

Every trained model is evaluated on the run's `eval` rows (held-out perplexity per domain, the
zero-shot suite) and, when the run has a target domain, on the cloze items of its `target` rows
(`target_loss`: in sample, what target-aware selectors aimed at) and of its `target_eval` rows
(`target_eval_loss`: out of sample, what arms are ranked by).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from jaxsel import downstream, evaluate, probe, report, train
from jaxsel import roles as roles_lib
from jaxsel.data import pipeline
from jaxsel.data import pool as pool_lib

MODEL_FILE = "model.json"  # Written into a model's folder by `train_once` when it is finished.


@dataclasses.dataclass(frozen=True)
class Data:
    """A run's pools (`train`, `heldout`), its held-out roles, the cloze items of its target
    (`items`: `target`, `target_eval`; empty without a target domain) and the zero-shot suite
    on its `eval` rows."""

    pools: dict
    roles: roles_lib.Roles
    items: dict[str, probe.Reference]
    suite: downstream.Suite

    @property
    def train_pool(self) -> pool_lib.Pool:
        return self.pools["train"]

    @property
    def heldout(self) -> pool_lib.Pool:
        return self.pools["heldout"]

    def splits(self) -> dict:
        """`roles.splits` plus how many cloze items each target role gave."""
        return {**roles_lib.splits(self.pools, self.roles),
                "items": {name: int(len(ref.tokens_RxL)) for name, ref in self.items.items()}}


def load_data(config: ml_collections.ConfigDict) -> Data:
    """The pools of `config.data` (built once), the roles of `config.roles`, the target's cloze
    items (from the first `roles.target_items` / `roles.target_eval_items` rows of each role,
    `roles.item_len` tokens each) and the
    zero-shot suite. Fails before any training if a role or task set cannot be made."""
    pools = pool_lib.build_pools(config)
    roles = roles_lib.assign(pools["heldout"], config.roles)
    items = {}
    if roles.target_domain:
        r = config.roles
        items = {role: probe.cloze_from_pool(pools["heldout"], roles.ids[role], count,
                                             r.item_len)
                 for role, count in (("target", r.target_items),
                                     ("target_eval", r.target_eval_items))}
    suite = downstream.build(config, pools["heldout"], roles.ids["eval"])
    return Data(pools, roles, items, suite)


def evaluate_model(config: ml_collections.ConfigDict, trainer: train.Trainer, params,
                   data: Data) -> dict:
    """`eval` (perplexity of the `eval` rows per domain, at most `train.eval_per_domain` of
    each), `downstream` (the zero-shot suite), and with a target `target_loss`,
    `target_eval_loss` and `target_eval_accuracy` (cloze items; lower loss is better)."""
    eval_ids = data.roles.rows("eval", data.heldout, config.train.eval_per_domain)
    out = {"eval": evaluate.perplexity_by_domain(trainer, params, data.heldout, eval_ids,
                                                 config.train.batch_size),
           "downstream": downstream.run(trainer, params, data.suite,
                                        config.downstream.batch_size)}
    if data.items:
        scores = {role: evaluate.cloze_accuracy(trainer, params, items,
                                                config.downstream.batch_size)
                  for role, items in data.items.items()}
        out.update(target_loss=scores["target"]["loss"],
                   target_eval_loss=scores["target_eval"]["loss"],
                   target_eval_accuracy=scores["target_eval"]["accuracy"])
    return out


def train_model(config: ml_collections.ConfigDict, workdir: str, data: Data,
                ids: np.ndarray | None = None, data_seed: int | None = None
                ) -> tuple[dict, train.Trainer, dict]:
    """Trains on `ids` of the train pool (default: all) in `workdir`, resuming from its
    checkpoints, visiting them in the order of `data_seed` (default `config.seed`): (record:
    `final_loss`, `steps`, `train_sequences`, `train_seconds`; the trainer; the final
    params)."""
    ids = np.arange(len(data.train_pool)) if ids is None else np.asarray(ids)
    if ids.size == 0:
        raise ValueError(f"{workdir}: no train rows to train on")
    batches = iter(pipeline.make_batches(
        data.train_pool, ids, config.train.batch_size,
        config.seed if data_seed is None else data_seed, jax.process_index(),
        jax.process_count()))
    trainer = train.Trainer(config)
    eval_ids = data.roles.rows("eval", data.heldout, config.train.eval_per_domain)
    eval_fn = lambda params, step: evaluate.perplexity_by_domain(  # noqa: E731
        trainer, params, data.heldout, eval_ids, config.train.batch_size)
    start = time.perf_counter()
    result = train.run(config, workdir, batches, trainer, evaluate_fn=eval_fn)
    record = {"final_loss": result["final_loss"], "steps": result["steps"],
              "train_sequences": int(ids.size),
              "train_seconds": round(time.perf_counter() - start, 2)}
    return record, trainer, result["state"].params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data: Data,
                       ids: np.ndarray | None = None,
                       describe: Callable[..., dict] | None = None,
                       data_seed: int | None = None) -> dict:
    """`train_model`, then `evaluate_model` of its final params, plus `describe(params)`'s
    fields (what else an experiment says of the model) and the `eval_seconds` it took."""
    record, trainer, params = train_model(config, workdir, data, ids, data_seed)
    start = time.perf_counter()
    record.update(evaluate_model(config, trainer, params, data))
    record.update(describe(params) if describe else {})
    record["eval_seconds"] = round(time.perf_counter() - start, 2)
    return record


def train_once(folder: str, train_fn: Callable[[], dict]) -> dict:
    """The record of the model that `train_fn()` trains in `folder` (e.g. by
    `train_and_evaluate`): read back from `folder/model.json` when finished, so a finished model
    is never trained (nor its data selected) again; else `train_fn()`'s, written there."""
    return report.cached_json(os.path.join(folder, MODEL_FILE), train_fn)
