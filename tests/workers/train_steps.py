"""Runs a few train steps on seeded batches and saves losses and params (process 0).

Used by tests that compare meshes and process counts. Every process builds the same global batch
and feeds its own contiguous slice, as the grain pipeline does.
Usage: python -m tests.workers.train_steps OUT.npz [mesh.data mesh.fsdp]
"""

import sys

import jax
import numpy as np

from jaxsel import config as config_lib
from jaxsel import sharding, train

STEPS, BATCH, SEQ = 4, 8, 32


def tiny_config(data: int = -1, fsdp: int = 1):
    c = config_lib.base_config("tiny")
    c.model.update(d_model=64, num_layers=2, num_heads=4, mlp_dim=128, vocab_size=256)
    c.data.seq_len, c.train.batch_size, c.train.steps = SEQ, BATCH, STEPS
    c.optim.warmup_steps = 1
    c.mesh.data, c.mesh.fsdp = data, fsdp
    return c


def batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        tokens = rng.integers(0, 256, (BATCH, SEQ)).astype(np.int32)
        segments = np.repeat(np.arange(1, 5), SEQ // 4)[None].repeat(BATCH, 0).astype(np.int32)
        yield {"tokens": tokens, "segments": segments}


def run(config):
    trainer = train.Trainer(config)
    state = trainer.new_state(trainer.init_params(config.seed))
    local = BATCH // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    losses = []
    for batch in batches():
        batch = sharding.global_batch({k: v[rows] for k, v in batch.items()}, trainer.mesh)
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(
        jax.jit(lambda y: y, out_shardings=sharding.replicated(trainer.mesh))(x))), state.params)
    return np.asarray(losses), params


def main():
    sharding.maybe_initialize_distributed()
    out = sys.argv[1]
    mesh = [int(x) for x in sys.argv[2:4]] if len(sys.argv) > 2 else [-1, 1]
    losses, params = run(tiny_config(*mesh))
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): v
                for p, v in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out, losses=losses, **flat)


if __name__ == "__main__":
    main()
