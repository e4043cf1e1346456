"""MinHash-LSH dedup: shingles by hand, near-duplicates removed against exact Jaccard, bad input."""

import numpy as np
import pytest

from jaxsel import minhash


def _jaccard(a, b):
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def test_shingles_are_lowercased_word_ngrams():
    assert minhash.shingles("The cat, the CAT sat", 3) == sorted(
        [b"the cat the", b"cat the cat", b"the cat sat"])
    assert minhash.shingles("two words", 3) == [b"two words"]
    assert minhash.shingles(" -- ", 3) == []


def test_dedup_removes_the_near_duplicates_exact_jaccard_finds():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(400)]
    originals = [list(rng.choice(vocab, 60)) for _ in range(30)]
    texts = [" ".join(words) for words in originals]
    for i in range(10):  # A near copy of each of the first 10: 1 word in 30 changed.
        words = list(originals[i])
        words[::30] = ["changed"] * len(words[::30])
        texts.append(" ".join(words))
    texts.append("")
    kept, info = minhash.dedup(texts, threshold=0.7, shingle_size=3)
    sets = [minhash.shingles(t, 3) for t in texts]
    exact = [j for j in range(30, 40) if _jaccard(sets[j], sets[j - 30]) >= 0.7]
    assert len(exact) == 10
    assert sorted(set(range(41)) - set(kept.tolist())) == exact
    assert info == {"empty": 1, "removed": 10}
    # Distinct texts are never removed; the order decides which of a pair stays.
    kept_reversed, _ = minhash.dedup(texts[::-1], threshold=0.7, shingle_size=3)
    assert len(kept_reversed) == 31


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 0.0}, "threshold must be in"), ({"threshold": 1.5}, "threshold must be in"),
    ({"shingle_size": 0}, "shingle_size >= 1"), ({"num_perm": 1}, "num_perm >= 2")])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        minhash.dedup(["a b c"], **kwargs)
