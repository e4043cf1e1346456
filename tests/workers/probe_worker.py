"""Probes a tiny run on seeded rows and saves the results (process 0).

Used by tests that compare meshes: every mesh builds the same train state (a few seeded train
steps), candidates and reference, and saves exact and first-order influences and gradient
features. Usage: python -m tests.workers.probe_worker OUT.npz [mesh.data mesh.fsdp]
"""

import sys

import jax
import numpy as np

from jaxsel import config as config_lib
from jaxsel import probe, sharding, train

SEQ, VOCAB, BATCH, CHUNK = 32, 512, 8, 8
PROJECTION = probe.GradProjection(k=64, seed=3, kind="gaussian", block_size=1000)


def tiny_config(data: int = -1, fsdp: int = 1):
    c = config_lib.base_config("tiny")
    c.model.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, vocab_size=VOCAB)
    c.data.seq_len, c.train.batch_size, c.train.steps = SEQ, BATCH, 50
    c.optim.warmup_steps = 2
    c.mesh.data, c.mesh.fsdp = data, fsdp
    return c


def random_rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n packed rows: 1-3 documents, the last row of them ending in padding (segment 0)."""
    tokens = rng.integers(2, VOCAB, (n, SEQ)).astype(np.int32)
    segments = np.zeros((n, SEQ), np.int32)
    for row in range(n):
        used = SEQ if row % 3 else int(rng.integers(SEQ // 2, SEQ))
        cuts = np.sort(rng.choice(np.arange(2, used - 1), size=row % 3, replace=False))
        for doc, (a, b) in enumerate(zip([0, *cuts], [*cuts, used], strict=True)):
            segments[row, a:b] = doc + 1
    return {"tokens": tokens, "segments": segments}


def trained_state(trainer, steps: int, rows_of_step):
    """A state after `steps` train steps on `rows_of_step(step)` (global rows, this process
    feeding its contiguous slice): real moments and a step count past warm-up."""
    state = trainer.new_state(trainer.init_params(trainer.config.seed))
    local = trainer.config.train.batch_size // jax.process_count()
    mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    for step in range(steps):
        rows = {k: v[mine] for k, v in rows_of_step(step).items()}
        state, _ = trainer.train_step(state, sharding.global_batch(rows, trainer.mesh))
    return state


def setup(config):
    """(trainer, state, candidates, reference) of the comparison: 10 candidates (two chunks, the
    last one padded) and a 5-row reference where a random half of the positions count."""
    rng = np.random.default_rng(0)
    trainer = train.Trainer(config)
    state = trained_state(trainer, 3, lambda step: random_rows(rng, BATCH))
    candidates = random_rows(rng, 10)
    rows = random_rows(rng, 5)
    reference = probe.Reference(rows["tokens"], rows["segments"],
                                rng.integers(0, 2, (5, SEQ)).astype(np.float32))
    return trainer, state, candidates, reference


def results(trainer, state, candidates, reference) -> dict[str, np.ndarray]:
    prober = probe.Prober(trainer, chunk_size=CHUNK, reference_batch_size=2)
    return {
        "oracle": prober.oracle_influence(state, candidates, reference, progress=False),
        "first_order": prober.first_order_influence(state, candidates, reference,
                                                    progress=False),
        "features": prober.grad_features(state.params, candidates, PROJECTION, progress=False),
    }


def main():
    out = sys.argv[1]
    mesh = [int(x) for x in sys.argv[2:4]] if len(sys.argv) > 2 else [-1, 1]
    found = results(*setup(tiny_config(*mesh)))
    if jax.process_index() == 0:
        np.savez(out, **found)


if __name__ == "__main__":
    main()
