"""The selector comparison end to end on the synthetic corpus with the real MiniLM: every
selector's pick checked against an independent computation from the saved scores and
embeddings, every arm continuing the seed model, the report against the arms' done markers, and
a rerun that recomputes only a deleted arm, to the same numbers."""

import os
import subprocess

import numpy as np
import pytest

from experiments import compare_selectors as cmp
from experiments.configs import compare_selectors as cmp_config
from jaxsel import config as config_lib
from jaxsel import report, select
from jaxsel.data import pool as pool_lib
from tests import experiment_runs as runs

# A shrunken tiny run on the synthetic corpus (703 train rows of 32 tokens in 4 domains): a
# 6-step seed on 200 rows, 48 of 300 candidates picked by each of the 7 selectors, 6-step arms.
OVERRIDES = {**runs.SMALL,
    "train.log_every": 1, "train.eval_per_domain": 8, "compare.seed_size": 200,
    "compare.seed_steps": 6, "compare.candidates": 300, "compare.select_size": 48,
    "compare.select_steps": 6, "compare.clusters": 6, "compare.probe_size": 40,
    "compare.probe_chunk": 8, "compare.reference_domain": "prose", "compare.reference_items": 8,
    "compare.encoder_max_length": 32, "compare.fit_epochs": 2, "compare.fit_batch_size": 8,
    "compare.predict_batch_size": 32, "compare.eval_batch_size": 32,
}
SEED_STEPS, SELECT_STEPS, K = 6, 6, 48


def _config(**overrides):
    return runs.config(cmp_config, {**OVERRIDES, **overrides})


def _run(workdir, cache):
    runs.run("compare_selectors", workdir, {**OVERRIDES, "data.cache_dir": cache})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    workdir, cache = tmp / "run", tmp / "cache"
    _run(workdir, cache)
    config = _config(**{"data.cache_dir": str(cache)})
    pool_size = len(pool_lib.build_pools(config)["train"])
    return dict(workdir=workdir, cache=cache, pool_size=pool_size,
                ids=cmp.split_ids(config, pool_size),
                result=report.read_json(workdir / "report.json"))


def _selection(tiny_run, name):
    return select.Selection.load(tiny_run["workdir"] / "arms" / name / "selection.json")


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Config and rows.


def test_split_is_seeded_and_disjoint():
    config = _config()
    ids = cmp.split_ids(config, 700)
    assert len(ids["seed"]) == 200 and len(ids["candidates"]) == 300
    assert not np.intersect1d(ids["seed"], ids["candidates"]).size
    again = cmp.split_ids(config, 700)
    assert all(np.array_equal(ids[k], again[k]) for k in ids)
    with pytest.raises(config_lib.ConfigError, match="config.compare.candidates: 300 exceeds"):
        cmp.split_ids(config, 499)
    with pytest.raises(config_lib.ConfigError, match="config.compare.seed_size: 200 exceeds"):
        cmp.split_ids(config, 150)


@pytest.mark.parametrize("key, value, message", [
    ("compare.selectors", "random,bogus", "config.compare.selectors: 'bogus' is not one of"),
    ("compare.selectors", "random,random", "config.compare.selectors: .* names one twice"),
    ("compare.selectors", " , ", "config.compare.selectors: names nothing"),
    ("compare.select_size", 301, "config.compare.select_size: 301 exceeds"),
    ("compare.probe_size", 301, "config.compare.probe_size: 301 exceeds"),
    ("compare.clusters", 301, "config.compare.clusters: 301 exceeds"),
    ("compare.dedup_threshold", 1.5, "config.compare.dedup_threshold: must be in"),
    ("compare.seed_steps", 0, "config.compare.seed_steps: must be >= 1"),
    ("compare.temperature", 0.0, "config.compare.temperature: must be > 0"),
    ("train.steps", 7, "config.train.steps: is compare.seed_steps \\+ compare.select_steps = 12"),
    ("train.stop_at", 3, "config.train.stop_at: is set for the seed run"),
    ("continue_from", "elsewhere", "config.continue_from: is set for each arm"),
])
def test_impossible_values_name_the_key(key, value, message):
    config = _config(**{key: value})
    with pytest.raises(config_lib.ConfigError, match=message):
        cmp.validate(config, 1)


def test_the_schedule_spans_seed_and_arms():
    config = cmp_config.get_config("tiny,seed_steps=10,select_steps=5")
    assert config.train.steps == 15
    config.compare.seed_steps = 12  # As a command-line override would: the schedule follows.
    assert config.train.steps == 17
    config.compare.seed_steps = 10
    seed = cmp.model_config(config, stop_at=10)
    arm = cmp.model_config(config, continue_from="somewhere")
    assert seed.train.steps == arm.train.steps == 15
    assert (seed.train.stop_at, seed.continue_from) == (10, "")
    assert (arm.train.stop_at, arm.continue_from) == (0, "somewhere")


# ------------------------------------------------------------------------------------------------
# The run.


def test_every_selection_is_k_candidates(tiny_run):
    for name in cmp.SELECTORS:
        selection = _selection(tiny_run, name)
        assert len(selection) == K and selection.pool_size == tiny_run["pool_size"]
        assert np.isin(selection.ids, tiny_run["ids"]["candidates"]).all(), name
        assert selection.params["selector"] == name
    assert _selection(tiny_run, "semdedup").method == "dedup_random"


def test_low_loss_and_first_order_are_the_k_lowest_saved_scores(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    for name, file, key in (("low_loss", "losses.npz", "losses"),
                            ("first_order", "influence.npz", "influence")):
        saved = np.load(workdir / "arms" / name / file)
        assert np.array_equal(saved["ids"], candidates)
        scores = saved[key]
        assert scores.shape == candidates.shape and np.isfinite(scores).all()
        expected = candidates[np.argsort(scores, kind="stable")[:K]]
        chosen = _selection(tiny_run, name).ids
        assert set(chosen) == set(expected), name
        assert scores[np.searchsorted(candidates, chosen)].max() <= np.sort(scores)[K - 1]


def test_nearest_matches_a_brute_force_cosine_ranking(tiny_run):
    saved = np.load(tiny_run["workdir"] / "candidates/embeddings.npz")
    sims = (_unit(saved["candidates"]) @ _unit(saved["reference"]).T).max(axis=1)
    expected = tiny_run["ids"]["candidates"][np.argsort(-sims, kind="stable")[:K]]
    assert set(_selection(tiny_run, "nearest").ids) == set(expected)


def test_diverse_is_water_filled_over_the_clusters(tiny_run):
    saved = np.load(tiny_run["workdir"] / "arms/diverse/clusters.npz")
    clusters = saved["clusters"]
    chosen = np.searchsorted(saved["ids"], _selection(tiny_run, "diverse").ids)
    sizes = np.bincount(clusters, minlength=6)
    counts = np.bincount(clusters[chosen], minlength=6)
    level = max(lv for lv in range(sizes.max() + 1) if np.minimum(sizes, lv).sum() <= K)
    assert counts.sum() == K
    assert (counts >= np.minimum(sizes, level)).all()
    assert (counts <= np.minimum(sizes, level + 1)).all()


def test_semdedup_keeps_no_near_duplicate_pair(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    emb = np.load(workdir / "candidates/embeddings.npz")["candidates"]
    kept = np.load(workdir / "arms/semdedup/kept.npz")["kept"]
    selection = _selection(tiny_run, "semdedup")
    rows = np.searchsorted(candidates, selection.ids)
    assert np.isin(rows, kept).all()
    cos = _unit(emb[rows]) @ _unit(emb[rows]).T
    np.fill_diagonal(cos, -1)
    assert cos.max() < selection.params["threshold"]
    # The removed rows each have a kept row at least that similar: dedup did remove something.
    all_cos = _unit(emb) @ _unit(emb).T
    np.fill_diagonal(all_cos, -1)
    removed = np.setdiff1d(np.arange(len(candidates)), kept)
    assert all(all_cos[r, kept].max() >= 0.9 - 1e-6 for r in removed)


def test_mates_probes_candidates_and_favours_low_predictions(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["ids"]["candidates"]
    oracle = np.load(workdir / "arms/mates/oracle.npz")
    assert len(oracle["ids"]) == 40 and np.isin(oracle["ids"], candidates).all()
    assert np.isfinite(oracle["influence"]).all() and oracle["influence"].std() > 0
    predicted = np.load(workdir / "arms/mates/predictions.npz")
    assert predicted["z"].shape == candidates.shape
    selection = _selection(tiny_run, "mates")
    assert selection.method == "gumbel_top_k"
    chosen = np.isin(candidates, selection.ids)
    assert predicted["z"][chosen].mean() < predicted["z"][~chosen].mean()


def test_every_arm_continues_the_seed(tiny_run):
    workdir = tiny_run["workdir"]
    seed_steps = [r["step"] for r in report.read_jsonl(workdir / "seed/metrics.jsonl")]
    assert seed_steps[-1] == SEED_STEPS
    for name in cmp.SELECTORS:
        steps = [r["step"] for r in report.read_jsonl(workdir / "arms" / name / "metrics.jsonl")]
        assert steps == list(range(SEED_STEPS + 1, SEED_STEPS + SELECT_STEPS + 1)), name


def test_report_equals_the_done_markers(tiny_run):
    workdir, result = tiny_run["workdir"], tiny_run["result"]
    assert set(result["arms"]) == set(cmp.SELECTORS)
    for name, arm in result["arms"].items():
        done = report.read_json(workdir / "arms" / name / "model.json")
        assert arm["reference_loss"] == done["reference_loss"]
        assert arm["eval"] == done["eval"] and arm["domains"] == done["domains"]
        assert arm["downstream"] == done["downstream"]
        assert arm["downstream"]["tasks"] or arm["downstream"]["skipped"]
        assert sum(arm["domains"].values()) == K
        assert np.isfinite(arm["reference_loss"]) and arm["eval"]["all"] > 1
    assert result["seed"] == report.read_json(workdir / "seed/model.json")
    losses = [result["arms"][a]["reference_loss"] for a in result["ranking"]]
    assert losses == sorted(losses)
    text = (workdir / "report.md").read_text()
    assert "Data selectors compared" in text and all(f"| {a} |" in text for a in cmp.SELECTORS)
    assert "Zero-shot tasks" in text
    assert (workdir / "reference_loss.png").stat().st_size > 0


def test_rerun_recomputes_only_a_deleted_arm(tiny_run):
    workdir = tiny_run["workdir"]
    kept = [workdir / "seed/model.json", workdir / "candidates/embeddings.npz",
            workdir / "candidates/encoder_inputs.npz"]
    for name in cmp.SELECTORS:
        if name != "nearest":
            kept += [workdir / "arms" / name / "model.json",
                     workdir / "arms" / name / "selection.json"]
    mtimes = {p: os.path.getmtime(p) for p in kept}
    subprocess.run(["rm", "-rf", str(workdir / "arms/nearest"), str(workdir / "report.json")],
                   check=True)
    _run(workdir, tiny_run["cache"])
    assert {p: os.path.getmtime(p) for p in kept} == mtimes
    assert (workdir / "arms/nearest/model.json").exists()
    again, first = report.read_json(workdir / "report.json"), tiny_run["result"]
    np.testing.assert_allclose(again["arms"]["nearest"]["reference_loss"],
                               first["arms"]["nearest"]["reference_loss"], rtol=1e-6)
    np.testing.assert_allclose(again["arms"]["nearest"]["eval"]["all"],
                               first["arms"]["nearest"]["eval"]["all"], rtol=1e-6)
    assert again["arms"]["nearest"]["domains"] == first["arms"]["nearest"]["domains"]
    for name in cmp.SELECTORS:
        if name != "nearest":
            assert again["arms"][name] == first["arms"][name]
