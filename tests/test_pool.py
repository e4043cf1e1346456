"""Pool: packing round trip, segment invariants, labels, split, cache, atomic build, report."""

import collections
import functools
import importlib.metadata
import json
import os
import sysconfig

import numpy as np
import pytest

from jaxsel import config as config_lib
from jaxsel.data import build as build_lib
from jaxsel.data import local_corpus, readers, sources
from jaxsel.data import pool as pool_lib
from jaxsel.data import tokenizer as tokenizer_lib

SEQ_LEN = 16
VOCAB = 300


def _config(cache_dir, source="jsonl", vocab_size=VOCAB, **data):
    c = config_lib.base_config("tiny")
    c.model.vocab_size = vocab_size
    c.data.update({"source": source, "cache_dir": str(cache_dir), "seq_len": SEQ_LEN,
                   "heldout_fraction": 0.2, "domain_field": "d", **data})
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl corpus: domains a (60 docs), b (30), c (1 doc); lengths from one word to several
    rows; three bad records."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "η", "<eos>", "theta\n"]
    lines = []
    for domain, n in (("a", 60), ("b", 30), ("c", 1)):
        for _ in range(n):
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 40))))
            lines.append(json.dumps({"text": text, "d": domain}))
    lines[5:5] = ['{"text": "broken', json.dumps({"text": "", "d": "a"}), '{"no": "text"}']
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """The corpus's pools, built with packers flushing every few rows (as on a large corpus)."""
    config = _config(tmp_path_factory.mktemp("cache"), paths=(str(corpus),))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_lib, "_FLUSH_TOKENS", 3 * SEQ_LEN + 5)
        return config, pool_lib.build_pools(config)


def _source_docs(config):
    return list(sources.read_documents(config.data, collections.Counter(), seed=config.seed))


def _docs_from_rows(pool) -> dict[int, np.ndarray]:
    """Doc id -> its tokens, reassembled from the rows via segment ids and the doc id lists."""
    pieces = collections.defaultdict(list)
    for i in range(len(pool)):
        for segment, doc_id in enumerate(pool.doc_ids_of(i), start=1):
            pieces[int(doc_id)].append(pool.tokens[i][pool.segments[i] == segment])
    return {doc_id: np.concatenate(p) for doc_id, p in pieces.items()}


def test_domain_packer_packs_and_carries_a_cut_document_over():
    packer = build_lib.DomainPacker(seq_len=4)
    docs = [([10, 11, 12, 13, 14], 100, 0), ([20, 21, 22], 101, 1),
            (list(range(30, 39)), 102, 0)]
    for tokens, doc_id, label in docs:
        packer.add(np.array(tokens, np.int32), doc_id, label)
    rows = packer.pop_rows(final=False)
    np.testing.assert_array_equal(rows.tokens, [[10, 11, 12, 13], [14, 20, 21, 22],
                                                [30, 31, 32, 33], [34, 35, 36, 37]])
    np.testing.assert_array_equal(rows.segments, [[1, 1, 1, 1], [1, 2, 2, 2], [1] * 4, [1] * 4])
    np.testing.assert_array_equal(rows.doc_counts, [1, 2, 1, 1])
    np.testing.assert_array_equal(rows.doc_ids, [100, 100, 101, 102, 102])
    np.testing.assert_array_equal(rows.labels, [0, 1, 0, 0])
    assert packer.pending == 1 and packer.pop_rows(final=False) is None
    packer.add(np.array([40, 41], np.int32), 103, 1)
    last = packer.pop_rows(final=True)
    np.testing.assert_array_equal(last.tokens, [[38, 40, 41, 0]])
    np.testing.assert_array_equal(last.segments, [[1, 2, 2, 0]])
    np.testing.assert_array_equal(last.doc_ids, [102, 103])
    np.testing.assert_array_equal(last.labels, [1])
    assert packer.pending == 0


def test_packing_round_trip_reproduces_every_document(built):
    config, pools = built
    tok = tokenizer_lib.load_tokenizer(pools["train"].tokenizer_path)
    docs = _source_docs(config)
    rebuilt = {}
    for pool in pools.values():
        from_rows = _docs_from_rows(pool)
        assert not set(from_rows) & set(rebuilt)  # A document lives in one split.
        rebuilt.update(from_rows)
    assert set(rebuilt) == {d.doc_id for d in docs}
    for doc in docs:
        expected = tok.encode(doc.text).ids + [tokenizer_lib.eos_id(tok)]
        np.testing.assert_array_equal(rebuilt[doc.doc_id], expected)
        assert tok.decode(rebuilt[doc.doc_id][:-1].tolist()) == doc.text


def test_segment_ids_and_padding_invariants(built):
    _, pools = built
    for pool in pools.values():
        tokens, segments = np.asarray(pool.tokens), np.asarray(pool.segments)
        assert tokens.dtype == segments.dtype == np.int32
        assert tokens.shape == segments.shape == (len(pool), SEQ_LEN)
        assert np.all(segments[:, 0] == 1)  # No empty row; numbering restarts in every row.
        steps = np.diff(segments, axis=1)
        valid = segments[:, 1:] > 0
        assert np.all(np.isin(steps[valid], [0, 1]))
        assert np.all(segments[:, 1:][~valid] == 0) and np.all(steps[~valid] <= 0)
        assert np.all(tokens[segments == 0] == 0)
        for i in range(len(pool)):
            assert segments[i].max() == len(pool.doc_ids_of(i))
        padded = np.flatnonzero((segments == 0).any(axis=1))
        for name in pool.domain_names:
            for group in np.unique(pool.groups):
                rows = np.intersect1d(pool.ids_of_domain(name), np.flatnonzero(
                    pool.groups == group))
                # Only the last row of a domain's (held-out group's) rows may be padded.
                assert set(padded) & set(rows) <= set(rows[-1:])


def test_heldout_groups_hold_whole_documents(built):
    """Every held-out document is in the rows of one group, the one its hash names; train rows
    are group 0."""
    config, pools = built
    assert not np.asarray(pools["train"].groups).any()
    heldout = pools["heldout"]
    groups = np.asarray(heldout.groups)
    assert len(np.unique(groups)) > 1
    group_of = {}
    for i in range(len(heldout)):
        for doc in heldout.doc_ids_of(i).tolist():
            assert group_of.setdefault(doc, groups[i]) == groups[i]
    for doc, group in group_of.items():
        assert group == build_lib.heldout_group(doc, config.data.heldout_groups)
    rows = np.flatnonzero(groups == groups[0])
    assert heldout.doc_ids(rows).tolist() == sorted(
        {d for i in rows for d in heldout.doc_ids_of(i).tolist()})


def test_document_packing_starts_every_document_on_a_row(corpus, tmp_path):
    """`data.packing="document"`: each document's first token is a row's first token, and the
    documents are the ones concat packing holds, token for token."""
    config = _config(tmp_path, paths=(str(corpus),), packing="document")
    concat = pool_lib.build_pools(_config(tmp_path, paths=(str(corpus),)))
    for split, pool in pool_lib.build_pools(config).items():
        segments = np.asarray(pool.segments)
        starts = {}
        for i in range(len(pool)):
            docs = pool.doc_ids_of(i)
            assert segments[i].max() == len(docs)
            if len(docs) > 1:  # A row holds the end of a long document only if it ends it.
                pytest.fail(f"row {i} holds documents {docs}")
            starts.setdefault(int(docs[0]), i)
        rebuilt, expected = _docs_from_rows(pool), _docs_from_rows(concat[split])
        assert rebuilt.keys() == expected.keys()
        for doc, tokens in rebuilt.items():
            np.testing.assert_array_equal(tokens, expected[doc])


def test_split_is_deterministic_disjoint_and_covers_every_domain(built, corpus, tmp_path):
    config, pools = built

    def doc_sets(ps):
        return {split: {int(x) for i in range(len(p)) for x in p.doc_ids_of(i)}
                for split, p in ps.items()}

    first = doc_sets(pools)
    again = doc_sets(pool_lib.build_pools(_config(tmp_path, paths=(str(corpus),))))
    assert first == again
    assert not first["train"] & first["heldout"]
    domain_of = {d.doc_id: d.domain for d in _source_docs(config)}
    heldout_domains = {domain_of[i] for i in first["heldout"]}
    assert heldout_domains == {"a", "b"}  # Every domain with >= 2 documents; c has one.
    fraction = len(first["heldout"]) / len(domain_of)
    assert 0.1 < fraction < 0.35


def test_report_counts_match_an_independent_count(built):
    config, pools = built
    tok = tokenizer_lib.load_tokenizer(pools["train"].tokenizer_path)
    docs = _source_docs(config)
    expected_tokens = collections.Counter()
    for d in docs:
        expected_tokens[d.domain] += len(tok.encode(d.text).ids) + 1
    per_domain = collections.Counter(d.domain for d in docs)
    for split, pool in pools.items():
        report = json.loads((pool.path / "pool.json").read_text())
        assert report == pool.report and report["split"] == split
        assert report["documents_read"] == len(docs)
        assert report["skipped"] == {"invalid_json": 1, "empty_text": 1, "missing_text_field": 1}
        assert report["sequences"] == len(pool) == sum(report["label_sequences"].values())
        assert report["seq_len"] == SEQ_LEN
        assert report["vocab_size"] == tok.get_vocab_size() <= VOCAB
        assert report["tokenizer_hash"] == tokenizer_lib.tokenizer_hash(tok)
        for name, counts in report["domains"].items():
            rows = pool.ids_of_domain(name)
            assert counts["sequences"] == len(rows)
            assert counts["tokens"] == int((pool.segments[rows] > 0).sum())
    for name in per_domain:
        assert sum(pools[s].report["domains"][name]["documents"] for s in pools) == \
            per_domain[name]
        assert sum(pools[s].report["domains"][name]["tokens"] for s in pools) == \
            expected_tokens[name]


def test_pool_accessors(built):
    pool = built[1]["train"]
    ids = np.array([3, 0, 3, len(pool) - 1])
    rows = pool.rows(ids)
    assert rows["tokens"].dtype == rows["segments"].dtype == np.int32
    np.testing.assert_array_equal(rows["tokens"], np.stack([pool.tokens[i] for i in ids]))
    np.testing.assert_array_equal(rows["segments"], np.stack([pool.segments[i] for i in ids]))
    all_rows = np.concatenate([pool.ids_of_domain(n) for n in pool.domain_names])
    np.testing.assert_array_equal(np.sort(all_rows), np.arange(len(pool)))
    with pytest.raises(ValueError, match="'zzz'"):
        pool.ids_of_domain("zzz")
    counted = collections.Counter(pool.domain_names[pool.domains[i]] for i in ids)
    assert pool.domain_counts(ids) == dict(counted)
    # A view reads only the rows indexed, the same rows as `rows`.
    view = pool.view(ids)
    assert view["tokens"].shape == rows["tokens"].shape and len(view["segments"]) == len(ids)
    for idx in (slice(1, 3), np.array([3, 0]), slice(None)):
        for name in ("tokens", "segments"):
            np.testing.assert_array_equal(view[name][idx], rows[name][idx])


def test_second_build_reads_the_cache(built, monkeypatch):
    config, pools = built
    mtime = os.stat(pools["train"].path / "pool.json").st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt despite a cached pool")

    monkeypatch.setattr(sources, "read_documents", fail)
    monkeypatch.setattr(tokenizer_lib, "load_or_train_tokenizer", fail)
    again = pool_lib.build_pools(config)
    assert again["train"].path == pools["train"].path
    assert os.stat(again["train"].path / "pool.json").st_mtime_ns == mtime


def test_pool_key_changes_with_its_inputs(built, corpus):
    config, _ = built
    key = pool_lib.pool_key(config)
    changed = config.copy_and_resolve_references()
    changed.data.seq_len = SEQ_LEN * 2
    assert pool_lib.pool_key(changed) != key
    stat = corpus.stat()
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert pool_lib.pool_key(config) != key
    finally:
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert pool_lib.pool_key(config) == key


def test_a_failed_build_leaves_no_pool(corpus, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build_lib, "_write_reports", crash)
    config = _config(tmp_path, paths=(str(corpus),))
    with pytest.raises(RuntimeError, match="killed"):
        pool_lib.build_pools(config)
    assert list((tmp_path / "pools").iterdir()) == []
    monkeypatch.undo()
    assert len(pool_lib.build_pools(config)["train"]) > 0


def test_cached_pool_with_a_larger_tokenizer_names_model_vocab_size(built, corpus, tmp_path):
    _, pools = built
    config = _config(tmp_path, paths=(str(corpus),), tokenizer=str(pools["train"].tokenizer_path))
    assert len(pool_lib.build_pools(config)["train"]) == len(pools["train"])
    config.model.vocab_size = 260
    with pytest.raises(ValueError, match="model.vocab_size=260"):
        pool_lib.build_pools(config)


def test_synthetic_near_duplicates_name_the_documents_they_copy(tmp_path):
    config = _config(tmp_path, source="synthetic", vocab_size=512, domain_field="",
                     synthetic_docs_per_domain=20)
    pools = pool_lib.build_pools(config)
    docs = _source_docs(config)
    expected = [(d.copy_of, d.doc_id) for d in docs if d.label == "near_duplicate"]
    assert len(expected) >= 3 and all(original >= 0 for original, _ in expected)
    for pool in pools.values():
        assert pool.near_duplicates.tolist() == [list(p) for p in expected]
        assert pool.report["near_duplicate_pairs"] == len(expected)


def test_real_sources_plant_no_near_duplicates(built):
    for pool in built[1].values():
        assert pool.near_duplicates.shape == (0, 2) and pool.report["near_duplicate_pairs"] == 0


def test_row_labels_are_the_majority_of_their_tokens(tmp_path):
    config = _config(tmp_path, source="synthetic", vocab_size=512, domain_field="",
                     synthetic_docs_per_domain=20)
    config.data.seq_len = 32
    pools = pool_lib.build_pools(config)
    label_of = {d.doc_id: d.label for d in _source_docs(config)}
    for pool in pools.values():
        names = pool.label_names
        assert set(names) == {"clean", "near_duplicate", "junk"}
        for i in range(len(pool)):
            counts = np.zeros(len(names), int)
            for segment, doc_id in enumerate(pool.doc_ids_of(i), start=1):
                counts[names.index(label_of[int(doc_id)])] += (pool.segments[i] == segment).sum()
            assert pool.labels[i] == counts.argmax()
    train = pools["train"]
    assert {train.label_names[k] for k in train.labels} == {"clean", "near_duplicate", "junk"}
    junk = train.domain_names.index("junk")
    assert np.all(train.labels[train.domains == junk] == train.label_names.index("junk"))


def test_splitter_holds_out_by_hash_and_one_document_of_every_domain():
    def heldout(fraction, docs):
        splitter = build_lib.Splitter(fraction)
        return [d.doc_id for d in docs if splitter.is_heldout(d)]

    docs = [readers.Document(i, "t", "xy"[i % 2]) for i in range(400)] + \
        [readers.Document(1000, "t", "single")]
    # A tiny fraction: only the rule acts, holding out each domain's second document.
    assert heldout(1e-9, docs) == [2, 3]
    by_hash = [d.doc_id for d in docs if build_lib.unit_hash(d.doc_id) < 0.3]
    assert set(by_hash) <= set(heldout(0.3, docs)) <= set(by_hash) | {2, 3}
    assert 0.2 < len(by_hash) / len(docs) < 0.4


# ------------------------------------------------------------------------------------------------
# Bad input stops the build: no pool is left behind.


def _no_pool_left(cache):
    assert not (cache / "pools").exists() or list((cache / "pools").iterdir()) == []


def _write_docs(path, domains):
    path.write_text("".join(json.dumps({"text": f"text number {i}", "d": d}) + "\n"
                            for i, d in enumerate(domains)))


def test_a_source_without_documents_stops_the_build(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "broken\n{"no": "text"}\n')
    with pytest.raises(ValueError, match=r"data.source='jsonl': no document survived reading "
                       r".*bad.jsonl.*\(invalid_json: 1, missing_text_field: 1\)"):
        pool_lib.build_pools(_config(tmp_path / "cache", paths=(str(path),)))
    _no_pool_left(tmp_path / "cache")


def test_an_empty_train_split_names_heldout_fraction(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write_docs(path, ["a", "b", "c"])  # One document per domain, ids 0, 1, 2.
    fraction = 0.99
    assert all(build_lib.unit_hash(i) < fraction for i in range(3))  # All held out by hash.
    with pytest.raises(ValueError, match=r"The train split is empty: all 3 documents that "
                       r"data.source='jsonl' yielded were held out \(data.heldout_fraction=0.99\)"
                       r".*Lower data.heldout_fraction"):
        pool_lib.build_pools(_config(tmp_path / "cache", paths=(str(path),),
                                     heldout_fraction=fraction))
    _no_pool_left(tmp_path / "cache")


def test_an_empty_heldout_split_names_heldout_fraction(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write_docs(path, ["a", "b", "c"])
    fraction = 0.05
    assert all(build_lib.unit_hash(i) >= fraction for i in range(3))  # None held out by hash.
    with pytest.raises(ValueError, match=r"The held-out split is empty: none of the 3 documents "
                       r".*Each of its 3 domain\(s\) holds a single document.*Raise "
                       r"data.heldout_fraction, or give a domain at least two documents "
                       r"\(data.max_docs=300 caps each domain\)"):
        pool_lib.build_pools(_config(tmp_path / "cache", paths=(str(path),),
                                     heldout_fraction=fraction))
    _no_pool_left(tmp_path / "cache")
    # A second document in one domain gives the held-out split a document: the build succeeds,
    # with domains that have no held-out document.
    _write_docs(path, ["a", "b", "c", "c"])
    pools = pool_lib.build_pools(_config(tmp_path / "cache", paths=(str(path),),
                                         heldout_fraction=fraction))
    assert pools["heldout"].domain_counts(range(len(pools["heldout"]))) == {"c": 1}


def test_local_pool_report_records_the_packages_and_roots_read(tmp_path, monkeypatch):
    monkeypatch.setattr(local_corpus, "discover", functools.partial(
        local_corpus.discover, man_root=tmp_path / "no-man", doc_root=tmp_path / "no-doc"))
    config = _config(tmp_path / "cache", source="local", domain_field="", max_docs=3)
    pools = pool_lib.build_pools(config)
    packages = {name: importlib.metadata.version(name)
                for name in local_corpus.DOCSTRING_PACKAGES}
    for split, pool in pools.items():
        record = json.loads((pool.path / "pool.json").read_text())["local_corpus"]
        assert set(record["domains"]) == {"code", "docstrings", "reference"}, split
        assert record["domains"]["code"] == {"roots": [sysconfig.get_paths()["stdlib"]]}
        read = record["domains"]["docstrings"]["packages"]
        assert {name: entry["version"] for name, entry in read.items()} == packages
        assert all(entry["files"] > 0 for entry in read.values())
