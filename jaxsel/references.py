"""Reference sets: the rows whose next-token losses a probe or an evaluation reads, with the
positions that count and their weights.

A perplexity reference (`from_rows`, e.g. of pool ids) and LAMBADA-style cloze items (`cloze`,
`cloze_from_pool`: only the last word's tokens count) are both a `Reference`, so one loss
function (`probe.reference_loss`, `evaluate`) serves both and runs the LM head at the positions
that count alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.struct
import jax
import numpy as np

from jaxsel import loss
from jaxsel.data import tokenizer as tokenizer_lib

Array = jax.Array


@flax.struct.dataclass
class Reference:
    """A reference set: rows `tokens_RxL`, `segments_RxL` int32, and in each row K positions
    `positions_RxK` int32 with weights `weights_RxK` float32.

    Weight `weights_RxK[r, j]` weights the loss of predicting token `t + 1` from position
    `t = positions_RxK[r, j]`; as everywhere, only pairs inside one document count
    (`loss.next_token_targets`), whatever their weight. The reference loss is the weighted mean of
    those token losses over the whole set. Rows with fewer positions pad with weight 0.
    `from_weights` builds one from a dense `[R, L]` weight per position, keeping only the pairs
    that count (K = the most of any row), so the LM head runs where a loss is read and nowhere
    else.
    """

    tokens_RxL: Array
    segments_RxL: Array
    positions_RxK: Array
    weights_RxK: Array

    @classmethod
    def from_weights(cls, tokens_RxL, segments_RxL, weights_RxL) -> Reference:
        """The positions of `weights_RxL` (numpy, [R, L]) with a positive weight and a target."""
        tokens_RxL, segments_RxL = np.asarray(tokens_RxL), np.asarray(segments_RxL)
        weights_RxL = np.asarray(weights_RxL, np.float32)
        if not tokens_RxL.shape == segments_RxL.shape == weights_RxL.shape or \
                tokens_RxL.ndim != 2:
            raise ValueError(f"reference: tokens {tokens_RxL.shape}, segments "
                             f"{segments_RxL.shape} and weights {weights_RxL.shape} must be [R, L] "
                             "arrays of one shape")
        _, mask_RxL = loss.next_token_targets(tokens_RxL, segments_RxL)
        counts_RxL = np.asarray(mask_RxL) & (weights_RxL > 0)
        width = max(int(counts_RxL.sum(1).max(initial=0)), 1)
        # A stable sort puts each row's counted positions first, in order; the rest is padding.
        positions_RxK = np.argsort(~counts_RxL, axis=1, kind="stable")[:, :width]
        weights_RxK = np.where(np.take_along_axis(counts_RxL, positions_RxK, 1),
                               np.take_along_axis(weights_RxL, positions_RxK, 1), 0.0)
        return cls(tokens_RxL.astype(np.int32), segments_RxL.astype(np.int32),
                   positions_RxK.astype(np.int32), weights_RxK.astype(np.float32))


def from_rows(rows: Mapping[str, np.ndarray]) -> Reference:
    """A perplexity reference: every next-token loss of `rows` (e.g. `pool.rows(ids)`) counts."""
    tokens, segments = check_token_rows(rows, "rows")
    return Reference.from_weights(tokens, segments, np.ones(tokens.shape, np.float32))


def cloze(rows: Mapping[str, np.ndarray], tokenizer, max_len: int = 0) -> Reference:
    """LAMBADA-style cloze items: in each row only the tokens of its last whole word count.

    The target of a row is the last word that is followed, inside the row and the same document,
    by a word boundary (a token starting with whitespace or punctuation, or the end-of-document
    token), so a word cut by the end of the row is never a target; the preceding tokens of its
    document are the context. A word starts at a token that begins with whitespace, as byte-level
    BPE tokenizes; that whitespace belongs to the target, as in LAMBADA's context / continuation
    split. With `max_len` (0: the whole row), each item keeps only the `max_len` tokens that end
    with its target (right-padded with segment 0 when shorter), as LAMBADA's passages are short:
    the context is what comes before the target inside that window. Rows without such a word
    after at least one context token are dropped; if none is left, a ValueError names `rows`.
    """
    tokens, segments = check_token_rows(rows, "rows")
    tokens, segments = np.asarray(tokens), np.asarray(segments)
    if max_len < 0 or max_len == 1:
        raise ValueError(f"max_len must be 0 (whole rows) or >= 2, got {max_len}")
    width = tokens.shape[1] if max_len == 0 else min(max_len, tokens.shape[1])
    items = {"tokens": [], "segments": [], "weights": []}
    for r in range(tokens.shape[0]):
        pieces = tokenizer.decode_batch([[int(t)] for t in tokens[r]])
        span = _last_word_span(pieces, segments[r])
        if span is None:
            continue
        start, end = span
        first = max(0, end + 1 - width)
        if first >= start:  # No context left in the window.
            continue
        weights = np.zeros(tokens.shape[1], np.float32)
        weights[start - 1:end] = 1.0  # Position t predicts token t + 1.
        window = slice(first, first + width)
        for name, row in (("tokens", tokens[r]), ("segments", segments[r]),
                          ("weights", weights)):
            items[name].append(np.pad(row[window], (0, width - len(row[window]))))
    if not items["tokens"]:
        raise ValueError(f"rows: none of the {tokens.shape[0]} rows has a whole last word after "
                         "some context")
    return Reference.from_weights(*(np.stack(items[k]) for k in ("tokens", "segments",
                                                                  "weights")))


def cloze_from_pool(pool, ids, max_items: int, max_len: int = 0) -> Reference:
    """Cloze items (`cloze`, at most `max_len` tokens each) from the first `max_items`
    of rows `ids` of `pool` (e.g. a held-out role's rows, `roles.Roles.rows`), decoded with the
    pool's own tokenizer."""
    ids = np.asarray(ids, np.int64)[:max_items]
    if max_items < 1 or not ids.size:
        raise ValueError(f"cloze items need max_items >= 1 and some rows, got {max_items} and "
                         f"{ids.size} rows")
    tokenizer = tokenizer_lib.load_tokenizer(pool.tokenizer_path)
    return cloze(pool.rows(ids), tokenizer, max_len)


def _last_word_span(pieces: Sequence[str], segments_L: np.ndarray) -> tuple[int, int] | None:
    """(first, last) token index of the row's last whole word with context, or None."""
    end = len(pieces) - 2  # The last token has no known boundary after it.
    while end >= 1:
        seg = segments_L[end]
        after = pieces[end + 1]
        bounded = segments_L[end + 1] == seg and (
            after == "" or after[0].isspace() or not (after[0].isalnum() or after[0] == "\ufffd"))
        if seg == 0 or not bounded or not any(ch.isalnum() for ch in pieces[end]):
            end -= 1
            continue
        start = end  # The word starts at a token beginning with whitespace.
        while start >= 1 and segments_L[start - 1] == seg and not pieces[start][:1].isspace():
            start -= 1
        if start >= 1 and segments_L[start - 1] == seg and pieces[start][:1].isspace():
            return start, end
        end = start - 1
    return None


def check_token_rows(rows, name: str, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`rows["tokens"]`, `rows["segments"]` after checking they are [N, L] with N >= 1 (and
    L = seq_len); reads no data, so memory-mapped pools and `Pool.view`s stay on disk."""
    if not isinstance(rows, Mapping) or not {"tokens", "segments"} <= set(rows):
        raise ValueError(f"{name}: expected a mapping with 'tokens' and 'segments' arrays")
    tokens, segments = (x if hasattr(x, "shape") else np.asarray(x)
                        for x in (rows["tokens"], rows["segments"]))
    if tokens.ndim != 2 or tokens.shape != segments.shape:
        raise ValueError(f"{name}: tokens {tokens.shape} and segments {segments.shape} must be "
                         "[N, L] arrays of one shape")
    if tokens.shape[0] == 0:
        raise ValueError(f"{name}: empty (0 sequences)")
    if seq_len is not None and tokens.shape[1] != seq_len:
        raise ValueError(f"{name}: sequences have {tokens.shape[1]} tokens but the run's "
                         f"config.data.seq_len is {seq_len}")
    return tokens, segments
