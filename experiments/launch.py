"""What every experiment script shares: the `--config` / `--workdir` flags and process start-up.

    python -m experiments.<name> --config=experiments/configs/<name>.py:tiny --workdir=DIR \
        --config.train.steps=200
"""

from __future__ import annotations

import jax
import ml_collections
from absl import flags
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
