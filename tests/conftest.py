"""One persistent XLA compilation cache for the whole test run, shared by the test process and
every experiment or worker it starts as a subprocess (they inherit the environment): the tests
compile the same small models again and again, and a repeat becomes a read."""

import os
import shutil
import tempfile

import fsspec
import jax
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

_OWN_CACHE = []


def pytest_configure(config):
    del config
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="jaxsel-test-xla-")
        _OWN_CACHE.append(path)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
    del config
    for path in _OWN_CACHE:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """`gs://` served by an in-memory file system (fsspec's memory file system, under the `gs`
    protocol that `etils.epath` reaches through fsspec), and a fresh local scratch folder:
    `gs://bucket/...` paths work as they do where gcsfs is installed. Yields the in-memory store
    (object name -> bytes) to inspect or damage."""
    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            return str(path).removeprefix("gs://").strip("/")

    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setenv("JAXSEL_SCRATCH", str(tmp_path / "scratch"))
    yield FakeGCS.store
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
