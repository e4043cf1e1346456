"""What a pick of pool rows is made of, against what the data is known to hold: the share of a
target domain and of junk rows, and the planted near-duplicate pairs (`Pool.near_duplicates`:
(original, copy) document ids, e.g. of the synthetic corpus) that it keeps whole.

These are the known answers a selector is checked against: a target-aware selector should pick
more of the target domain than the candidates hold, a quality filter less junk, a deduplicator
fewer whole pairs.
"""

from __future__ import annotations

import numpy as np

JUNK = "junk"  # The label of junk rows (`jaxsel.data.synthetic`'s ground truth).


def shares(pool, ids, target_domain: str) -> dict:
    """`rows`, `target` (the share of rows of `target_domain`; None without one) and `junk` (the
    share of rows labelled junk; None when the pool has no such label) of rows `ids`."""
    ids = np.asarray(ids, np.int64)
    out = {"rows": int(ids.size), "target": None, "junk": None}
    if target_domain:
        index = pool.domain_names.index(target_domain)
        out["target"] = float(np.mean(np.asarray(pool.domains)[ids] == index))
    if JUNK in pool.label_names:
        out["junk"] = float(np.mean(np.asarray(pool.labels)[ids] == pool.label_names.index(JUNK)))
    return out


def whole_pairs(pool, ids) -> np.ndarray:
    """The planted (original, copy) pairs `[P, 2]` both of whose documents are in rows `ids`."""
    docs = pool.doc_ids(ids)
    pairs = pool.near_duplicates
    return pairs[np.isin(pairs[:, 0], docs) & np.isin(pairs[:, 1], docs)]


def dedup_quality(pool, candidates, kept) -> dict:
    """How well removing rows `candidates \\ kept` removed the planted near-duplicates:
    `pairs` (whole among the candidates), `recall` (the share of those that `kept` no longer
    holds whole), `precision` (the share of removed rows that hold a document of one of those
    pairs) and `removed` (rows). Precision and recall are None when there is nothing to divide
    by."""
    candidates, kept = np.asarray(candidates, np.int64), np.asarray(kept, np.int64)
    removed = np.setdiff1d(candidates, kept)
    pairs = whole_pairs(pool, candidates)
    still = {tuple(p) for p in whole_pairs(pool, kept).tolist()}
    hits = sum(bool(np.isin(pool.doc_ids([row]), pairs).any()) for row in removed.tolist())
    return {"pairs": int(len(pairs)), "removed": int(removed.size),
            "recall": 1 - sum(tuple(p) in still for p in pairs.tolist()) / len(pairs)
            if len(pairs) else None,
            "precision": hits / removed.size if removed.size and len(pairs) else None}
