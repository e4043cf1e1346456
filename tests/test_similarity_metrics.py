"""The similarity-metrics experiment: config checks and its pieces against hand computations, then
a shrunken run end to end on the synthetic corpus (variance reduction and purity recomputed with
numpy from the saved losses and clusters, the random floor, an independent water-filling of the
diverse selection), then a killed run resuming from its cached artifacts to the same numbers."""

import os

import numpy as np
import pytest

from experiments import similarity_metrics as sim
from experiments.configs import similarity_metrics as sim_config
from jaxsel import config as config_lib
from jaxsel import report, search, select
from jaxsel.data import pool as pool_lib
from tests import experiment_runs as runs

# A shrunken tiny run on the synthetic corpus (703 train rows of 32 tokens in 4 domains): a
# 40-step proxy on 30% of them, 240 rows analysed, 90 of 360 candidates selected, 12-step models.
OVERRIDES = {**runs.SMALL,
    "train.log_every": 5, "train.eval_per_domain": 8, "similarity.proxy_fraction": 0.3,
    "similarity.proxy_steps": 40, "similarity.analysis_size": 240, "similarity.candidates": 360,
    "similarity.num_clusters": "4,16", "similarity.pca_dims": 8,
    "similarity.encoder_max_length": 32, "similarity.ngram_buckets": 256,
    "similarity.select_clusters": 6, "similarity.select_size": 90, "similarity.select_steps": 12,
    "similarity.eval_batch_size": 32, "similarity.bootstrap": 200,
}
KS = (4, 16)


def _config(**overrides):
    return runs.config(sim_config, {**OVERRIDES, **overrides})


def _run(workdir, cache):
    runs.run("similarity_metrics", workdir, {**OVERRIDES, "data.cache_dir": cache})


def _variance_reduction(values, clusters):
    """1 - within-cluster sum of squares / total sum of squares, cluster by cluster."""
    values = np.asarray(values, np.float64)
    total = np.sum((values - values.mean()) ** 2)
    within = sum(np.sum((values[clusters == c] - values[clusters == c].mean()) ** 2)
                 for c in np.unique(clusters))
    return 1 - within / total


def _purity(labels, clusters):
    """The share of points in their cluster's most common label."""
    return sum(np.bincount(labels[clusters == c]).max() for c in np.unique(clusters)) / len(labels)


# ------------------------------------------------------------------------------------------------
# Config and pieces.


def test_presets_validate_and_options_reach_the_section():
    for preset in ("tiny", "small", "410m", "1b"):
        sim.validate(sim_config.get_config(preset), num_devices=1)
    config = sim_config.get_config("tiny,select_size=100,embeddings=encoder")
    assert config.similarity.select_size == 100 and config.similarity.embeddings == "encoder"
    assert sim.parse_num_clusters(" 8, 32") == [8, 32]
    assert sim.parse_embeddings("ngram_hash,encoder") == ["ngram_hash", "encoder"]


@pytest.mark.parametrize("key, value, message", [
    ("similarity.embeddings", "encoder,bert", "similarity.embeddings: 'bert' is not one of"),
    ("similarity.embeddings", "encoder,encoder", "similarity.embeddings: .* twice"),
    ("similarity.embeddings", " , ", "similarity.embeddings: names nothing"),
    ("similarity.select_embedding", "tfidf", "similarity.select_embedding: 'tfidf' is not"),
    ("similarity.num_clusters", "4,300", "similarity.num_clusters: K=300 exceeds"),
    ("similarity.num_clusters", "4,x", "similarity.num_clusters: '4,x' is not"),
    ("similarity.num_clusters", "1,4", "similarity.num_clusters: .* >= 2"),
    ("similarity.select_size", 400, "similarity.select_size: 400 exceeds"),
    ("similarity.select_clusters", 0, "similarity.select_clusters: must be >= 1"),
    ("similarity.pca_dims", 33, "similarity.pca_dims: 33 exceeds .*model.d_model=32"),
    ("similarity.proxy_fraction", 1.0, "similarity.proxy_fraction: must be in"),
    ("similarity.proxy_fraction", 0.0, "similarity.proxy_fraction: must be in"),
    ("similarity.bootstrap", -1, "similarity.bootstrap: must be >= 0"),
    ("similarity.encoder_max_length", 1, "similarity.encoder_max_length: must be >= 2"),
    ("train.stop_at", 5, "train.stop_at: is not used here"),
])
def test_impossible_values_name_the_key(key, value, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        sim.validate(_config(**{key: value}), num_devices=1)


def test_split_ids_hold_the_proxy_share_apart_and_nest_sample_and_candidates():
    config = _config()
    ids = sim.split_ids(config, 703)
    assert len(ids["proxy"]) == round(0.3 * 703)
    assert len(ids["analysis"]) == 240 and len(ids["candidates"]) == 360
    assert not np.isin(ids["candidates"], ids["proxy"]).any()
    assert np.isin(ids["analysis"], ids["candidates"]).all()
    assert all(np.all(np.diff(v) > 0) for v in ids.values())
    again = sim.split_ids(config, 703)
    assert all(np.array_equal(ids[k], again[k]) for k in ids)
    assert not np.array_equal(ids["proxy"], sim.split_ids(_config(seed=1), 703)["proxy"])
    # A sample larger than the candidates holds them.
    bigger = sim.split_ids(_config(**{"similarity.analysis_size": 400}), 703)
    assert np.isin(bigger["candidates"], bigger["analysis"]).all()
    # A pretrained proxy (init_from) may hold no share back.
    external = sim.split_ids(_config(init_from="/proxy", **{"similarity.proxy_fraction": 0.0}),
                             703)
    assert len(external["proxy"]) == 0


def test_split_ids_refuse_a_pool_too_small_naming_the_key():
    # 600 rows: 420 left after the proxy's 30%, fewer than 450 analysis rows or candidates.
    with pytest.raises(config_lib.ConfigError, match="similarity.analysis_size: 450 exceeds the "
                                                     "420 train rows"):
        sim.split_ids(_config(**{"similarity.analysis_size": 450}), 600)
    with pytest.raises(config_lib.ConfigError, match="similarity.candidates: 450 exceeds"):
        sim.split_ids(_config(**{"similarity.candidates": 450}), 600)
    with pytest.raises(config_lib.ConfigError, match="similarity.proxy_fraction"):
        sim.split_ids(_config(**{"similarity.proxy_fraction": 0.001}), 300)


def test_random_clusters_are_equal_sized_and_explain_nothing_on_average():
    clusters = sim.random_clusters(103, 10, seed=3)
    assert sorted(np.bincount(clusters)) == [10] * 7 + [11] * 3
    assert np.array_equal(clusters, sim.random_clusters(103, 10, seed=3))
    values = np.random.default_rng(0).normal(size=103) ** 2  # Skewed, like losses.
    reductions = [_variance_reduction(values, sim.random_clusters(103, 10, seed=s))
                  for s in range(400)]
    assert np.mean(reductions) == pytest.approx(sim.expected_random_variance_reduction(103, 10),
                                                abs=0.01)


def test_cluster_metrics_match_numpy_and_bootstrap_brackets_them():
    rng = np.random.default_rng(1)
    clusters = rng.integers(0, 5, size=300)
    values = clusters * 0.5 + rng.normal(size=300)
    domains = (clusters + (rng.random(300) < 0.2)) % 3
    m = sim.cluster_metrics(values, domains, clusters, num_resamples=300, seed=0)
    assert m["k"] == 5 and m["sizes"] == [np.bincount(clusters).min(), np.bincount(clusters).max()]
    assert m["variance_reduction"] == pytest.approx(_variance_reduction(values, clusters))
    assert m["purity"] == pytest.approx(_purity(domains, clusters))
    for name in ("variance_reduction", "purity"):
        low, high = m[f"{name}_ci"]
        assert low < m[name] < high and high - low < 0.2
    assert m["interval"] == "bootstrap"
    assert sim.cluster_metrics(values, domains, clusters, 0, 0)["purity_ci"] is None
    # The permutation interval is the null of clusters of these sizes: it holds the expected
    # (K - 1) / (N - 1) and lies far below the real clusters.
    null = sim.cluster_metrics(values, domains, rng.permutation(clusters), 300, 0, "permutation")
    low, high = null["variance_reduction_ci"]
    assert low <= sim.expected_random_variance_reduction(300, 5) <= high < m["variance_reduction"]
    assert null["interval"] == "permutation" and null["purity_ci"][1] < m["purity"]
    with pytest.raises(ValueError, match="interval"):
        sim.cluster_metrics(values, domains, clusters, 10, 0, "jackknife")


# ------------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("similarity")
    workdir, cache = tmp / "run", tmp / "cache"
    _run(workdir, cache)
    config = _config(**{"data.cache_dir": str(cache)})
    train_pool = pool_lib.build_pools(config)["train"]
    return dict(workdir=workdir, cache=cache, config=config, train_pool=train_pool,
                ids=sim.split_ids(config, len(train_pool)),
                result=report.read_json(workdir / "report.json"))


def test_variance_reduction_and_purity_recomputed_from_the_artifacts(tiny_run):
    workdir, result, pool = tiny_run["workdir"], tiny_run["result"], tiny_run["train_pool"]
    sample = np.load(workdir / "losses.npz")
    assert np.array_equal(sample["ids"], tiny_run["ids"]["analysis"])
    assert np.array_equal(sample["domains"], np.asarray(pool.domains)[sample["ids"]])
    losses, domains = sample["losses"], sample["domains"]
    assert np.isfinite(losses).all() and losses.std() > 0
    assert result["sample"]["loss_mean"] == pytest.approx(losses.mean())
    rows = {(r["embedding"], r["k"]): r for r in result["clustering"]}
    assert set(rows) == {("domain labels", len(np.unique(domains)))} | {
        (name, k) for name in ["random", *sim.EMBEDDINGS] for k in KS}
    for name in ["random", *sim.EMBEDDINGS]:
        saved = np.load(workdir / "clusters" / f"{name}.npz")
        for k in KS:
            clusters, row = saved[f"k{k}"], rows[name, k]
            assert len(np.unique(clusters)) == k
            low, high = search.size_bounds(240, k)
            assert low <= np.bincount(clusters).min() and np.bincount(clusters).max() <= high
            assert row["variance_reduction"] == pytest.approx(_variance_reduction(losses,
                                                                                  clusters))
            assert row["purity"] == pytest.approx(_purity(domains, clusters))
            assert row["variance_reduction_ci"][0] <= row["variance_reduction_ci"][1]
    domain_row = rows["domain labels", len(np.unique(domains))]
    assert domain_row["purity"] == 1.0
    assert domain_row["variance_reduction"] == pytest.approx(_variance_reduction(losses, domains))
    for name in sim.EMBEDDINGS:
        emb = np.load(workdir / "embeddings" / f"{name}.npz")["analysis"]
        assert emb.shape == (240, 8)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_random_clusters_are_the_floor(tiny_run):
    rows = {(r["embedding"], r["k"]): r for r in tiny_run["result"]["clustering"]}
    for k in KS:
        floor = rows["random", k]
        expected = tiny_run["result"]["random_expected_variance_reduction"][str(k)]
        assert expected == pytest.approx((k - 1) / 239)
        assert abs(floor["variance_reduction"] - expected) < 0.1
        assert floor["interval"] == "permutation"
        low, high = floor["variance_reduction_ci"]
        assert low <= expected <= high
        # The synthetic domains differ in statistics and in loss: clusters of the hashed
        # n-grams or of the token embeddings explain far more of the loss than chance does.
        for name in ("ngram_hash", "lm_token_mean"):
            assert rows[name, k]["variance_reduction"] > floor["variance_reduction"] + 0.3
            assert rows[name, k]["variance_reduction_ci"][0] > high
            assert rows[name, k]["purity"] > floor["purity"] + 0.2


def test_diverse_selection_is_water_filled_over_the_clusters(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    saved = np.load(workdir / "selection" / "clusters.npz")
    assert np.array_equal(saved["ids"], candidates)
    clusters = saved["clusters"]
    sizes = np.bincount(clusters, minlength=6)
    assert len(sizes) == 6 and sizes.min() >= 1
    selection = select.Selection.load(workdir / "models" / "diverse" / "selection.json")
    assert selection.method == "cluster_diverse" and len(selection) == 90
    rows = np.searchsorted(candidates, selection.ids)
    assert np.array_equal(candidates[rows], selection.ids)
    counts = np.bincount(clusters[rows], minlength=6)
    # The water level: the largest L with sum(min(size, L)) <= 90. Clusters at or under it are
    # taken whole; the others get L or L + 1.
    level = max(L for L in range(sizes.max() + 1) if np.minimum(sizes, L).sum() <= 90)
    assert counts.sum() == 90
    for size, count in zip(sizes, counts, strict=True):
        assert count == size if size <= level else count in (level, level + 1)
    assert selection.params["level"] == level


def test_selections_are_valid_and_each_trains_a_model(tiny_run):
    workdir, pool, candidates = tiny_run["workdir"], tiny_run["train_pool"], \
        tiny_run["ids"]["candidates"]
    arms = tiny_run["result"]["selection"]["arms"]
    heldout = pool_lib.build_pools(tiny_run["config"])["heldout"]
    for arm, method in (("diverse", "cluster_diverse"), ("random", "random")):
        selection = select.Selection.load(workdir / "models" / arm / "selection.json")
        assert selection.method == method and selection.pool_size == len(pool)
        assert len(selection) == 90 and np.isin(selection.ids, candidates).all()
        assert not np.isin(selection.ids, tiny_run["ids"]["proxy"]).any()
        record = arms[arm]
        assert record["train_sequences"] == 90 and record["steps"] == 12
        steps = [r["step"] for r in report.read_jsonl(workdir / "models" / arm / "metrics.jsonl")]
        assert steps[-1] == 12
        assert set(record["eval"]) == set(heldout.domain_names) | {"all"}
        assert all(1 < ppl < 512 for ppl in record["eval"].values())
        counts = np.bincount(np.asarray(pool.domains)[selection.ids], minlength=4)
        assert record["domains"] == {d: int(c) for d, c in zip(pool.domain_names, counts,
                                                               strict=True) if c}
    gain = tiny_run["result"]["selection"]["perplexity_gain"]
    assert gain == pytest.approx(arms["random"]["eval"]["all"] - arms["diverse"]["eval"]["all"])
    assert tiny_run["result"]["proxy"]["train_sequences"] == len(tiny_run["ids"]["proxy"])
    markdown = (workdir / "report.md").read_text()
    assert "Similarity metrics" in markdown and "| ngram_hash | 16 |" in markdown
    assert "Zero-shot tasks" in markdown
    assert all(arms[a]["downstream"]["tasks"] or arms[a]["downstream"]["skipped"] for a in arms)
    assert (workdir / "variance_reduction.png").stat().st_size > 0


def test_killed_run_resumes_from_the_cached_artifacts(tiny_run):
    """Deleting what a kill could leave undone (an embedding and its clusters, the clusters of a
    saved embedding, the random model's marker, the report) and running again recomputes exactly
    that, reusing the rest, and gives the same numbers."""
    workdir, first = tiny_run["workdir"], tiny_run["result"]
    kept = [workdir / "losses.npz", workdir / "proxy" / "model.json",
            workdir / "embeddings" / "encoder.npz", workdir / "embeddings" / "lm_token_mean.npz",
            workdir / "selection" / "clusters.npz", workdir / "models" / "diverse" / "model.json"]
    mtimes = [os.path.getmtime(p) for p in kept]
    old = {path: dict(np.load(workdir / path)) for path in (
        "embeddings/ngram_hash.npz", "clusters/ngram_hash.npz", "clusters/lm_token_mean.npz")}
    for path in ("report.json", "report.md", "variance_reduction.png", *old,
                 "models/random/model.json"):
        os.remove(workdir / path)
    _run(workdir, tiny_run["cache"])
    assert [os.path.getmtime(p) for p in kept] == mtimes
    for path, arrays in old.items():
        again = np.load(workdir / path)
        for key, value in arrays.items():
            np.testing.assert_allclose(again[key], value, atol=1e-6, err_msg=f"{path}: {key}")
    again = report.read_json(workdir / "report.json")
    assert again["clustering"] == first["clustering"]
    for arm in ("diverse", "random"):
        np.testing.assert_allclose(list(again["selection"]["arms"][arm]["eval"].values()),
                                   list(first["selection"]["arms"][arm]["eval"].values()),
                                   rtol=1e-6)
