"""The synthetic corpus: deterministic per seed, with the structure it claims."""

import collections
import re

from jaxsel.data import synthetic


def test_synthetic_is_deterministic_per_seed():
    def texts(seed):
        return [(d.doc_id, d.text, d.domain, d.label, d.copy_of)
                for d in synthetic.documents(seed, 20, 64)]

    assert texts(3) == texts(3)
    assert texts(3) != texts(4)


def test_synthetic_has_the_structure_it_claims():
    per_domain, seq_len = 30, 128
    docs = list(synthetic.documents(0, per_domain, seq_len))
    by_domain = collections.defaultdict(list)
    for d in docs:
        by_domain[d.domain].append(d)
    names = [s.name for s in synthetic.DOMAINS]
    assert list(by_domain) == names + ["junk"] and len(names) >= 3
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    by_id = {d.doc_id: d for d in docs}

    letters = {}
    for name in names:
        domain_docs = by_domain[name]
        labels = collections.Counter(d.label for d in domain_docs)
        assert labels == {"clean": per_domain - per_domain // 10,
                          "near_duplicate": per_domain // 10}
        for dup in (d for d in domain_docs if d.label == "near_duplicate"):
            # Its original: a clean document of the same domain, same length, a few words changed.
            original = by_id[dup.copy_of]
            assert original.label == "clean" and original.domain == name
            words, original_words = dup.text.split(" "), original.text.split(" ")
            diffs = sum(a != b for a, b in zip(words, original_words, strict=True))
            assert 1 <= diffs <= 0.1 * len(words)
        assert all(d.copy_of == -1 for d in domain_docs if d.label == "clean")
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
