"""Workdir artifacts (`jaxsel.report`) and an experiment's life cycle in its workdir
(`experiments.launch.run_experiment`)."""

import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest

from experiments import launch
from jaxsel import report


class Counter:
    """A `compute()` that counts its calls."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_cached_json_computes_once_then_reads_back(tmp_path):
    path = str(tmp_path / "model" / "model.json")
    compute = Counter({"loss": 1.5, "eval": {"all": 3.0}})
    assert report.cached_json(path, compute) == compute.value
    assert json.loads(pathlib.Path(path).read_text()) == compute.value
    assert report.cached_json(path, Counter({"loss": 9.0})) == compute.value
    assert compute.calls == 1
    assert os.listdir(tmp_path / "model") == ["model.json"]  # No temp file left behind.


def test_cached_npz_computes_once_then_reads_back(tmp_path):
    path = str(tmp_path / "a" / "losses.npz")
    compute = Counter({"ids": np.arange(3), "losses": np.array([0.5, 1.0, 2.0], np.float32)})
    first = report.cached_npz(path, compute)
    again = report.cached_npz(path, Counter({"ids": np.zeros(1)}))
    assert compute.calls == 1
    for key, value in compute.value.items():
        np.testing.assert_array_equal(first[key], value)
        np.testing.assert_array_equal(again[key], value)
        assert again[key].dtype == value.dtype
    assert os.listdir(tmp_path / "a") == ["losses.npz"]


def _config(steps: int = 3) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"train": {"steps": steps}, "seed": 0})


def test_open_workdir_refuses_another_config_naming_the_keys(tmp_path):
    assert report.open_workdir(str(tmp_path), _config()) is None
    assert report.open_workdir(str(tmp_path), _config()) is None  # Same config: resume.
    with pytest.raises(ValueError, match=r"keys differ: train\.steps"):
        report.open_workdir(str(tmp_path), _config(steps=4))


def test_run_experiment_runs_once_and_writes_report_figures_last(tmp_path):
    workdir, calls = str(tmp_path / "run"), []

    def validate(config, num_devices):
        calls.append(("validate", num_devices))
        if config.train.steps < 1:
            raise ValueError("train.steps: must be >= 1")

    def run(config, workdir):
        calls.append(("run",))
        return {"loss": 0.25, "steps": config.train.steps}

    def plot(result, path):
        assert not os.path.exists(os.path.join(workdir, "report.json"))  # Written last.
        calls.append(("plot", os.path.basename(path)))
        with open(path, "w") as f:
            f.write(str(result["loss"]))

    to_markdown = lambda result: f"# Run\n\nloss {result['loss']}\n"  # noqa: E731
    with pytest.raises(ValueError, match="train.steps"):
        launch.run_experiment(_config(0), workdir, validate, run, to_markdown, {"a.png": plot})
    assert not os.path.exists(workdir)  # Refused before any work.

    result = launch.run_experiment(_config(), workdir, validate, run, to_markdown,
                                   {"a.png": plot})
    assert result == {"loss": 0.25, "steps": 3}
    assert report.read_json(os.path.join(workdir, "report.json")) == result
    assert report.read_json(os.path.join(workdir, "config.json")) == _config().to_dict()
    assert pathlib.Path(workdir, "report.md").read_text() == "# Run\n\nloss 0.25\n"
    assert pathlib.Path(workdir, "a.png").read_text() == "0.25"
    assert [c[0] for c in calls] == ["validate", "validate", "run", "plot"]

    # A finished run is returned as it is, not run again.
    again = launch.run_experiment(_config(), workdir, validate, run, to_markdown, {"a.png": plot})
    assert again == result and [c[0] for c in calls[4:]] == ["validate"]
