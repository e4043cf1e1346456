"""A stand-in for Cloud Storage in tests: `gs://bucket/...` served from a local folder through
fsspec (the file system layer `etils.epath` reaches `gs://` through, as gcsfs does), with gcsfs'
conventions (paths without the scheme, folders implicit). Being a folder, it is shared by the
processes of a multi-process test, each with its own local scratch, as hosts share a bucket."""

import os

import fsspec
from etils import epath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

ROOT_ENV = "JAXSEL_TEST_BUCKET_ROOT"


class DirectoryBucket(DirFileSystem):
    """`gs://<bucket>/<path>` -> `$JAXSEL_TEST_BUCKET_ROOT/<bucket>/<path>`."""

    protocol = ("gs", "gcs")
    cachable = False  # A new root per test: no instance kept by fsspec across tests.

    def __init__(self, *args, **kwargs):
        del args, kwargs  # gcsfs' options (epath passes finalize_on_close).
        super().__init__(path=os.environ[ROOT_ENV], fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("gs://").strip("/")


def install(root: str | os.PathLike) -> None:
    """Serves `gs://` from `root` in this process (and, through the environment, in the
    processes it starts that call `install_from_environment`)."""
    os.environ[ROOT_ENV] = os.fspath(root)
    for name in DirectoryBucket.protocol:
        fsspec.register_implementation(name, DirectoryBucket, clobber=True)
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def install_from_environment() -> None:
    if os.environ.get(ROOT_ENV):
        install(os.environ[ROOT_ENV])
