"""Maps seeded rows through `rowmap.map_rows` on a mesh and saves the results and the rows read.

`tests/test_rowmap.py` runs this on 8 CPU devices (one process) and as 2 processes on localhost,
and compares with a plain loop over the rows; every process saves `OUT.<process index>.npz`.
Usage: python -m tests.workers.rowmap_worker OUT mesh.data mesh.fsdp
"""

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxsel import rowmap, sharding

NUM, WIDTH, MULTIPLE = 37, 12, 4


def inputs() -> dict[str, np.ndarray]:
    """`x` [N, L] float32 with garbage beyond each row's `lengths` (1 ... L), `k` [N] int32."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, WIDTH + 1, NUM).astype(np.int32)
    x = rng.standard_normal((NUM, WIDTH)).astype(np.float32)
    x[np.arange(WIDTH)[None, :] >= lengths[:, None]] = 1e6
    return {"x": x, "k": rng.integers(-3, 4, NUM).astype(np.int32), "lengths": lengths}


def row_fn(batch):
    """Per row: `y` = sum of tanh(x) * (k + 1) over its first `lengths` entries, `z` = (the first
    entry * k, the batch's width)."""
    x_BxW = batch["x"]
    mask_BxW = jnp.arange(x_BxW.shape[1])[None, :] < batch["lengths"][:, None]
    y_B = jnp.sum(jnp.where(mask_BxW, jnp.tanh(x_BxW), 0.0), axis=1) * (batch["k"] + 1)
    width_B = jnp.full(x_BxW.shape[:1], x_BxW.shape[1], jnp.float32)
    return {"y": y_B, "z": jnp.stack([x_BxW[:, 0] * batch["k"], width_B], axis=1)}


def jitted(mesh):
    """`row_fn` jitted with rows split over the batch axes and results replicated."""
    if mesh is None:
        return jax.jit(row_fn)
    return jax.jit(row_fn, in_shardings=sharding.batch_sharding(mesh),
                   out_shardings=sharding.replicated(mesh))


def recording_reader(data: dict[str, np.ndarray], reads: list):
    """Reads rows of `data` by index, appending each request's indices to `reads`."""
    def read(idx):
        reads.append(np.array(idx))
        return {k: v[idx] for k, v in data.items()}
    return read


def main():
    sharding.maybe_initialize_distributed()
    out, data_axis, fsdp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = ml_collections.ConfigDict({"mesh": {"data": data_axis, "fsdp": fsdp, "tensor": 1}})
    mesh = sharding.make_mesh(config)
    data, fn = inputs(), jitted(mesh)
    saved, reads = {}, []
    for batch_size in (8, 16):
        found = rowmap.map_rows(fn, data, batch_size, mesh)
        saved.update({f"{k}_{batch_size}": v for k, v in found.items()})
    found = rowmap.map_rows(fn, recording_reader(data, reads), 16, mesh, num_rows=NUM,
                            lengths_N=data["lengths"], length_multiple=MULTIPLE)
    saved.update({f"{k}_lengths": v for k, v in found.items()})
    try:  # A batch that cannot be split over the mesh is refused before any work.
        rowmap.map_rows(fn, data, 12, mesh)
        saved["refused"] = ""
    except ValueError as error:
        saved["refused"] = str(error)
    placed = jax.jit(lambda b: b, out_shardings=sharding.replicated(mesh))(
        rowmap.place({"x": data["x"][:16]}, mesh))
    saved["placed"] = np.asarray(placed["x"])
    np.savez(f"{out}.{jax.process_index()}.npz", reads=np.stack(reads), **saved)


if __name__ == "__main__":
    main()
