"""What the end-to-end experiment tests share: a tiny LM for the synthetic corpus' 32-token rows,
running an experiment's command line on its `tiny` config, running one in process while
recording which pool rows a phase of it reads, and a cloze loss computed by hand."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.special

from jaxsel import launch
from jaxsel.data import pool as pool_lib

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


def run_recording_reads(module, config, workdir, phase_method: str):
    """`launch.run_experiment` of experiment `module`'s `STUDY` in process, recording every
    `Pool.rows` and `Pool.view` call made while `module.Experiment.<phase_method>` runs: returns
    (result, reads), each read `(split, phase, ids)` with the phase the method's arguments."""
    reads, phase = [], []
    method = getattr(module.Experiment, phase_method)

    def recording(read):
        def recorded(pool, ids):
            if phase:
                reads.append((pool.path.name, phase[-1], np.asarray(ids).copy()))
            return read(pool, ids)
        return recorded

    def recording_method(experiment, *args):
        phase.append(args[0] if len(args) == 1 else args)
        try:
            return method(experiment, *args)
        finally:
            phase.pop()

    with pytest.MonkeyPatch.context() as patch:
        for name in ("rows", "view"):
            patch.setattr(pool_lib.Pool, name, recording(getattr(pool_lib.Pool, name)))
        patch.setattr(module.Experiment, phase_method, recording_method)
        result = launch.run_experiment(config, str(workdir), module.STUDY)
    return result, reads


def cloze_loss(model, params, items) -> float:
    """The weighted mean next-token loss of cloze items from full logits, by hand."""
    total = weight = 0.0
    for r in range(len(items.tokens_RxL)):
        tokens = np.asarray(items.tokens_RxL[r:r + 1])
        logits = model.apply(params, tokens, np.asarray(items.segments_RxL[r:r + 1]))
        logp = scipy.special.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
        for t, w in zip(items.positions_RxK[r], items.weights_RxK[r], strict=True):
            total -= w * logp[t, tokens[0, t + 1]]
            weight += w
    return total / weight
