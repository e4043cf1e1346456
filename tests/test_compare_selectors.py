"""The selector comparison end to end on the synthetic corpus with the real MiniLM, as a
known-answer study: the corpus plants a target domain, junk and near-duplicates, and each
selector must find what it is built to find. Every pick is checked against an independent
computation from the saved scores and embeddings; no selector reads a held-out row outside the
`target` role; the report's numbers are recomputed from the saved models and selections; a rerun
recomputes only a deleted arm, to the same numbers."""

import os
import subprocess

import jax
import numpy as np
import pytest
import scipy.stats

from experiments import compare_selectors as cmp
from experiments.configs import compare_selectors as cmp_config
from jaxsel import (
    checkpoint,
    embed,
    group_mates,
    probe,
    references,
    report,
    runs,
    select,
    selectors,
    stream,
    train,
)
from jaxsel import config as config_lib
from tests import experiment_runs as runs_lib

# The synthetic corpus with one document per row (document packing, 64-token rows, a BPE of
# 2048): 4 domains, prose the target. A 20-step seed on 150 rows (trained enough that its
# gradients tell the domains apart); each of the 8 selectors picks 150 of 300 candidates; 6-step
# arms.
OVERRIDES = {**runs_lib.SMALL,
    "data.seq_len": 64, "model.vocab_size": 2048, "data.packing": "document",
    "data.heldout_fraction": 0.2, "roles.target_domain": "prose", "roles.target_items": 8,
    "roles.target_eval_items": 16, "train.log_every": 1, "train.eval_per_domain": 8,
    "optim.warmup_steps": 2, "compare.seed_size": 150, "compare.seed_steps": 20,
    "compare.candidates": 300, "compare.select_size": 150, "compare.select_steps": 6,
    "compare.clusters": 6,
    "compare.probe_size": 64, "compare.probe_chunk": 8, "compare.encoder_max_length": 64,
    "compare.fit_epochs": 3, "compare.fit_batch_size": 8, "compare.predict_batch_size": 32,
    "compare.eval_batch_size": 32, "compare.dedup_threshold": 0.97, "compare.less_dims": 256,
    "compare.group_probes": 16, "compare.group_clusters": 10,
}
SEED_STEPS, SELECT_STEPS, K = 20, 6, 150


def _config(**overrides):
    return runs_lib.config(cmp_config, {**OVERRIDES, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The run, in process, recording every pool row read while each selector selects."""
    tmp = tmp_path_factory.mktemp("compare")
    workdir, cache = tmp / "run", tmp / "cache"
    config = _config(**{"data.cache_dir": str(cache)})
    result, reads = runs_lib.run_recording_reads(cmp, config, workdir, "selection")
    data = runs.load_data(config)
    return dict(workdir=workdir, cache=cache, config=config, data=data, reads=reads,
                ids=cmp.split_ids(config, len(data.train_pool)), result=result)


def _selection(tiny_run, name):
    return select.Selection.load(tiny_run["workdir"] / "arms" / name / "selection.json")


def _streamed(workdir, name: str, candidates) -> np.ndarray:
    """The per-candidate array streamed under `rows/<name>-<key>`, checked to be keyed by the
    candidates."""
    (folder,) = (workdir / "rows").glob(f"{name}-*")
    assert report.read_json(folder / "manifest.json")["inputs"]["ids"] == stream.ids_key(
        candidates)
    return np.load(folder / "result.npy")


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _share(pool, ids, domain):
    return np.mean([pool.domain_names[pool.domains[i]] == domain for i in ids])


def _whole_pairs(pool, ids):
    docs = {d for i in ids for d in pool.doc_ids_of(i).tolist()}
    return sum(a in docs and b in docs for a, b in pool.near_duplicates.tolist())


# ------------------------------------------------------------------------------------------------
# Config and rows.


def test_split_is_seeded_and_disjoint():
    config = _config()
    ids = cmp.split_ids(config, 700)
    assert len(ids["seed"]) == 150 and len(ids["candidates"]) == 300
    assert not np.intersect1d(ids["seed"], ids["candidates"]).size
    again = cmp.split_ids(config, 700)
    assert all(np.array_equal(ids[k], again[k]) for k in ids)
    with pytest.raises(config_lib.ConfigError, match="config.compare.candidates: 300 exceeds"):
        cmp.split_ids(config, 449)
    with pytest.raises(config_lib.ConfigError, match="config.compare.seed_size: 150 exceeds"):
        cmp.split_ids(config, 100)


@pytest.mark.parametrize("key, value, message", [
    ("compare.selectors", ("random", "bogus"), "config.compare.selectors: 'bogus' is not one of"),
    ("compare.selectors", ("random", "random"), "config.compare.selectors: .* names one twice"),
    ("compare.selectors", (), "config.compare.selectors: names nothing"),
    ("compare.selectors", ("random,mates",), "on the command line write a tuple of strings"),
    ("compare.select_size", 301, "config.compare.select_size: 301 exceeds"),
    ("compare.probe_size", 301, "config.compare.probe_size: 301 exceeds"),
    ("compare.clusters", 301, "config.compare.clusters: 301 exceeds"),
    ("compare.dedup_threshold", 1.5, "config.compare.dedup_threshold: must be in"),
    ("compare.minhash_threshold", 0.0, "config.compare.minhash_threshold: must be in"),
    ("compare.dsir_smoothing", -1.0, "config.compare.dsir_smoothing: must be >= 0"),
    ("compare.less_dims", 0, "config.compare.less_dims: must be >= 1"),
    ("compare.group_probes", 3, "config.compare.group_probes: must be >= 4"),
    ("compare.group_clusters", 301, "config.compare.group_clusters: 301 exceeds"),
    ("compare.group_budget", "bogus", "config.compare.group_budget: 'bogus' is not one of"),
    ("compare.seed_steps", 0, "config.compare.seed_steps: must be >= 1"),
    ("compare.temperature", 0.0, "config.compare.temperature: must be > 0"),
    ("compare.encoder_windows", 0, "config.compare.encoder_windows: must be >= 1"),
    ("roles.target_domain", "", "config.roles.target_domain: names no domain"),
    ("train.steps", 7, "config.train.steps: is compare.seed_steps \\+ compare.select_steps = 26"),
    ("train.stop_at", 3, "config.train.stop_at: is set for the seed run"),
    ("continue_from", "elsewhere", "config.continue_from: is set for each arm"),
])
def test_impossible_values_name_the_key(key, value, message):
    config = _config(**{key: value})
    with pytest.raises(config_lib.ConfigError, match=message):
        cmp.validate(config, 1)


def test_the_schedule_spans_seed_and_arms():
    config = cmp_config.get_config("tiny,seed_steps=10,select_steps=5")
    assert config.train.steps == 15 and config.compare.temperature == 0.5
    config.compare.seed_steps = 12  # As a command-line override would: the schedule follows.
    assert config.train.steps == 17
    config.compare.seed_steps = 10
    seed = cmp.model_config(config, stop_at=10)
    arm = cmp.model_config(config, continue_from="somewhere")
    assert seed.train.steps == arm.train.steps == 15
    assert (seed.train.stop_at, seed.continue_from) == (10, "")
    assert (arm.train.stop_at, arm.continue_from) == (0, "somewhere")


# ------------------------------------------------------------------------------------------------
# Held-out roles: the selectors never read what ranks or evaluates the arms.


def test_selectors_read_no_target_eval_or_eval_row(tiny_run):
    data, reads = tiny_run["data"], tiny_run["reads"]
    assert {phase for _, phase, _ in reads} >= {"low_loss", "first_order", "mates", "semdedup"}
    held_out = [ids for split, _, ids in reads if split == "heldout"]
    forbidden = np.union1d(data.roles.ids["target_eval"], data.roles.ids["eval"])
    assert not any(np.isin(ids, forbidden).any() for ids in held_out)
    for split, phase, ids in reads:  # Train rows: the candidates only.
        if split == "train":
            assert np.isin(ids, tiny_run["ids"]["candidates"]).all(), phase
    # The target items the selectors aim at are rows of the target role.
    items = data.items["target"].tokens_RxL
    target = data.heldout.rows(data.roles.ids["target"])["tokens"]
    assert all((row == target).all(1).any() for row in items)
    splits = tiny_run["result"]["splits"]
    assert splits["overlap_documents"] == 0 and splits["target_domain"] == "prose"
    assert splits["items"] == {"target": len(items),
                               "target_eval": len(data.items["target_eval"].tokens_RxL)}


# ------------------------------------------------------------------------------------------------
# Each pick against an independent computation.


def test_every_selection_is_k_candidates(tiny_run):
    for name in selectors.NAMES:
        selection = _selection(tiny_run, name)
        assert len(selection) == K and selection.pool_size == len(tiny_run["data"].train_pool)
        assert np.isin(selection.ids, tiny_run["ids"]["candidates"]).all(), name
        assert selection.params["selector"] == name
    assert _selection(tiny_run, "semdedup").method == "dedup_random"


def test_low_loss_and_first_order_are_the_k_lowest_saved_scores(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    sums = _streamed(workdir, "losses", candidates)  # Each candidate's loss sum and tokens.
    for name, scores in (("low_loss", sums[:, 0] / sums[:, 1]),
                         ("first_order", _streamed(workdir, "first_order", candidates))):
        assert scores.shape == candidates.shape and np.isfinite(scores).all()
        expected = candidates[np.argsort(scores, kind="stable")[:K]]
        assert set(_selection(tiny_run, name).ids) == set(expected), name


def test_nearest_matches_a_brute_force_cosine_ranking(tiny_run):
    workdir = tiny_run["workdir"]
    emb = _streamed(workdir, "embeddings", tiny_run["ids"]["candidates"])
    target = np.load(workdir / "candidates/target_embeddings.npz")["target"]
    sims = (_unit(emb) @ _unit(target).T).max(axis=1)
    expected = tiny_run["ids"]["candidates"][np.argsort(-sims, kind="stable")[:K]]
    assert set(_selection(tiny_run, "nearest").ids) == set(expected)


def test_cluster_stratified_is_water_filled_over_the_clusters(tiny_run):
    saved = np.load(tiny_run["workdir"] / "arms/cluster_stratified/clusters.npz")
    clusters = saved["clusters"]
    chosen = np.searchsorted(saved["ids"], _selection(tiny_run, "cluster_stratified").ids)
    sizes = np.bincount(clusters, minlength=6)
    counts = np.bincount(clusters[chosen], minlength=6)
    level = max(lv for lv in range(sizes.max() + 1) if np.minimum(sizes, lv).sum() <= K)
    assert counts.sum() == K
    assert (counts >= np.minimum(sizes, level)).all()
    assert (counts <= np.minimum(sizes, level + 1)).all()


def test_semdedup_keeps_no_near_duplicate_pair(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    emb = _streamed(workdir, "embeddings", candidates)
    kept = np.load(workdir / "arms/semdedup/kept.npz")["kept"]
    selection = _selection(tiny_run, "semdedup")
    rows = np.searchsorted(candidates, selection.ids)
    assert np.isin(rows, kept).all()
    cos = _unit(emb[rows]) @ _unit(emb[rows]).T
    np.fill_diagonal(cos, -1)
    assert cos.max() < selection.params["threshold"]


def test_group_mates_is_the_greedy_of_its_saved_model(tiny_run):
    """The group oracle trains on candidates; the pick is `group_mates.select` recomputed from
    the saved clusters, relational model, MATES' scores and embeddings."""
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    c, folder = tiny_run["config"].compare, tiny_run["workdir"] / "arms/group_mates"
    oracle = np.load(folder / "oracle.npz")
    assert oracle["ids"].shape == (16, c.group_size) and np.isin(oracle["ids"], candidates).all()
    # Out of sample for MATES' predictions: no group member was among its probed candidates.
    assert not np.isin(oracle["ids"], np.load(workdir / "arms/mates/oracle.npz")["ids"]).any()
    assert np.isfinite(oracle["trajectory"]).all() and oracle["trajectory"].std() > 0
    model = report.read_json(folder / "relational_model.json")
    p = model["params"]
    scores = np.load(workdir / "arms/mates/predictions.npz")["scores"]
    unit = embed.l2_normalize(_streamed(workdir, "embeddings", candidates))
    positions, _ = group_mates.select(p["scale"] * scores + p["shift"], unit,
                                      np.load(folder / "clusters.npz")["clusters"], K,
                                      p["alpha"], p["beta"], c.group_budget)
    selection = _selection(tiny_run, "group_mates")
    assert selection.method == "group_mates_greedy"
    np.testing.assert_array_equal(selection.ids, candidates[positions])
    assert selection.params["val_spearman"] == model["val"]["spearman"]
    text = (workdir / "report.md").read_text()
    val = model["val"]
    assert (f"| relational | {val['spearman']:.3f} | {val['pearson']:.3f} |" in text
            and f"| sum of individual predictions | {val['baseline']['spearman']:.3f} |" in text)


def test_mates_probes_candidates_and_favours_low_predictions(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    oracle = np.load(workdir / "arms/mates/oracle.npz")
    assert len(oracle["ids"]) == 64 and np.isin(oracle["ids"], candidates).all()
    assert np.isfinite(oracle["influence"]).all() and oracle["influence"].std() > 0
    scores = np.load(workdir / "arms/mates/predictions.npz")["scores"]
    predicted = _streamed(workdir / "arms/mates", "predictions", candidates)
    np.testing.assert_allclose(scores, (predicted - predicted.mean()) / predicted.std(),
                               rtol=1e-5, atol=1e-6)
    selection = _selection(tiny_run, "mates")
    assert selection.method == "gumbel_top_k" and selection.params["temperature"] == 0.5
    chosen = np.isin(candidates, selection.ids)
    assert scores[chosen].mean() < scores[~chosen].mean()


def test_every_arm_continues_the_seed_in_the_model_pool(tiny_run):
    folders, result = tiny_run["result"]["folders"], tiny_run["result"]
    seed_steps = [r["step"] for r in report.read_jsonl(os.path.join(folders["seed"],
                                                                    "metrics.jsonl"))]
    assert seed_steps[-1] == SEED_STEPS
    for name in selectors.NAMES:
        steps = [r["step"] for r in report.read_jsonl(os.path.join(folders[name],
                                                                   "metrics.jsonl"))]
        assert steps == list(range(SEED_STEPS + 1, SEED_STEPS + SELECT_STEPS + 1)), name
        assert os.path.dirname(folders[name]) == str(tiny_run["workdir"] / "models")
        identity = report.read_json(os.path.join(folders[name], "model.json"))["identity"]
        assert identity["start"] == "continue" and identity["parent"] == result["seed"]["key"]
    assert (tiny_run["workdir"] / "seed" / "evaluation.json").exists()


# ------------------------------------------------------------------------------------------------
# The known answers of the synthetic corpus.


def test_target_aware_selectors_enrich_the_target_domain(tiny_run):
    pool, candidates = tiny_run["data"].train_pool, tiny_run["ids"]["candidates"]
    base = _share(pool, candidates, "prose")
    assert 0.15 < base < 0.5
    for name in ("nearest", "first_order", "mates", "dsir"):
        share = _share(pool, _selection(tiny_run, name).ids, "prose")
        assert share > base + 0.2, (name, share, base)
    # LESS' direction is mostly the seed's momentum, shared by every candidate: less sharp. Its
    # scores still rank the target domain first: the rank-sum AUC over every candidate (random
    # scores give 0.5 +- 0.04 here), and its pick is enriched.
    less = np.load(tiny_run["workdir"] / "arms/less/scores.npz")["scores"]
    prose = np.asarray([pool.domain_names[pool.domains[i]] == "prose" for i in candidates])
    auc = scipy.stats.mannwhitneyu(less[prose], less[~prose]).statistic / (
        prose.sum() * (~prose).sum())
    assert auc > 0.6, auc
    assert _share(pool, _selection(tiny_run, "less").ids, "prose") > base + 0.05
    assert abs(_share(pool, _selection(tiny_run, "random").ids, "prose") - base) < 0.15


def test_deduplicators_keep_fewer_whole_pairs_than_random(tiny_run):
    pool, candidates = tiny_run["data"].train_pool, tiny_run["ids"]["candidates"]
    assert _whole_pairs(pool, candidates) >= 8
    random_pairs = _whole_pairs(pool, _selection(tiny_run, "random").ids)
    for name in ("semdedup", "minhash"):
        assert _whole_pairs(pool, _selection(tiny_run, name).ids) < random_pairs, name


def test_diversity_selectors_cover_every_domain(tiny_run):
    pool = tiny_run["data"].train_pool
    domains = set(pool.domain_counts(tiny_run["ids"]["candidates"]))
    for name in ("cluster_stratified", "diverse"):
        assert set(pool.domain_counts(_selection(tiny_run, name).ids)) == domains, name


# ------------------------------------------------------------------------------------------------
# The report, recomputed.


def test_report_numbers_recomputed_from_models_and_picks(tiny_run):
    workdir, result, data = tiny_run["workdir"], tiny_run["result"], tiny_run["data"]
    config, pool = tiny_run["config"], data.train_pool
    trainer = train.Trainer(cmp.model_config(config))
    # Out-of-sample loss of two arms, from their saved params, by hand.
    items = references.cloze_from_pool(data.heldout, data.roles.ids["target_eval"],
                                  config.roles.target_eval_items)
    for name in ("random", "nearest"):
        params = checkpoint.load_params(result["folders"][name], trainer.abstract_params())
        assert result["arms"][name]["target_eval_loss"] == pytest.approx(
            runs_lib.cloze_loss(trainer.model, jax.device_get(params), items), rel=2e-4)
    # The ranking and the gains follow the recomputed losses; the report says so in words.
    losses = {a: result["arms"][a]["target_eval_loss"] for a in result["arms"]}
    assert result["ranking"][0] == min(losses, key=losses.get)
    text = (workdir / "report.md").read_text()
    gain = losses["random"] - losses[result["ranking"][0]]
    assert f"{gain:+.4f}" in text and "out of sample" in text and "in sample" in text
    # Composition by hand.
    for name in selectors.NAMES:
        ids = _selection(tiny_run, name).ids
        comp = result["composition"][name]
        assert comp["target"] == pytest.approx(_share(pool, ids, "prose"))
        junk = np.mean([pool.label_names[pool.labels[i]] == "junk" for i in ids])
        assert comp["junk"] == pytest.approx(junk)
        assert comp["pairs_kept"] == _whole_pairs(pool, ids)
    # The deduplicators' precision and recall against the planted pairs, by hand.
    candidates = tiny_run["ids"]["candidates"]
    docs = {d for i in candidates for d in pool.doc_ids_of(i).tolist()}
    pairs = [(a, b) for a, b in pool.near_duplicates.tolist() if a in docs and b in docs]
    members = {d for p in pairs for d in p}
    for name in ("semdedup", "minhash"):
        kept = candidates[np.load(workdir / "arms" / name / "kept.npz")["kept"]]
        removed = sorted(set(candidates.tolist()) - set(kept.tolist()))
        kept_docs = {d for i in kept for d in pool.doc_ids_of(i).tolist()}
        quality = result["dedup"][name]
        assert quality["pairs"] == len(pairs) and quality["removed"] == len(removed)
        assert quality["recall"] == pytest.approx(
            np.mean([not (a in kept_docs and b in kept_docs) for a, b in pairs]))
        assert quality["precision"] == pytest.approx(np.mean(
            [bool(set(pool.doc_ids_of(i).tolist()) & members) for i in removed]))
        assert quality["recall"] > 0.8, name  # The planted pairs are what it removes.
        assert f"| {name} | {len(removed)} |" in text
    # MATES: the target share of a plain top-k on its oracle labels, by hand.
    oracle = np.load(workdir / "arms/mates/oracle.npz")
    k = round(K / len(candidates) * len(oracle["ids"]))
    top = oracle["ids"][np.argsort(oracle["influence"], kind="stable")[:k]]
    assert result["mates"]["oracle_top_k_target_share"] == pytest.approx(
        _share(pool, top, "prose"))
    overhead = result["mates"]["overhead"]
    assert overhead["flops"]["probe"] == 64 * probe.oracle_matmul_flops(
        trainer.model.cfg, 64, data.items["target"])
    assert overhead["flops"]["ratio"] == pytest.approx(sum(
        overhead["flops"][s] for s in ("probe", "fit", "score")) / overhead["flops"]["train"])
    assert (workdir / "target_eval_loss.png").stat().st_size > 0


def test_rerun_recomputes_only_a_deleted_arm(tiny_run):
    """Deleting one arm's folder and its model in the pool, then running the command line
    again: only that arm is selected, trained and evaluated again, to the same numbers; the
    other arms and the seed are read back."""
    workdir, first = tiny_run["workdir"], tiny_run["result"]
    kept = [os.path.join(first["folders"]["seed"], "model.json"),
            *(workdir / "rows").glob("*/*.npy")]
    for name in selectors.NAMES:
        if name != "nearest":
            kept += [os.path.join(first["folders"][name], "model.json"),
                     workdir / "arms" / name / "evaluation.json",
                     workdir / "arms" / name / "selection.json"]
    mtimes = {p: os.path.getmtime(p) for p in kept}
    subprocess.run(["rm", "-rf", str(workdir / "arms/nearest"), first["folders"]["nearest"],
                    str(workdir / "report.json")], check=True)
    runs_lib.run("compare_selectors", workdir, {**OVERRIDES, "data.cache_dir": tiny_run["cache"]})
    assert {p: os.path.getmtime(p) for p in kept} == mtimes
    assert os.path.exists(os.path.join(first["folders"]["nearest"], "model.json"))
    again = report.read_json(workdir / "report.json")
    for key in ("target_loss", "target_eval_loss"):
        np.testing.assert_allclose(again["arms"]["nearest"][key], first["arms"]["nearest"][key],
                                   rtol=1e-6)
    assert again["arms"]["nearest"]["domains"] == first["arms"]["nearest"]["domains"]
    for name in selectors.NAMES:
        if name != "nearest":
            assert again["arms"][name] == first["arms"][name]
