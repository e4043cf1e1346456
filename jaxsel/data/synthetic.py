"""The synthetic corpus: a seeded generator with known structure, for tests of selectors.

Domains with different statistics, near-duplicates that name the document they copy
(`Document.copy_of`), and junk documents, each labelled with the truth (`Document.label`).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterator

import numpy as np

from jaxsel.data.readers import Document


@dataclasses.dataclass(frozen=True)
class _Domain:
    """A domain's statistics: words drawn from its own alphabet with a Zipf law, in a template."""

    name: str
    alphabet: str
    vocab_size: int
    zipf: float
    template: str  # "prose" | "code" | "table"
    # Words per token of the template's text under a BPE trained on this corpus (measured at
    # vocab 2048), to size documents in tokens.
    words_per_token: float


DOMAINS = (
    _Domain("prose", "abcdefgh", 2000, 1.1, "prose", 0.68),
    _Domain("code", "ijklmnop", 600, 1.4, "code", 0.41),
    _Domain("tables", "qrstuvwxyz", 200, 1.8, "table", 0.22),
)
CLEAN, NEAR_DUPLICATE, JUNK = "clean", "near_duplicate", "junk"  # The labels.


def documents(seed: int, docs_per_domain: int, seq_len: int) -> Iterator[Document]:
    """A seeded corpus with known structure, for tests of selectors.

    Domains `prose`, `code`, `tables` differ in alphabet, vocabulary size, Zipf exponent and
    template, so their token statistics are clearly different. Each has `docs_per_domain`
    documents of 65-95% of a `seq_len` sequence (in tokens, roughly). A tenth of them (at least
    one) are near-duplicates: a copy of another document of the domain with ~5% of its words
    changed, label "near_duplicate", `copy_of` the id of the document it copies, placed at a
    random position in the domain. All other documents, the originals included, are "clean".
    The `junk` domain holds `docs_per_domain // 4` (at least one) junk documents, label "junk":
    alternately random character soup and one short unit repeated.
    """
    if docs_per_domain < 2:
        raise ValueError(f"data.synthetic_docs_per_domain must be >= 2, got {docs_per_domain}")
    doc_id = 0
    for index, spec in enumerate(DOMAINS):
        rng = np.random.default_rng([seed, index])
        first = doc_id
        for text, label, copy_of in _domain_docs(spec, rng, docs_per_domain, seq_len):
            yield Document(doc_id, text, spec.name, label, -1 if copy_of < 0 else first + copy_of)
            doc_id += 1
    rng = np.random.default_rng([seed, len(DOMAINS)])
    for i in range(max(1, docs_per_domain // 4)):
        text = _junk_soup(rng, seq_len) if i % 2 == 0 else _junk_repeat(rng, seq_len)
        yield Document(doc_id, text, JUNK, JUNK)
        doc_id += 1


def _doc_fraction(rng: np.random.Generator) -> float:
    """A document's length as a fraction of a sequence: most rows then hold one main document."""
    return rng.uniform(0.65, 0.95)


def _domain_docs(spec: _Domain, rng: np.random.Generator, n_docs: int,
                 seq_len: int) -> list[tuple[str, str, int]]:
    """`(text, label, copy_of)` in the domain's order; `copy_of` is the position (in that order)
    of the document a near-duplicate copies, -1 for the others."""
    vocab = _pseudo_words(spec.alphabet, spec.vocab_size, rng)
    probs = 1.0 / np.arange(1, len(vocab) + 1) ** spec.zipf
    probs /= probs.sum()
    n_dups = max(1, n_docs // 10)
    clean = []
    for _ in range(n_docs - n_dups):
        n_words = max(4, int(seq_len * _doc_fraction(rng) * spec.words_per_token))
        words = [vocab[i] for i in rng.choice(len(vocab), size=n_words, p=probs)]
        clean.append(_render(spec.template, words, rng))
    originals = rng.choice(len(clean), size=min(n_dups, len(clean)), replace=False)
    dups = [_perturb(clean[i], vocab, rng) for i in originals]
    docs = [(t, CLEAN, -1) for t in clean] + [
        (t, NEAR_DUPLICATE, int(i)) for t, i in zip(dups, originals, strict=True)]
    order = rng.permutation(len(docs))
    position = np.argsort(order)  # position[j]: where docs[j] lands.
    return [(text, label, -1 if source < 0 else int(position[source]))
            for text, label, source in (docs[j] for j in order)]


def _pseudo_words(alphabet: str, n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct random words of 2-8 letters from `alphabet`."""
    words: dict[str, None] = {}
    while len(words) < n:
        ends = np.cumsum(rng.integers(2, 9, size=n))
        letters = "".join(rng.choice(list(alphabet), size=int(ends[-1])))
        for start, end in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True):
            words.setdefault(letters[start:end])
    return list(words)[:n]


def _render(template: str, words: list[str], rng: np.random.Generator) -> str:
    """Lays words out in the domain's template; words stay space-separated tokens."""
    out: list[str] = []
    i = 0
    while i < len(words):
        if template == "prose":
            n = int(rng.integers(6, 18))
            sentence = words[i:i + n]
            out.append(" ".join([sentence[0].capitalize()] + sentence[1:]) + ".")
        elif template == "code":
            n = 4
            w = (words[i:i + n] + words[:n])[:n]
            out.append(f"{w[0]} = {w[1]} ( {w[2]} , {w[3]} )\n")
        else:
            n = 2
            w = (words[i:i + n] + words[:n])[:n]
            a, b = rng.integers(0, 1000, size=2)
            out.append(f"{w[0]} {w[1]} | {a} | {b / 7:.2f}\n")
        i += n
    return " ".join(out)


def _perturb(text: str, vocab: list[str], rng: np.random.Generator) -> str:
    """A near-duplicate: ~5% (at least one) of the vocabulary words replaced by other words."""
    tokens = text.split(" ")
    index = {w: i for i, w in enumerate(vocab)}
    positions = [i for i, t in enumerate(tokens) if t in index]
    for i in rng.choice(positions, size=max(1, len(positions) // 20), replace=False):
        shift = int(rng.integers(1, len(vocab)))  # Never 0: the word always changes.
        tokens[i] = vocab[(index[tokens[i]] + shift) % len(vocab)]
    return " ".join(tokens)


def _junk_soup(rng: np.random.Generator, seq_len: int) -> str:
    """Random printable characters (about one token each)."""
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    return "".join(rng.choice(chars, size=int(seq_len * _doc_fraction(rng))))


def _junk_repeat(rng: np.random.Generator, seq_len: int) -> str:
    """One short random unit repeated (about 2 tokens per repeat)."""
    unit = "".join(rng.choice(list(string.ascii_lowercase + "#*=~"), size=int(rng.integers(1, 5))))
    return " ".join([unit] * int(seq_len * _doc_fraction(rng) / 2))
