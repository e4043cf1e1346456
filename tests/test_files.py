"""files.atomic_path: a write lands whole or not at all."""

import os

import numpy as np
import pytest

from jaxsel import files


def test_a_finished_write_lands_and_a_failed_one_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "result.json"
    with files.atomic_path(path) as tmp:
        assert tmp.endswith(".json") and os.path.dirname(tmp) == str(path.parent)
        with open(tmp, "w") as f:
            f.write("old")
    assert path.read_text() == "old"
    with pytest.raises(RuntimeError), files.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert os.listdir(path.parent) == ["result.json"]  # No temporary file is left behind.


def test_a_folder_is_renamed_into_place_only_if_none_is_there(tmp_path):
    folder = tmp_path / "pool"
    with files.atomic_path(folder) as tmp:
        os.mkdir(tmp)
        (tmp_path / tmp / "a.npy").write_bytes(b"x")
    assert (folder / "a.npy").read_bytes() == b"x"
    with pytest.raises(OSError), files.atomic_path(folder) as tmp:
        os.mkdir(tmp)
        (tmp_path / tmp / "b.npy").write_bytes(b"y")
    assert sorted(os.listdir(folder)) == ["a.npy"] and os.listdir(tmp_path) == ["pool"]


def test_read_rows_equals_indexing_and_keeps_the_memory_map_unmapped(tmp_path):
    """`read_rows` of a memory-mapped .npy gives what indexing gives (runs, repeats, any order,
    negative ids, slices) without touching the mapping's pages; views and arrays are indexed."""
    data = np.arange(50 * 3, dtype=np.int32).reshape(50, 3)
    np.save(tmp_path / "a.npy", data)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    for idx in (np.array([7, 8, 9, 2, 2, 49, 0, -1]), slice(10, 20), slice(None, None, 7),
                np.array([], np.int64)):
        np.testing.assert_array_equal(files.read_rows(mapped, idx), data[idx])
        np.testing.assert_array_equal(files.read_rows(mapped[:, 1:], idx), data[:, 1:][idx])
        np.testing.assert_array_equal(files.read_rows(data, idx), data[idx])
    with pytest.raises(IndexError, match="out of range"):
        files.read_rows(mapped, np.array([50]))
    big = np.lib.format.open_memmap(tmp_path / "big.npy", "w+", np.float32, (4096, 1024))
    big[:] = 1.0
    big.flush()
    del big
    big = np.load(tmp_path / "big.npy", mmap_mode="r")
    files.read_rows(big, slice(None))  # 16 MB read; the mapping's pages are never touched.
    with open("/proc/self/smaps") as f:
        smaps = f.read()
    entry = smaps[smaps.index(str(tmp_path / "big.npy")):].split("\nRss:")[1]
    assert int(entry.split()[0]) == 0  # kB of the mapping resident in this process.


def test_remote_files_land_whole_and_remote_folders_are_mirrored_once_complete(tmp_path, bucket,
                                                                               monkeypatch):
    """On `gs://` (a stand-in bucket, `tests.fake_gcs`): a file is uploaded when its block ends,
    never when it fails; a folder is uploaded with `COMPLETE` last, refused once complete, kept
    as its local mirror, and downloaded whole into a fresh scratch; appending rewrites the
    object."""
    path = "gs://bucket/run/result.json"
    with files.atomic_path(path) as tmp:
        assert not files.is_remote(tmp) and tmp.endswith(".json")
        with open(tmp, "w") as f:
            f.write("old")
    with pytest.raises(RuntimeError), files.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed mid-write")
    assert files.path(path).read_text() == "old"
    files.append_text("gs://bucket/run/metrics.jsonl", "1\n")
    files.append_text("gs://bucket/run/metrics.jsonl", "2\n")
    assert files.path("gs://bucket/run/metrics.jsonl").read_text() == "1\n2\n"

    folder = "gs://bucket/cache/pool"
    assert not files.is_complete(folder)
    with files.atomic_path(folder) as tmp:
        os.makedirs(os.path.join(tmp, "train"))
        with open(os.path.join(tmp, "train", "a.bin"), "wb") as f:
            f.write(b"abc")
    assert files.is_complete(folder)
    assert sorted(str(p.relative_to(bucket)) for p in (bucket / "bucket" / "cache").rglob("*")
                  if p.is_file()) == ["bucket/cache/pool/COMPLETE", "bucket/cache/pool/train/a.bin"]
    assert files.mirror(folder) == files.scratch(folder)  # Kept from the build.
    with open(os.path.join(files.scratch(folder), "train", "a.bin"), "rb") as f:
        assert f.read() == b"abc"
    with pytest.raises(FileExistsError), files.atomic_path(folder) as tmp:
        os.makedirs(tmp)
    monkeypatch.setenv("JAXSEL_SCRATCH", str(tmp_path / "elsewhere"))
    local = files.mirror(folder)
    assert local.startswith(str(tmp_path / "elsewhere")) and os.path.basename(local) == "pool"
    with open(os.path.join(local, "train", "a.bin"), "rb") as f:
        assert f.read() == b"abc"
    assert files.mirror("relative/local") == "relative/local"
