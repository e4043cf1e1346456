"""The input pipeline: pool row ids -> seeded shuffle per epoch -> repeat -> global batch -> this
process's slice -> rows, with grain.

Batching happens on ids, to the GLOBAL batch, before sharding: process p of P takes rows
`[p*b, (p+1)*b)` of every global batch (b = global_batch // P). So the global batch, and the whole
training order, is the same whatever the process count, and only this process's rows are read
(one fancy-indexed read of the memory-mapped pool per batch). The iterator's state is
`{"next_index": int}`: JSON-serialisable, and `set_state` resumes exactly.

The grain dataset's elements are whole batches: batch k holds positions [k*B, (k+1)*B) of the
endless sequence epoch 0 order, epoch 1 order, ..., each epoch a seeded permutation of the ids.
Shuffling and batching per element in grain costs ~170 us of Python per row (measured), which
would cap the pipeline near what a tiny model consumes; per batch it is one numpy gather.
"""

from __future__ import annotations

import functools
import sys
import time

import grain
import numpy as np

from jaxsel.data.pool import Pool

# Reading threads and batches kept ready: threads overlap the memmap reads (page faults on a cold
# pool) with the consumer.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def make_batches(pool: Pool, ids, global_batch: int, seed: int, process_index: int,
                 process_count: int, num_epochs: int | None = None) -> grain.IterDataset:
    """Batches of this process: dicts of `tokens`, `segments` [b, L] int32 and `ids` [b] int64.

    Each epoch visits `ids` in a new seeded order; batches run across epoch boundaries;
    `num_epochs=None` repeats forever, otherwise a last partial global batch is dropped (every
    batch has the same shape on every process).
    """
    ids_N = _checked_ids(pool, ids)
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    if global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} is not divisible by "
                         f"process_count={process_count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if num_epochs is not None and (num_epochs < 1 or len(ids_N) * num_epochs < global_batch):
        raise ValueError(f"num_epochs={num_epochs}: {len(ids_N)} ids x num_epochs give no full "
                         f"global batch of {global_batch}")
    num_batches = sys.maxsize if num_epochs is None else len(ids_N) * num_epochs // global_batch
    global_ids = _GlobalBatchIds(ids_N, seed, global_batch)
    b = global_batch // process_count
    start = process_index * b

    def read(batch_index: int) -> dict[str, np.ndarray]:
        ids_b = global_ids(batch_index)[start:start + b]
        return {**pool.rows(ids_b), "ids": ids_b}

    return grain.MapDataset.range(num_batches).map(read).to_iter_dataset(READ_OPTIONS)


class _GlobalBatchIds:
    """Batch index -> the ids of that global batch, computed with numpy (random access, so any
    batch can be produced first: that is what makes `set_state` exact and cheap)."""

    def __init__(self, ids_N: np.ndarray, seed: int, global_batch: int):
        self.ids_N, self.seed, self.global_batch = ids_N, seed, global_batch
        # A batch spans one or two epochs (unless it is larger than an epoch); reading threads
        # may run a batch ahead.
        self.epoch_order = functools.lru_cache(maxsize=3)(self._epoch_order)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The ids in epoch `epoch`'s order: a permutation seeded by (seed, epoch)."""
        return self.ids_N[np.random.default_rng([self.seed, epoch]).permutation(len(self.ids_N))]

    def __call__(self, batch_index: int) -> np.ndarray:
        n = len(self.ids_N)
        positions = np.arange(batch_index * self.global_batch,
                              (batch_index + 1) * self.global_batch, dtype=np.int64)
        epochs = positions // n
        out = np.empty(self.global_batch, np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self.epoch_order(int(epoch))[positions[here] % n]
        return out


def pipeline_tokens_per_s(pool: Pool, ids, global_batch: int, seed: int,
                          num_batches: int) -> float:
    """Tokens per second one process reads through `make_batches` (after one warm-up batch)."""
    iterator = iter(make_batches(pool, ids, global_batch, seed, 0, 1))
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return num_batches * global_batch * pool.seq_len / (time.perf_counter() - start)


def _checked_ids(pool: Pool, ids) -> np.ndarray:
    ids_N = np.asarray(ids)
    if ids_N.ndim != 1 or ids_N.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D list of pool row ids, got shape "
                         f"{ids_N.shape}")
    if not np.issubdtype(ids_N.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids_N.dtype}")
    if ids_N.min() < 0 or ids_N.max() >= len(pool):
        raise ValueError(f"ids out of range: [{ids_N.min()}, {ids_N.max()}] for a pool of "
                         f"{len(pool)} rows")
    return ids_N.astype(np.int64)
