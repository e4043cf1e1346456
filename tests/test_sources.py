"""Source dispatch: the per-domain cap, fingerprints, and a read that yields no document."""

import collections
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxsel import config as config_lib
from jaxsel.data import local_corpus, sources
from tests import tfds_dataset


def _data_config(**overrides):
    c = config_lib.base_config("tiny").data
    c.update(overrides)
    return c


def _read(**overrides):
    skipped = collections.Counter()
    docs = list(sources.read_documents(_data_config(**overrides), skipped, seed=0))
    return docs, skipped


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tfds_dataset.prepare(tmp_path_factory.mktemp("tfds"))


def test_max_docs_caps_each_domain_and_counts_the_rest(tmp_path):
    records = [{"text": f"doc {i}", "d": "ab"[i % 2]} for i in range(10)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    docs, skipped = _read(source="jsonl", paths=(str(tmp_path / "a.jsonl"),), domain_field="d",
                          max_docs=3)
    assert [d.text for d in docs] == [f"doc {i}" for i in range(6)]
    assert skipped == {"over_max_docs": 4}


def test_unknown_source_names_data_source_and_choices():
    for call in (lambda d: sources.read_documents(d, collections.Counter()),
                 sources.source_fingerprint):
        with pytest.raises(ValueError, match=r"data.source='nope'.*jsonl.*synthetic"):
            call(_data_config(source="nope"))


def test_synthetic_needs_the_seed_and_is_keyed_by_it():
    d = _data_config(source="synthetic", synthetic_docs_per_domain=4)
    with pytest.raises(ValueError, match="seed"):
        sources.read_documents(d, collections.Counter())
    with pytest.raises(ValueError, match="seed"):
        sources.source_fingerprint(d)
    assert sources.source_fingerprint(d, seed=1) != sources.source_fingerprint(d, seed=2)
    assert sources.manifest(d) is None


def test_file_fingerprint_follows_the_files(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n')
    d = _data_config(source="jsonl", paths=(str(path),))
    key = sources.source_fingerprint(d)
    assert sources.source_fingerprint(_data_config(source="jsonl", paths=(str(path),),
                                                   text_field="body")) != key
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert sources.source_fingerprint(d) != key


def test_tfds_fingerprint_depends_on_what_is_read(tfds_dir):
    def fingerprint(**overrides):
        return sources.source_fingerprint(_data_config(
            source="tfds", tfds_name=tfds_dataset.NAME, tfds_data_dir=tfds_dir, **overrides))

    assert fingerprint() == fingerprint()
    assert fingerprint() != fingerprint(text_field="topic")


def test_local_manifest_names_every_domain():
    manifest = sources.manifest(_data_config(source="local"))
    assert manifest == local_corpus.manifest(local_corpus.discover())
    assert set(manifest["domains"]["docstrings"]["packages"]) == set(
        local_corpus.DOCSTRING_PACKAGES)


# ------------------------------------------------------------------------------------------------
# No document survived: one error that names the source, its files and the skip counts.


def _no_documents(**overrides) -> str:
    with pytest.raises(ValueError, match="no document survived") as info:
        _read(**overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_jsonl_with_only_bad_lines_names_the_files_and_skip_counts(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_bytes(b'{"text": "broken\n\n{"body": "no text"}\n{"text": " "}\n')
    message = _no_documents(source="jsonl", paths=(f"{tmp_path}/*.jsonl",))
    assert message.startswith("data.source='jsonl': no document survived reading data.paths=")
    assert f"2 file(s): {tmp_path / 'a.jsonl'}, {tmp_path / 'b.jsonl'})" in message
    assert ("all 8 records were skipped (blank_line: 2, empty_text: 2, invalid_json: 2, "
            "missing_text_field: 2)") in message
    assert "data.text_field='text'" in message


def test_empty_jsonl_file_holds_no_record(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"")
    message = _no_documents(source="jsonl", paths=(str(tmp_path / "a.jsonl"),))
    assert "it holds no records at all" in message and str(tmp_path / "a.jsonl") in message


def test_text_folder_with_only_empty_files(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(" \n" * i)
    message = _no_documents(source="text", paths=(str(tmp_path),))
    assert f"data.paths=('{tmp_path}',) (5 file(s): {tmp_path / '0.txt'}, " in message
    assert "and 2 more)" in message and "all 5 files were skipped (empty_text: 5)" in message
    assert "non-empty UTF-8 text" in message


def test_parquet_with_only_null_texts(tmp_path):
    pq.write_table(pa.table({"text": pa.array([None, None], pa.string()), "d": ["x", "y"]}),
                   tmp_path / "a.parquet")
    message = _no_documents(source="parquet", paths=(str(tmp_path / "a.parquet"),),
                            domain_field="d")
    assert str(tmp_path / "a.parquet") in message
    assert "(missing_text_field: 2)" in message
    assert "data.text_field='text' and data.domain_field='d'" in message


def test_tfds_with_no_usable_record(tfds_dir):
    message = _no_documents(source="tfds", tfds_name=tfds_dataset.NAME, tfds_data_dir=tfds_dir,
                            text_field="body")
    assert f"data.tfds_name='{tfds_dataset.NAME}', data.tfds_split='train'" in message
    assert f"(missing_text_field: {len(tfds_dataset.RECORDS)})" in message


def test_local_corpus_with_nothing_readable(monkeypatch):
    items = [("empty", lambda: "  ")]
    monkeypatch.setattr(local_corpus, "discover",
                        lambda: {"d": local_corpus.Domain(items, {"roots": []})})
    message = _no_documents(source="local")
    assert re.search(r"reading the local corpus; all 1 items were skipped \(empty_text: 1\)",
                     message)
