"""What every experiment script shares: the `--config` / `--workdir` flags, process start-up and
the run's life cycle in its workdir (`run_experiment`).

    python -m experiments.<name> --config=experiments/configs/<name>.py:tiny --workdir=DIR \
        --config.train.steps=200
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from jaxsel import report, sharding
from jaxsel.data import pool as pool_lib

CONFIG = config_flags.DEFINE_config_file("config", None, "path.py:arg", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes everything.", required=True)


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
                          str(pool_lib.cache_root(config.data) / "xla"))
    return config, WORKDIR.value


def run_experiment(config: ml_collections.ConfigDict, workdir: str,
                   validate: Callable[[ml_collections.ConfigDict, int], None],
                   run: Callable[[ml_collections.ConfigDict, str], dict],
                   to_markdown: Callable[[dict], str],
                   figures: dict[str, Callable[[dict, str], None]] | None = None) -> dict:
    """One experiment in `workdir`: `validate(config, num_devices)`, then claim the workdir for
    `config` (`report.open_workdir`); a finished run's report is returned as it is. Otherwise
    `run(config, workdir)` (which resumes from whatever it saved), then process 0 draws each
    figure (`figures[file name](result, path)`) and writes report.md and, last, report.json."""
    validate(config, jax.device_count())
    done = report.open_workdir(workdir, config)
    if done is not None:
        logging.info("already finished: %s/report.json", workdir)
        return done
    result = run(config, workdir)
    if jax.process_index() == 0:
        for name, plot in (figures or {}).items():
            plot(result, os.path.join(workdir, name))
        report.finish(workdir, result, to_markdown(result))
    return result


def main(validate, run, to_markdown, figures=None) -> dict:
    """An experiment script's `main`: `start()`, then `run_experiment` on the flags' config and
    workdir."""
    config, workdir = start()
    return run_experiment(config, workdir, validate, run, to_markdown, figures)
