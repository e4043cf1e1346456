"""rowmap.map_rows against a plain numpy loop over the rows one at a time: batch sizes with and
without padding, a reader called with one batch at a time, variable-length rows visited shortest
first and cut; 8 devices and 2 processes against the loop; bad input named."""

import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from jaxsel import rowmap, sharding
from tests.workers import rowmap_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loop(data, widths=None):
    """`worker.row_fn` written out in numpy, one row at a time; row i seen at width
    `widths[i]` (default: the full width)."""
    y, z = [], []
    for i in range(len(data["x"])):
        x_L, k = data["x"][i].astype(np.float64), int(data["k"][i])
        y.append(np.tanh(x_L[:data["lengths"][i]]).sum() * (k + 1))
        z.append([x_L[0] * k, worker.WIDTH if widths is None else widths[i]])
    return {"y": np.array(y), "z": np.array(z)}


def shortest_first(lengths, batch_size):
    """(the rows in visiting order, each row's width: its batch's longest length rounded up to
    `worker.MULTIPLE`)."""
    order = np.argsort(lengths, kind="stable")
    widths = np.empty(len(lengths), np.int64)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        widths[rows] = -(-lengths[rows].max() // worker.MULTIPLE) * worker.MULTIPLE
    return order, widths


def assert_close(found, expected):
    assert sorted(found) == sorted(expected)
    for key in expected:
        assert found[key].shape == expected[key].shape, key
        np.testing.assert_allclose(found[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def data():
    return worker.inputs()


@pytest.fixture(scope="module")
def one_device_mesh():
    config = ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 1, "tensor": 1}})
    return sharding.make_mesh(config, jax.devices()[:1])


@pytest.mark.parametrize("batch_size", [1, 4, 5, 37, 64])
def test_equals_loop_for_any_batch_size(data, batch_size):
    found = rowmap.map_rows(worker.jitted(None), data, batch_size)
    assert found["y"].dtype == np.float32 and found["z"].shape == (worker.NUM, 2)
    assert_close(found, loop(data))


def test_equals_loop_on_a_one_device_mesh(data, one_device_mesh):
    found = rowmap.map_rows(worker.jitted(one_device_mesh), data, 8, one_device_mesh)
    assert_close(found, loop(data))


def test_reader_gets_one_padded_batch_at_a_time(data):
    reads = []
    found = rowmap.map_rows(worker.jitted(None), worker.recording_reader(data, reads), 10,
                            num_rows=worker.NUM)
    assert_close(found, loop(data))
    # Batches of exactly 10 rows in order; the last is padded by repeating row 36.
    assert [len(r) for r in reads] == [10] * 4
    np.testing.assert_array_equal(np.concatenate(reads), [*range(37), 36, 36, 36])


def test_variable_length_rows_are_visited_shortest_first_and_cut(data):
    reads = []
    found = rowmap.map_rows(worker.jitted(None), worker.recording_reader(data, reads), 8,
                            num_rows=worker.NUM, lengths_N=data["lengths"],
                            length_multiple=worker.MULTIPLE)
    order, widths = shortest_first(data["lengths"], 8)
    assert_close(found, loop(data, widths))
    assert len(set(widths)) > 1 and widths.min() < worker.WIDTH  # Cut, to several widths.
    np.testing.assert_array_equal(np.concatenate(reads), np.pad(order, (0, 3), mode="edge"))
    # Arrays instead of a reader: the same.
    again = rowmap.map_rows(worker.jitted(None), data, 8, lengths_N=data["lengths"],
                            length_multiple=worker.MULTIPLE)
    assert_close(again, loop(data, widths))


def test_a_single_array_in_and_out():
    x_NxD = np.arange(21, dtype=np.float32).reshape(7, 3)
    found = rowmap.map_rows(jax.jit(lambda x: x * 2), x_NxD, 4)
    np.testing.assert_array_equal(found, x_NxD * 2)


def _run_worker(prefix, data_axis, fsdp, processes, devices):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
    args = [sys.executable, "-m", "tests.workers.rowmap_worker", str(prefix), str(data_axis),
            str(fsdp)]
    if processes == 1:
        return [subprocess.Popen(args, cwd=ROOT, env=env)]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen(args, cwd=ROOT, env={
        **env, "JAXSEL_DISTRIBUTED": "1", "JAXSEL_COORDINATOR": f"localhost:{port}",
        "JAXSEL_NUM_PROCESSES": str(processes), "JAXSEL_PROCESS_ID": str(i)})
        for i in range(processes)]


@pytest.fixture(scope="module", autouse=True)
def workers(tmp_path_factory):
    """8 devices in one process and 2 processes of 4 devices, both a data=2 x fsdp=4 mesh (run
    at once, while this process runs the other tests)."""
    tmp = tmp_path_factory.mktemp("rowmap")
    runs = {"eight": _run_worker(tmp / "eight", 2, 4, processes=1, devices=8),
            "two": _run_worker(tmp / "two", 2, 4, processes=2, devices=4)}
    try:
        yield tmp, runs
    finally:
        for proc in sum(runs.values(), []):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("name, processes", [("eight", 1), ("two", 2)])
def test_mesh_and_processes_equal_loop(workers, data, name, processes):
    tmp, runs = workers
    assert [p.wait(timeout=600) for p in runs[name]] == [0] * processes
    order, widths = shortest_first(data["lengths"], 16)
    padded = np.pad(order, (0, 11), mode="edge").reshape(3, 16)
    local = 16 // processes
    for index in range(processes):
        saved = np.load(tmp / f"{name}.{index}.npz")
        for suffix in ("8", "16"):  # Every process gets every result.
            assert_close({k: saved[f"{k}_{suffix}"] for k in ("y", "z")}, loop(data))
        assert_close({k: saved[f"{k}_lengths"] for k in ("y", "z")}, loop(data, widths))
        # Process p read only its contiguous slice of each batch.
        np.testing.assert_array_equal(saved["reads"],
                                      padded[:, index * local:(index + 1) * local])
        assert str(saved["refused"]).startswith(
            f"batch_size must be a positive multiple of the {processes} processes and of the "
            "mesh's batch-parallel size mesh.data*mesh.fsdp=8, got 12")
        np.testing.assert_array_equal(saved["placed"], data["x"][:16])


def test_bad_input_is_named(data, one_device_mesh, monkeypatch):
    fn = worker.jitted(None)
    for batch_size in (0, -4):
        with pytest.raises(ValueError, match=r"batch_size must be a positive multiple of 1 "
                                             rf"\(no mesh\), got {batch_size}"):
            rowmap.map_rows(fn, data, batch_size)
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple"):
        rowmap.check_batch_size(0, None, "chunk_size")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of the 2 "
                                         "processes .* got 3"):
        rowmap.map_rows(fn, data, 3, one_device_mesh)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="rows: expected arrays with one leading"):
        rowmap.map_rows(fn, {**data, "k": data["k"][:-1]}, 4)
    with pytest.raises(ValueError, match="rows: 0 rows"):
        rowmap.map_rows(fn, {k: v[:0] for k, v in data.items()}, 4)
    with pytest.raises(ValueError, match="num_rows: needed"):
        rowmap.map_rows(fn, worker.recording_reader(data, []), 4)
    with pytest.raises(ValueError, match="num_rows: only with a callable"):
        rowmap.map_rows(fn, data, 4, num_rows=worker.NUM)
    with pytest.raises(ValueError, match=r"lengths_N must be \[N=37\] lengths"):
        rowmap.map_rows(fn, data, 4, lengths_N=data["lengths"][:-1])
    with pytest.raises(ValueError, match="length_multiple must be >= 1"):
        rowmap.map_rows(fn, data, 4, lengths_N=data["lengths"], length_multiple=0)
    with pytest.raises(ValueError, match="leading axis of the batch's 4 rows"):
        rowmap.map_rows(jax.jit(lambda b: b["x"].sum(0)), data, 4)
