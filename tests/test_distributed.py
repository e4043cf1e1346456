"""Scale without changing results: 8 CPU devices (data=2, fsdp=4) and 2 processes on localhost
(jax.distributed over gloo) give the losses and params of one device."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_worker(out, *args, env=None, processes=1):
    base = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    if processes == 1:
        subprocess.run([sys.executable, "-m", "tests.workers.train_steps", str(out), *args],
                       cwd=ROOT, env=base, check=True, timeout=600)
        return
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.workers.train_steps", str(out), *args], cwd=ROOT,
        env={**base, "JAXSEL_DISTRIBUTED": "1", "JAXSEL_COORDINATOR": f"localhost:{port}",
             "JAXSEL_NUM_PROCESSES": str(processes), "JAXSEL_PROCESS_ID": str(i)})
        for i in range(processes)]
    assert [p.wait(timeout=600) for p in procs] == [0] * processes


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run.npz"
    _run_worker(out)
    return np.load(out)


def _assert_same(result, reference):
    np.testing.assert_allclose(result["losses"], reference["losses"], atol=1e-5)
    assert sorted(result.files) == sorted(reference.files)
    for key in reference.files:
        np.testing.assert_allclose(result[key], reference[key], atol=1e-5, err_msg=key)


def test_eight_devices_data2_fsdp4_match_one_device(one_device, tmp_path):
    out = tmp_path / "eight.npz"
    _run_worker(out, "2", "4", env={"JAX_NUM_CPU_DEVICES": "8"})
    _assert_same(np.load(out), one_device)


def test_two_processes_match_one_process(one_device, tmp_path):
    out = tmp_path / "two.npz"
    _run_worker(out, processes=2)
    _assert_same(np.load(out), one_device)
