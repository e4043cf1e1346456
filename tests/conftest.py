"""One persistent XLA compilation cache for the whole test run, shared by the test process and
every experiment or worker it starts as a subprocess (they inherit the environment): the tests
compile the same small models again and again, and a repeat becomes a read."""

import os
import shutil
import tempfile

import jax
import pytest
from etils import epath

from tests import fake_gcs

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
    """`gs://` served from a local folder (`tests.fake_gcs`) and a fresh local scratch folder:
    `gs://bucket/...` paths work as they do where gcsfs is installed. Yields the folder that
    holds the buckets (`gs://bucket/x` is `<it>/bucket/x`), to inspect or damage."""
    root = tmp_path / "buckets"
    root.mkdir()
    monkeypatch.setenv(fake_gcs.ROOT_ENV, str(root))
    monkeypatch.setenv("JAXSEL_SCRATCH", str(tmp_path / "scratch"))
    fake_gcs.install(root)
    yield root
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
