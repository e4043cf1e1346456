"""The zero-shot suite every trained model is evaluated on (`config.downstream`), no download.

For each held-out domain (all, or those named in `downstream.domains`), from its `eval` rows
(`jaxsel.roles`: never a row a selector aimed at or arms are ranked on):

- `cloze/<domain>`: LAMBADA-style items (`references.cloze_from_pool`, `downstream.num_items` rows),
  scored by `evaluate.cloze_accuracy`: the greedy prediction of each row's last word;
- `continuation/<domain>`: a HellaSwag-like task (`tasks.continuation_task`: a window of a
  document in each of `downstream.num_items` rows, `choices` same-length continuations, one
  true), scored by `evaluate.multiple_choice`;

plus `mc/<file stem>` for each jsonl file of multiple-choice items in `downstream.files` (e.g.
ARC or SciQ exported in `tasks.load_jsonl`'s format). A domain too small for a task is left out
and named in the suite's `skipped` with the reason. `average` holds the macro averages of the
cloze accuracies and of the continuation accuracies.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from jaxsel import config as config_lib
from jaxsel import evaluate, references, tasks
from jaxsel.data import tokenizer as tokenizer_lib

_SUITE = 7  # The stream of config.seed that draws the continuation tasks.


@dataclasses.dataclass(frozen=True)
class Suite:
    """Tasks by name (`references.Reference` cloze items or `tasks.MultipleChoice`) and the
    tasks left out, by name, with the reason."""

    tasks: dict
    skipped: dict[str, str]


def build(config: ml_collections.ConfigDict, heldout, eval_ids) -> Suite:
    """The suite of `config.downstream` on rows `eval_ids` of the held-out pool `heldout` (the
    run's `eval` role)."""
    d = config.downstream
    domains = list(d.domains) or list(heldout.domain_names)
    unknown = sorted(set(domains) - set(heldout.domain_names))
    config_lib.check(not unknown, "downstream.domains",
                     f"{unknown} are not domains of the held-out pool {heldout.domain_names}")
    eval_ids = np.asarray(eval_ids, np.int64)
    eval_domains = np.asarray(heldout.domains)[eval_ids]
    suite, skipped = {}, {}
    seed = config_lib.stream_seed(config.seed, _SUITE)
    for domain in domains if d.num_items else []:
        ids = eval_ids[eval_domains == heldout.domain_names.index(domain)]
        builders = {
            f"cloze/{domain}": lambda ids=ids: references.cloze_from_pool(heldout, ids,
                                                                          d.num_items),
            f"continuation/{domain}": lambda ids=ids: tasks.continuation_task(
                heldout, ids, d.num_items, d.choices, d.context_len, d.continuation_len, seed)}
        for name, make in builders.items():
            try:
                suite[name] = make()
            except ValueError as e:  # Too few rows or documents in this domain.
                skipped[name] = str(e)
    if d.files:
        tokenizer = tokenizer_lib.load_tokenizer(heldout.tokenizer_path)
        for path in d.files:
            items, bad = tasks.load_jsonl(path)
            mc = tasks.multiple_choice_from_texts(items, tokenizer, config.data.seq_len,
                                                  skipped=bad)
            name = f"mc/{os.path.splitext(os.path.basename(path))[0]}"
            if mc.num_items:
                suite[name] = mc
            else:
                skipped[name] = f"no usable items in {path} (skipped: {dict(mc.skipped)})"
    return Suite(suite, skipped)


def run(trainer, params, suite: Suite, batch_size: int) -> dict:
    """Every task of `suite` under `params`: `tasks` (name -> the evaluate function's numbers),
    `average` (macro averages of cloze and continuation accuracies, where there are any) and
    `skipped`."""
    results = {}
    for name, task in suite.tasks.items():
        if isinstance(task, tasks.MultipleChoice):
            results[name] = evaluate.multiple_choice(trainer, params, task, batch_size)
            if task.skipped or task.truncated:
                results[name].update(skipped=dict(task.skipped), truncated=task.truncated)
        else:
            results[name] = evaluate.cloze_accuracy(trainer, params, task, batch_size)
    average = {}
    for kind, field in (("cloze", "accuracy"), ("continuation", "acc")):
        values = [r[field] for n, r in results.items() if n.startswith(kind + "/")]
        if values:
            average[kind] = float(np.mean(values))
    return {"tasks": results, "average": average, "skipped": dict(suite.skipped)}
