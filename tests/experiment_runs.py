"""What the end-to-end experiment tests share: a tiny LM for the synthetic corpus' 32-token rows,
and running an experiment's command line on its `tiny` config."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The zero-shot suite's windows follow data.seq_len; 8 items per held-out domain.
SMALL = {
    "data.source": "synthetic", "data.seq_len": 32, "model.vocab_size": 512,
    "model.d_model": 32, "model.num_heads": 2, "model.mlp_dim": 64, "train.batch_size": 8,
    "downstream.num_items": 8,
}


def config(config_module, overrides: dict):
    """The `tiny` config of an experiment's config module with `overrides` (dotted keys)."""
    c = config_module.get_config("tiny")
    c.update_from_flattened_dict(overrides)
    return c


def run(name: str, workdir, overrides: dict, timeout: int = 900) -> None:
    """`python -m experiments.<name>` on its `tiny` config with `overrides`, into `workdir`."""
    subprocess.run(
        [sys.executable, "-m", f"experiments.{name}",
         f"--config=experiments/configs/{name}.py:tiny", f"--workdir={workdir}",
         *(f"--config.{k}={v}" for k, v in overrides.items())],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True, timeout=timeout)
