"""Task builders against hand-written tokenization: lm-evaluation-harness' context / continuation
split, left truncation, bad items and lines counted by reason, jsonl round trip, and the
continuation task checked against the synthetic documents re-tokenized from scratch."""

import collections
import dataclasses
import json

import numpy as np
import pytest

from jaxsel import tasks
from jaxsel.data import pool as pool_lib
from jaxsel.data import sources
from jaxsel.data import tokenizer as tokenizer_lib
from tests.workers import probe_worker

TEXT = "The cat sat on the mat. A dog ran in the park. Café au lait, naïve résumé. " * 20


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_lib.train_bpe(iter([TEXT]), 300)


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


def _row_parts(mc, row):
    """(context ids, choice ids) of one row, read through its positions and weights."""
    counted = mc.positions_CxK[row][mc.weights_CxK[row] > 0]
    length = int((mc.segments_CxL[row] > 0).sum())
    tokens = list(mc.tokens_CxL[row, :length])
    assert list(counted) == list(range(counted[0], length - 1))  # The choice ends the row.
    return tokens[:counted[0] + 1], tokens[counted[0] + 1:]


def test_texts_are_split_like_lm_evaluation_harness(tokenizer):
    items = [("The cat sat on the", ["mat.", "park.", "résumé"], 2),
             ("A dog ran ", ["in", "on the mat"], 0)]  # Its trailing space joins the choice.
    mc = tasks.multiple_choice_from_texts(items, tokenizer, seq_len=24)
    assert mc.num_items == 2 and mc.skipped == {} and mc.truncated == 0
    np.testing.assert_array_equal(mc.item_C, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(mc.answers_I, [2, 0])
    # acc_norm's length: characters of the choice (lm-eval's `len(choice)`), not bytes or tokens.
    np.testing.assert_array_equal(mc.choice_lengths_C, [4, 5, 6, 2, 10])
    assert mc.tokens_CxL.shape == (5, 24) and mc.tokens_CxL.dtype == np.int32
    assert mc.positions_CxK.shape[1] == max(len(_row_parts(mc, r)[1]) for r in range(5))
    row = 0
    for context, choices, _ in items:
        stripped = context.rstrip()
        for choice in choices:
            continuation = context[len(stripped):] + " " + choice
            whole = _encode(tokenizer, stripped + continuation)
            expected_context = _encode(tokenizer, stripped)
            got_context, got_choice = _row_parts(mc, row)
            assert got_context == expected_context
            assert got_choice == whole[len(expected_context):]
            assert tokenizer.decode(got_choice) == continuation
            np.testing.assert_array_equal(mc.segments_CxL[row],
                                          np.arange(24) < len(got_context + got_choice))
            row += 1
    # Another delimiter: the choice follows the context directly.
    glued = tasks.multiple_choice_from_texts([("The cat", [" sat"], 0)], tokenizer, 24,
                                             target_delimiter="")
    assert tokenizer.decode(_row_parts(glued, 0)[1]) == " sat"


def test_long_contexts_are_cut_on_the_left_and_counted(tokenizer):
    long_context = "The cat sat on the mat. " * 10
    items = [(long_context, ["dog", "naïve résumé"], 1), ("A dog", ["ran"], 0),
             ("The cat", ["sat " * 30], 0)]  # A choice that cannot fit: skipped whole.
    seq_len = 16
    mc = tasks.multiple_choice_from_texts(items, tokenizer, seq_len)
    assert mc.num_items == 2 and mc.truncated == 1
    assert mc.skipped == {"choice_too_long": 1}
    context_ids = _encode(tokenizer, long_context.rstrip())
    for row, choice in enumerate(["dog", "naïve résumé"]):
        got_context, got_choice = _row_parts(mc, row)
        whole = _encode(tokenizer, long_context.rstrip() + "  " + choice)
        assert got_choice == whole[len(context_ids):]  # The choice intact,
        assert got_context == context_ids[-(seq_len - len(got_choice)):]  # the context's end.
        assert len(got_context) + len(got_choice) == seq_len
    assert _row_parts(mc, 2)[0] == _encode(tokenizer, "A dog")  # Short: untouched.


def test_bad_items_are_skipped_and_counted(tokenizer):
    good = ("The cat", ["sat", "ran"], 1)
    bad = [("", ["sat"], 0), ("   ", ["sat"], 0),  # empty_context
           ("The cat", [], 0),  # no_choices
           ("The cat", ["sat", ""], 0),  # empty_choice
           ("The cat", ["sat"], 1), ("The cat", ["sat"], -1),  # answer_out_of_range
           ("The cat", ["sat"], "0"), ("The cat", ["sat"], True), (None, ["sat"], 0),
           ("The cat", "sat", 0), ("The cat", ["sat", 3], 0)]  # bad_type
    mc = tasks.multiple_choice_from_texts([good, *bad, good], tokenizer, 16)
    assert mc.num_items == 2
    np.testing.assert_array_equal(mc.item_C, [0, 0, 1, 1])
    assert mc.skipped == {"answer_out_of_range": 2, "bad_type": 5, "empty_choice": 1,
                          "empty_context": 2, "no_choices": 1}
    empty = tasks.multiple_choice_from_texts(bad, tokenizer, 16)  # Nothing left: no crash.
    assert empty.num_items == 0 and empty.tokens_CxL.shape == (0, 16)
    assert sum(empty.skipped.values()) == len(bad)
    tokens = tasks.multiple_choice_from_tokens(
        [([5, 6], [[7], [8, 9]], 1), ([], [[7]], 0), ([5], [[7], []], 0), ([5], [[7]], 2),
         ("ab", [[7]], 0), (np.array([5, 6]), (np.array([7, 8]), [9]), np.int64(0))], 8)
    assert tokens.skipped == {"answer_out_of_range": 1, "bad_type": 1, "empty_choice": 1,
                              "empty_context": 1}
    np.testing.assert_array_equal(tokens.choice_lengths_C, [1, 2, 2, 1])  # Tokens, no text.
    np.testing.assert_array_equal(tokens.answers_I, [1, 0])
    with pytest.raises(ValueError, match="seq_len"):
        tasks.multiple_choice_from_tokens([([5], [[7]], 0)], 1)


def test_jsonl_round_trip_counts_bad_lines(tokenizer, tmp_path):
    items = [("The cat sat on the", ["mat.", "park."], 0), ("Café au", ["lait", "résumé"], 1)]
    path = tmp_path / "task.jsonl"
    lines = [json.dumps({"context": c, "choices": ch, "answer": a, "id": i}, ensure_ascii=False)
             for i, (c, ch, a) in enumerate(items)]
    lines[1:1] = ["{not json", "[1, 2]", "", json.dumps({"context": "x", "choices": ["y"]}),
                  json.dumps({"context": "x", "choices": ["y"], "answer": "0"})]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"context": "\xff"}\n')
    loaded, skipped = tasks.load_jsonl(path)
    assert skipped == collections.Counter(bad_json=2, missing_field=1, bad_utf8=1)
    assert [(c, list(ch), a) for c, ch, a in loaded[:1] + loaded[2:]] == \
        [(c, list(ch), a) for c, ch, a in items]
    mc = tasks.multiple_choice_from_texts(loaded, tokenizer, 24, skipped=skipped)
    assert mc.skipped == {"bad_json": 2, "bad_type": 1, "bad_utf8": 1, "missing_field": 1}
    direct = tasks.multiple_choice_from_texts(items, tokenizer, 24)
    for field in dataclasses.fields(tasks.MultipleChoice)[:7]:
        np.testing.assert_array_equal(getattr(mc, field.name), getattr(direct, field.name))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    config = probe_worker.tiny_config()
    config.data.update(source="synthetic", synthetic_docs_per_domain=120, heldout_fraction=0.5,
                       cache_dir=str(tmp_path_factory.mktemp("tasks") / "cache"))
    return config, pool_lib.build_pools(config)["heldout"]


def _hand_windows(pool, ids, width):
    """Per row, scanning token by token: the first run of `width` tokens of one segment."""
    out = []
    rows = pool.rows(ids)
    for tokens_L, segments_L in zip(rows["tokens"].tolist(), rows["segments"].tolist(),
                                    strict=True):
        run_start = 0
        for t in range(len(tokens_L)):
            if t and segments_L[t] != segments_L[t - 1]:
                run_start = t
            if segments_L[t] and t - run_start + 1 == width:
                out.append(tuple(tokens_L[run_start:t + 1]))
                break
    return out


def test_continuation_task_puts_each_documents_continuation_at_the_answer(synthetic):
    config, heldout = synthetic
    context_len, continuation_len, num_choices = 8, 4, 4
    prose = heldout.ids_of_domain("prose")
    mc = tasks.continuation_task(heldout, prose, 30, num_choices, context_len,
                                 continuation_len, seed=3)
    assert mc.num_items == 30 and mc.skipped == {} and mc.truncated == 0
    width = context_len + continuation_len
    assert mc.tokens_CxL.shape == (30 * num_choices, width)
    assert (mc.segments_CxL == 1).all()  # Context and choice in one document.
    np.testing.assert_array_equal(mc.item_C, np.repeat(np.arange(30), num_choices))
    np.testing.assert_array_equal(
        mc.positions_CxK, np.broadcast_to(np.arange(context_len - 1, width - 1), (120, 4)))
    assert (mc.weights_CxK == 1).all() and (mc.choice_lengths_C == continuation_len).all()
    # The truth, from scratch: each window is a run of the prose documents, tokenized as the
    # pool does (ending with the end-of-document token), and the items are the windows of the
    # first rows that have one.
    tokenizer = tokenizer_lib.load_tokenizer(heldout.tokenizer_path)
    eos = tokenizer_lib.eos_id(tokenizer)
    documents = [" ".join(map(str, _encode(tokenizer, doc.text) + [eos])) for doc in
                 sources.read_documents(config.data, collections.Counter(), seed=config.seed)
                 if doc.domain == "prose"]
    rows = mc.tokens_CxL.reshape(30, num_choices, width)
    contexts, choices = rows[:, :, :context_len], rows[:, :, context_len:]
    assert (contexts == contexts[:, :1]).all()
    truths = [tuple(choices[i, a]) for i, a in enumerate(mc.answers_I)]
    windows = _hand_windows(heldout, heldout.ids_of_domain("prose"), width)[:30]
    assert [tuple(contexts[i, 0]) + truths[i] for i in range(30)] == windows
    for i, answer in enumerate(mc.answers_I):
        window = " ".join(map(str, windows[i]))
        assert any(f" {window} " in f" {doc} " for doc in documents)
        others = [tuple(c) for j, c in enumerate(choices[i]) if j != answer]
        assert len(set(others + [truths[i]])) == num_choices  # Distinct choices,
        assert set(others) <= set(truths[:i] + truths[i + 1:])  # other items' continuations.
    assert len(set(mc.answers_I.tolist())) > 1  # The answer's place is drawn.
    again = tasks.continuation_task(heldout, prose, 30, num_choices, context_len,
                                    continuation_len, seed=3)
    np.testing.assert_array_equal(again.tokens_CxL, mc.tokens_CxL)
    other = tasks.continuation_task(heldout, prose, 30, num_choices, context_len,
                                    continuation_len, seed=4)
    assert not np.array_equal(other.answers_I, mc.answers_I)


def test_continuation_task_reads_the_given_rows_in_order(synthetic):
    _, heldout = synthetic
    ids = heldout.ids_of_domain("prose")[::-1][:40]  # Any rows, in the order given.
    mc = tasks.continuation_task(heldout, ids, 20, 4, 8, 4, seed=0)
    items = [tuple(r) for r in mc.tokens_CxL[mc.answers_I + 4 * np.arange(20)]]
    assert items == _hand_windows(heldout, ids, 12)[:20]


def test_continuation_task_bad_arguments(synthetic):
    _, heldout = synthetic
    prose = heldout.ids_of_domain("prose")
    for kwargs, name in [(dict(num_choices=1), "num_choices"), (dict(num_items=0), "num_items"),
                         (dict(context_len=0), "context_len"),
                         (dict(continuation_len=30), "context_len \\+ continuation_len"),
                         (dict(num_items=3), "num_items"), (dict(num_items=10_000), "num_items"),
                         (dict(ids=prose[:2]), "only .* of the 2 rows")]:
        args = dict(pool=heldout, ids=prose, num_items=8, num_choices=4, context_len=8,
                    continuation_len=4, seed=0) | kwargs
        with pytest.raises(ValueError, match=name):
            tasks.continuation_task(**args)
