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


# Peak dense matmul FLOP/s of one device, by device kind and compute dtype, from the vendors'
# datasheets (no sparsity). float32 on NVIDIA GPUs is TF32, which XLA uses for float32 matmuls
# at default precision; TPUs have no float32 entry. Matched in order: the first substring of
# `device.device_kind` that fits.
PEAK_FLOPS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("TPU v4", {"bfloat16": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12}),
    ("TPU v5", {"bfloat16": 459e12}),  # v5p reports itself as "TPU v5".
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """One device's peak dense FLOP/s for `dtype`; None for a kind or dtype not in the table."""
    for name, peaks in PEAK_FLOPS:
        if name in device_kind:
            return peaks.get(dtype)
    return None


class MatmulPeak:
    """Jitted `a @ b` of one shape and dtype on the mesh's devices (the rows of `a` split like a
    batch, as the train step splits tokens); `sample()` -> FLOP/s of `reps` back-to-back calls."""

    def __init__(self, m: int, k: int, n: int, reps: int, mesh, dtype: str = "float32"):
        rng = np.random.default_rng(0)
        self.shape, self.reps = (m, k, n), reps
        self.a = jax.device_put(rng.standard_normal((m, k), np.float32).astype(dtype),
                                sharding.batch_sharding(mesh))
        self.b = jax.device_put(rng.standard_normal((k, n), np.float32).astype(dtype),
                                sharding.replicated(mesh))
        self.fn = jax.jit(jnp.matmul)
        self.fn(self.a, self.b).block_until_ready()  # Compile and warm up.

    def sample(self) -> tuple[float, float]:
        """FLOP/s and CPU utilisation (process CPU seconds per wall second)."""
        start, cpu = time.perf_counter(), time.process_time()
        outs = [self.fn(self.a, self.b) for _ in range(self.reps)]
        jax.block_until_ready(outs)
        wall = time.perf_counter() - start
        return self.reps * 2 * float(np.prod(self.shape)) / wall, (time.process_time() - cpu) / wall
