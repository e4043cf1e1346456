"""The MATES experiment end to end on the synthetic corpus with the real MiniLM, 3 stages: the
stage plan, what each stage selects from and trains on, the probe state of each stage (its
optimizer step and schedule learning rate, and the oracle recomputed from it by hand), the
decayed copies, the report recomputed from the saved models, no held-out row outside the
`target` role read while selecting, and a killed stage resuming to the same result."""

import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import mates
from experiments.configs import mates as mates_config
from jaxsel import checkpoint, references, report, runs, select, train
from jaxsel import config as config_lib
from jaxsel.model import encoder as encoder_lib
from tests import experiment_runs as runs_lib

# 3 stages of 6 steps (stage 1 and 2 selected), each decayed over 3 steps from a copy; 48 of 96
# candidates per stage; the synthetic corpus, one document per row, prose the target.
OVERRIDES = {**runs_lib.SMALL,
    "data.seq_len": 64, "model.vocab_size": 2048, "data.packing": "document",
    "data.heldout_fraction": 0.2, "roles.target_domain": "prose", "roles.target_items": 8,
    "roles.target_eval_items": 16, "train.steps": 18, "train.log_every": 1,
    "train.eval_per_domain": 8, "optim.warmup_steps": 2, "optim.decay_steps": 3,
    "mates.stages": 3, "mates.selection_fraction": 0.5, "mates.probe_size": 32,
    "mates.probe_chunk": 8, "mates.encoder_max_length": 64, "mates.fit_epochs": 2,
    "mates.fit_batch_size": 8, "mates.fit_lr": 1e-4, "mates.predict_batch_size": 32,
    "mates.eval_batch_size": 8,
}
STAGE_STEPS, DECAY = 6, 3


def _config(cache):
    return runs_lib.config(mates_config, {**OVERRIDES, "data.cache_dir": str(cache)})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The run, in process, recording every pool row read while each stage selects."""
    tmp = tmp_path_factory.mktemp("mates")
    workdir, cache = tmp / "run", tmp / "cache"
    config = _config(cache)
    result, reads = runs_lib.run_recording_reads(mates, config, workdir, "selection")
    data = runs.load_data(config)
    return dict(workdir=workdir, cache=cache, config=config, data=data, reads=reads,
                result=result, candidates=mates.stage_candidates(config, len(data.train_pool)))


def _selection(workdir, arm, stage):
    return select.Selection.load(mates.stage_dir(str(workdir), arm, stage) + "/selection.json")


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


def test_presets_follow_mates():
    for preset in ("tiny", "small", "410m", "1b"):
        config = mates_config.get_config(preset)
        mates.validate(config, 1)
        assert config.optim.schedule == "wsd" and config.mates.temperature == 0.5
        assert config.mates.encoder_windows == (1 if preset == "small" else 2)
    small = mates_config.get_config("small")
    assert small.roles.target_items == 1024 and small.mates.encoder_max_length == 512
    assert small.optim.decay_steps == 200 and small.roles.item_len == 128


def test_presets_plan_at_most_a_tenth_of_training_for_selection():
    """MATES' selection overhead against training, in FLOPs, as every preset plans it (with
    MiniLM): at most 10% from `small` up."""
    minilm = encoder_lib.load_encoder(max_length=512).config
    ratios = {preset: mates.planned_overhead(mates_config.get_config(preset), minilm)["ratio"]
              for preset in ("small", "410m", "1b")}
    assert all(0.0 < r <= 0.10 for r in ratios.values()), ratios


@pytest.mark.parametrize("key, value, message", [
    ("mates.stages", 1, "config.mates.stages: must be >= 2"),
    ("train.steps", 121, "config.train.steps: 121 is not divisible by mates.stages=3"),
    ("mates.temperature", 0.0, "config.mates.temperature: must be > 0"),
    ("train.stop_at", 40, "config.train.stop_at: is set for each stage"),
    ("mates.selection_fraction", 1.5, "config.mates.selection_fraction: must be in"),
    ("optim.warmup_steps", 41, "config.optim.warmup_steps: 41 exceeds a stage"),
    ("roles.target_domain", "", "config.roles.target_domain: names no domain"),
])
def test_impossible_values_name_the_key(key, value, message):
    config = mates_config.get_config("tiny")
    config.update_from_flattened_dict({key: value})
    with pytest.raises(config_lib.ConfigError, match=message):
        mates.validate(config, 1)


def test_each_stage_selects_from_its_candidates_and_continues_the_last(tiny_run):
    workdir, candidates = tiny_run["workdir"], tiny_run["candidates"]
    lr = tiny_run["config"].optim.lr
    first = _selection(workdir, "random", 0)
    assert first.method == "random" and len(first) == 48 and np.isin(first.ids, candidates[0]).all()
    for stage in (1, 2):
        for arm, method in (("mates", "gumbel_top_k"), ("random", "random")):
            record = tiny_run["result"]["stages"][arm][stage]
            selection = _selection(workdir, arm, stage)
            assert selection.method == method and len(selection) == 48
            assert np.isin(selection.ids, candidates[stage]).all()
            rows = report.read_jsonl(os.path.join(record["dir"], "metrics.jsonl"))
            assert [r["step"] for r in rows] == list(range(stage * STAGE_STEPS + 1,
                                                           (stage + 1) * STAGE_STEPS + 1))
            assert all(r["lr"] == pytest.approx(lr) for r in rows)  # The stable phase.
            decayed = report.read_jsonl(os.path.join(record["evaluated_dir"], "metrics.jsonl"))
            identity = report.read_json(os.path.join(record["evaluated_dir"],
                                                     "model.json"))["identity"]
            assert identity["start"] == "continue" and identity["parent"] == record["key"]
            end = (stage + 1) * STAGE_STEPS
            assert [r["step"] for r in decayed] == list(range(end + 1, end + DECAY + 1))
            rates = [r["lr"] for r in decayed]
            assert rates[0] <= lr * (1 + 1e-6) and np.all(np.diff(rates) < 0)
    oracle = np.load(workdir / "stages/1-mates/oracle.npz")
    assert len(oracle["ids"]) == 32 and np.isin(oracle["ids"], candidates[1]).all()
    assert np.isfinite(oracle["influence"]).all() and oracle["influence"].std() > 0


def test_each_probe_state_carries_its_stage_step_and_learning_rate(tiny_run):
    """The oracle of stage s is probed from the state stage s - 1 left: its step is that
    stage's last, the schedule's rate there is the stable one, and one step of the run's own
    optimizer on a probed candidate, from that state, changes the target loss by the saved
    oracle value (recomputed here by hand)."""
    workdir, config, data = tiny_run["workdir"], tiny_run["config"], tiny_run["data"]
    trainer = train.Trainer(mates.stage_config(config, 2))
    items = data.items["target"]
    for stage in (1, 2):
        state, _ = train.load_state(trainer, tiny_run["result"]["stages"]["mates"][stage - 1]
                                    ["dir"])
        assert int(state.step) == stage * STAGE_STEPS
        assert float(trainer.schedule(int(state.step))) == pytest.approx(config.optim.lr)
        oracle = np.load(workdir / f"stages/{stage}-mates/oracle.npz")
        before = runs_lib.cloze_loss(trainer.model, jax.device_get(state.params), items)
        for i in (0, 1):
            row = data.train_pool.rows(oracle["ids"][i:i + 1])
            batch = {k: jnp.asarray(v) for k, v in row.items()}
            stepped, _ = train.train_step(state, batch, trainer.model, trainer.tx)
            after = runs_lib.cloze_loss(trainer.model, jax.device_get(stepped.params), items)
            assert oracle["influence"][i] == pytest.approx(after - before, rel=2e-3, abs=2e-6)


def test_selection_reads_no_target_eval_or_eval_row(tiny_run):
    data, reads = tiny_run["data"], tiny_run["reads"]
    assert {phase for _, phase, _ in reads} >= {("mates", 1), ("mates", 2)}
    forbidden = np.union1d(data.roles.ids["target_eval"], data.roles.ids["eval"])
    assert not any(np.isin(ids, forbidden).any()
                   for split, _, ids in reads if split == "heldout")
    for split, (_, stage), ids in reads:
        if split == "train":
            assert np.isin(ids, tiny_run["candidates"][stage]).all()
    assert tiny_run["result"]["splits"]["overlap_documents"] == 0


def test_report_recomputed_from_the_saved_models(tiny_run):
    workdir, result, data, config = (tiny_run[k] for k in ("workdir", "result", "data",
                                                            "config"))
    trainer = train.Trainer(mates.stage_config(config, 2))
    items = references.cloze_from_pool(data.heldout, data.roles.ids["target_eval"],
                                  config.roles.target_eval_items)
    finals = {}
    for arm in mates.ARMS:  # The final model is the last stage's decayed copy.
        folder = result["stages"][arm][2]["evaluated_dir"]
        params = checkpoint.load_params(folder, trainer.abstract_params())
        finals[arm] = runs_lib.cloze_loss(trainer.model, jax.device_get(params), items)
        assert result["final"][arm]["target_eval_loss"] == pytest.approx(finals[arm], rel=2e-4)
    assert result["target_eval_loss_gain"] == pytest.approx(finals["random"] - finals["mates"],
                                                            abs=1e-3)
    assert result["stages"]["mates"][0] == result["stages"]["random"][0]  # One stage 0.
    pool = data.train_pool
    for stage, diagnostics in enumerate(result["selection"], start=1):
        oracle = np.load(workdir / f"stages/{stage}-mates/oracle.npz")
        top = oracle["ids"][np.argsort(oracle["influence"], kind="stable")[:16]]
        share = np.mean([pool.domain_names[pool.domains[i]] == "prose" for i in top])
        assert diagnostics["oracle_top_k_target_share"] == pytest.approx(share)
        picked = _selection(workdir, "mates", stage).ids
        assert diagnostics["pick_target_share"] == pytest.approx(
            np.mean([pool.domain_names[pool.domains[i]] == "prose" for i in picked]))
        fit = report.read_json(workdir / f"stages/{stage}-mates/influence_model.json")
        assert diagnostics["val_spearman"] == fit["history"][fit["best_epoch"]]["val_spearman"]
    overhead = result["overhead"]
    planned = result["planned_overhead"]  # Full windows: an upper bound of the run's scoring.
    assert planned["probe"] == pytest.approx(overhead["flops"]["probe"], rel=0.05)
    assert planned["score"] >= overhead["flops"]["score"] > 0
    assert overhead["flops"]["train"] == 3 * 18 * 8 * 64 * (
        trainer.model.cfg.num_layers * (2 * 4 * 32 * 32 + 2 * 2 * 64 * 32 + 2 * 3 * 32 * 64)
        + 2 * 32 * 2048)
    text = (workdir / "report.md").read_text()
    assert "target-eval" in text and "in sample" in text and "decay of 3 steps" in text
    assert (workdir / "stages.png").stat().st_size > 0


def test_killed_stage_resumes_to_the_same_result(tiny_run):
    """Deleting what a kill during the last MATES stage would leave undone (its predictions,
    selection, evaluation, its model and decayed copy in the pool, and the report) and running
    again recomputes exactly that, reusing the oracle probes, and gives the same result."""
    workdir, stage = tiny_run["workdir"], tiny_run["workdir"] / "stages/2-mates"
    record = tiny_run["result"]["stages"]["mates"][2]
    oracle_mtime = os.path.getmtime(stage / "oracle.npz")
    for name in ("predictions.npz", "selection.json", "evaluation.json"):
        os.remove(stage / name)
    subprocess.run(["rm", "-rf", record["dir"], record["evaluated_dir"],
                    str(workdir / "report.json")], check=True)
    runs_lib.run("mates", workdir, {**OVERRIDES, "data.cache_dir": tiny_run["cache"]},
                 timeout=1200)
    assert os.path.getmtime(stage / "oracle.npz") == oracle_mtime
    again = report.read_json(workdir / "report.json")
    np.testing.assert_allclose(again["final"]["mates"]["target_eval_loss"],
                               tiny_run["result"]["final"]["mates"]["target_eval_loss"],
                               rtol=1e-6)
    assert again["final"]["random"] == tiny_run["result"]["final"]["random"]
