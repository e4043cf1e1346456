"""files.atomic_path: a write lands whole or not at all."""

import os

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
