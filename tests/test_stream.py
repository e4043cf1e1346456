"""stream_rows against the in-memory row map: equal results for any chunk size; a run killed
with kill -9 resumes at the first missing chunk; a corrupt chunk or marker is recomputed; another
computation's folder is refused by name; a failed write leaves the done chunks intact; two
processes (own chunks, or a mesh over both) write what one process writes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxsel import embed, files, rowmap, stream
from tests.workers import rowmap_worker, stream_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FN = rowmap_worker.jitted(None)
N = rowmap_worker.NUM


@pytest.fixture(scope="module")
def data():
    return rowmap_worker.inputs()


@pytest.fixture(scope="module")
def expected(data):
    return rowmap.map_rows(FN, data, 4)


def _counting(data, reads: set):
    """A reader that adds the rows it reads to `reads`."""
    def read(idx):
        reads.update(np.asarray(idx).tolist())
        return {k: v[idx] for k, v in data.items()}
    return read


def _stream(folder, data, reads=None, chunk_rows=8, inputs=None, **kwargs):
    rows = data if reads is None else _counting(data, reads)
    return stream.stream_rows(FN, rows, folder, inputs or stream_worker.INPUTS,
                              chunk_rows=chunk_rows, batch_size=4,
                              num_rows=None if reads is None else N, **kwargs)


def _assert_equal(found, expected):
    assert sorted(found) == sorted(expected)
    for k in expected:
        assert isinstance(found[k], np.memmap)
        np.testing.assert_array_equal(found[k], expected[k], err_msg=k)


@pytest.mark.parametrize("chunk_rows", [4, 8, 12, 40])
def test_equals_the_in_memory_map_for_any_chunk_size(tmp_path, data, expected, chunk_rows):
    _assert_equal(_stream(tmp_path / "s", data, chunk_rows=chunk_rows), expected)
    manifest = json.loads((tmp_path / "s" / stream.MANIFEST).read_text())
    assert manifest["num_rows"] == N and manifest["results"]["z"]["shape"] == [2]
    assert len(os.listdir(tmp_path / "s" / stream.DONE)) == -(-N // chunk_rows)


def test_a_finished_folder_is_read_back_without_computing(tmp_path, data, expected):
    _stream(tmp_path / "s", data)
    reads = set()
    _assert_equal(_stream(tmp_path / "s", data, reads), expected)
    assert reads == set()


def test_a_run_killed_mid_way_resumes_at_the_first_missing_chunk(tmp_path, data, expected):
    folder = tmp_path / "s"
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.stream_worker", str(folder), "none", "0.3"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    done = folder / stream.DONE
    deadline = time.time() + 300
    while not (done.is_dir() and len(os.listdir(done)) >= 2) and time.time() < deadline:
        assert worker.poll() is None, "the worker ended before it was killed"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    finished = len([f for f in os.listdir(done) if f.endswith(".json")])
    assert 2 <= finished < -(-N // 8)
    reads = set()
    _assert_equal(_stream(folder, data, reads), expected)
    assert reads == set(range(8 * finished, N))  # Only the missing chunks were read again.


def test_a_corrupt_chunk_or_marker_is_recomputed_never_read(tmp_path, data, expected):
    folder = tmp_path / "s"
    _stream(folder, data)
    y = np.load(folder / "y.npy", mmap_mode="r+")
    y[9] += 1.0  # Chunk 1's bytes no longer match its marker.
    y.flush()
    del y
    (folder / stream.DONE / "00000003.json").write_text("{trunc")
    reads = set()
    _assert_equal(_stream(folder, data, reads), expected)
    assert reads == set(range(8, 16)) | set(range(24, 32))


def test_another_computations_folder_is_refused_by_name(tmp_path, data):
    folder = tmp_path / "s"
    _stream(folder, data)
    with pytest.raises(ValueError, match=r"refusing to reuse .*inputs\.what: "):
        _stream(folder, data, inputs={**stream_worker.INPUTS, "what": "another"})
    with pytest.raises(ValueError, match=r"chunk_rows: 8 here, 12 now"):
        _stream(folder, data, chunk_rows=12)
    with pytest.raises(ValueError, match="chunk_rows must be a positive multiple"):
        _stream(tmp_path / "t", data, chunk_rows=6)


def test_a_failed_write_names_the_chunk_and_keeps_the_done_ones(tmp_path, data, expected,
                                                                 monkeypatch):
    folder = tmp_path / "s"
    calls, fsync = [], os.fsync

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 5:  # Chunk 2's first array (two arrays a chunk).
            raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(stream.os, "fsync", full_disk)
    with pytest.raises(OSError, match=rf"writing chunk 2 \(rows 16-23\) into {folder} failed"):
        _stream(folder, data)
    monkeypatch.undo()
    assert sorted(os.listdir(folder / stream.DONE)) == ["00000000.json", "00000001.json"]
    reads = set()
    _assert_equal(_stream(folder, data, reads), expected)
    assert reads == set(range(16, N))


@pytest.mark.parametrize("mode", ["none", "mesh", "gs"])
def test_two_processes_write_what_one_writes(tmp_path, expected, mode, request):
    """Each process its own chunks ("none"), or all of them on a mesh over both ("mesh"), into a
    shared local folder; or ("gs") each into a `gs://` folder (the stand-in bucket) from its own
    local scratch, as hosts without a shared disk: every process ends with all the rows."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    folder, out = tmp_path / "s", tmp_path / "s"
    if mode == "gs":
        bucket = request.getfixturevalue("bucket")  # Sets the stand-in's environment.
        folder = "gs://bucket/s"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXSEL_DISTRIBUTED": "1",
           "JAXSEL_COORDINATOR": f"localhost:{port}", "JAXSEL_NUM_PROCESSES": "2",
           "STREAM_WORKER_OUT": str(out)}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.workers.stream_worker", str(folder),
         "mesh" if mode == "mesh" else "none"], cwd=ROOT,
        env={**env, "JAXSEL_PROCESS_ID": str(i),
             "JAXSEL_SCRATCH": str(tmp_path / f"host{i}")}) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    chosen = stream_worker.selections(expected["y"])  # One process, whole rows at a time.
    for i in range(2):
        found = np.load(f"{out}.{i}.npz")
        for k in expected:
            np.testing.assert_array_equal(found[k], expected[k], err_msg=k)
        for k in chosen:  # The same seed, any process count and chunk size: the same ids.
            np.testing.assert_array_equal(found[k], chosen[k], err_msg=k)
    done = (bucket / "bucket" / "s" if mode == "gs" else folder) / stream.DONE
    markers = [json.loads((done / f).read_text()) for f in sorted(os.listdir(done))]
    assert [m["rows"] for m in markers] == [[s, min(s + 8, N)] for s in range(0, N, 8)]


def test_targets_are_keyed_by_their_inputs_and_embeddings_stream(tmp_path):
    a = stream.Target(tmp_path, "ngram", {"pool": "p1", "buckets": 64})
    assert a.folder == stream.Target(tmp_path, "ngram", {"buckets": 64, "pool": "p1"}).folder
    assert a.folder != stream.Target(tmp_path, "ngram", {"pool": "p2", "buckets": 64}).folder
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (45, 16)).astype(np.int32)
    segments = np.ones_like(tokens)
    table = rng.normal(size=(50, 6)).astype(np.float32)
    computations = {
        "ngram_hash": lambda **kw: embed.ngram_hash(tokens, segments, 64, batch_size=8, **kw),
        "token_mean": lambda **kw: embed.token_mean(table, tokens, segments, batch_size=8, **kw)}
    for name, fn in computations.items():
        streamed = fn(progress=False, to=stream.Target(tmp_path, name, {"pool": "p1"}, 16))
        assert isinstance(streamed, np.memmap)
        np.testing.assert_array_equal(streamed, fn(progress=False))


def test_a_remote_folder_resumes_on_another_machine_and_never_reads_bad_chunks(
        tmp_path, data, expected, bucket, monkeypatch):
    """A `gs://` folder (a stand-in bucket, `tests.fake_gcs`): a run stopped after two chunks
    resumes from a fresh local scratch (another machine) computing only the rest; a finished
    folder is read back into a fresh scratch without computing; a chunk whose uploaded bytes are
    damaged, or that lacks its marker, is computed again."""
    folder = "gs://bucket/runs/s"
    calls = []

    def stop_after_two_chunks(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # As a kill: the third chunk never reaches the bucket.
        return real(*args, **kwargs)

    real = stream.rowmap.map_rows
    monkeypatch.setattr(stream.rowmap, "map_rows", stop_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        _stream(folder, data)
    monkeypatch.undo()
    assert sorted(os.listdir(bucket / "bucket" / "runs" / "s" / stream.DONE)) == [
        f"0000000{c}.json" for c in (0, 1)]

    def on_another_machine(name):
        monkeypatch.setenv("JAXSEL_SCRATCH", str(tmp_path / name))

    on_another_machine("second")
    reads = set()
    _assert_equal(_stream(folder, data, reads), expected)
    assert reads == set(range(16, N))
    on_another_machine("third")
    reads = set()
    _assert_equal(_stream(folder, data, reads), expected)
    assert reads == set()
    chunk = files.path(f"{folder}/chunks/00000001/y.bin")
    chunk.write_bytes(bytes([chunk.read_bytes()[0] ^ 1]) + chunk.read_bytes()[1:])
    files.path(f"{folder}/done/00000003.json").unlink()
    on_another_machine("fourth")
    reads = set()
    _assert_equal(_stream(folder, data, reads), expected)
    assert reads == set(range(8, 16)) | set(range(24, 32))


def test_chunks_another_process_wrote_where_this_one_cannot_see_are_an_error(tmp_path, data,
                                                                                monkeypatch):
    """As a second host with its own disk: the odd chunks belong to another process, which
    wrote them where this one cannot see; the stream stops naming them, never returning rows
    that were not written."""
    monkeypatch.setattr(stream, "_owner", lambda chunk: chunk % 2 == 0)
    with pytest.raises(RuntimeError, match=r"chunks \[1, 3\] of .* not visible here"):
        _stream(tmp_path / "s", data)
