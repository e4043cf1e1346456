"""Tests of jaxsel.search: exact search against numpy, ScaNN recall against exact search."""

import shutil

import numpy as np
import pytest

from jaxsel import search


def clustered(rng, n, d, num_clusters, spread=0.3, normalize=True):
    """Points around random centres (like real embeddings: structured, not uniform)."""
    centres = rng.standard_normal((num_clusters, d)).astype(np.float32)
    x = centres[rng.integers(num_clusters, size=n)] + spread * rng.standard_normal(
        (n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x


def numpy_top_k(db, queries, k, metric):
    if metric == "dot_product":
        scores = queries.astype(np.float64) @ db.T.astype(np.float64)
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        scores = ((queries[:, None, :].astype(np.float64) - db[None].astype(np.float64)) ** 2
                  ).sum(-1)
        ids = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, axis=1)


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])


@pytest.mark.parametrize("metric", search.METRICS)
def test_exact_search_equals_numpy(metric):
    rng = np.random.default_rng(0)
    db = rng.standard_normal((1000, 16)).astype(np.float32)
    queries = rng.standard_normal((100, 16)).astype(np.float32)
    # Chunks and query batches that do not divide N and Q exercise the padding.
    ids, scores = search.exact_search(db, queries, 10, metric, chunk_size=300, query_batch=64)
    ref_ids, ref_scores = numpy_top_k(db, queries, 10, metric)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def scann_data():
    rng = np.random.default_rng(1)
    data = clustered(rng, 20_200, 32, num_clusters=200, spread=1.0)  # overlapping clusters
    return data[:20_000], data[20_000:]


def test_scann_recall_against_exact(scann_data):
    db, queries = scann_data
    params = search.scann_params(len(db))
    assert params.num_leaves > 0, "20k points must use a partitioned (approximate) index"
    index = search.build_index(db, "dot_product", params)
    ids, scores = search.search_index(index, queries, 10)
    truth, truth_scores = search.exact_search(db, queries, 10)
    assert recall(ids, truth) >= 0.95
    # Reordered scores are exact dot products of the returned ids.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, db[ids]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_scann_brute_force_below_threshold_is_exact():
    rng = np.random.default_rng(2)
    db = clustered(rng, 1000, 16, num_clusters=10)
    params = search.scann_params(len(db))
    assert params.num_leaves == 0
    index = search.build_index(db, "squared_l2", params)
    ids, scores = search.search_index(index, db[:50], 5)
    ref_ids, ref_scores = numpy_top_k(db, db[:50], 5, "squared_l2")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)


def test_save_and_load_index(scann_data, tmp_path):
    db, queries = scann_data
    index = search.build_index(db[:5000])
    search.save_index(index, tmp_path / "index")
    shutil.move(tmp_path / "index", tmp_path / "moved")  # the saved folder is relocatable
    loaded = search.load_index(tmp_path / "moved")
    assert (loaded.metric, loaded.num_points, loaded.dim, loaded.params) == (
        index.metric, index.num_points, index.dim, index.params)
    for got, want in zip(search.search_index(loaded, queries, 10),
                         search.search_index(index, queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(FileNotFoundError, match="jaxsel_index.json"):
        search.load_index(tmp_path)


def test_scann_params_defaults_and_overrides():
    small, large = search.scann_params(1000), search.scann_params(1_000_000)
    assert small.num_leaves == 0
    assert large.num_leaves == 1000 and 1 <= large.leaves_to_search < large.num_leaves
    assert search.scann_params(1_000_000, {"reorder": 50}).reorder == 50
    with pytest.raises(ValueError, match="unknown ScaNN parameters.*leaves"):
        search.scann_params(10_000, {"leaves": 5})
    with pytest.raises(ValueError, match="leaves_to_search"):
        search.scann_params(10_000, {"leaves_to_search": 10_000})


def test_bad_search_input_names_the_problem(scann_data):
    db, queries = scann_data
    small = db[:100].copy()
    index = search.build_index(small)
    nan_db = small.copy()
    nan_db[7, 3] = np.nan
    zero_queries = queries[:5].copy()
    zero_queries[2] = 0
    with pytest.raises(ValueError, match=r"database has 1 rows with NaN.*\[7\]"):
        search.exact_search(nan_db, queries, 5)
    with pytest.raises(ValueError, match=r"database has 1 rows with NaN"):
        search.build_index(nan_db)
    with pytest.raises(ValueError, match=r"queries has 1 all-zero rows.*\[2\]"):
        search.exact_search(small, zero_queries, 5)
    with pytest.raises(ValueError, match=r"queries has 1 all-zero rows"):
        search.search_index(index, zero_queries, 5)
    with pytest.raises(ValueError, match=r"k=101 must be in \[1, N=100\]"):
        search.exact_search(small, queries, 101)
    with pytest.raises(ValueError, match=r"k=101 must be in \[1, N=100\]"):
        search.search_index(index, queries, 101)
    with pytest.raises(ValueError, match="queries have dimension 16 but the index has "
                                         "dimension 32"):
        search.search_index(index, queries[:, :16], 5)
    with pytest.raises(ValueError, match="queries have dimension 16 but the database"):
        search.exact_search(small, queries[:, :16], 5)
    with pytest.raises(ValueError, match="metric='cosine'"):
        search.exact_search(small, queries, 5, metric="cosine")
