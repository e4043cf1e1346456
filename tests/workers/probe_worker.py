"""Probes a saved train state, candidates and reference on a mesh and saves the results.

Used by tests that compare meshes: the state is built once (on one device) and loaded here with
the trainer's shardings (params sharded over fsdp), so only the probes differ between meshes.
Usage: python -m tests.workers.probe_worker IN.npz OUT.npz mesh.data mesh.fsdp
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxsel import config as config_lib
from jaxsel import probe, references, train
from jaxsel.data import pool as pool_lib

SEQ, VOCAB, BATCH = 32, 512, 8
PROJECTION = probe.GradProjection(k=512, seed=3, kind="gaussian", block_size=1000)


def tiny_config(data: int = -1, fsdp: int = 1):
    c = config_lib.base_config("tiny")
    c.model.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, vocab_size=VOCAB)
    c.data.seq_len, c.train.batch_size, c.train.steps = SEQ, BATCH, 100
    c.optim.warmup_steps = 5
    c.mesh.data, c.mesh.fsdp = data, fsdp
    return c


def trained_state(folder, steps: int):
    """The synthetic corpus' pools (built into `folder`) and a tiny model trained `steps` steps
    on seeded train-pool batches: `(config, pools, trainer, state, rng)`, the rng ready for the
    caller's own draws."""
    config = tiny_config()
    config.data.update(source="synthetic", synthetic_docs_per_domain=40, heldout_fraction=0.2,
                       cache_dir=str(folder))
    pools = pool_lib.build_pools(config)
    trainer = train.Trainer(config)
    state = trainer.new_state(trainer.init_params(config.seed))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = pools["train"].rows(rng.choice(len(pools["train"]), BATCH))
        state, _ = trainer.train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    return config, pools, trainer, state, rng


def save_inputs(path, state, candidates, reference) -> None:
    leaves = {f"state_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    np.savez(path, **leaves, **{f"candidates_{k}": v for k, v in candidates.items()},
             **{f"reference_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(reference))})


def load_inputs(path, trainer):
    """(state with the trainer's shardings, candidates, reference) saved by `save_inputs`."""
    data = np.load(path)
    structure = jax.tree.structure(trainer.abstract_state)
    state = jax.tree.unflatten(structure, [data[f"state_{i}"]
                                           for i in range(structure.num_leaves)])
    state = jax.device_put(state, trainer.state_shardings)
    candidates = {k: data[f"candidates_{k}"] for k in ("tokens", "segments")}
    reference = references.Reference(*(data[f"reference_{i}"]
                                  for i in range(len(dataclasses.fields(references.Reference)))))
    return state, candidates, reference


def make_prober(trainer, chunk_size: int, eval_batch_size: int | None = None) -> probe.Prober:
    return probe.Prober(trainer, chunk_size=chunk_size, reference_batch_size=2,
                        eval_batch_size=eval_batch_size)


def results(prober, state, candidates, reference) -> dict[str, np.ndarray]:
    """Exact influences and gradient features: what the mesh comparison checks."""
    return {
        "oracle": prober.oracle_influence(state, candidates, reference, progress=False),
        "features": prober.grad_features(state.params, candidates, PROJECTION, progress=False),
    }


def main():
    inputs, out, data, fsdp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    trainer = train.Trainer(tiny_config(data, fsdp))
    # One chunk of 16, all candidates evaluated at once (the one-device run uses two chunks of
    # 8, scanned two at a time): results do not depend on these knobs.
    found = results(make_prober(trainer, chunk_size=16), *load_inputs(inputs, trainer))
    if jax.process_index() == 0:
        np.savez(out, **found)


if __name__ == "__main__":
    main()
