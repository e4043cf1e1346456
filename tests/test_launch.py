"""An experiment's life cycle in its workdir (`jaxsel.launch`): one run, several seeds in one
command (each resumable, aggregated with intervals and paired differences recomputed here), the
headline table, and bad workdirs refused in one line."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import scipy.stats

from jaxsel import config as config_lib
from jaxsel import launch, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps: int = 3, seeds=()) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"train": {"steps": steps}, "seed": 0, "seeds": seeds})


def _study(calls: list, workdir_of_plot: list | None = None) -> launch.Study:
    def validate(config, num_devices):
        calls.append(("validate", config.seed))
        if config.train.steps < 1:
            raise config_lib.ConfigError("config.train.steps: must be >= 1")

    def run(config, workdir):
        calls.append(("run", config.seed))
        # Two arms whose losses depend on the seed; "mates" beats "random" by 0.1 + seed / 100.
        base = 2.0 + config.seed / 10
        mates = base - 0.1 - config.seed / 100
        return {"arms": {"random": {"loss": base}, "mates": {"loss": mates}},
                "steps": config.train.steps}

    def plot(result, path):
        assert not os.path.exists(os.path.join(os.path.dirname(path), "report.json"))  # Last.
        calls.append(("plot", os.path.basename(path)))
        pathlib.Path(path).write_text(str(result["steps"]))

    return launch.Study(validate, run, lambda result: f"# Run\n\nsteps {result['steps']}\n",
                        {"a.png": plot},
                        launch.Headline(r"arms\.(?P<arm>[^.]+)\.loss", "loss", "loss.png"))


def test_run_experiment_runs_once_and_writes_report_figures_last(tmp_path):
    workdir, calls = str(tmp_path / "run"), []
    with pytest.raises(config_lib.ConfigError, match="train.steps"):
        launch.run_experiment(_config(0), workdir, _study(calls))
    assert not os.path.exists(workdir)  # Refused before any work.
    result = launch.run_experiment(_config(), workdir, _study(calls))
    assert result["steps"] == 3
    assert report.read_json(os.path.join(workdir, "report.json")) == result
    assert report.read_json(os.path.join(workdir, "config.json")) == {**_config().to_dict(),
                                                                      "seeds": []}
    assert pathlib.Path(workdir, "report.md").read_text() == "# Run\n\nsteps 3\n"
    assert pathlib.Path(workdir, "a.png").read_text() == "3"
    assert pathlib.Path(workdir, "loss.png").stat().st_size > 0  # The headline figure.
    assert [c[0] for c in calls] == ["validate", "validate", "run", "plot"]
    # A finished run is returned as it is, not run again.
    again = launch.run_experiment(_config(), workdir, _study(calls))
    assert again == result and [c[0] for c in calls[4:]] == ["validate"]


def test_seeds_run_each_in_its_folder_then_aggregate(tmp_path):
    workdir, calls = str(tmp_path / "seeds"), []
    seeds = (0, 1, 2)
    result = launch.run_seeds(_config(seeds=seeds), workdir, _study(calls))
    assert [c for c in calls if c[0] == "run"] == [("run", s) for s in seeds]
    for seed in seeds:
        saved = report.read_json(os.path.join(workdir, f"seed_{seed}", "config.json"))
        assert saved["seed"] == seed and saved["seeds"] == []
    # The mean and the Student-t 95% interval, by hand.
    numbers = result["numbers"]
    random = np.array([2.0 + s / 10 for s in seeds])
    half = scipy.stats.t.ppf(0.975, 2) * random.std(ddof=1) / np.sqrt(3)
    assert numbers["arms.random.loss"]["mean"] == pytest.approx(random.mean())
    assert numbers["arms.random.loss"]["low"] == pytest.approx(random.mean() - half)
    # The paired difference to random: -0.1 - seed / 100 in every seed.
    diff = np.array([-0.1 - s / 100 for s in seeds])
    paired = numbers["arms.mates.loss - random"]
    assert paired["mean"] == pytest.approx(diff.mean())
    assert paired["high"] == pytest.approx(
        diff.mean() + scipy.stats.t.ppf(0.975, 2) * diff.std(ddof=1) / np.sqrt(3))
    text = pathlib.Path(workdir, "report.md").read_text()
    assert "Arms by loss" in text and "| mates |" in text and "+0.1100" in text
    assert pathlib.Path(workdir, "loss.png").stat().st_size > 0
    assert report.read_json(os.path.join(workdir, "report.json")) == result
    # Resumable seed by seed: a lost seed is run again, the others are read back.
    os.remove(os.path.join(workdir, "seed_1", "report.json"))
    os.remove(os.path.join(workdir, "report.json"))
    calls.clear()
    again = launch.run_seeds(_config(seeds=seeds), workdir, _study(calls))
    assert [c for c in calls if c[0] == "run"] == [("run", 1)]
    assert again["numbers"] == numbers


@pytest.mark.parametrize("seeds", [(0,), (1, 1), (0, -1)])
def test_seeds_must_be_distinct_and_at_least_two(tmp_path, seeds):
    with pytest.raises(config_lib.ConfigError, match="config.seeds"):
        launch.run_seeds(_config(seeds=seeds), str(tmp_path / "s"), _study([]))


def test_headline_table_ranks_arms_with_gains_over_random():
    numbers = {"arms.random.loss": {"mean": 2.0, "low": None, "high": None},
               "arms.mates.loss": {"mean": 1.5, "low": None, "high": None},
               "arms.mates.loss - random": {"mean": -0.5, "low": None, "high": None},
               "other": {"mean": 9.0, "low": None, "high": None}}
    table = launch.headline_table(_study([]).headline, numbers)
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in lines] == ["| mates", "| random"]
    assert "+0.5000" in lines[0] and lines[1].endswith("| - |")


def test_a_workdir_that_is_a_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    with pytest.raises(config_lib.ConfigError, match=f"--workdir {path} is a file"):
        report.open_workdir(str(path), _config())
    refused = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain",
         "--config=experiments/configs/pretrain.py:tiny", f"--workdir={path}",
         "--config.data.source=synthetic", f"--config.data.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: --workdir {path} is a file, not a folder; name a folder (it is created if "
        "missing)")
    assert "Traceback" not in refused.stderr
