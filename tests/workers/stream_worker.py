"""Streams seeded rows through `stream.stream_rows` into a folder, with or without a mesh.

`tests/test_stream.py` runs this as 2 processes on localhost (each writing its own chunks, or all
computing every chunk on a mesh over both), and as one slow process it kills mid-run (kill -9).
Each process then selects from the streamed `y` (`selections`), reading it in chunks of 7 rows,
and saves both into `$STREAM_WORKER_OUT.<process>.npz` (default: beside FOLDER). A `gs://` FOLDER
is served by the test's stand-in bucket (`tests.fake_gcs`).
Usage: python -m tests.workers.stream_worker FOLDER (none|mesh) [SECONDS_PER_BATCH]
"""

import os
import sys
import time

import jax
import ml_collections
import numpy as np

from jaxsel import select, sharding, similarity, stream
from tests import fake_gcs
from tests.workers import rowmap_worker

CHUNK, BATCH = 8, 4
INPUTS = {"what": "rowmap_worker.row_fn", "rows": rowmap_worker.NUM}


def slow_reader(data, seconds: float):
    def read(idx):
        time.sleep(seconds)
        return {k: v[idx] for k, v in data.items()}
    return read


def main():
    sharding.maybe_initialize_distributed()
    fake_gcs.install_from_environment()
    folder, mode = sys.argv[1], sys.argv[2]
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    mesh = None
    if mode == "mesh":
        mesh = sharding.make_mesh(ml_collections.ConfigDict(
            {"mesh": {"data": -1, "fsdp": 1, "tensor": 1}}))
    data = rowmap_worker.inputs()
    found = stream.stream_rows(rowmap_worker.jitted(mesh), slow_reader(data, seconds), folder,
                               INPUTS, chunk_rows=CHUNK, batch_size=BATCH, mesh=mesh,
                               num_rows=rowmap_worker.NUM)
    out = os.environ.get("STREAM_WORKER_OUT", folder)
    np.savez(f"{out}.{jax.process_index()}.npz", **{k: np.asarray(v) for k, v in found.items()},
             **selections(found["y"], chunk_rows=7))


def selections(scores_N, chunk_rows: int = select.CHUNK_ROWS) -> dict[str, np.ndarray]:
    """Top-k, Gumbel-top-k and nearest-to-target ids from (memory-mapped) scores, seeded, read
    `chunk_rows` rows at a time."""
    emb_NxD = np.stack([scores_N, np.cos(scores_N)], axis=1)
    return {"top_k": select.top_k(scores_N, 9, chunk_rows=chunk_rows).ids,
            "gumbel_top_k": select.gumbel_top_k(scores_N, 9, seed=5, temperature=0.5,
                                                chunk_rows=chunk_rows).ids,
            "nearest": similarity.nearest_to_target(emb_NxD, emb_NxD[:2], 9,
                                                    chunk_rows=chunk_rows).ids}


if __name__ == "__main__":
    main()
