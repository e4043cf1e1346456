"""The one atomic writer: every file a run or a build writes goes through `atomic_path`, so a
killed or failed write never leaves half a result where a reader would take it for whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator


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
