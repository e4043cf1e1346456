"""Pipeline: per-epoch permutations, seeding, process sharding, exact resume, bad arguments."""

import itertools
import json

import numpy as np
import pytest

from jaxsel import config as config_lib
from jaxsel.data import pipeline
from jaxsel.data import pool as pool_lib


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    c = config_lib.base_config("tiny")
    c.model.vocab_size = 300
    c.data.update({"source": "synthetic", "synthetic_docs_per_domain": 20, "seq_len": 16,
                   "cache_dir": str(tmp_path_factory.mktemp("cache"))})
    return pool_lib.build_pools(c)["train"]


def _take(pool, ids, n, global_batch=8, seed=0, process_index=0, process_count=1, **kwargs):
    dataset = pipeline.make_batches(pool, ids, global_batch, seed, process_index,
                                    process_count, **kwargs)
    return list(itertools.islice(iter(dataset), n))


def _ids(batches):
    return np.concatenate([b["ids"] for b in batches])


def test_each_epoch_is_a_new_permutation_of_the_ids(pool):
    ids = np.arange(0, 80, 2)  # A selection: 40 ids, 5 batches of 8 per epoch.
    assert len(pool) >= 80
    batches = _take(pool, ids, 15)
    epochs = _ids(batches).reshape(3, 40)
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), ids)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    for batch in batches:
        assert batch["tokens"].shape == batch["segments"].shape == (8, pool.seq_len)
        assert batch["tokens"].dtype == batch["segments"].dtype == np.int32
        assert batch["ids"].dtype == np.int64
        np.testing.assert_array_equal(batch["tokens"], pool.tokens[batch["ids"]])
        np.testing.assert_array_equal(batch["segments"], pool.segments[batch["ids"]])


def test_batches_run_across_epoch_boundaries(pool):
    ids = np.arange(12)  # 1.5 batches of 8 per epoch.
    order = _ids(_take(pool, ids, 6)).reshape(4, 12)
    for epoch in order:
        np.testing.assert_array_equal(np.sort(epoch), ids)


def test_same_seed_same_order_other_seed_other_order(pool):
    ids = np.arange(len(pool))
    np.testing.assert_array_equal(_ids(_take(pool, ids, 4, seed=5)),
                                  _ids(_take(pool, ids, 4, seed=5)))
    assert not np.array_equal(_ids(_take(pool, ids, 4, seed=5)), _ids(_take(pool, ids, 4, seed=6)))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(pool, process_count):
    ids = np.arange(len(pool))
    whole = _take(pool, ids, 6)
    slices = [_take(pool, ids, 6, process_index=p, process_count=process_count)
              for p in range(process_count)]
    for step, global_batch in enumerate(whole):
        for key in ("tokens", "segments", "ids"):
            parts = [s[step][key] for s in slices]
            assert all(len(p) == 8 // process_count for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts), global_batch[key])


def test_state_resumes_exactly_after_a_json_round_trip(pool):
    ids = np.arange(len(pool))
    dataset = pipeline.make_batches(pool, ids, 8, 1, 0, 1)
    iterator = iter(dataset)
    for _ in range(7):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(5)]
    resumed = iter(pipeline.make_batches(pool, ids, 8, 1, 0, 1))
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(5)), strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_finite_epochs_end_after_the_full_batches(pool):
    batches = list(pipeline.make_batches(pool, np.arange(20), 8, 0, 0, 1, num_epochs=2))
    assert len(batches) == 5  # 40 ids, the last partial batch dropped.


@pytest.mark.parametrize("kwargs, match", [
    (dict(ids=[]), "ids"),
    (dict(ids=[0, -1]), "ids out of range"),
    (dict(ids="len"), "ids out of range"),
    (dict(ids=[0.5, 1.0]), "ids must be integers"),
    (dict(global_batch=6, process_count=4), "global_batch=6"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(global_batch=0), "global_batch"),
    (dict(seed=-1), "seed"),
    (dict(ids=[0, 1, 2], num_epochs=2), "num_epochs"),
])
def test_bad_arguments_name_what_is_wrong(pool, kwargs, match):
    args = dict(ids=np.arange(10), global_batch=8, seed=0, process_index=0, process_count=1)
    args.update(kwargs)
    if isinstance(args["ids"], str):
        args["ids"] = [0, len(pool)]
    with pytest.raises(ValueError, match=match):
        pipeline.make_batches(pool, **args)


def test_tokens_per_s_counts_the_tokens_it_reads(pool):
    rate = pipeline.pipeline_tokens_per_s(pool, np.arange(len(pool)), 8, 0, num_batches=20)
    assert np.isfinite(rate) and rate > 0
