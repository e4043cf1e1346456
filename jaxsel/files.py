"""Files of runs and caches, local or remote: the one atomic writer, the local mirrors of remote
folders, and the one reader of memory-mapped rows.

- `atomic_path`: every file a run or a build writes goes through it, so a killed or failed write
  never leaves half a result where a reader would take it for whole.
- Paths are strings; a remote one (`gs://...`, any path with a scheme) is read and written through
  `etils.epath` (as orbax and TFDS do; `gs://` where gcsfs is installed), and so is any path a
  workdir or a cache may be (`path(p)`). A remote file is written whole: `atomic_path` hands out
  a local temporary path and uploads it when the block ends (a cloud object appears whole or
  not at all). Memory maps need local files: `scratch(folder)` is the local folder that stands
  for a remote one (under `$JAXSEL_SCRATCH`, default `<temp dir>/jaxsel-scratch`), `mirror`
  fills it from a complete remote folder, and `upload` sends a local file or folder up.
- `read_rows`: rows of memory-mapped arrays read with plain file reads, so resident memory stays
  flat.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import numpy as np
from etils import epath

COMPLETE = "COMPLETE"  # Written last into a remote folder that `atomic_path` built.


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names a remote file system (`gs://`, `s3://`, ...)."""
    return "://" in os.fspath(path)


def path(p: str | os.PathLike) -> epath.Path:
    """`p` (`~` expanded) as an `epath.Path`: the same calls for a local and a remote path."""
    p = os.fspath(p)
    return epath.Path(p if is_remote(p) else os.path.expanduser(p))


def scratch(folder: str | os.PathLike) -> str:
    """The local folder that stands for `folder`: `folder` itself when local; for a remote one,
    `$JAXSEL_SCRATCH/<hash of the remote path>/<its name>`."""
    folder = os.fspath(folder).rstrip("/")
    if not is_remote(folder):
        return os.path.expanduser(folder)
    root = os.environ.get("JAXSEL_SCRATCH") or os.path.join(tempfile.gettempdir(),
                                                               "jaxsel-scratch")
    digest = hashlib.sha256(folder.encode()).hexdigest()[:16]
    return os.path.join(root, digest, os.path.basename(folder))


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` was built whole by `atomic_path`: a local folder exists only once
    renamed into place, a remote one holds `COMPLETE`, which its upload writes last."""
    if is_remote(folder):
        return (path(folder) / COMPLETE).exists()
    return os.path.isdir(os.path.expanduser(os.fspath(folder)))


def mirror(folder: str | os.PathLike) -> str:
    """A local folder with the files of the complete folder `folder` (see `is_complete`):
    `folder` itself when local; for a remote one its `scratch`, downloaded once (atomically)."""
    local = scratch(folder)
    if not is_remote(folder) or os.path.isdir(local):
        return local
    try:
        with atomic_path(local) as tmp:
            for relative, remote_file in _remote_files(os.fspath(folder)):
                os.makedirs(os.path.dirname(os.path.join(tmp, relative)), exist_ok=True)
                remote_file.copy(os.path.join(tmp, relative))
    except OSError:
        if not os.path.isdir(local):  # Not a concurrent download of the same folder.
            raise
    return local


def _remote_files(folder: str) -> Iterator[tuple[str, epath.Path]]:
    """(path relative to `folder`, remote path) of every file under the remote `folder`."""
    scheme = folder[:folder.index("://") + 3]
    base = folder.removeprefix(scheme).rstrip("/")
    for top, _, names in path(folder).walk():
        top = str(top).removeprefix(scheme).rstrip("/")
        for name in names:
            yield (os.path.normpath(os.path.join(os.path.relpath(top, base), name)),
                   epath.Path(f"{scheme}{top}/{name}"))


def upload(local: str | os.PathLike, remote: str | os.PathLike) -> None:
    """The local file, or every file of the local folder, copied to `remote` (overwriting)."""
    local, remote = os.fspath(local), path(remote)
    if not os.path.isdir(local):
        remote.parent.mkdir(parents=True, exist_ok=True)
        epath.Path(local).copy(remote, overwrite=True)
        return
    for top, _, names in os.walk(local):
        for name in sorted(names):
            upload(os.path.join(top, name), remote / os.path.relpath(top, local) / name)


def append_text(file: str | os.PathLike, text: str) -> None:
    """`text` appended to `file`: in place on a local file system; a remote object is written
    again whole (object stores do not append)."""
    if not is_remote(file):
        with open(os.path.expanduser(os.fspath(file)), "a") as f:
            f.write(text)
        return
    previous = path(file).read_text() if path(file).exists() else ""
    with atomic_path(file) as tmp, open(tmp, "w") as f:
        f.write(previous + text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` (same folder, same suffix, so writers that pick a format
    by suffix still do) to write a file or build a folder at; renamed to `path` when the block
    ends without error, removed otherwise. The parent folder is created. A folder is renamed
    only if `path` does not exist yet (an `OSError` otherwise, for the caller to handle).

    A remote `path`: the temporary path is local (under `$JAXSEL_SCRATCH`) and is uploaded to
    `path` when the block ends without error; a folder is refused (`FileExistsError`) if `path`
    is already complete, gets `COMPLETE` last, and then stays as `path`'s `scratch` (what
    `mirror` would download)."""
    path = os.fspath(path)
    if is_remote(path):
        with _remote_atomic_path(path) as tmp:
            yield tmp
        return
    path = os.path.expanduser(path)
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


@contextlib.contextmanager
def _remote_atomic_path(remote: str) -> Iterator[str]:
    root = os.path.dirname(os.path.dirname(scratch(remote)))
    os.makedirs(root, exist_ok=True)
    local_dir = tempfile.mkdtemp(prefix="upload.", dir=root)
    tmp = os.path.join(local_dir, os.path.basename(remote))
    try:
        yield tmp
        if not os.path.isdir(tmp):
            upload(tmp, remote)
            return
        if is_complete(remote):
            raise FileExistsError(f"{remote} is already complete")
        upload(tmp, remote)
        (path(remote) / COMPLETE).write_text("")
        with contextlib.suppress(OSError):  # Kept as the folder's mirror, unless one exists.
            os.makedirs(os.path.dirname(scratch(remote)), exist_ok=True)
            os.rename(tmp, scratch(remote))
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


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
