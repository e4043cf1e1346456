"""The pretraining experiment end to end: it learns (and reports held-out perplexity and bits
per byte), it resumes exactly after SIGKILL, it never redoes a finished run, and a non-finite loss
stops it with the last good checkpoint kept."""

import glob
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import pretrain
from experiments.configs import pretrain as pretrain_config
from jaxsel import checkpoint, files, launch, report, select, train
from jaxsel.data import pool as pool_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, cache, *overrides):
    return [sys.executable, "-m", "experiments.pretrain",
            "--config=experiments/configs/pretrain.py:tiny", f"--workdir={workdir}",
            "--config.data.source=synthetic", f"--config.data.cache_dir={cache}",
            "--config.data.seq_len=64", "--config.model.vocab_size=512",
            "--config.data.synthetic_docs_per_domain=60", "--config.train.batch_size=8",
            "--config.train.log_every=2", *overrides]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _params(workdir, overrides):
    config = pretrain_config.get_config("tiny")
    config.data.seq_len, config.model.vocab_size, config.train.batch_size = 64, 512, 8
    config.update_from_flattened_dict(overrides)
    trainer = train.Trainer(config)
    params = checkpoint.load_params(str(workdir), trainer.abstract_params())
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_killed_run_resumes_to_the_same_params(tmp_path):
    steps = ["--config.train.steps=16", "--config.train.checkpoint_every=4"]
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    subprocess.run(_command(straight, cache, *steps), cwd=ROOT, env=_env(), check=True,
                   timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(killed, cache, *steps), cwd=ROOT, env=_env())
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "8").is_dir():  # Orbax renames a step dir when complete.
        assert proc.poll() is None and time.time() < deadline, "no checkpoint at step 8"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "report.json").exists()
    subprocess.run(_command(killed, cache, *steps), cwd=ROOT, env=_env(), check=True,
                   timeout=600)

    overrides = {"train.steps": 16}
    a, b = _params(straight, overrides), _params(killed, overrides)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows = report.read_jsonl(killed / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, 17, 2))  # No step logged twice.
    straight_rows = report.read_jsonl(straight / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]


def test_finished_run_is_not_redone_and_other_config_is_refused(tmp_path):
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    run = lambda *o: subprocess.run(  # noqa: E731
        _command(workdir, cache, "--config.train.steps=4", *o), cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=600)
    assert run().returncode == 0
    finished = (workdir / "report.json").read_text()
    second = run()
    assert second.returncode == 0 and "already finished" in second.stderr
    assert (workdir / "report.json").read_text() == finished
    third = run("--config.optim.lr=0.5")
    assert third.returncode != 0 and "optim.lr" in third.stderr


def test_init_from_starts_from_another_runs_params(tmp_path):
    """Continued pretraining: a run with `init_from` starts from the other run's final params
    (a step at lr ~ 0 leaves them where they were) with a fresh optimizer."""
    cache, seed_run, continued = tmp_path / "cache", tmp_path / "seed", tmp_path / "cpt"
    subprocess.run(_command(seed_run, cache, "--config.train.steps=4"), cwd=ROOT, env=_env(),
                   check=True, timeout=600)
    subprocess.run(_command(continued, cache, "--config.train.steps=1",
                            f"--config.init_from={seed_run}", "--config.optim.schedule=constant",
                            "--config.optim.warmup_steps=0", "--config.optim.lr=1e-12"),
                   cwd=ROOT, env=_env(), check=True, timeout=600)
    before, after = _params(seed_run, {"train.steps": 4}), _params(continued, {"train.steps": 1})
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-8, err_msg=key)
    config = pretrain_config.get_config("tiny")
    config.data.seq_len, config.model.vocab_size = 64, 512
    fresh = train.Trainer(config).init_params(config.seed)
    assert any(not np.allclose(np.asarray(x), after[jax.tree_util.keystr(p)])
               for p, x in jax.tree_util.tree_leaves_with_path(fresh))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, dtype):
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    proc = subprocess.run(
        _command(workdir, cache, "--config.train.steps=40", "--config.train.checkpoint_every=1",
                 "--config.optim.lr=1e30", "--config.optim.clip=0.0",
                 "--config.optim.warmup_steps=5", f"--config.model.dtype={dtype}"),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "non-finite loss at step" in proc.stderr
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(str(workdir / "checkpoints/*"))
                   if os.path.basename(p).isdigit())
    bad_step = int(proc.stderr.split("non-finite loss at step ")[1].split(";")[0])
    # Step 1 runs at lr 0, then the lr explodes. The state saved just before the first non-finite
    # loss produced it, so it is dropped; the one before it (2 are kept) is the last good one.
    assert bad_step >= 3 and saved == [bad_step - 2]
    params = _params(workdir, {"train.steps": 40})
    assert all(np.isfinite(v).all() for v in params.values())
    assert not (workdir / "report.json").exists()


def test_tiny_pretraining_on_local_corpus_lowers_heldout_loss(tmp_path):
    workdir = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "experiments.pretrain",
         "--config=experiments/configs/pretrain.py:tiny", f"--workdir={workdir}",
         f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.max_docs=150",
         "--config.train.steps=120", "--config.train.eval_every=40"],
        cwd=ROOT, env=_env(), check=True, timeout=1200)
    result = report.read_json(workdir / "report.json")
    vocab = 2048
    assert set(result) >= {"final_loss", "eval", "eval_bpb"}
    assert result["eval"]["all"] < vocab / 4  # Uniform guessing gives ~vocab (7.6 nats).
    evals = [r["eval"]["all"] for r in report.read_jsonl(workdir / "metrics.jsonl") if "eval" in r]
    assert evals[-1] < evals[0]
    # Bits per byte for every domain perplexity is given for; below the bits per token, since a
    # token of this BPE holds more than one byte on average.
    ppl, bpb = result["eval"], result["eval_bpb"]
    assert set(bpb) == set(ppl)
    assert all(0 < bpb[d] < math.log2(ppl[d]) for d in ppl), (ppl, bpb)
    markdown = (workdir / "report.md").read_text()
    assert report.BITS_PER_BYTE in markdown
    assert f"| all | {ppl['all']:.4g} |" in markdown and f"| all | {bpb['all']:.4g} |" in markdown
    assert (workdir / "config.json").exists()


def test_pretrains_on_a_saved_selection_of_this_pool(tmp_path):
    cache = tmp_path / "cache"
    config = pretrain_config.get_config("tiny")
    config.data.update(source="synthetic", cache_dir=str(cache), seq_len=64,
                       synthetic_docs_per_domain=60)
    config.model.vocab_size = 512
    pool_size = len(pool_lib.build_pools(config)["train"])
    chosen = select.random_ids(pool_size, 24, seed=0)
    chosen.save(tmp_path / "selection.json")
    subprocess.run(_command(tmp_path / "run", cache, "--config.train.steps=2",
                            f"--config.selection={tmp_path / 'selection.json'}"),
                   cwd=ROOT, env=_env(), check=True, timeout=600)
    assert report.read_json(tmp_path / "run" / "report.json")["train_sequences"] == 24
    select.Selection(chosen.ids, "random", pool_size + 1, {}).save(tmp_path / "other.json")
    refused = subprocess.run(_command(tmp_path / "other", cache, "--config.train.steps=2",
                                      f"--config.selection={tmp_path / 'other.json'}"),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "config.selection" in refused.stderr


def test_a_run_and_its_pool_cache_on_gs_paths(tmp_path, bucket, monkeypatch):
    """`--workdir` and `data.cache_dir` on `gs://` (a stand-in bucket, `tests.fake_gcs`): the
    run writes its config, metrics, TensorBoard events, figure and report into the bucket, the
    pool is cached there (complete, then read back from a fresh local scratch as the same rows a
    local cache holds), and the finished run is found again from another machine. Orbax writes
    `gs://` itself (TensorStore's driver, which the stand-in bucket cannot serve), so its
    checkpoints go to a local folder here."""
    manager = checkpoint.manager
    monkeypatch.setattr(checkpoint, "manager", lambda workdir, *a, **k: manager(
        workdir.replace("gs://bucket", str(tmp_path / "orbax")), *a, **k))
    config = pretrain_config.get_config("tiny")
    config.update_from_flattened_dict({
        "data.source": "synthetic", "data.cache_dir": "gs://bucket/cache", "data.seq_len": 64,
        "data.synthetic_docs_per_domain": 60, "model.vocab_size": 512,
        "train.batch_size": 8, "train.steps": 4, "train.log_every": 2,
        "train.profile_steps": (2, 3)})
    result = launch.run_experiment(config, "gs://bucket/run", pretrain.STUDY)
    run = files.path("gs://bucket/run")
    assert report.read_json(str(run / "report.json"))["final_loss"] == result["final_loss"]
    assert {"config.json", "report.md", "loss_curve.png"} <= {p.name for p in run.iterdir()}
    assert [r["step"] for r in report.read_jsonl(str(run / "metrics.jsonl"))] == [2, 4]
    assert [p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir()
            ] == [True]
    traces = [os.path.join(top, name) for top, _, names in (run / "profile").walk()
              for name in names if name.endswith(".xplane.pb")]
    assert traces and all(files.path(f"gs://{t}").stat().length > 0 for t in traces)
    pool_folder = next(files.path("gs://bucket/cache/pools").iterdir())
    assert (pool_folder / files.COMPLETE).exists()

    monkeypatch.setenv("JAXSEL_SCRATCH", str(tmp_path / "another_machine"))
    assert launch.run_experiment(config, "gs://bucket/run", pretrain.STUDY) == result
    remote = pool_lib.build_pools(config)["train"]
    assert str(remote.path).startswith(str(tmp_path / "another_machine"))
    config.data.cache_dir = str(tmp_path / "local_cache")
    local = pool_lib.build_pools(config)["train"]
    assert remote.key == local.key
    np.testing.assert_array_equal(remote.tokens, local.tokens)
