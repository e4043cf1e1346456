"""What every benchmark shares: JSON-lines output and a matmul peak measured in the same run."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsel import sharding


def emit(row: dict) -> dict:
    """Prints one measurement as a JSON line (flushed, so a long run shows progress)."""
    print(json.dumps(row), flush=True)
    return row


class MatmulPeak:
    """Jitted float32 `a @ b` of one shape on the mesh's devices (the rows of `a` split like a
    batch, as the train step splits tokens); `sample()` -> FLOP/s of `reps` back-to-back calls."""

    def __init__(self, m: int, k: int, n: int, reps: int, mesh):
        rng = np.random.default_rng(0)
        self.shape, self.reps = (m, k, n), reps
        self.a = jax.device_put(rng.standard_normal((m, k), np.float32),
                                sharding.batch_sharding(mesh))
        self.b = jax.device_put(rng.standard_normal((k, n), np.float32), sharding.replicated(mesh))
        self.fn = jax.jit(jnp.matmul)
        self.fn(self.a, self.b).block_until_ready()  # Compile and warm up.

    def sample(self) -> tuple[float, float]:
        """FLOP/s and CPU utilisation (process CPU seconds per wall second)."""
        start, cpu = time.perf_counter(), time.process_time()
        outs = [self.fn(self.a, self.b) for _ in range(self.reps)]
        jax.block_until_ready(outs)
        wall = time.perf_counter() - start
        return self.reps * 2 * float(np.prod(self.shape)) / wall, (time.process_time() - cpu) / wall
