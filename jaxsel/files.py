"""The one atomic writer: every file a run or a build writes goes through `atomic_path`, so a
killed or failed write never leaves half a result where a reader would take it for whole; and
`read_rows`, the one reader of rows of memory-mapped arrays that keeps resident memory flat."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import uuid
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` (same folder, same suffix, so writers that pick a format
    by suffix still do) to write a file or build a folder at; renamed to `path` when the block
    ends without error, removed otherwise. The parent folder is created. A folder is renamed
    only if `path` does not exist yet (an `OSError` otherwise, for the caller to handle)."""
    path = os.fspath(path)
    root, suffix = os.path.splitext(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{root}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}"  # Unique across hosts.
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def read_rows(array, idx) -> np.ndarray:
    """`array[idx]` (`idx` an int array or a slice) as a new array. Rows of a memory-mapped `.npy`
    are read with plain file reads (one `pread` per run of consecutive rows), so the pages read
    never stay mapped in this process: its resident memory stays flat however much of a large
    pool or result a pass walks through. Anything else (an array, a view of a memory map) is
    indexed as usual."""
    if not (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)
            and array.flags.c_contiguous and array.ndim >= 1):
        return np.asarray(array[idx])
    rows_R = np.arange(len(array))[idx] if isinstance(idx, slice) else np.asarray(idx)
    if rows_R.ndim != 1 or not np.issubdtype(rows_R.dtype, np.integer):
        return np.asarray(array[idx])
    rows_R = np.where(rows_R < 0, rows_R + len(array), rows_R)
    if rows_R.size and (rows_R.min() < 0 or rows_R.max() >= len(array)):
        raise IndexError(f"rows {rows_R.min()}..{rows_R.max()} out of range for {len(array)} rows")
    out = np.empty((rows_R.size, *array.shape[1:]), array.dtype)
    if not rows_R.size:
        return out
    row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    order_R = np.argsort(rows_R, kind="stable")
    sorted_R = rows_R[order_R]
    runs = np.split(np.arange(sorted_R.size), np.flatnonzero(np.diff(sorted_R) != 1) + 1)
    with open(array.filename, "rb") as f:
        for run in runs:
            first, count = int(sorted_R[run[0]]), run.size
            data = os.pread(f.fileno(), count * row_bytes, array.offset + first * row_bytes)
            out[order_R[run]] = np.frombuffer(data, array.dtype).reshape(count, *array.shape[1:])
    return out
