"""Aggregating runs over seeds (`experiments.aggregate`) against numpy / scipy by hand."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats as scipy_stats

from jaxsel import aggregate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = {"mates": [6.30, 6.41, 6.35], "random": [6.52, 6.49, 6.61]}


def _run(tmp_path, seed, config=None, **report_fields):
    """A finished run's workdir: config.json and report.json."""
    workdir = tmp_path / f"run{seed}"
    workdir.mkdir()
    config = {"seed": seed, "train": {"steps": 100}, **(config or {})}
    (workdir / "config.json").write_text(json.dumps(config))
    i = seed
    report = {"arms": {arm: {"reference_loss": LOSSES[arm][i], "method": arm,
                             "eval": {"all": 400.0 + 10 * i + (arm == "mates")}}
                       for arm in LOSSES},
              "ranking": ["mates", "random"], "converged": True, "note": None, **report_fields}
    (workdir / "report.json").write_text(json.dumps(report))
    return str(workdir)


def _interval(x):
    x = np.asarray(x)
    low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    return x.mean(), low, high


def test_numbers_are_the_numeric_leaves():
    tree = {"a": {"b": 1, "c": 2.5, "d": True, "e": None, "f": [1, 2], "g": "x"}, "h": 3}
    assert aggregate.numbers(tree) == {"a.b": 1.0, "a.c": 2.5, "h": 3.0}


def test_means_intervals_and_paired_differences(tmp_path):
    workdirs = [_run(tmp_path, s) for s in range(3)]
    result = aggregate.aggregate(aggregate.load_runs(workdirs), baseline="random")
    for arm, losses in LOSSES.items():
        got = result[f"arms.{arm}.reference_loss"]
        assert (got["mean"], got["low"], got["high"]) == pytest.approx(_interval(losses))
        assert got["n"] == 3 and got["std"] == pytest.approx(np.std(losses, ddof=1))
    paired = result["arms.mates.reference_loss - random"]
    differences = np.subtract(LOSSES["mates"], LOSSES["random"])
    assert (paired["mean"], paired["low"], paired["high"]) == pytest.approx(
        _interval(differences))
    # The paired interval is far narrower than the arms' own: the seeds' shared shift cancels.
    ppl = result["arms.mates.eval.all - random"]
    assert ppl["mean"] == pytest.approx(1.0) and ppl["std"] == pytest.approx(0.0)
    assert "arms.random.reference_loss - random" not in result
    assert not any("method" in p or "converged" in p or "note" in p for p in result)


def test_match_keeps_only_matching_paths_and_missing_numbers_are_left_out(tmp_path):
    workdirs = [_run(tmp_path, 0, extra=1.0), _run(tmp_path, 1), _run(tmp_path, 2, extra=2.0)]
    result = aggregate.aggregate(aggregate.load_runs(workdirs), match=("reference_loss",))
    assert set(result) == {"arms.mates.reference_loss", "arms.random.reference_loss"}
    assert "extra" not in aggregate.aggregate(aggregate.load_runs(workdirs))


def test_runs_that_cannot_be_aggregated_are_refused_naming_why(tmp_path):
    good = [_run(tmp_path, 0), _run(tmp_path, 1)]
    with pytest.raises(ValueError, match="at least 2 runs"):
        aggregate.load_runs(good[:1])
    other = _run(tmp_path, 2, config={"train": {"steps": 50}})
    with pytest.raises(ValueError, match=r"run2 differs from .*run0 in train\.steps"):
        aggregate.load_runs([good[0], other])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"seed": 5, "train": {"steps": 100}}))
    with pytest.raises(ValueError, match="unfinished has no report.json"):
        aggregate.load_runs([good[0], str(unfinished)])
    (tmp_path / "again").mkdir()
    for name in ("config.json", "report.json"):
        (tmp_path / "again" / name).write_text((tmp_path / "run0" / name).read_text())
    with pytest.raises(ValueError, match="seeds .* repeat"):
        aggregate.load_runs([good[0], str(tmp_path / "again")])


def test_command_line_writes_json_and_markdown(tmp_path):
    workdirs = [_run(tmp_path, s) for s in range(3)]
    out = tmp_path / "agg"
    subprocess.run([sys.executable, "-m", "experiments.aggregate",
                    f"--workdirs={','.join(workdirs)}", f"--out={out}", "--baseline=random",
                    "--match=reference_loss"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    saved = json.loads((out / "aggregate.json").read_text())
    assert saved["workdirs"] == workdirs
    assert set(saved["numbers"]) == {"arms.mates.reference_loss", "arms.random.reference_loss",
                                     "arms.mates.reference_loss - random"}
    text = (out / "aggregate.md").read_text()
    assert "| arms.mates.reference_loss - random |" in text and "Aggregate of 3 runs" in text
