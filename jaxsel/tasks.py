"""Zero-shot evaluation tasks as arrays, independent of any model.

A multiple-choice task (`MultipleChoice`) has one row per (item, choice) pair: the item's context
followed by the choice as its continuation, in one document (segment 1; 0 pads the row). Only the
choice's tokens count, exactly as in a `references.Reference` row: weight 1 at position `t` scores
predicting token `t + 1`, so a choice's log-likelihood is minus the sum of its token losses given
the context. `jaxsel.evaluate.multiple_choice` scores it as lm-evaluation-harness does.

Builders:
- `multiple_choice_from_texts`: `(context, choices, answer)` items (ARC, SciQ, PIQA, HellaSwag...
  exported with `load_jsonl`'s format), tokenized as lm-evaluation-harness does.
- `multiple_choice_from_tokens`: the same from token ids.
- `continuation_task`: a HellaSwag-like task on a pool, with no download.

Bad items are skipped and counted by reason in the task's `skipped`, never raised and never
dropped silently; contexts cut to fit are counted in `truncated`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping

import numpy as np

from jaxsel import files

Item = tuple  # (context, choices, answer): str / list[str], or token ids / list of token ids.


@dataclasses.dataclass(frozen=True, eq=False)
class MultipleChoice:
    """A multiple-choice task, one row per (item, choice) pair, items' rows consecutive in order.

    - `tokens_CxL`, `segments_CxL` int32: context + choice, segment 1, then padding (segment 0).
    - `positions_CxK` int32, `weights_CxK` float32: the positions that predict the choice's
      tokens (weight 1; rows with a shorter choice pad with position 0, weight 0).
    - `item_C` int32: the item of each row (0, 0, 0, 1, 1, ...); a row's choice index is its
      rank among its item's rows.
    - `answers_I` int32: the correct choice of each item.
    - `choice_lengths_C` float32: the length acc_norm divides a choice's log-likelihood by: its
      number of characters (Python `len` of the choice text, without the delimiter), as
      lm-evaluation-harness's `acc_norm`; its number of tokens where the task has no text.
    - `skipped`: items left out, by reason; `truncated`: items whose context was cut on the left
      to fit the row.
    """

    tokens_CxL: np.ndarray
    segments_CxL: np.ndarray
    positions_CxK: np.ndarray
    weights_CxK: np.ndarray
    item_C: np.ndarray
    answers_I: np.ndarray
    choice_lengths_C: np.ndarray
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    truncated: int = 0

    @property
    def num_items(self) -> int:
        return len(self.answers_I)


def load_jsonl(path: str | os.PathLike) -> tuple[list[Item], collections.Counter]:
    """Items from a file of JSON lines `{"context": str, "choices": [str, ...], "answer": int}`
    (other keys are ignored), and the lines skipped by reason: `bad_utf8`, `bad_json` (not a JSON
    object) or `missing_field`. Blank lines are ignored. The values are checked by the builder;
    pass it these counts (`skipped=`) to carry them into the task."""
    items, skipped = [], collections.Counter()
    with files.path(path).open("rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["bad_utf8"] += 1
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                skipped["bad_json"] += 1
            elif not {"context", "choices", "answer"} <= set(record):
                skipped["missing_field"] += 1
            else:
                items.append((record["context"], record["choices"], record["answer"]))
    return items, skipped


def multiple_choice_from_texts(items: Iterable[Item], tokenizer, seq_len: int,
                               target_delimiter: str = " ",
                               skipped: Mapping[str, int] | None = None) -> MultipleChoice:
    """A task from `(context: str, choices: list[str], answer: int)` items.

    As lm-evaluation-harness (`target_delimiter` and `_encode_pair`): a choice is scored as the
    continuation `target_delimiter + choice` of the context (so choices are given without their
    leading space); whitespace ending the context moves to the start of the continuation; the
    continuation's tokens are those of `encode(context + continuation)` after the first
    `len(encode(context))`. `tokenizer` is a `tokenizers.Tokenizer` (no special tokens added).
    acc_norm divides by `len(choice)`. A context too long for `seq_len` loses tokens on the left
    (see `multiple_choice_from_tokens`).

    Skipped items (counted in `skipped`, added to the given counts): `bad_type`, `empty_context`
    (only whitespace), `no_choices`, `empty_choice`, `answer_out_of_range`, and those of
    `multiple_choice_from_tokens`.
    """
    skipped = collections.Counter(skipped or {})
    kept = []  # (context without its final whitespace, continuations, answer, choice lengths)
    for context, choices, answer in items:
        reason = _bad_fields(context, choices, answer, lambda x: isinstance(x, str))
        if reason is None and not context.strip():
            reason = "empty_context"
        if reason is None and not all(choices):
            reason = "empty_choice"
        if reason is not None:
            skipped[reason] += 1
            continue
        stripped = context.rstrip()
        moved = context[len(stripped):]
        kept.append((stripped, [moved + target_delimiter + c for c in choices], answer,
                     [len(c) for c in choices]))
    contexts_ids = _encode(tokenizer, [context for context, *_ in kept])
    wholes_ids = iter(_encode(tokenizer, [context + continuation
                                          for context, continuations, *_ in kept
                                          for continuation in continuations]))
    encoded = [(context_ids, [next(wholes_ids)[len(context_ids):] for _ in continuations],
                answer, lengths)
               for context_ids, (_, continuations, answer, lengths)
               in zip(contexts_ids, kept, strict=True)]
    return _pack(encoded, seq_len, skipped)


def multiple_choice_from_tokens(items: Iterable[Item], seq_len: int,
                                skipped: Mapping[str, int] | None = None) -> MultipleChoice:
    """A task from `(context_ids, [choice_ids, ...], answer)` items; acc_norm divides by a
    choice's number of tokens.

    Each row holds the context's last `seq_len - len(choice)` tokens (items cut so are counted in
    `truncated`) and the whole choice. Skipped items (counted in `skipped`, added to the given
    counts): `bad_type`, `empty_context`, `no_choices`, `empty_choice` (no tokens),
    `answer_out_of_range`, and `choice_too_long`: a choice of `seq_len` tokens or more leaves no
    context token to predict its first token from, and the item is left out whole (scoring the
    other choices alone would change the question).
    """
    skipped = collections.Counter(skipped or {})
    encoded = []
    for context, choices, answer in items:
        reason = _bad_fields(context, choices, answer, _is_ids)
        if reason is None and len(context) == 0:
            reason = "empty_context"
        if reason is None and not all(len(c) for c in choices):
            reason = "empty_choice"
        if reason is not None:
            skipped[reason] += 1
            continue
        encoded.append(([int(t) for t in context], [[int(t) for t in c] for c in choices],
                        answer, [len(c) for c in choices]))
    return _pack(encoded, seq_len, skipped)


def continuation_task(pool, ids, num_items: int, num_choices: int, context_len: int,
                      continuation_len: int, seed: int) -> MultipleChoice:
    """A HellaSwag-like task made from rows `ids` of a pool (e.g. a held-out domain's eval rows),
    with no download.

    A row's window is the first `context_len + continuation_len` tokens of the first document in
    it that has that many tokens in the row. The windows of the first `num_items` rows of `ids`
    that have one are the items: the context is the window's first `context_len` tokens, the
    correct choice its next `continuation_len` tokens, and the `num_choices - 1` distractors
    other items' continuations, drawn with `seed` among those that differ from the correct one
    and from each other; the correct choice's index is drawn with `seed` too. Rows are
    `context_len + continuation_len` tokens, one document each; acc_norm equals acc (all choices
    have `continuation_len` tokens). Items without enough distinct distractors are skipped and
    counted (`too_few_distinct_continuations`).
    """
    for name, value, least in (("num_items", num_items, 1), ("num_choices", num_choices, 2),
                               ("context_len", context_len, 1),
                               ("continuation_len", continuation_len, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    width = context_len + continuation_len
    if width > pool.seq_len:
        raise ValueError(f"context_len + continuation_len = {width} is more than the pool's "
                         f"rows ({pool.seq_len} tokens)")
    if num_items < num_choices:
        raise ValueError(f"num_items ({num_items}) must be >= num_choices ({num_choices}): the "
                         "distractors are other items' continuations")
    windows_NxW = _row_windows(pool, np.asarray(ids, np.int64), width, num_items)
    if len(windows_NxW) < num_items:
        raise ValueError(f"num_items: only {len(windows_NxW)} of the {len(ids)} rows have a "
                         f"document of {width} tokens; ask for fewer items or shorter windows")
    contexts_NxC, continuations_NxT = windows_NxW[:, :context_len], windows_NxW[:, context_len:]
    rng = np.random.default_rng(seed)
    items, skipped = [], collections.Counter()
    for i in range(num_items):
        choices = [continuations_NxT[i]]
        for j in rng.permutation(num_items):
            if len(choices) == num_choices:
                break
            if all((continuations_NxT[j] != c).any() for c in choices):
                choices.append(continuations_NxT[j])
        if len(choices) < num_choices:
            skipped["too_few_distinct_continuations"] += 1
            continue
        answer = int(rng.integers(num_choices))
        choices[0], choices[answer] = choices[answer], choices[0]
        items.append((contexts_NxC[i], choices, answer))
    return multiple_choice_from_tokens(items, width, skipped)


def _row_windows(pool, ids: np.ndarray, width: int, limit: int) -> np.ndarray:
    """[<= limit, width]: in each row of `ids`, in order, the first `width` tokens of its first
    document with that many tokens in the row (rows without one give none; rows are read a
    chunk at a time)."""
    windows = []
    for start in range(0, len(ids), 256):
        rows = pool.rows(ids[start:start + 256])
        for tokens_L, segments_L in zip(rows["tokens"], rows["segments"], strict=True):
            for segment in np.unique(segments_L[segments_L > 0]):
                columns = np.flatnonzero(segments_L == segment)
                if columns.size >= width:
                    windows.append(tokens_L[columns[0]:columns[0] + width])
                    break
            if len(windows) == limit:
                return np.stack(windows)
    return np.stack(windows) if windows else np.zeros((0, width), np.int32)


def _bad_fields(context, choices, answer, is_piece) -> str | None:
    """Why an item's fields are unusable, or None: the context and every choice must pass
    `is_piece`, choices be a non-empty list or tuple, and answer an int indexing them."""
    if not is_piece(context) or not isinstance(choices, list | tuple) or \
            not all(is_piece(c) for c in choices) or \
            not isinstance(answer, int | np.integer) or isinstance(answer, bool):
        return "bad_type"
    if not choices:
        return "no_choices"
    if not 0 <= answer < len(choices):
        return "answer_out_of_range"
    return None


def _is_ids(x) -> bool:
    """A 1-D sequence of integer token ids (possibly empty)."""
    if isinstance(x, str | bytes):
        return False
    try:
        x = np.asarray(x)
    except (TypeError, ValueError):
        return False
    return x.ndim == 1 and (x.size == 0 or x.dtype.kind in "iu")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _pack(encoded: list, seq_len: int, skipped: collections.Counter) -> MultipleChoice:
    """Rows of `(context_ids, [choice_ids], answer, [choice_length])` items that fit `seq_len`."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a context token and a choice token), got "
                         f"{seq_len}")
    kept, truncated = [], 0
    for context, choices, answer, lengths in encoded:
        if not all(len(c) for c in choices):
            skipped["empty_choice"] += 1  # A continuation that encodes to no token of its own.
        elif max(len(c) for c in choices) >= seq_len:
            skipped["choice_too_long"] += 1
        else:
            truncated += len(context) + max(len(c) for c in choices) > seq_len
            kept.append((context, choices, answer, lengths))
    num_rows = sum(len(choices) for _, choices, _, _ in kept)
    width = max((len(c) for _, choices, _, _ in kept for c in choices), default=1)
    tokens_CxL = np.zeros((num_rows, seq_len), np.int32)
    segments_CxL = np.zeros((num_rows, seq_len), np.int32)
    positions_CxK = np.zeros((num_rows, width), np.int32)
    weights_CxK = np.zeros((num_rows, width), np.float32)
    item_C = np.zeros(num_rows, np.int32)
    row = 0
    for item, (context, choices, _, _) in enumerate(kept):
        for choice in choices:
            context_part = context[-(seq_len - len(choice)):]
            n_context, n_choice = len(context_part), len(choice)
            tokens_CxL[row, :n_context + n_choice] = context_part + choice
            segments_CxL[row, :n_context + n_choice] = 1
            positions_CxK[row, :n_choice] = np.arange(n_context - 1, n_context - 1 + n_choice)
            weights_CxK[row, :n_choice] = 1.0
            item_C[row] = item
            row += 1
    return MultipleChoice(
        tokens_CxL, segments_CxL, positions_CxK, weights_CxK, item_C,
        answers_I=np.array([answer for _, _, answer, _ in kept], np.int32),
        choice_lengths_C=np.array([n for *_, lengths in kept for n in lengths], np.float32),
        skipped=dict(sorted(skipped.items())), truncated=int(truncated))
