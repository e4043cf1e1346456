"""Document sources: every source on small fixtures, bad records counted by reason."""

import collections
import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from jaxsel import config as config_lib
from jaxsel.data import sources


def _data_config(**overrides):
    c = config_lib.base_config("tiny").data
    c.update(overrides)
    return c


def _read(**overrides):
    skipped = collections.Counter()
    docs = list(sources.read_documents(_data_config(**overrides), skipped, seed=0))
    return docs, skipped


# ------------------------------------------------------------------------------------------------
# jsonl and parquet


def _write_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")


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
    docs, skipped = _read(source="jsonl", paths=f"{tmp_path}/*.jsonl", domain_field="src")

    assert [(d.text, d.domain) for d in docs] == [(g["text"], str(g["src"])) for g in good]
    # Ids are record positions over the sorted files, bad records included.
    assert [d.doc_id for d in docs] == [0, 5, 11]
    assert skipped == {"invalid_utf8": 1, "invalid_json": 1, "missing_text_field": 1,
                       "blank_line": 1, "empty_text": 1, "non_string_text": 1,
                       "not_an_object": 1, "invalid_unicode": 1, "missing_domain_field": 1}


def test_jsonl_without_domain_field_is_one_default_domain(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": f"doc {i}"}).encode()
                                        for i in range(3)])
    docs, skipped = _read(source="jsonl", paths=str(tmp_path / "a.jsonl"))
    assert {d.domain for d in docs} == {"default"} and len(docs) == 3 and not skipped


def test_jsonl_path_matching_nothing_names_data_paths(tmp_path):
    with pytest.raises(ValueError, match="data.paths"):
        _read(source="jsonl", paths=str(tmp_path / "missing*.jsonl"))


def test_max_docs_caps_each_domain_and_counts_the_rest(tmp_path):
    records = [{"text": f"doc {i}", "d": "ab"[i % 2]} for i in range(10)]
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps(r).encode() for r in records])
    docs, skipped = _read(source="jsonl", paths=str(tmp_path / "a.jsonl"), domain_field="d",
                          max_docs=3)
    assert [d.text for d in docs] == [f"doc {i}" for i in range(6)]
    assert skipped == {"over_max_docs": 4}


def test_parquet_reads_columns_and_counts_bad_rows(tmp_path):
    table = pa.table({"body": ["first", None, "", "second"], "kind": ["x", "x", "y", "y"]})
    pq.write_table(table, tmp_path / "a.parquet")
    docs, skipped = _read(source="parquet", paths=str(tmp_path / "a.parquet"),
                          text_field="body", domain_field="kind")
    assert [(d.doc_id, d.text, d.domain) for d in docs] == [(0, "first", "x"), (3, "second", "y")]
    assert skipped == {"missing_text_field": 1, "empty_text": 1}
    with pytest.raises(ValueError, match="data.text_field"):
        _read(source="parquet", paths=str(tmp_path / "a.parquet"), text_field="text")


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
    docs, skipped = _read(source="text", paths=str(tmp_path))
    assert sorted((d.domain, d.text) for d in docs) == [
        ("code", "print('hi')\n"), ("default", "at the root"), ("news", "news one"),
        ("news", "news two, nested")]
    assert skipped == {"invalid_utf8": 1, "empty_text": 1}
    assert len({d.doc_id for d in docs}) == len(docs)


# ------------------------------------------------------------------------------------------------
# TFDS: a real array_record dataset written by tfds itself (no TensorFlow is installed).


class JaxselTestText(tfds.core.GeneratorBasedBuilder):
    """A tiny text dataset with one bad record of each kind TFDS can hold. Written and read by
    tfds itself in this venv, which has no TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"content": tfds.features.Text(), "topic": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        texts = ["first document", "second document", "third one", b"bad \xff bytes", "  "]
        for i, text in enumerate(texts):
            yield i, {"content": text, "topic": "even" if i % 2 == 0 else "odd"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    JaxselTestText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


@pytest.mark.parametrize("domain_field", ["topic", ""])
def test_tfds_array_record_source(tfds_dir, domain_field):
    docs, skipped = _read(source="tfds", tfds_name="jaxsel_test_text", tfds_split="train",
                          tfds_data_dir=tfds_dir, text_field="content", domain_field=domain_field)
    expected = {("first document", "even"), ("second document", "odd"), ("third one", "even")}
    if not domain_field:
        expected = {(text, "jaxsel_test_text") for text, _ in expected}
    assert {(d.text, d.domain) for d in docs} == expected
    assert skipped == {"invalid_utf8": 1, "empty_text": 1}


def test_tfds_fingerprint_depends_on_what_is_read(tfds_dir):
    def fingerprint(**overrides):
        return sources.source_fingerprint(_data_config(
            source="tfds", tfds_name="jaxsel_test_text", tfds_data_dir=tfds_dir, **overrides))

    assert fingerprint() == fingerprint()
    assert fingerprint() != fingerprint(text_field="topic")


def test_unknown_source_names_data_source_and_choices():
    with pytest.raises(ValueError, match=r"data.source='nope'.*jsonl.*synthetic"):
        _read(source="nope")


# ------------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_is_deterministic_per_seed():
    def texts(seed):
        return [(d.doc_id, d.text, d.domain, d.label)
                for d in sources.synthetic_documents(seed, 20, 64)]

    assert texts(3) == texts(3)
    assert texts(3) != texts(4)
    with pytest.raises(ValueError, match="seed"):
        list(sources.read_documents(_data_config(source="synthetic"), collections.Counter()))


def test_synthetic_has_the_structure_it_claims():
    per_domain, seq_len = 30, 128
    docs = list(sources.synthetic_documents(0, per_domain, seq_len))
    by_domain = collections.defaultdict(list)
    for d in docs:
        by_domain[d.domain].append(d)
    names = [s.name for s in sources.SYNTHETIC_DOMAINS]
    assert list(by_domain) == names + ["junk"] and len(names) >= 3
    assert [d.doc_id for d in docs] == list(range(len(docs)))

    letters = {}
    for name in names:
        domain_docs = by_domain[name]
        labels = collections.Counter(d.label for d in domain_docs)
        assert labels == {"clean": per_domain - per_domain // 10,
                          "near_duplicate": per_domain // 10}
        clean = [d.text.split(" ") for d in domain_docs if d.label == "clean"]
        for dup in (d.text.split(" ") for d in domain_docs if d.label == "near_duplicate"):
            # Its original: a clean document of the same domain, same length, a few words changed.
            diffs = [sum(a != b for a, b in zip(dup, c, strict=True))
                     for c in clean if len(c) == len(dup)]
            assert diffs and 1 <= min(diffs) <= 0.1 * len(dup)
        words = re.findall(r"[a-z]+", " ".join(d.text for d in domain_docs))
        letters[name] = set("".join(words))
    # Different statistics: each domain's words use an alphabet no other domain uses.
    for a in names:
        for b in names:
            assert a == b or not letters[a] & letters[b]
    junk = by_domain["junk"]
    assert len(junk) == per_domain // 4 and {d.label for d in junk} == {"junk"}
    # Junk is soup (no word-like structure) or one unit repeated.
    assert any(len(set(d.text.split())) == 1 for d in junk)
    assert any(" " not in d.text for d in junk)


# ------------------------------------------------------------------------------------------------
# Local corpus


def test_local_corpus_has_real_domains_and_is_deterministic():
    items = sources.local_items()
    for domain_items in items.values():  # Discovery order is sorted, so reads are repeatable.
        keys = [str(key) for key, _ in domain_items]
        assert keys == sorted(keys)

    def read():
        skipped = collections.Counter()
        return [(d.doc_id, d.domain, d.text) for d in sources.local_documents(1, skipped, items)]

    docs = read()
    domains = collections.Counter(domain for _, domain, _ in docs)
    assert {"code", "docstrings", "reference"} <= set(domains) and len(domains) >= 3
    assert all(count == 1 for count in domains.values())
    assert all(text.strip() and len(text) <= sources.LOCAL_DOC_CHARS for _, _, text in docs)
    assert read() == docs


def test_local_capped_domain_spreads_over_its_sorted_items():
    items = {"d": [(f"item{i:03d}", lambda i=i: f"text {i}") for i in range(100)]}
    docs = list(sources.local_documents(5, collections.Counter(), items))
    assert [d.text for d in docs] == [f"text {i}" for i in (0, 20, 40, 60, 80)]


def _troff_page(name: str) -> str:
    return (f'.\\" comment line\n.TH {name.upper()} 1 "2024"\n.SH NAME\n'
            f"{name} \\- does \\fBthings\\fR\n.SH SYNOPSIS\n.B {name}\n\\fIfile\\fP\n")


def test_man_pages_and_docs_become_domains_per_language(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MIN_MAN_PAGES", 2)
    man, doc = tmp_path / "man", tmp_path / "doc"
    for lang_dir in ("man1", "de/man1", "de.UTF-8/man8", "fi/man1"):
        (man / lang_dir).mkdir(parents=True)
    (man / "man1" / "foo.1.gz").write_bytes(gzip.compress(_troff_page("foo").encode()))
    (man / "man1" / "bar.1").write_text(_troff_page("bar"))
    (man / "man1" / "alias.1").write_text(".so man1/foo.1\n")
    (man / "man1" / "broken.1.gz").write_bytes(b"not gzip")
    (man / "man1" / "link.1.gz").symlink_to(man / "man1" / "foo.1.gz")
    (man / "de" / "man1" / "foo.1").write_text(_troff_page("foo"))
    (man / "de.UTF-8" / "man8" / "baz.8").write_text(_troff_page("baz"))
    (man / "fi" / "man1" / "only.1").write_text(_troff_page("only"))  # Under MIN_MAN_PAGES.
    (doc / "pkg").mkdir(parents=True)
    (doc / "pkg" / "README.md").write_text("# pkg\nread me\n")
    (doc / "pkg" / "notes.txt.gz").write_bytes(gzip.compress(b"some notes\n"))
    (doc / "pkg" / "copyright").write_text("not documentation")
    (doc / "pkg" / "index.html").write_text("<html>skipped</html>")

    items = {k: v for k, v in sources.local_items(man, doc).items()
             if k.startswith("man_") or k == "docs"}
    skipped = collections.Counter()
    docs = list(sources.local_documents(0, skipped, items))
    by_domain = collections.defaultdict(list)
    for d in docs:
        by_domain[d.domain].append(d.text)
    assert sorted(by_domain) == ["docs", "man_de", "man_en"]
    assert len(by_domain["man_en"]) == 2 and len(by_domain["man_de"]) == 2
    assert sorted(by_domain["docs"]) == ["# pkg\nread me\n", "some notes\n"]
    assert skipped == {"man_alias": 1, "unreadable_file": 1}
    foo = next(t for t in by_domain["man_en"] if "foo" in t)
    assert "NAME" in foo and "foo - does things" in foo and "file" in foo
    assert "\\f" not in foo and ".TH" not in foo and "comment" not in foo


def test_split_text_keeps_all_text_in_pieces_of_bounded_size():
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(1, 200)) + "x" * 250 + "\nend\n"
    pieces = sources.split_text(text, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert "".join(pieces) == text
