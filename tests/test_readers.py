"""Readers of real data: every reader on small fixtures, bad records counted by reason."""

import collections
import contextlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath
from etils.epath import testing as _epath_testing  # noqa: F401 (registers epath.testing)

from jaxsel import config as config_lib
from jaxsel.data import readers
from tests import tfds_dataset

_READERS = {"jsonl": readers.jsonl_documents, "parquet": readers.parquet_documents,
            "text": readers.text_dir_documents, "tfds": readers.tfds_documents}


def _read(source, **overrides):
    d = config_lib.base_config("tiny").data
    d.update(source=source, **overrides)
    skipped = collections.Counter()
    return list(_READERS[source](d, skipped)), skipped


def _write_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")


# ------------------------------------------------------------------------------------------------
# jsonl and parquet


def test_jsonl_reads_good_records_and_counts_each_kind_of_bad_one(tmp_path):
    good = [{"text": "alpha doc", "src": "a"}, {"text": "beta doc", "src": "b"},
            {"text": "gamma doc", "src": 7}]
    _write_jsonl(tmp_path / "1.jsonl", [
        json.dumps(good[0]).encode(),
        b'{"text": "bad \xff utf8", "src": "a"}',
        b'{"text": "broken',
        json.dumps({"body": "no text field", "src": "a"}).encode(),
        b"",
        json.dumps(good[1]).encode(),
    ])
    _write_jsonl(tmp_path / "2.jsonl", [
        json.dumps({"text": "   \n", "src": "a"}).encode(),
        json.dumps({"text": 42, "src": "a"}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        b'{"text": "lone \\ud800 surrogate", "src": "a"}',
        json.dumps({"text": "no domain"}).encode(),
        json.dumps(good[2]).encode(),
    ])
    docs, skipped = _read("jsonl", paths=(f"{tmp_path}/*.jsonl",), domain_field="src")

    assert [(d.text, d.domain) for d in docs] == [(g["text"], str(g["src"])) for g in good]
    # Ids are record positions over the sorted files, bad records included.
    assert [d.doc_id for d in docs] == [0, 5, 11]
    assert skipped == {"invalid_utf8": 1, "invalid_json": 1, "missing_text_field": 1,
                       "blank_line": 1, "empty_text": 1, "non_string_text": 1,
                       "not_an_object": 1, "invalid_unicode": 1, "missing_domain_field": 1}


def test_jsonl_without_domain_field_is_one_default_domain(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": f"doc {i}"}).encode()
                                        for i in range(3)])
    docs, skipped = _read("jsonl", paths=(str(tmp_path / "a.jsonl"),))
    assert {d.domain for d in docs} == {"default"} and len(docs) == 3 and not skipped


def test_jsonl_path_matching_nothing_names_data_paths(tmp_path):
    with pytest.raises(ValueError, match="data.paths"):
        _read("jsonl", paths=(str(tmp_path / "missing*.jsonl"),))


def test_parquet_reads_columns_and_counts_bad_rows(tmp_path):
    table = pa.table({"body": ["first", None, "", "second"], "kind": ["x", "x", "y", "y"]})
    pq.write_table(table, tmp_path / "a.parquet")
    docs, skipped = _read("parquet", paths=(str(tmp_path / "a.parquet"),), text_field="body",
                          domain_field="kind")
    assert [(d.doc_id, d.text, d.domain) for d in docs] == [(0, "first", "x"), (3, "second", "y")]
    assert skipped == {"missing_text_field": 1, "empty_text": 1}
    with pytest.raises(ValueError, match="data.text_field"):
        _read("parquet", paths=(str(tmp_path / "a.parquet"),), text_field="text")


# ------------------------------------------------------------------------------------------------
# Text folder


def test_text_folder_has_a_domain_per_subfolder_and_counts_bad_files(tmp_path):
    (tmp_path / "news" / "2024").mkdir(parents=True)
    (tmp_path / "code").mkdir()
    (tmp_path / "root.txt").write_text("at the root")
    (tmp_path / "news" / "a.txt").write_text("news one")
    (tmp_path / "news" / "2024" / "b.txt").write_text("news two, nested")
    (tmp_path / "code" / "x.py").write_text("print('hi')\n")
    (tmp_path / "code" / "bad.bin").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "code" / "empty.txt").write_text("  \n")
    (tmp_path / ".hidden").write_text("ignored")
    docs, skipped = _read("text", paths=(str(tmp_path),))
    assert sorted((d.domain, d.text) for d in docs) == [
        ("code", "print('hi')\n"), ("default", "at the root"), ("news", "news one"),
        ("news", "news two, nested")]
    assert skipped == {"invalid_utf8": 1, "empty_text": 1}
    assert len({d.doc_id for d in docs}) == len(docs)
    d = config_lib.base_config("tiny").data
    d.update(source="text", paths=(str(tmp_path),))
    assert [p.name for p in readers.source_files(d)] == [
        "bad.bin", "empty.txt", "x.py", "b.txt", "a.txt", "root.txt"]


# ------------------------------------------------------------------------------------------------
# TFDS: a real array_record dataset written by tfds itself (no TensorFlow is installed).


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tfds_dataset.prepare(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("domain_field", ["topic", ""])
def test_tfds_array_record_source(tfds_dir, domain_field):
    docs, skipped = _read("tfds", tfds_name=tfds_dataset.NAME, tfds_split="train",
                          tfds_data_dir=tfds_dir, text_field="content", domain_field=domain_field)
    expected = set(tfds_dataset.GOOD)
    if not domain_field:
        expected = {(text, tfds_dataset.NAME) for text, _ in expected}
    assert {(d.text, d.domain) for d in docs} == expected
    assert skipped == {"invalid_utf8": 1, "empty_text": 1}


# ------------------------------------------------------------------------------------------------
# Remote paths through etils.epath


@contextlib.contextmanager
def _bucket(root):
    """`gs://bucket/...` served from the local folder `root` (`epath.testing.mock_epath`)."""
    local = str(root)

    def same(original, path, *args, **kwargs):
        return original(str(path).replace("gs://bucket", local), *args, **kwargs)

    def glob(original, path):
        return [p.replace(local, "gs://bucket") for p in same(original, path)]

    def walk(original, path, *args, **kwargs):
        for top, dirs, files in same(original, path, *args, **kwargs):
            yield str(top).replace(local, "gs://bucket"), dirs, files

    with epath.testing.mock_epath(open=same, exists=same, isdir=same, glob=glob, listdir=same,
                                  stat=same, walk=walk):
        yield


def test_gs_paths_read_as_local_ones(tmp_path):
    """jsonl (a glob), parquet and text folders under `gs://` (a fake bucket over a local folder)
    give the documents the same local files give, and cache keys that name the remote files."""
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "1.jsonl", [json.dumps({"text": "one", "src": "a"}).encode()])
    _write_jsonl(tmp_path / "data" / "2.jsonl", [json.dumps({"text": "two", "src": "b"}).encode()])
    pq.write_table(pa.table({"text": ["three", "four"], "src": ["a", "b"]}),
                   tmp_path / "data" / "x.parquet")
    (tmp_path / "texts" / "news").mkdir(parents=True)
    (tmp_path / "texts" / "news" / "a.txt").write_text("news one")
    (tmp_path / "texts" / "root.txt").write_text("at the root")
    sources = {"jsonl": "data/*.jsonl", "parquet": "data/x.parquet", "text": "texts"}
    local = {s: _read(s, paths=(str(tmp_path / p),), domain_field="src" if s != "text" else "")
             for s, p in sources.items()}
    with _bucket(tmp_path):
        remote = {s: _read(s, paths=(f"gs://bucket/{p}",),
                           domain_field="src" if s != "text" else "")
                  for s, p in sources.items()}
        d = config_lib.base_config("tiny").data
        d.update(source="jsonl", paths=("gs://bucket/data/*.jsonl",))
        keys = [readers.stat_key(p) for p in readers.source_files(d)]
    assert remote == local and [len(docs) for docs, _ in remote.values()] == [2, 2, 2]
    assert [k[:2] for k in keys] == [(f"gs://bucket/data/{n}.jsonl",
                                      (tmp_path / "data" / f"{n}.jsonl").stat().st_size)
                                     for n in (1, 2)]
