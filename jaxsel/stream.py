"""Per-row computations over a pool, streamed to disk: chunked, resumable, split across processes.

Every per-row function of jaxsel (embeddings, per-sequence losses, probes, the influence model's
predictions) maps its rows with `map_rows(fn, rows, batch_size, mesh, to=...)`: without `to`,
`rowmap.map_rows` in memory; with a `Target`, `stream_rows` into the target's folder,
`<root>/<name>-<key>`, the key a hash of the target's `inputs` (what is computed from what), so
a result is found again by what it was computed from, as pools are.

`stream_rows(fn, rows, folder, inputs, ...)` runs `rowmap.map_rows` over the rows one chunk of
`chunk_rows` at a time and writes each chunk's results into arrays on disk in `folder`:

- `manifest.json`: what is computed from what (`inputs`, the caller's identity of the
  computation: pool, model, function, settings), `num_rows`, `chunk_rows` and each result's
  dtype and row shape. A folder whose manifest differs is never reused: the run stops and names
  the keys that differ.
- `<name>.npy`: one `[N, ...]` array per result (`name` its pytree path, `result` for a single
  array), written in place chunk by chunk and read back memory-mapped.
- `done/<chunk>.json`: written (atomically) once the chunk's rows are on disk, with the CRC-32 of
  each result's bytes. A chunk without it, or whose bytes no longer match it (a run killed
  mid-write, a corrupted file), is computed again, never read.

Memory stays bounded by a chunk. A killed run (even kill -9) resumes at the first missing chunk
and ends with the arrays an uninterrupted run writes. A write that fails (e.g. the disk is full)
stops with a message naming the file and chunk; the chunks already done stay intact.

Processes: chunk c belongs to process c % P. Without a mesh, each process computes and writes
its own chunks alone (data parallel, every process holding the parameters). On a mesh every
computation spans all processes, so all of them compute every missing chunk together and its
owner writes it. Either way the arrays equal one process's. A local `folder` must be visible
to every process (one machine, or a shared file system); the result is returned to every process.

A remote `folder` (`gs://`, through `etils.epath`): it holds the manifest, the markers and each
chunk's bytes (`chunks/<chunk>/<name>.bin`, uploaded before the chunk's marker); the arrays are
memory-mapped in a local folder of each process (`files.scratch`), which takes every chunk it
lacks from the remote folder (checked against its marker's CRCs). So a run resumes on another
machine, and processes on hosts without a shared disk end with the same arrays.

Progress (rows/s and an ETA) is shown on process 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from jaxsel import files, rowmap

MANIFEST = "manifest.json"
DONE = "done"
CHUNKS = "chunks"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a streamed computation goes: `folder` = `root/<name>-<key>`, the key a hash of
    `inputs` (JSON: the pool, the model, the function and its settings); chunks of about
    `chunk_rows` rows (rounded down to a multiple of the batch size)."""

    root: str
    name: str
    inputs: dict
    chunk_rows: int = 65_536

    @property
    def folder(self) -> str:
        digest = hashlib.sha256(json.dumps(self.inputs, sort_keys=True).encode()).hexdigest()
        return os.path.join(os.fspath(self.root), f"{self.name}-{digest[:16]}")


def ids_key(ids) -> str:
    """A short hash of row ids, for a target's inputs."""
    return hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()[:16]


def map_rows(fn: Callable, rows: rowmap.Rows, batch_size: int, mesh: Mesh | None = None, *,
             to: Target | None = None, **kwargs):
    """`rowmap.map_rows(fn, rows, batch_size, mesh, **kwargs)` in memory, or with `to`,
    `stream_rows` into `to.folder` (memory-mapped results)."""
    if to is None:
        return rowmap.map_rows(fn, rows, batch_size, mesh, **kwargs)
    chunk_rows = max(1, to.chunk_rows // batch_size) * batch_size
    return stream_rows(fn, rows, to.folder, to.inputs, chunk_rows=chunk_rows,
                       batch_size=batch_size, mesh=mesh, **kwargs)


def stream_rows(fn: Callable, rows: rowmap.Rows, folder: str | os.PathLike, inputs: dict, *,
                chunk_rows: int, batch_size: int, mesh: Mesh | None = None,
                num_rows: int | None = None, lengths_N: np.ndarray | None = None,
                length_multiple: int = 1, progress: bool = False, desc: str = "rows"):
    """`fn` over `rows` (as `rowmap.map_rows` takes them, with `lengths_N` applied within each
    chunk) -> its results as a pytree of read-only memory-mapped arrays `[N, ...]` in `folder`
    (see the module docstring). `inputs` (JSON) identifies what is computed; `chunk_rows` must
    be a multiple of `batch_size`."""
    read, num = rowmap.reader(rows, num_rows)
    if lengths_N is not None:
        lengths_N = np.asarray(lengths_N)
    if not isinstance(inputs, dict):
        raise ValueError(f"inputs must be a dict (JSON) naming what is computed, got {inputs!r}")
    if chunk_rows < 1 or chunk_rows % batch_size:
        raise ValueError(f"chunk_rows must be a positive multiple of batch_size={batch_size}, "
                         f"got {chunk_rows}")
    folder = os.fspath(folder)
    num_chunks = -(-num // chunk_rows)
    chunk_ids = (lambda c: np.arange(c * chunk_rows, min((c + 1) * chunk_rows, num)))

    def compute(c: int):
        ids = chunk_ids(c)
        return rowmap.map_rows(fn, lambda idx: read(ids[idx]), batch_size, mesh,
                               num_rows=ids.size, length_multiple=length_multiple,
                               lengths_N=None if lengths_N is None else lengths_N[ids])

    manifest = {"inputs": inputs, "num_rows": num, "chunk_rows": chunk_rows}
    existing = _read_manifest(folder)
    if existing is not None:
        _check_same(existing, manifest, folder)
        layout = existing["results"]
        first = None
    else:
        first = compute(0) if _owner(0) or mesh is not None else None
        layout = _layout(first) if first is not None else None
        if jax.process_index() == 0:
            _create(folder, {**manifest, "results": layout}, num)
        _sync("stream manifest " + folder)
        layout = _read_manifest(folder)["results"]
    local = _local_folder(folder, {**manifest, "results": layout}, num)
    arrays = {name: np.load(_array_path(local, name), mmap_mode="r") for name in layout}
    is_done = (lambda c: _is_done(local, c, arrays, chunk_ids(c))
               or _fetch(folder, local, c, arrays, chunk_ids(c)))
    done = [c for c in range(num_chunks) if is_done(c)]
    missing = [c for c in range(num_chunks) if c not in set(done)]
    _sync("stream done " + folder)  # Every process has read the same markers.
    with tqdm(total=num, initial=sum(chunk_ids(c).size for c in done), desc=desc, unit="row",
              disable=not progress or jax.process_index() != 0, smoothing=0.1) as bar:
        for c in missing:
            if mesh is None and not _owner(c):
                continue
            results = first if (c == 0 and first is not None) else compute(c)
            if _owner(c):
                _write(folder, local, c, arrays, _flat(results), chunk_ids(c))
            bar.update(chunk_ids(c).size)
    _sync("stream finished " + folder)
    lacking = [c for c in missing if not is_done(c)]  # Other hosts' chunks of a remote folder.
    if lacking:
        raise RuntimeError(f"chunks {lacking[:5]} of {folder} were written by other processes but "
                           "are not visible here: a local folder must be one that every process "
                           "shares (a shared file system), else use a gs:// folder")
    return _unflatten({name: np.load(_array_path(local, name), mmap_mode="r")
                       for name in layout})


# ------------------------------------------------------------------------------------------------
# The folder.


def _owner(chunk: int) -> bool:
    return chunk % jax.process_count() == jax.process_index()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _array_path(folder: str, name: str) -> str:
    return os.path.join(folder, f"{name}.npy")


def _done_path(folder: str, chunk: int) -> str:
    return os.path.join(folder, DONE, f"{chunk:08d}.json")


def _chunk_path(folder: str, chunk: int, name: str) -> str:
    return os.path.join(folder, CHUNKS, f"{chunk:08d}", f"{name}.bin")


def _read_manifest(folder: str) -> dict | None:
    path = files.path(os.path.join(folder, MANIFEST))
    return json.loads(path.read_text()) if path.exists() else None


def _check_same(existing: dict, manifest: dict, folder: str) -> None:
    """A ValueError naming every key of `manifest` whose value differs in `existing`."""
    differ = [f"{key}: {existing.get(key)!r} here, {value!r} now" for key, value in
              _flat_json(manifest).items() if _flat_json(existing).get(key) != value]
    if differ:
        raise ValueError(f"{folder} holds another computation's results; refusing to reuse "
                         f"them. Differing: {'; '.join(differ)}. Use another folder, or delete "
                         f"this one to recompute.")


def _flat_json(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if key == "results" and not prefix:
            continue
        if isinstance(value, dict):
            out.update(_flat_json(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return out


def _layout(results) -> dict:
    return {name: {"dtype": np.dtype(a.dtype).str, "shape": list(a.shape[1:])}
            for name, a in _flat(results).items()}


def _create(folder: str, manifest: dict, num: int) -> None:
    """The arrays (sparse, unwritten; a local folder only) and then the manifest, atomically."""
    if not files.is_remote(folder):
        _create_arrays(folder, manifest, num)
    with files.atomic_path(os.path.join(folder, MANIFEST)) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)


def _local_folder(folder: str, manifest: dict, num: int) -> str:
    """Where the arrays are memory-mapped: a local `folder` itself; for a remote one, this
    process's scratch folder, (re)created empty unless it holds the same manifest."""
    if not files.is_remote(folder):
        return folder
    local = f"{files.scratch(folder)}-process{jax.process_index()}"
    if _read_manifest(local) != json.loads(json.dumps(manifest)):
        shutil.rmtree(local, ignore_errors=True)
        _create_arrays(local, manifest, num)
        with files.atomic_path(os.path.join(local, MANIFEST)) as tmp, open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
    return local


def _create_arrays(folder: str, manifest: dict, num: int) -> None:
    os.makedirs(os.path.join(folder, DONE), exist_ok=True)
    for name, spec in manifest["results"].items():
        with files.atomic_path(_array_path(folder, name)) as tmp:
            np.lib.format.open_memmap(tmp, "w+", np.dtype(spec["dtype"]),
                                      (num, *spec["shape"])).flush()


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def _is_done(folder: str, chunk: int, arrays: dict, ids: np.ndarray) -> bool:
    """Whether the chunk's marker exists and every result's bytes still match it."""
    path = _done_path(folder, chunk)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            crcs = json.load(f)["crc32"]
    except (OSError, ValueError, KeyError):
        return False
    rows = slice(ids[0], ids[-1] + 1)
    return all(crcs.get(name) == _crc(files.read_rows(a, rows)) for name, a in arrays.items())


def _write(folder: str, local: str, chunk: int, arrays: dict, results: dict,
           ids: np.ndarray) -> None:
    """The chunk's rows into each array file, then its marker (`_store`); for a remote
    `folder`, its bytes and then its marker there too."""
    data = {name: np.ascontiguousarray(results[name], a.dtype).tobytes()
            for name, a in arrays.items()}
    marker = _store(local, chunk, arrays, data, ids)
    if not files.is_remote(folder):
        return
    try:
        for name, chunk_bytes in data.items():
            path = files.path(_chunk_path(folder, chunk, name))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(chunk_bytes)
        with files.atomic_path(_done_path(folder, chunk)) as tmp, open(tmp, "w") as f:
            json.dump(marker, f)
    except OSError as e:
        raise OSError(f"uploading chunk {chunk} (rows {ids[0]}-{ids[-1]}) to {folder} failed: "
                      f"{e}. The chunks already there are intact; run again to resume.") from e


def _fetch(folder: str, local: str, chunk: int, arrays: dict, ids: np.ndarray) -> bool:
    """A remote `folder`'s chunk into the local arrays, if its marker is there and its bytes
    match the marker's CRCs; whether it was."""
    if not files.is_remote(folder) or not files.path(_done_path(folder, chunk)).exists():
        return False
    try:
        crcs = json.loads(files.path(_done_path(folder, chunk)).read_text())["crc32"]
        data = {name: files.path(_chunk_path(folder, chunk, name)).read_bytes()
                for name in arrays}
    except (OSError, ValueError, KeyError):
        return False
    if any(zlib.crc32(data[name]) != crcs.get(name) for name in arrays):
        return False
    _store(local, chunk, arrays, data, ids)
    return True


def _store(folder: str, chunk: int, arrays: dict, data: dict[str, bytes],
           ids: np.ndarray) -> dict:
    """Each result's bytes of the chunk into its array file in the local `folder` (plain writes,
    flushed and synced: a full disk is an OSError, where a write through the memory map would
    be a crash), then the chunk's marker; returns the marker."""
    try:
        for name, a in arrays.items():
            with open(_array_path(folder, name), "r+b") as f:
                f.seek(a.offset + int(ids[0]) * a[0].nbytes)
                f.write(data[name])
                f.flush()
                os.fsync(f.fileno())
        marker = {"rows": [int(ids[0]), int(ids[-1]) + 1],
                  "crc32": {name: zlib.crc32(chunk_bytes) for name, chunk_bytes in data.items()}}
        with files.atomic_path(_done_path(folder, chunk)) as tmp, open(tmp, "w") as f:
            json.dump(marker, f)
    except OSError as e:
        raise OSError(f"writing chunk {chunk} (rows {ids[0]}-{ids[-1]}) into {folder} failed: "
                      f"{e}. The chunks already done are intact; free space and run again to "
                      f"resume.") from e
    return marker


# ------------------------------------------------------------------------------------------------
# Results as named arrays.


def _flat(results) -> dict[str, Any]:
    if not isinstance(results, dict):
        return {"result": results}
    return {str(k): v for k, v in results.items()}


def _unflatten(arrays: dict[str, Any]):
    return arrays["result"] if list(arrays) == ["result"] else arrays
