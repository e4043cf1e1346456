"""What every experiment does with its data and models: load the pools and the held-out roles
once (`load_data`); train a model on rows of the train pool (`train_model`), once, in the
content-keyed model pool every experiment shares (`model`: a finished model is found by what it
was trained from and how, never trained again); evaluate it the same way everywhere
(`evaluate_model`), once per run (`evaluation`).

Every trained model is evaluated on the run's `eval` rows (held-out perplexity and bits per byte
per domain, the zero-shot suite) and, when the run has a target domain, on the cloze items of
its `target` rows (`target_loss`: in sample, what target-aware selectors aimed at) and of its
`target_eval` rows (`target_eval_loss`: out of sample, what arms are ranked by).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxsel import checkpoint, downstream, evaluate, files, references, report, train
from jaxsel import roles as roles_lib
from jaxsel.data import pipeline
from jaxsel.data import pool as pool_lib

MODEL_FILE = "model.json"  # Written into a model's folder in the pool when it is finished.
EVALUATION_FILE = "evaluation.json"  # A model's evaluation under one run's data and roles.


@dataclasses.dataclass(frozen=True)
class Data:
    """A run's pools (`train`, `heldout`), its held-out roles, the cloze items of its target
    (`items`: `target`, `target_eval`; empty without a target domain) and the zero-shot suite
    on its `eval` rows."""

    pools: dict
    roles: roles_lib.Roles
    items: dict[str, references.Reference]
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
        items = {role: references.cloze_from_pool(pools["heldout"], roles.ids[role], count,
                                                  r.item_len)
                 for role, count in (("target", r.target_items),
                                     ("target_eval", r.target_eval_items))}
    suite = downstream.build(config, pools["heldout"], roles.ids["eval"])
    return Data(pools, roles, items, suite)


def evaluate_model(config: ml_collections.ConfigDict, trainer: train.Trainer, params,
                   data: Data) -> dict:
    """`eval` and `eval_bpb` (perplexity and bits per byte of the `eval` rows per domain and
    `"all"`, at most `train.eval_per_domain` of each; `evaluate.scores_by_domain`), `downstream`
    (the zero-shot suite), and with a target `target_loss`, `target_eval_loss` and
    `target_eval_accuracy` (cloze items; lower loss is better)."""
    eval_ids = data.roles.rows("eval", data.heldout, config.train.eval_per_domain)
    scores = evaluate.scores_by_domain(trainer, params, data.heldout, eval_ids,
                                       config.train.batch_size)
    out = {"eval": scores["perplexity"], "eval_bpb": scores["bits_per_byte"],
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
    eval_fn = lambda params, step: evaluate.scores_by_domain(  # noqa: E731
        trainer, params, data.heldout, eval_ids, config.train.batch_size)["perplexity"]
    start = time.perf_counter()
    result = train.run(config, workdir, batches, trainer, evaluate_fn=eval_fn)
    record = {"final_loss": result["final_loss"], "steps": result["steps"],
              "train_sequences": int(ids.size),
              "train_seconds": round(time.perf_counter() - start, 2)}
    return record, trainer, result["state"].params


def model_pool(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The model pool's folder: `config.model_pool`, else `<workdir>/models`."""
    return config.model_pool or os.path.join(workdir, "models")


def model_identity(config: ml_collections.ConfigDict, data: Data, ids: np.ndarray,
                   parent: dict | None, data_seed: int | None) -> dict:
    """Everything a trained model's params depend on: the model it starts from (its key, and
    whether its whole state continues or only its params start a fresh optimizer), the pool and
    the rows it trains on in which order, and the training config that matters (not logging,
    checkpointing, evaluation or the mesh)."""
    ids = np.asarray(ids, np.int64)
    start = "scratch"
    origin = config.continue_from or config.init_from
    if parent is None and origin:  # Another run's model, by its folder.
        start = "continue" if config.continue_from else "init"
        origin = origin if files.is_remote(origin) else os.path.abspath(origin)
    elif parent is not None:
        start = "continue" if config.continue_from else "init"
        if parent["dir"] not in (config.continue_from, config.init_from):
            raise ValueError(f"parent {parent['dir']}: the config must continue_from or "
                             "init_from it")
    return dict(start=start, parent=parent["key"] if parent else origin or None,
                pool=data.train_pool.report["key"],
                num_ids=int(ids.size), ids_sha256=hashlib.sha256(ids.tobytes()).hexdigest(),
                seed=config.seed, data_seed=config.seed if data_seed is None else data_seed,
                seq_len=config.data.seq_len, steps=config.train.steps,
                stop_at=config.train.stop_at, batch_size=config.train.batch_size,
                model=config.model.to_dict(), optim=config.optim.to_dict())


def model(config: ml_collections.ConfigDict, data: Data, ids: np.ndarray, *, pool: str,
          name: str, parent: dict | None = None, data_seed: int | None = None) -> dict:
    """The model trained on rows `ids` of the train pool with `config` (from scratch, or from
    `parent`, another record of this function, that `config.continue_from` or `init_from`
    names), in the model pool `pool`: a folder per model named by a hash of its
    `model_identity`, so any experiment that needs the same model finds it. A finished model
    (its `model.json`) is read back, never trained again; one cut short resumes from its
    checkpoints. Returns its record (`train_model`'s, `name`, `key`, `identity`), its `dir` and
    `status` ("trained" or "reused")."""
    identity = model_identity(config, data, ids, parent, data_seed)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    folder = os.path.join(pool, key)
    done = os.path.join(folder, MODEL_FILE)
    reused = files.path(done).exists()

    def train_fn():
        logging.info("model %s: %d steps on %d sequences in %s", name,
                     (config.train.stop_at or config.train.steps), len(ids), folder)
        return dict(train_model(config, folder, data, ids, data_seed)[0], name=name, key=key,
                    identity=identity)

    record = report.cached_json(done, train_fn)
    return {**record, "dir": folder, "status": "reused" if reused else "trained"}


def evaluation(config: ml_collections.ConfigDict, data: Data, trained: dict,
               folder: str) -> dict:
    """`evaluate_model` of the `trained` model's final params (a `model` record) under this
    run's data and roles, computed once into `folder/evaluation.json`, with the `eval_seconds`
    it took (an evaluation saved before bits per byte were measured reads back with an empty
    `eval_bpb`)."""
    def compute():
        start = time.perf_counter()
        trainer = train.Trainer(config)
        params = checkpoint.load_params(trained["dir"], trainer.abstract_params())
        out = evaluate_model(config, trainer, params, data)
        return {**out, "eval_seconds": round(time.perf_counter() - start, 2)}

    return {"eval_bpb": {}, **report.cached_json(os.path.join(folder, EVALUATION_FILE), compute)}
