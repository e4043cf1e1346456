"""MinHash-LSH near-duplicate removal over word shingles (datasketch's `MinHash`, `MinHashLSH`).

A text's shingles are its lower-cased word n-grams (`shingle_size` words; a text shorter than
that is one shingle). Texts are visited in order: a text whose estimated Jaccard similarity to
a text already kept reaches `threshold` is a near-duplicate and is removed; otherwise it is kept
and indexed. The LSH index only proposes the pairs to compare (its bands are tuned to
`threshold`); every removal is confirmed on the MinHash estimate. A text with no word has no
shingle: it is kept and counted, never compared.
"""

from __future__ import annotations

import re

import numpy as np
from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+")


def shingles(text: str, shingle_size: int) -> list[bytes]:
    """The distinct lower-cased word `shingle_size`-grams of `text`, UTF-8, sorted."""
    words = _WORD.findall(text.lower())
    if len(words) <= shingle_size:
        return [" ".join(words).encode()] if words else []
    return sorted({" ".join(words[i:i + shingle_size]).encode()
                   for i in range(len(words) - shingle_size + 1)})


def dedup(texts: list[str], threshold: float = 0.7, shingle_size: int = 3, num_perm: int = 128,
          seed: int = 1) -> tuple[np.ndarray, dict]:
    """The positions of `texts` kept (ascending) and `{"empty": texts without a word,
    "removed": count}`."""
    if not 0 < threshold <= 1:
        raise ValueError(f"minhash threshold must be in (0, 1], got {threshold}")
    if shingle_size < 1 or num_perm < 2:
        raise ValueError(f"minhash needs shingle_size >= 1 and num_perm >= 2, got "
                         f"{shingle_size} and {num_perm}")
    sets = [shingles(text, shingle_size) for text in texts]
    hashes = MinHash.bulk(sets, num_perm=num_perm, seed=seed)
    index = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept, empty = [], 0
    for i, (words, minhash) in enumerate(zip(sets, hashes, strict=True)):
        if not words:
            empty += 1
        elif any(hashes[j].jaccard(minhash) >= threshold for j in index.query(minhash)):
            continue
        else:
            index.insert(i, minhash)
        kept.append(i)
    return np.asarray(kept, np.int64), {"empty": empty, "removed": len(texts) - len(kept)}
