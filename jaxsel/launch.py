"""How an experiment script runs: the `--config` / `--workdir` flags, process start-up, the run's
life cycle in its workdir (`run_experiment`) and, with `--config.seeds`, one run per seed and
their aggregate (`run_seeds`).

    python -m experiments.<name> --config=experiments/configs/<name>.py:tiny --workdir=DIR \
        --config.train.steps=200 [--config.seeds=0,1,2]

An experiment declares a `Study`: its validation, its run, its markdown and figures, and its
`Headline` (the number arms are ranked by; printed as a short table at the end, drawn with 95%
intervals when there are several seeds).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from jaxsel import aggregate, figures, files, report, sharding
from jaxsel import config as config_lib
from jaxsel.data import pool as pool_lib

CONFIG = config_flags.DEFINE_config_file("config", None, "path.py:arg", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes everything.", required=True)
BASELINE = "random"  # The arm every other is compared with, where a study has one.


@dataclasses.dataclass(frozen=True)
class Headline:
    """The number a study ranks its arms by: the report paths matching `pattern` (a regex whose
    group `arm` names the arm), `label` for tables and the figure `file`; lower is better."""

    pattern: str
    label: str
    file: str

    def arms(self, numbers: dict[str, dict]) -> dict[str, tuple[dict, dict | None]]:
        """Arm -> (its `stats.mean_interval`, that of its paired difference to `random` or
        None), from `aggregate.aggregate`'s numbers."""
        out = {}
        for path, n in numbers.items():
            match = re.fullmatch(self.pattern, path)
            if match:
                out[match["arm"]] = (n, numbers.get(f"{path} - {BASELINE}"))
        return out


@dataclasses.dataclass(frozen=True)
class Study:
    """What an experiment script declares: `validate(config, num_devices)`, `run(config,
    workdir) -> result`, `to_markdown(result)`, figures (file name -> `plot(result, path)`)
    and its `headline` (None: no arms to rank)."""

    validate: Callable[[ml_collections.ConfigDict, int], None]
    run: Callable[[ml_collections.ConfigDict, str], dict]
    to_markdown: Callable[[dict], str]
    figures: dict[str, Callable[[dict, str], None]] = dataclasses.field(default_factory=dict)
    headline: Headline | None = None


def start() -> tuple[ml_collections.ConfigDict, str]:
    """Distributed init (JAXSEL_DISTRIBUTED), quiet library logs, XLA's compilation cache.

    Experiments that train several models compile the same steps again for each; the persistent
    cache (under the data cache root unless JAX_COMPILATION_CACHE_DIR is set) turns each repeat
    into a read (on 2 CPU cores: ~20 s -> ~3 s per model).
    """
    sharding.maybe_initialize_distributed()
    report.quiet_library_logs()
    config = CONFIG.value
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(pool_lib.cache_root(config.data), "xla"))
    return config, WORKDIR.value


def run_experiment(config: ml_collections.ConfigDict, workdir: str, study: Study) -> dict:
    """One run in `workdir`: `study.validate`, then claim the workdir for `config`
    (`report.open_workdir`); a finished run's report is returned as it is. Otherwise
    `study.run` (which resumes from whatever it saved), then process 0 draws each figure and the
    headline's, and writes report.md and, last, report.json."""
    study.validate(config, jax.device_count())
    done = report.open_workdir(workdir, config)
    if done is not None:
        logging.info("already finished: %s/report.json", workdir)
        return done
    result = study.run(config, workdir)
    if jax.process_index() == 0:
        for name, plot in study.figures.items():
            plot(result, os.path.join(workdir, name))
        if study.headline:
            _headline_figure(study.headline, aggregate.aggregate([result]), workdir)
        report.finish(workdir, result, study.to_markdown(result))
    return result


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of one seed's run: `seed`, and no `seeds` of its own."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed, c.seeds = seed, ()
    return c


def run_seeds(config: ml_collections.ConfigDict, workdir: str, study: Study) -> dict:
    """One run per seed of `config.seeds` in `workdir/seed_<s>` (each resumable on its own),
    then their aggregate in `workdir`: report.json (`seeds`, `workdirs`, `numbers`: mean, std
    and 95% interval of every number the runs share, and paired differences to `random` where a
    study has such an arm), report.md (the headline with intervals, then every number) and the
    headline figure with intervals."""
    seeds = list(config.seeds)
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise config_lib.ConfigError(f"config.seeds: {tuple(seeds)} must be 2 or more distinct "
                                     "seeds >= 0 (or empty: one run with config.seed)")
    for seed in seeds:
        study.validate(seed_config(config, seed), jax.device_count())
    done = report.open_workdir(workdir, config)
    if done is not None:
        return done
    dirs = [os.path.join(workdir, f"seed_{seed}") for seed in seeds]
    for seed, folder in zip(seeds, dirs, strict=True):
        logging.info("seed %d of %s: %s", seed, seeds, folder)
        run_experiment(seed_config(config, seed), folder, study)
    numbers = aggregate.aggregate(aggregate.load_runs(dirs), BASELINE)
    result = {"seeds": seeds, "workdirs": dirs, "numbers": numbers}
    if jax.process_index() == 0:
        markdown = aggregate.to_markdown(numbers, dirs)
        if study.headline:
            _headline_figure(study.headline, numbers, workdir)
            markdown = (headline_table(study.headline, numbers)
                        + f"\n![{study.headline.label}]({study.headline.file})\n\n" + markdown)
        report.finish(workdir, result, markdown)
    return result


def _headline_figure(headline: Headline, numbers: dict, workdir: str) -> None:
    figures.headline_bars({arm: n for arm, (n, _) in headline.arms(numbers).items()},
                          headline.label, os.path.join(workdir, headline.file))


def headline_table(headline: Headline, numbers: dict[str, dict]) -> str:
    """The arms ranked by the headline (the mean over seeds, its 95% interval where there are
    several seeds, and the gain over `random`: minus the paired difference, with its
    interval), as markdown."""
    arms = headline.arms(numbers)
    seeds = any(n["low"] is not None for n, _ in arms.values())
    rows = [(arm, n["mean"], *([_interval(n)] if seeds else []),
             "-" if diff is None else f"{-diff['mean']:+.4f} {_interval(diff, -1)}".strip())
            for arm, (n, diff) in arms.items()]
    rows.sort(key=lambda row: row[1])
    return (f"## Arms by {headline.label} (lower is better)\n\n"
            + report.markdown_table(["arm", headline.label, *(["95% interval"] if seeds else []),
                                     f"gain over {BASELINE}"], rows))


def _interval(n: dict, sign: int = 1) -> str:
    if n["low"] is None:
        return ""
    low, high = sorted((sign * n["low"], sign * n["high"]))
    return f"[{low:.4f}, {high:.4f}]"


def main(study: Study) -> dict:
    """An experiment script's `main`: `start()`, then `run_seeds` when `config.seeds` names
    seeds, else `run_experiment`; prints the headline table and the report's files. A
    `ConfigError` (a config value, or the workdir, that cannot work) exits with its one-line
    message."""
    config, workdir = start()
    try:
        if config.seeds:
            numbers = run_seeds(config, workdir, study)["numbers"]
        else:
            numbers = aggregate.aggregate([run_experiment(config, workdir, study)], BASELINE)
    except config_lib.ConfigError as e:  # Bad input: one line, no traceback.
        sys.exit(f"error: {e}")
    if study.headline and jax.process_index() == 0:
        print(headline_table(study.headline, numbers))
    written = sorted(f.name for f in files.path(workdir).iterdir()
                     if f.name.endswith((".md", ".png")))
    print("\n".join(os.path.join(workdir, f) for f in written))
    return numbers
