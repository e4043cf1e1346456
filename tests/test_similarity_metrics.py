"""The similarity-metrics experiment: config checks and its pieces against hand computations, then
a shrunken run end to end on the synthetic corpus, checked against independent computations from
its saved artifacts: both variance reductions and purity (and their resampled intervals) in
numpy, the `diverse` pick re-derived from the saved threshold clusters, the stratified arm's
water-filling, each arm's held-out perplexity from its saved params by a hand loop, and the loss
and embedding models shown to be different runs; then a killed run resuming from its cached
artifacts to the same numbers."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import similarity_metrics as sim
from experiments.configs import similarity_metrics as sim_config
from jaxsel import checkpoint, cluster, embed, probe, report, select, stats, train
from jaxsel import config as config_lib
from jaxsel import roles as roles_lib
from jaxsel.data import pool as pool_lib
from tests import experiment_runs as runs

# A shrunken tiny run on the synthetic corpus (~660 train rows of 32 tokens in 4 domains): a
# 40-step loss model and a 40-step embedding model on 15% of them each, 240 rows analysed, 90
# of 360 candidates selected by each arm, 12-step models.
OVERRIDES = {**runs.SMALL,
    "train.log_every": 5, "train.eval_per_domain": 8,
    "similarity.loss_model.fraction": 0.15, "similarity.loss_model.steps": 40,
    "similarity.embedding_model.fraction": 0.15, "similarity.embedding_model.steps": 40,
    "similarity.analysis_size": 240, "similarity.candidates": 360,
    "similarity.num_clusters": (4, 16), "similarity.pca_dims": 8,
    "similarity.encoder_max_length": 32, "similarity.ngram_buckets": 256,
    "similarity.select_clusters": 6, "similarity.select_size": 90, "similarity.select_steps": 12,
    "similarity.eval_batch_size": 32, "similarity.bootstrap": 200,
}
KS = (4, 16)
ARMS = ("diverse", "cluster_stratified", "random")


def _config(**overrides):
    return runs.config(sim_config, {**OVERRIDES, **overrides})


def _run(workdir, cache):
    runs.run("similarity_metrics", workdir, {**OVERRIDES, "data.cache_dir": cache})


def _cluster_values(values, clusters):
    values, clusters = np.asarray(values, np.float64), np.asarray(clusters)
    return [values[clusters == c] for c in np.unique(clusters)]


def _pooled(values, clusters):
    """1 - sum over clusters of the within-cluster sum of squares / the total sum of squares."""
    values = np.asarray(values, np.float64)
    within = sum(np.sum((v - v.mean()) ** 2) for v in _cluster_values(values, clusters))
    return 1 - within / np.sum((values - values.mean()) ** 2)


def _unweighted(values, clusters):
    """1 - the plain mean over clusters of their variances (ddof 0) / the total variance."""
    values = np.asarray(values, np.float64)
    return 1 - np.mean([v.var() for v in _cluster_values(values, clusters)]) / values.var()


def _purity(labels, clusters):
    """The share of points in their cluster's most common label."""
    labels = np.asarray(labels).astype(np.int64)
    return sum(np.bincount(labels[clusters == c]).max() for c in np.unique(clusters)) / len(labels)


NUMPY_METRICS = {"variance_reduction_pooled": (_pooled, True),
                 "variance_reduction_unweighted": (_unweighted, True), "purity": (_purity, False)}


def _interval(fn, values, clusters, num_resamples, seed, kind):
    """The documented 95% intervals, resampled by hand: rows drawn with replacement by
    `default_rng(seed).integers` (bootstrap) or the labels shuffled by its `permutation`."""
    rng = np.random.default_rng(seed)
    if kind == "bootstrap":
        draws = rng.integers(0, len(values), size=(num_resamples, len(values)))
        null = [fn(values[rows], clusters[rows]) for rows in draws]
    else:
        null = [fn(values, rng.permutation(clusters)) for _ in range(num_resamples)]
    return np.quantile(null, [0.025, 0.975])


def _check_row(row, losses, domains, clusters, num_resamples, seed):
    for name, (fn, of_losses) in NUMPY_METRICS.items():
        values = losses if of_losses else domains
        assert row[name] == pytest.approx(fn(values, clusters), abs=1e-10), name
        if num_resamples:
            np.testing.assert_allclose(
                row[f"{name}_ci"], _interval(fn, values, clusters, num_resamples, seed,
                                             row["interval"]), atol=1e-10, err_msg=name)


# ------------------------------------------------------------------------------------------------
# Config and pieces.


def test_presets_validate_and_options_reach_the_section():
    for preset in ("tiny", "small", "410m", "1b"):
        config = sim_config.get_config(preset)
        sim.validate(config, num_devices=1)
        s = config.similarity
        assert s.loss_model.seed != s.embedding_model.seed
        assert s.loss_model.fraction > 0 and s.embedding_model.fraction > 0
        assert not s.loss_model.init_from and not s.embedding_model.init_from
    config = sim_config.get_config("tiny,select_size=100,embeddings=encoder,loss_model.steps=7")
    assert config.similarity.select_size == 100 and config.similarity.embeddings == ("encoder",)
    assert config.similarity.loss_model.steps == 7
    assert sim.parse_num_clusters([8, 32]) == (8, 32)
    assert sim.parse_embeddings(("ngram_hash", "encoder")) == ("ngram_hash", "encoder")
    # Without an LM embedding the embedding model is not used, and may have no share.
    no_lm = _config(**{"similarity.embeddings": ("encoder", "ngram_hash"),
                       "similarity.embedding_model.fraction": 0.0})
    sim.validate(no_lm, num_devices=1)
    assert sim.models_used(no_lm) == ["loss_model"]
    assert sim.models_used(_config()) == ["loss_model", "embedding_model"]


@pytest.mark.parametrize("overrides, message", [
    ({"similarity.embeddings": ("encoder", "bert")}, "similarity.embeddings: 'bert' is not one"),
    ({"similarity.embeddings": ("encoder", "encoder")}, "similarity.embeddings: .* twice"),
    ({"similarity.embeddings": ()}, "similarity.embeddings: names nothing"),
    ({"similarity.select_embedding": "tfidf"}, "similarity.select_embedding: 'tfidf' is not"),
    ({"similarity.num_clusters": (4, 300)}, "similarity.num_clusters: K=300 exceeds"),
    ({"similarity.num_clusters": (4, "x")}, "similarity.num_clusters: must be a tuple of int"),
    ({"similarity.num_clusters": (1, 4)}, "similarity.num_clusters: .* >= 2"),
    ({"similarity.select_size": 400}, "similarity.select_size: 400 exceeds"),
    ({"similarity.select_clusters": 0}, "similarity.select_clusters: must be >= 1"),
    ({"similarity.select_neighbors": 0}, "similarity.select_neighbors: must be >= 1"),
    ({"similarity.pca_dims": 33}, "similarity.pca_dims: 33 exceeds .*model.d_model=32"),
    ({"similarity.loss_model.fraction": 1.0}, r"similarity.loss_model.fraction: must be in \[0"),
    ({"similarity.loss_model.fraction": 0.0}, "similarity.loss_model.fraction: must be > 0"),
    ({"similarity.embedding_model.fraction": -0.1},
     r"similarity.embedding_model.fraction: must be in \[0, 1\)"),
    ({"similarity.embedding_model.fraction": 0.0},
     "similarity.embedding_model.fraction: must be > 0"),
    ({"similarity.loss_model.fraction": 0.5, "similarity.embedding_model.fraction": 0.5},
     "similarity.embedding_model.fraction: .* leaves no rows"),
    ({"similarity.loss_model.steps": 0}, "similarity.loss_model.steps: must be >= 1"),
    ({"similarity.embedding_model.seed": -1}, "similarity.embedding_model.seed: must be >= 0"),
    ({"similarity.loss_model.init_from": "/no/such/run"},
     "similarity.loss_model.init_from: '/no/such/run' is not a run folder"),
    ({"init_from": "/no/such/run"}, "config.init_from: is not used here"),
    ({"similarity.bootstrap": -1}, "similarity.bootstrap: must be >= 0"),
    ({"similarity.encoder_max_length": 1}, "similarity.encoder_max_length: must be >= 2"),
    ({"train.stop_at": 5}, "train.stop_at: is not used here"),
])
def test_impossible_values_name_the_key(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        sim.validate(_config(**overrides), num_devices=1)


def test_split_ids_give_each_model_its_own_share_and_nest_sample_and_candidates():
    config = _config()
    ids = sim.split_ids(config, 703)
    assert len(ids["loss_model"]) == len(ids["embedding_model"]) == round(0.15 * 703)
    assert len(ids["analysis"]) == 240 and len(ids["candidates"]) == 360
    assert not np.intersect1d(ids["loss_model"], ids["embedding_model"]).size
    for share in ("loss_model", "embedding_model"):
        assert not np.isin(ids["candidates"], ids[share]).any()
    assert np.isin(ids["analysis"], ids["candidates"]).all()
    assert all(np.all(np.diff(v) > 0) for v in ids.values())
    again = sim.split_ids(config, 703)
    assert all(np.array_equal(ids[k], again[k]) for k in ids)
    assert not np.array_equal(ids["loss_model"], sim.split_ids(_config(seed=1), 703)["loss_model"])
    # A sample larger than the candidates holds them.
    bigger = sim.split_ids(_config(**{"similarity.analysis_size": 400}), 703)
    assert np.isin(bigger["candidates"], bigger["analysis"]).all()


def test_split_ids_refuse_a_pool_too_small_naming_the_key():
    # 600 rows: 420 left after the models' 2 x 15%, fewer than 450 analysis rows or candidates.
    with pytest.raises(config_lib.ConfigError, match="similarity.analysis_size: 450 exceeds the "
                                                     "420 train rows"):
        sim.split_ids(_config(**{"similarity.analysis_size": 450}), 600)
    with pytest.raises(config_lib.ConfigError, match="similarity.candidates: 450 exceeds"):
        sim.split_ids(_config(**{"similarity.candidates": 450}), 600)
    with pytest.raises(config_lib.ConfigError, match="similarity.embedding_model.fraction: 0.001"):
        sim.split_ids(_config(**{"similarity.embedding_model.fraction": 0.001}), 300)


def test_random_clusters_are_equal_sized_and_explain_nothing_on_average():
    clusters = stats.random_clusters(103, 10, seed=3)
    assert sorted(np.bincount(clusters)) == [10] * 7 + [11] * 3
    assert np.array_equal(clusters, stats.random_clusters(103, 10, seed=3))
    values = np.random.default_rng(0).normal(size=103) ** 2  # Skewed, like losses.
    expected = stats.expected_random_variance_reduction(np.bincount(clusters))
    assert expected["pooled"] == pytest.approx(9 / 102)
    draws = [stats.random_clusters(103, 10, seed=s) for s in range(400)]
    assert np.mean([_pooled(values, c) for c in draws]) == pytest.approx(expected["pooled"],
                                                                         abs=0.01)
    # Unequal sizes 3, 20 and 80: a small cluster keeps a smaller share of its variance in
    # expectation, so the unweighted form's floor lies above the pooled one.
    labels = np.repeat([0, 1, 2], [3, 20, 80])
    unequal = stats.expected_random_variance_reduction([3, 20, 80])
    assert unequal["pooled"] == pytest.approx(2 / 102)
    assert unequal["unweighted"] == pytest.approx(1 - 103 / 102 * np.mean([2 / 3, 19 / 20,
                                                                            79 / 80]))
    rng = np.random.default_rng(1)
    simulated = [_unweighted(values, rng.permutation(labels)) for _ in range(4000)]
    assert np.mean(simulated) == pytest.approx(unequal["unweighted"], abs=0.02)
    assert unequal["unweighted"] > unequal["pooled"] + 0.05


def test_cluster_metrics_match_numpy_and_the_documented_resampling():
    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(5), [10, 30, 60, 90, 110])[rng.permutation(300)]
    values = clusters * 0.5 + rng.normal(size=300) * (1 - 0.7 * (clusters == 0))
    domains = (clusters + (rng.random(300) < 0.2)) % 3
    m = stats.cluster_metrics(values, domains, clusters, num_resamples=300, seed=4)
    assert m["k"] == 5 and m["sizes"] == [10, 110] and m["singletons"] == 0
    assert m["interval"] == "bootstrap"
    _check_row(m, values, domains, clusters, 300, 4)
    assert abs(m["variance_reduction_pooled"] - m["variance_reduction_unweighted"]) > 0.01
    for name in NUMPY_METRICS:
        low, high = m[f"{name}_ci"]
        assert low < m[name] < high and high - low < 0.2
    assert stats.cluster_metrics(values, domains, clusters, 0, 0)["purity_ci"] is None
    # The permutation interval is the null of clusters of these sizes: it holds the expected
    # floor and lies far below the real clusters.
    shuffled = np.random.default_rng(2).permutation(clusters)
    null = stats.cluster_metrics(values, domains, shuffled, 300, 5, "permutation")
    _check_row(null, values, domains, shuffled, 300, 5)
    floor = stats.expected_random_variance_reduction(np.bincount(clusters))
    for form in ("pooled", "unweighted"):
        low, high = null[f"variance_reduction_{form}_ci"]
        assert low <= floor[form] <= high < m[f"variance_reduction_{form}"]
    assert null["interval"] == "permutation" and null["purity_ci"][1] < m["purity"]
    with pytest.raises(ValueError, match="interval"):
        stats.cluster_metrics(values, domains, clusters, 10, 0, "jackknife")


# ------------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("similarity")
    workdir, cache = tmp / "run", tmp / "cache"
    _run(workdir, cache)
    config = _config(**{"data.cache_dir": str(cache)})
    pools = pool_lib.build_pools(config)
    return dict(workdir=workdir, cache=cache, config=config, train_pool=pools["train"],
                heldout=pools["heldout"], ids=sim.split_ids(config, len(pools["train"])),
                trainer=train.Trainer(config), result=report.read_json(workdir / "report.json"))


def _params(tiny_run, folder):
    return checkpoint.load_params(folder, tiny_run["trainer"].abstract_params())


def test_clustering_metrics_and_intervals_recomputed_from_the_artifacts(tiny_run):
    workdir, result, pool = tiny_run["workdir"], tiny_run["result"], tiny_run["train_pool"]
    sample = np.load(workdir / "losses.npz")
    assert np.array_equal(sample["ids"], tiny_run["ids"]["analysis"])
    assert np.array_equal(sample["domains"], np.asarray(pool.domains)[sample["ids"]])
    losses, domains = sample["losses"], sample["domains"]
    assert np.isfinite(losses).all() and losses.std() > 0
    assert result["sample"]["loss_mean"] == pytest.approx(losses.mean())
    seed = result["resample_seed"]
    assert seed == config_lib.stream_seed(tiny_run["config"].seed, sim._BOOTSTRAP)
    rows = {(r["embedding"], r["k"]): r for r in result["clustering"]}
    assert set(rows) == {("domain labels", len(np.unique(domains)))} | {
        (name, k) for name in ["random", *sim.EMBEDDINGS] for k in KS}
    domain_row = rows["domain labels", len(np.unique(domains))]
    _check_row(domain_row, losses, domains, domains, 200, seed)
    assert domain_row["purity"] == 1.0
    differ = [abs(domain_row["variance_reduction_pooled"]
                  - domain_row["variance_reduction_unweighted"])]
    for name in ["random", *sim.EMBEDDINGS]:
        saved = np.load(workdir / "clusters" / f"{name}.npz")
        for k in KS:
            clusters, row = saved[f"k{k}"], rows[name, k]
            assert row["interval"] == ("permutation" if name == "random" else "bootstrap")
            sizes = np.bincount(clusters)
            assert len(sizes) == k and row["sizes"] == [sizes.min(), sizes.max()]
            low, high = cluster.size_bounds(240, k)
            assert low <= sizes.min() and sizes.max() <= high
            _check_row(row, losses, domains, clusters, 200, seed)
            differ.append(abs(row["variance_reduction_pooled"]
                              - row["variance_reduction_unweighted"]))
    # Unequal cluster sizes: the two forms are reported apart and do differ.
    assert max(differ) > 1e-3
    for name in sim.EMBEDDINGS:
        emb = np.load(workdir / "embeddings" / f"{name}.npz")["analysis"]
        assert emb.shape == (240, 8)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_random_clusters_are_the_floor(tiny_run):
    rows = {(r["embedding"], r["k"]): r for r in tiny_run["result"]["clustering"]}
    saved = np.load(tiny_run["workdir"] / "clusters" / "random.npz")
    for k in KS:
        floor = rows["random", k]
        expected = tiny_run["result"]["random_expected_variance_reduction"][str(k)]
        sizes = np.bincount(saved[f"k{k}"])
        assert expected["pooled"] == pytest.approx((k - 1) / 239)
        assert expected["unweighted"] == pytest.approx(1 - 240 / 239 * np.mean(1 - 1 / sizes))
        for form in ("pooled", "unweighted"):
            metric = f"variance_reduction_{form}"
            assert abs(floor[metric] - expected[form]) < 0.1
            low, high = floor[f"{metric}_ci"]
            assert low <= expected[form] <= high
            # The synthetic domains differ in statistics and in loss: clusters of the hashed
            # n-grams or of the token embeddings explain far more of the loss than chance does.
            for name in ("ngram_hash", "lm_token_mean"):
                assert rows[name, k][metric] > floor[metric] + 0.3
                assert rows[name, k][f"{metric}_ci"][0] > high
        for name in ("ngram_hash", "lm_token_mean"):
            assert rows[name, k]["purity"] > floor["purity"] + 0.2


def _selection(tiny_run, arm):
    return select.Selection.load(tiny_run["workdir"] / "arms" / arm / "selection.json")


def test_diverse_pick_is_one_representative_per_threshold_cluster(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    saved = np.load(workdir / "selection" / "clusters.npz")
    assert np.array_equal(saved["ids"], candidates)
    labels = saved["threshold"]
    x = np.load(workdir / "embeddings" / "encoder.npz")["candidates"].astype(np.float64)
    assert x.shape == (360, 8)
    selection = _selection(tiny_run, "diverse")
    assert selection.method == "threshold_diverse" and len(selection) == 90
    threshold = tiny_run["result"]["selection"]["threshold"]
    # The budget is met: 90 threshold clusters at the epsilon the selection and the saved
    # clustering agree on.
    assert len(np.unique(labels)) == 90 == selection.params["num_clusters"]
    assert threshold["num_clusters"] == 90 and threshold["neighbors"] == 16
    cut = json.loads(str(saved["threshold_params"]))
    assert threshold["epsilon"] == pytest.approx(cut["epsilon"])
    assert selection.params == {**cut, "candidates": 360, "embedding": "encoder"}
    assert 0 < threshold["epsilon"] < 1
    # Re-derived: each cluster's member nearest the mean of its members' unit rows.
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        distances = np.sum((unit[members] - unit[members].mean(0)) ** 2, axis=1)
        expected.append(members[np.flatnonzero(distances <= distances.min() + 1e-12)[0]])
    assert sorted(selection.ids.tolist()) == sorted(candidates[expected].tolist())
    rows = np.searchsorted(candidates, selection.ids)
    np.testing.assert_array_equal(selection.scores, np.bincount(labels)[labels[rows]])


def test_cluster_stratified_is_water_filled_over_its_clusters(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    clusters = np.load(workdir / "selection" / "clusters.npz")["kmeans"]
    sizes = np.bincount(clusters)
    assert len(sizes) == 6 and sizes.min() >= 1
    selection = _selection(tiny_run, "cluster_stratified")
    assert selection.method == "cluster_stratified" and len(selection) == 90
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


def _perplexity_by_hand(model, params, pool, ids, batch=32):
    """exp(token-weighted mean next-token loss) per domain and in all, in float64 from the
    model's logits: a position predicts the next token when both lie in one document."""
    sums, counts = {}, {}
    domains = np.asarray(pool.domains)[ids]
    for start in range(0, len(ids), batch):
        rows = pool.rows(ids[start:start + batch])
        logits = np.asarray(jax.jit(model.apply)(params, rows["tokens"], rows["segments"]),
                            np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        tokens, segments = rows["tokens"], rows["segments"]
        nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        mask = (segments[:, :-1] > 0) & (segments[:, 1:] == segments[:, :-1])
        for i, d in enumerate(domains[start:start + batch]):
            for key in (pool.domain_names[d], "all"):
                sums[key] = sums.get(key, 0.0) + nll[i][mask[i]].sum()
                counts[key] = counts.get(key, 0) + mask[i].sum()
    return {key: float(np.exp(sums[key] / counts[key])) for key in sums}


def test_each_arm_is_a_valid_selection_evaluated_on_the_held_out_eval_rows(tiny_run):
    workdir, pool, ids = tiny_run["workdir"], tiny_run["train_pool"], tiny_run["ids"]
    config, heldout = tiny_run["config"], tiny_run["heldout"]
    sel = tiny_run["result"]["selection"]
    eval_ids = roles_lib.assign(heldout, config.roles).rows("eval", heldout, 8)
    clusters = np.load(workdir / "selection" / "clusters.npz")
    recomputed = {}
    for arm, method in zip(ARMS, ("threshold_diverse", "cluster_stratified", "random"),
                           strict=True):
        selection = _selection(tiny_run, arm)
        assert selection.method == method and selection.pool_size == len(pool)
        assert len(selection) == 90 and np.isin(selection.ids, ids["candidates"]).all()
        for share in ("loss_model", "embedding_model"):
            assert not np.isin(selection.ids, ids[share]).any()
        record = sel["arms"][arm]
        assert record["train_sequences"] == 90 and record["steps"] == 12
        steps = [r["step"] for r in report.read_jsonl(os.path.join(record["dir"],
                                                                   "metrics.jsonl"))]
        assert steps[-1] == 12
        counts = np.bincount(np.asarray(pool.domains)[selection.ids], minlength=4)
        assert record["domains"] == {d: int(c) for d, c in zip(pool.domain_names, counts,
                                                               strict=True) if c}
        rows = np.searchsorted(clusters["ids"], selection.ids)
        assert record["clusters_covered"] == {
            name: len(np.unique(clusters[name][rows])) for name in ("threshold", "kmeans")}
        recomputed[arm] = _perplexity_by_hand(tiny_run["trainer"].model,
                                              _params(tiny_run, sel["arms"][arm]["dir"]), heldout,
                                              eval_ids)
        assert set(record["eval"]) == set(recomputed[arm])
        for domain, value in recomputed[arm].items():
            assert record["eval"][domain] == pytest.approx(value, rel=1e-4), (arm, domain)
    # The diverse pick covers every threshold cluster; the stratified one every k-means cluster.
    assert sel["arms"]["diverse"]["clusters_covered"]["threshold"] == 90
    assert sel["arms"]["cluster_stratified"]["clusters_covered"]["kmeans"] == 6
    assert set(sel["perplexity_gain"]) == {"diverse", "cluster_stratified"}
    for arm, gain in sel["perplexity_gain"].items():
        assert gain == pytest.approx(recomputed["random"]["all"] - recomputed[arm]["all"],
                                     abs=1e-3 * recomputed["random"]["all"])


def test_both_diversity_arms_cover_every_domain(tiny_run):
    names = set(tiny_run["train_pool"].domain_names)
    assert names == {"prose", "code", "tables", "junk"}
    for arm in ("diverse", "cluster_stratified"):
        selection = _selection(tiny_run, arm)
        covered = {tiny_run["train_pool"].domain_names[d]
                   for d in np.asarray(tiny_run["train_pool"].domains)[selection.ids]}
        assert covered == names, arm


def test_embedding_and_loss_models_are_different_runs(tiny_run):
    workdir, pool, ids = tiny_run["workdir"], tiny_run["train_pool"], tiny_run["ids"]
    models = tiny_run["result"]["models"]
    loss_model, embedding_model = models["loss_model"], models["embedding_model"]
    assert loss_model["dir"] != embedding_model["dir"]
    assert (tiny_run["workdir"] / "loss_model" / "evaluation.json").exists()
    assert loss_model["seed"] != embedding_model["seed"]
    assert loss_model["train_sequences"] == len(ids["loss_model"]) == round(0.15 * len(pool))
    assert embedding_model["train_sequences"] == len(ids["embedding_model"])
    assert not np.intersect1d(ids["loss_model"], ids["embedding_model"]).size
    assert loss_model["steps"] == embedding_model["steps"] == 40
    params = {role: _params(tiny_run, models[role]["dir"]) for role in models}
    assert not np.allclose(*(jax.tree.leaves(p)[0] for p in params.values()))
    # The saved losses are the loss model's, not the embedding model's.
    sample = np.load(workdir / "losses.npz")
    losses = {role: probe.pool_losses(tiny_run["trainer"], p, pool, 32, sample["ids"])
              for role, p in params.items()}
    np.testing.assert_allclose(sample["losses"], losses["loss_model"], rtol=1e-5)
    assert np.abs(sample["losses"] - losses["embedding_model"]).max() > 1e-2
    # The token-mean embeddings are the embedding model's: recomputed and post-processed alike.
    rows = pool.rows(sample["ids"])
    seed = config_lib.stream_seed(tiny_run["config"].seed, sim._PCA)
    saved = np.load(workdir / "embeddings" / "lm_token_mean.npz")["analysis"]
    for role, p in params.items():
        raw = embed.lm_token_mean(p, rows["tokens"], rows["segments"])
        post = embed.fit_postprocess(raw, 8, sample_size=len(raw), seed=seed)
        close = np.allclose(embed.apply_postprocess(post, raw), saved, atol=1e-4)
        assert close == (role == "embedding_model"), role
    markdown = (workdir / "report.md").read_text()
    assert "come from different runs (seeds 2 and 1, disjoint rows)" in markdown


def test_a_pretrained_loss_model_is_taken_from_init_from(tiny_run, tmp_path):
    """`loss_model.init_from` at the run's loss model: its seed and step are reported, nothing
    is trained, and the sample's losses are the same numbers."""
    folder = tiny_run["result"]["models"]["loss_model"]["dir"]
    config = _config(**{"data.cache_dir": str(tiny_run["cache"]),
                        "similarity.loss_model.init_from": folder,
                        "similarity.embeddings": ("ngram_hash",),
                        "similarity.select_embedding": "ngram_hash"})
    sim.validate(config, num_devices=1)
    assert sim.models_used(config) == ["loss_model"]
    experiment = sim.Experiment(config, str(tmp_path))
    assert experiment.model("loss_model") == dict(dir=folder, trained_here=False, seed=1,
                                                  steps=40)
    assert not (tmp_path / "loss_model").exists()
    np.testing.assert_allclose(experiment.losses()["losses"],
                               np.load(tiny_run["workdir"] / "losses.npz")["losses"], rtol=1e-6)


def test_report_shows_the_tables_and_the_figure(tiny_run):
    workdir, result = tiny_run["workdir"], tiny_run["result"]
    markdown = (workdir / "report.md").read_text()
    assert "Similarity metrics" in markdown and "| ngram_hash | 16 |" in markdown
    assert "variance reduction (pooled)" in markdown and "unweighted" in markdown
    epsilon = result["selection"]["threshold"]["epsilon"]
    assert f"epsilon = {epsilon:.4f}" in markdown and "the 90 clusters" in markdown
    for arm in ARMS:
        assert f"| {arm} |" in markdown
    assert "Zero-shot tasks" in markdown and "## Data" in markdown
    arms = result["selection"]["arms"]
    assert all(arms[a]["downstream"]["tasks"] or arms[a]["downstream"]["skipped"] for a in arms)
    assert (workdir / "variance_reduction.png").stat().st_size > 0


def test_killed_run_resumes_from_the_cached_artifacts(tiny_run):
    """Deleting what a kill could leave undone (an embedding and its clusters, the clusters of a
    saved embedding, the random arm's model and evaluation, the report) and running again
    recomputes exactly that, reusing the rest, and gives the same numbers."""
    workdir, first = tiny_run["workdir"], tiny_run["result"]
    models = {**first["models"], **first["selection"]["arms"]}
    kept = [workdir / "losses.npz", workdir / "embeddings" / "encoder.npz",
            workdir / "embeddings" / "lm_token_mean.npz", workdir / "selection" / "clusters.npz",
            workdir / "arms" / "diverse" / "evaluation.json",
            *(os.path.join(models[m]["dir"], "model.json") for m in ("loss_model",
                                                                       "embedding_model",
                                                                       "diverse"))]
    # The per-row computations streamed into rows/<name>-<key>, keyed by what they read.
    streamed = sorted(f.split("-")[0] for f in os.listdir(workdir / "rows"))
    assert streamed == sorted(["losses", "encoder_inputs", *sim.EMBEDDINGS])
    kept += [workdir / "rows" / f / "manifest.json" for f in os.listdir(workdir / "rows")
             if not f.startswith("ngram_hash")]
    mtimes = [os.path.getmtime(p) for p in kept]
    old = {path: dict(np.load(workdir / path)) for path in (
        "embeddings/ngram_hash.npz", "clusters/ngram_hash.npz", "clusters/lm_token_mean.npz")}
    for path in ("report.json", "report.md", "variance_reduction.png", *old,
                 "arms/random/evaluation.json"):
        os.remove(workdir / path)
    shutil.rmtree(models["random"]["dir"])
    _run(workdir, tiny_run["cache"])
    assert [os.path.getmtime(p) for p in kept] == mtimes
    for path, arrays in old.items():
        again = np.load(workdir / path)
        for key, value in arrays.items():
            np.testing.assert_allclose(again[key], value, atol=1e-6, err_msg=f"{path}: {key}")
    again = report.read_json(workdir / "report.json")
    assert again["clustering"] == first["clustering"]
    for arm in ARMS:
        np.testing.assert_allclose(list(again["selection"]["arms"][arm]["eval"].values()),
                                   list(first["selection"]["arms"][arm]["eval"].values()),
                                   rtol=1e-6)
