"""Workdir artifacts (`jaxsel.report`): cached steps written once, a workdir claimed by one
config."""

import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest

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
