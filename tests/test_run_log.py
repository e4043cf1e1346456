"""What a training run records besides metrics.jsonl, read back: TensorBoard scalars (training,
eval, the learning rate) equal to metrics.jsonl's rows, purged on resume; a profiler trace of
the chosen steps; the parameter count."""

import glob
import os
import shutil
import struct

import flax.linen as nn
import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxsel import config as config_lib
from jaxsel import report, run_log, train
from jaxsel.data import pipeline
from jaxsel.data import pool as pool_lib
from tests.workers import train_steps


def _events(folder):
    """The events of the event files under `folder`, in order, read from the TFRecord framing
    by hand: [length u64][crc u32][data][crc u32]."""
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            yield event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4


def starts(folder) -> list[int]:
    """The steps at which a writer marked a restart (TensorBoard's purge)."""
    return [e.step for e in _events(folder)
            if e.HasField("session_log") and e.session_log.status == e.session_log.START]


def read_scalars(folder) -> dict[str, dict[int, float]]:
    """Every scalar, tag -> step -> value, as TensorBoard reads them: a restart at step s drops
    what was logged at steps >= s before it."""
    scalars: dict[str, dict[int, float]] = {}
    for event in _events(folder):
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            for steps in scalars.values():
                for step in [s for s in steps if s >= event.step]:
                    del steps[step]
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_log")
    config = train_steps.tiny_config()
    config.model.vocab_size = 512
    config.data.update(source="synthetic", synthetic_docs_per_domain=20,
                       cache_dir=str(tmp / "cache"))
    config.train.update(steps=6, log_every=1, checkpoint_every=3, eval_every=2,
                        profile_steps=(2, 3))
    train_pool = pool_lib.build_pools(config)["train"]
    batches = lambda: iter(pipeline.make_batches(  # noqa: E731
        train_pool, np.arange(40), config.train.batch_size, 0, 0, 1))
    evaluate = lambda params, step: {"all": 10.0 + step, "prose": {"ppl": 2.0 * step}}  # noqa
    workdir = str(tmp / "run")
    config.train.stop_at = 4
    train.run(config, workdir, batches(), evaluate_fn=evaluate)
    # As if killed after logging step 4 but before its checkpoint landed: resume from step 3.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    config.train.update(stop_at=0, profile_steps=())
    train.run(config, workdir, batches(), evaluate_fn=evaluate)
    return workdir


def test_scalars_equal_the_metrics_rows_and_resume_purges(runs):
    rows = report.read_jsonl(os.path.join(runs, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    scalars = read_scalars(os.path.join(runs, "tensorboard"))
    for key in ("loss", "grad_norm", "lr", "tokens_per_s"):
        assert scalars[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in rows}), key
    evals = {r["step"]: r["eval"] for r in rows if "eval" in r}
    assert sorted(evals) == [2, 4, 6]
    assert scalars["eval/all"] == pytest.approx({s: e["all"] for s, e in evals.items()})
    assert scalars["eval/prose/ppl"] == pytest.approx({s: e["prose"]["ppl"]
                                                       for s, e in evals.items()})
    # Step 4 was logged by the first run and again after the resume from step 3: the resumed
    # writer marks a restart at step 4, so TensorBoard drops the first run's events from there.
    assert starts(os.path.join(runs, "tensorboard")) == [4]
    assert scalars["train/loss"][4] == pytest.approx(rows[3]["loss"])


def test_the_chosen_steps_are_profiled(runs):
    traces = glob.glob(os.path.join(runs, "profile", "**", "*.xplane.pb"), recursive=True)
    assert traces and all(os.path.getsize(t) > 0 for t in traces)


def test_parameter_count_and_peak_memory_are_reported():
    config = train_steps.tiny_config()
    trainer = train.Trainer(config)
    params = trainer.init_params(0)
    info = run_log.log_model_and_memory(params)
    assert info["params"] == sum(np.size(x) for x in jax.tree.leaves(nn.unbox(params)))
    assert set(info["peak_bytes"]) == {str(d) for d in jax.local_devices()}


def test_profile_steps_are_validated():
    config = train_steps.tiny_config()
    config.train.profile_steps = (3, 2)
    with pytest.raises(config_lib.ConfigError, match="train.profile_steps"):
        config_lib.validate(config, 1)
