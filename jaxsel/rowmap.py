"""One batched map over rows: pad, split per process, place on the mesh, run, gather, unpad.

`map_rows(fn, rows, batch_size, mesh)` is the one loop that feeds many rows through a jitted
function: per-sequence losses and cloze / multiple-choice scores (`evaluate`), probes
(`probe.Prober`), embeddings (`embed`) and the influence model's predictions
(`influence_model.predict`) all run on it.

- **Rows** are a pytree of arrays with a leading `[N]` axis (numpy, or memory-mapped: only the
  rows of one batch are read at a time), or a callable `read(idx_B)` that returns such a pytree
  for the rows `idx_B`, given with `num_rows=N` (e.g. `lambda idx: pool.rows(ids[idx])`).
- **Batches** hold `batch_size` rows, a positive multiple of `batch_multiple(mesh)`: the mesh's
  batch-parallel size `data` x `fsdp` and the process count (`check_batch_size`). The last batch
  is padded by repeating its last row, a valid input whatever `fn` is, and the results of the
  padding are dropped. `fn` must compute each row's result from that row alone; then results do
  not depend on the batch size, the mesh or the number of processes.
- **Processes**: every process passes the same rows and gets every result. On a mesh, process
  `p` of `P` reads only its contiguous slice of each batch (rows `p*B/P ... (p+1)*B/P`, as
  `sharding.global_batch` expects) and the batch is split over `data` x `fsdp`; without a mesh,
  each process runs every batch on its default device.
- **Variable-length rows**: with `lengths_N`, rows are visited shortest first and each batch's
  per-row arrays of rank >= 2 are cut along axis 1 (their length axis) to the batch's longest
  length rounded up to `length_multiple` (`cut_to_length`), so short rows cost little and at
  most `L / length_multiple` shapes compile.
- **`fn(batch) -> results`** is the caller's, jitted once by it: only the caller knows the
  shardings of what it closes over (parameters in their FSDP layouts, a train state), and its
  jitted function serves every call, compiled once per batch shape. `batch` has the pytree
  structure of the rows with a leading `[B]`; `results` is a pytree of `[B, ...]` arrays that
  every process can read whole: replicated on a mesh (`out_shardings=sharding.replicated(mesh)`).

`_batches` yields results batch by batch, one batch computed ahead so that reading rows overlaps
with the device, and `map_rows` writes them into arrays aligned with the rows (`_allocate`).
Streaming the results of a 10M-row pool into a memory-mapped file is the same loop with the
output allocated on disk and the batches done recorded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jaxsel import files, sharding

# A pytree of [N, ...] arrays, or a callable read(idx_B) -> a pytree of [B, ...] arrays.
Rows = Any


def batch_multiple(mesh: Mesh | None) -> int:
    """What a batch's row count must be a multiple of: on a mesh, its batch-parallel size
    (`data` x `fsdp`) and the process count; without one, 1."""
    if mesh is None:
        return 1
    return math.lcm(sharding.batch_parallel_size(mesh), jax.process_count())


def check_batch_size(batch_size: int, mesh: Mesh | None, name: str = "batch_size") -> None:
    """A ValueError naming `name` unless `batch_size` is a positive multiple of
    `batch_multiple(mesh)`."""
    if batch_size >= 1 and batch_size % batch_multiple(mesh) == 0:
        return
    of = ("1 (no mesh)" if mesh is None else
          f"the {jax.process_count()} processes and of the mesh's batch-parallel size "
          f"mesh.data*mesh.fsdp={sharding.batch_parallel_size(mesh)}")
    raise ValueError(f"{name} must be a positive multiple of {of}, got {batch_size}")


def cut_to_length(batch, lengths_B: np.ndarray, multiple: int):
    """`batch` (a pytree of [B, ...] arrays) with each array of rank >= 2 cut along axis 1 to the
    longest of `lengths_B` rounded up to `multiple`: what lies beyond is padding."""
    width = -(-int(np.max(lengths_B)) // multiple) * multiple
    return jax.tree.map(lambda x: x[:, :width] if np.ndim(x) >= 2 else x, batch)


def place(batch, mesh: Mesh | None):
    """Rows that every process holds whole (a pytree of [B, ...] numpy arrays, B a multiple of
    `batch_multiple(mesh)`) as device arrays, as `map_rows` hands them to `fn`: split over
    `data` x `fsdp` on a mesh, each process giving its own slice; else on the default device."""
    num = len(jax.tree.leaves(batch)[0])
    return _put(jax.tree.map(lambda x: x[_local_rows(num, mesh)], batch), mesh)


def map_rows(fn: Callable, rows: Rows, batch_size: int, mesh: Mesh | None = None, *,
             num_rows: int | None = None, lengths_N: np.ndarray | None = None,
             length_multiple: int = 1, progress: bool = False, desc: str = "rows"):
    """`fn` over `rows` in batches of `batch_size` (see the module docstring) -> its results as
    a pytree of numpy arrays `[N, ...]`, row i the result of row i. `progress` shows a bar
    (`desc`) on process 0."""
    read, num = reader(rows, num_rows)
    check_batch_size(batch_size, mesh)
    if lengths_N is not None:
        lengths_N = np.asarray(lengths_N)
        if lengths_N.shape != (num,):
            raise ValueError(f"lengths_N must be [N={num}] lengths, got shape {lengths_N.shape}")
        if length_multiple < 1:
            raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
    out = None
    for idx, results_B in _batches(fn, read, num, batch_size, mesh, lengths_N, length_multiple,
                                   progress, desc):
        out = _allocate(results_B, num) if out is None else out
        for out_N, result_B in zip(jax.tree.leaves(out), jax.tree.leaves(results_B), strict=True):
            out_N[idx] = result_B
    return out


def reader(rows: Rows, num_rows: int | None) -> tuple[Callable, int]:
    """(read(idx) -> the rows idx as numpy, N), after checking `rows` has N >= 1 rows."""
    if callable(rows):
        if num_rows is None:
            raise ValueError("num_rows: needed with a callable `rows` (how many rows it reads)")
        num = int(num_rows)
        read = rows
    else:
        if num_rows is not None:
            raise ValueError("num_rows: only with a callable `rows`; arrays have their own")
        shapes = [np.shape(x) for x in jax.tree.leaves(rows)]
        if not shapes or any(not s or s[0] != shapes[0][0] for s in shapes):
            raise ValueError(f"rows: expected arrays with one leading [N] axis, got shapes "
                             f"{shapes}")
        num = shapes[0][0]

        def read(idx):
            return jax.tree.map(lambda x: files.read_rows(x, idx), rows)

    if num < 1:
        raise ValueError(f"rows: {num} rows; nothing to map")
    return read, num


def _batches(fn, read, num: int, batch_size: int, mesh: Mesh | None, lengths_N, multiple: int,
             progress: bool, desc: str) -> Iterator[tuple[np.ndarray, Any]]:
    """(rows idx_b, fn's results for them as numpy) of each batch, in visiting order; batch
    b + 1 is dispatched before the results of batch b are fetched."""
    order = np.arange(num) if lengths_N is None else np.argsort(lengths_N, kind="stable")
    mine = _local_rows(batch_size, mesh)
    pending = None
    with tqdm(total=num, desc=desc, unit="row",
              disable=not progress or jax.process_index() != 0) as bar:
        for start in range(0, num, batch_size):
            idx = order[start:start + batch_size]
            padded = np.pad(idx, (0, batch_size - idx.size), mode="edge")
            batch = read(padded[mine])
            if lengths_N is not None:
                batch = cut_to_length(batch, lengths_N[idx], multiple)
            running = idx, fn(_put(batch, mesh))
            if pending is not None:
                bar.update(pending[0].size)
                yield _fetch(*pending, batch_size)
            pending = running
        bar.update(pending[0].size)
        yield _fetch(*pending, batch_size)


def _local_rows(num: int, mesh: Mesh | None) -> slice:
    """This process's contiguous slice of a batch of `num` rows: all of it without a mesh."""
    if mesh is None:
        return slice(None)
    local = num // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def _put(local_batch, mesh: Mesh | None):
    """This process's rows as device arrays: a global batch on `mesh`, else on the default
    device."""
    if mesh is None:
        return jax.device_put(local_batch)
    return sharding.global_batch(local_batch, mesh)


def _fetch(idx: np.ndarray, results_B, batch_size: int):
    """(idx, the results of the real rows `idx` as numpy arrays)."""
    for result in jax.tree.leaves(results_B):
        if np.shape(result)[:1] != (batch_size,):
            raise ValueError(f"fn must return arrays with a leading axis of the batch's "
                             f"{batch_size} rows, got shape {np.shape(result)}")
        if isinstance(result, jax.Array) and not (result.is_fully_addressable
                                                  or result.is_fully_replicated):
            raise ValueError("fn must return results that every process can read whole: "
                             "replicate them (out_shardings=sharding.replicated(mesh))")
    return idx, jax.tree.map(lambda r: np.asarray(r)[:idx.size], jax.device_get(results_B))


def _allocate(results_B, num: int):
    """Arrays `[num, ...]` for results like `results_B` (`[B, ...]`)."""
    return jax.tree.map(lambda r: np.empty((num, *r.shape[1:]), r.dtype), results_B)
