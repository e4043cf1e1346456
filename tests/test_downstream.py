"""The zero-shot suite (`jaxsel.downstream`): which tasks it builds from which rows, what it leaves
out and why, its numbers against direct `evaluate` calls, and its config checks."""

import json

import numpy as np
import pytest

from jaxsel import config as config_lib
from jaxsel import downstream, evaluate, references, tasks, train
from jaxsel.data import pool as pool_lib
from tests.workers import probe_worker


def _config(cache, **downstream_settings):
    config = probe_worker.tiny_config()
    config.data.update(source="synthetic", synthetic_docs_per_domain=120, heldout_fraction=0.5,
                       cache_dir=str(cache))
    config.downstream.update(dict(num_items=8, choices=4, context_len=8, continuation_len=4,
                                  batch_size=16) | downstream_settings)
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = tmp_path_factory.mktemp("downstream") / "cache"
    config = _config(cache)
    heldout = pool_lib.build_pools(config)["heldout"]
    trainer = train.Trainer(config)
    # The eval rows: every other row of each domain (any set of rows will do).
    eval_ids = np.concatenate([heldout.ids_of_domain(d)[::2] for d in heldout.domain_names])
    return dict(cache=cache, heldout=heldout, trainer=trainer, eval_ids=np.sort(eval_ids),
                params=trainer.init_params(config.seed))


def test_suite_has_both_tasks_per_domain_on_the_eval_rows_only(setup):
    heldout, eval_ids = setup["heldout"], setup["eval_ids"]
    suite = downstream.build(_config(setup["cache"]), heldout, eval_ids)
    assert suite.skipped == {}
    assert set(suite.tasks) == {f"{kind}/{d}" for d in heldout.domain_names
                                for kind in ("cloze", "continuation")}
    for domain in heldout.domain_names:
        mine = np.intersect1d(heldout.ids_of_domain(domain), eval_ids)
        allowed = heldout.rows(mine[:8])["tokens"]  # The domain's first 8 eval rows.
        cloze = suite.tasks[f"cloze/{domain}"]
        assert all((row == allowed).all(1).any() for row in cloze.tokens_RxL)
        np.testing.assert_array_equal(  # The same task as built directly on those rows.
            suite.tasks[f"continuation/{domain}"].tokens_CxL, tasks.continuation_task(
                heldout, mine, 8, 4, 8, 4, config_lib.stream_seed(0, downstream._SUITE)
            ).tokens_CxL)


def test_too_small_domains_and_bad_files_are_left_out_with_the_reason(setup, tmp_path):
    heldout = setup["heldout"]
    domain = heldout.domain_names[0]
    good, empty = tmp_path / "quiz.jsonl", tmp_path / "empty.jsonl"
    good.write_text("".join(json.dumps({"context": "a b c", "choices": ["d", "e"], "answer": i % 2})
                            + "\n" for i in range(3)) + "{broken\n")
    empty.write_text(json.dumps({"context": "a", "choices": [], "answer": 0}) + "\n")
    config = _config(setup["cache"], domains=(domain,), files=(str(good), str(empty)))
    others = np.setdiff1d(np.arange(len(heldout)), heldout.ids_of_domain(domain))
    suite = downstream.build(config, heldout, others)  # No eval row of the domain.
    assert set(suite.tasks) == {"mc/quiz"}
    assert suite.tasks["mc/quiz"].num_items == 3
    assert suite.tasks["mc/quiz"].skipped == {"bad_json": 1}
    assert "some rows" in suite.skipped[f"cloze/{domain}"]
    assert "num_items" in suite.skipped[f"continuation/{domain}"]
    assert "no usable items" in suite.skipped["mc/empty"] and "no_choices" in \
        suite.skipped["mc/empty"]
    with pytest.raises(config_lib.ConfigError, match="downstream.domains"):
        downstream.build(_config(setup["cache"], domains=("poetry",)), heldout, setup["eval_ids"])


def test_run_reports_each_task_as_evaluate_does_and_macro_averages(setup, tmp_path):
    heldout, trainer, params = setup["heldout"], setup["trainer"], setup["params"]
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(json.dumps({"context": "one two", "choices": ["three", "four four"],
                                        "answer": 1}) + "\n" for _ in range(2)))
    suite = downstream.build(_config(setup["cache"], files=(str(quiz),)), heldout,
                             setup["eval_ids"])
    result = downstream.run(trainer, params, suite, 16)
    assert set(result["tasks"]) == set(suite.tasks) and result["skipped"] == {}
    for name, task in suite.tasks.items():
        if isinstance(task, tasks.MultipleChoice):
            assert result["tasks"][name] == evaluate.multiple_choice(trainer, params, task, 5)
        else:
            assert isinstance(task, references.Reference)
            assert result["tasks"][name] == evaluate.cloze_accuracy(trainer, params, task, 5)
    cloze = [result["tasks"][f"cloze/{d}"]["accuracy"] for d in heldout.domain_names]
    continuation = [result["tasks"][f"continuation/{d}"]["acc"] for d in heldout.domain_names]
    assert result["average"] == pytest.approx({"cloze": np.mean(cloze),
                                               "continuation": np.mean(continuation)})


def _downstream(**settings):
    config = config_lib.base_config("tiny")
    config.downstream.update(settings)
    return config


@pytest.mark.parametrize("settings, key", [
    (dict(num_items=-1), "downstream.num_items"),
    (dict(choices=1), "downstream.choices"), (dict(num_items=3), "downstream.num_items"),
    (dict(context_len=0), "downstream.context_len"),
    (dict(continuation_len=0), "downstream.continuation_len"),
    (dict(batch_size=0), "downstream.batch_size"),
    (dict(context_len=120, continuation_len=16), "downstream.context_len"),
    (dict(files=("/no/such/file.jsonl",)), "downstream.files"),
])
def test_impossible_settings_name_the_key(settings, key):
    with pytest.raises(config_lib.ConfigError, match=f"config.{key}:"):
        config_lib.validate(_downstream(**settings), 1)
