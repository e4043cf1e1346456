"""The MATES experiment end to end on the synthetic corpus with the real MiniLM: the stage plan,
what each stage selects and trains on, and a killed run resuming to the same result."""

import os
import subprocess

import numpy as np
import pytest

from experiments import mates
from experiments.configs import mates as mates_config
from jaxsel import config as config_lib
from jaxsel import report, select
from jaxsel.data import pool as pool_lib
from tests import experiment_runs as runs

OVERRIDES = {**runs.SMALL,
    "train.steps": 12, "train.log_every": 2, "train.eval_per_domain": 8, "mates.stages": 2,
    "mates.selection_fraction": 0.5, "mates.probe_size": 40, "mates.probe_chunk": 8,
    "mates.reference_domain": "prose", "mates.reference_items": 8,
    "mates.encoder_max_length": 32, "mates.fit_epochs": 2, "mates.fit_batch_size": 8,
    "mates.fit_lr": 1e-4, "mates.predict_batch_size": 32, "mates.eval_batch_size": 8,
}


def _config(cache):
    return runs.config(mates_config, {**OVERRIDES, "data.cache_dir": str(cache)})


def _run(workdir, cache):
    runs.run("mates", workdir, {**OVERRIDES, "data.cache_dir": cache}, timeout=1200)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mates")
    workdir, cache = tmp / "run", tmp / "cache"
    _run(workdir, cache)
    config = _config(cache)
    pool_size = len(pool_lib.build_pools(config)["train"])
    return dict(workdir=workdir, cache=cache, config=config, result=report.read_json(
        workdir / "report.json"), candidates=mates.stage_candidates(config, pool_size))


def test_stage_candidates_are_disjoint_seeded_draws():
    config = mates_config.get_config("tiny")
    candidates = mates.stage_candidates(config, 20_000)
    per_stage = 40 * 16 * 5  # stage_steps x batch / selection_fraction
    assert [len(c) for c in candidates] == [per_stage] * 3
    assert len(np.unique(np.concatenate(candidates))) == 3 * per_stage
    again = mates.stage_candidates(config, 20_000)
    assert all(np.array_equal(a, b) for a, b in zip(candidates, again, strict=True))
    with pytest.raises(config_lib.ConfigError, match="mates.selection_fraction"):
        mates.stage_candidates(config, 3 * per_stage - 1)


@pytest.mark.parametrize("key, value, message", [
    ("mates.stages", 1, "config.mates.stages: must be >= 2"),
    ("train.steps", 121, "config.train.steps: 121 is not divisible by mates.stages=3"),
    ("mates.temperature", 0.0, "config.mates.temperature: must be > 0"),
    ("train.stop_at", 40, "config.train.stop_at: is set for each stage"),
    ("mates.selection_fraction", 1.5, "config.mates.selection_fraction: must be in"),
])
def test_impossible_values_name_the_key(key, value, message):
    config = mates_config.get_config("tiny")
    config.update_from_flattened_dict({key: value})
    with pytest.raises(config_lib.ConfigError, match=message):
        mates.validate(config, 1)


def test_each_stage_selects_from_its_candidates_and_continues_the_last(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["candidates"]
    stage_size = 6 * 8
    first = select.Selection.load(workdir / "stages/0/selection.json")
    assert first.method == "random" and len(first) == stage_size
    assert np.isin(first.ids, candidates[0]).all()
    for arm, method in (("mates", "gumbel_top_k"), ("random", "random")):
        selection = select.Selection.load(workdir / f"stages/1-{arm}/selection.json")
        assert selection.method == method and len(selection) == stage_size
        assert np.isin(selection.ids, candidates[1]).all()
        steps = [r["step"] for r in report.read_jsonl(workdir / f"stages/1-{arm}/metrics.jsonl")]
        assert steps[0] == 8 and steps[-1] == 12  # Continued from stage 0's step 6.
    oracle = np.load(workdir / "stages/1-mates/oracle.npz")
    assert len(oracle["ids"]) == 40 and np.isin(oracle["ids"], candidates[1]).all()
    assert np.isfinite(oracle["influence"]).all() and oracle["influence"].std() > 0
    predicted = np.load(workdir / "stages/1-mates/predictions.npz")
    assert predicted["z"].shape == candidates[1].shape
    # Gumbel-top-k on z-scored predictions favours low (good) predicted influence.
    chosen = np.isin(candidates[1], select.Selection.load(
        workdir / "stages/1-mates/selection.json").ids)
    assert predicted["z"][chosen].mean() < predicted["z"][~chosen].mean()


def test_report_compares_both_arms(tiny_run):
    result = tiny_run["result"]
    assert set(result["final"]) == {"mates", "random"}
    assert result["stages"]["mates"][0] == result["stages"]["random"][0]  # One shared stage 0.
    for arm in ("mates", "random"):
        assert [s["stage"] for s in result["stages"][arm]] == [0, 1]
        final = result["final"][arm]
        assert np.isfinite(final["reference_loss"]) and final["eval"]["all"] > 1
        assert final["downstream"] == result["stages"][arm][-1]["downstream"]
        assert final["downstream"]["tasks"] or final["downstream"]["skipped"]
    assert result["reference_loss_gain"] == pytest.approx(
        result["final"]["random"]["reference_loss"] - result["final"]["mates"]["reference_loss"])
    spearman = result["stages"]["mates"][1]["selection"]["influence_model_val_spearman"]
    assert -1 <= spearman <= 1
    text = (tiny_run["workdir"] / "report.md").read_text()
    assert "MATES vs random" in text and "Final zero-shot tasks" in text


def test_killed_stage_resumes_to_the_same_result(tiny_run):
    """Deleting what a kill during the MATES stage would leave undone (its predictions,
    selection, training and the report) and running again recomputes exactly that, reusing the
    oracle probes, and gives the same result."""
    workdir, stage = tiny_run["workdir"], tiny_run["workdir"] / "stages/1-mates"
    oracle_mtime = os.path.getmtime(stage / "oracle.npz")
    for name in ("predictions.npz", "selection.json", "model.json"):
        os.remove(stage / name)
    subprocess.run(["rm", "-rf", str(stage / "checkpoints"), str(stage / "metrics.jsonl"),
                    str(workdir / "report.json")], check=True)
    _run(workdir, tiny_run["cache"])
    assert os.path.getmtime(stage / "oracle.npz") == oracle_mtime
    again = report.read_json(workdir / "report.json")
    np.testing.assert_allclose(again["final"]["mates"]["reference_loss"],
                               tiny_run["result"]["final"]["mates"]["reference_loss"], rtol=1e-6)
    assert again["final"]["random"] == tiny_run["result"]["final"]["random"]
