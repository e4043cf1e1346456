"""Cloze and multiple-choice evals against hand-written loops of full forwards; `losses_at` against
full logits; perplexity and bits per byte of a pool of multi-byte text against a hand computation;
a planted signal; 8 devices against one; bad input."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from jaxsel import evaluate, loss, probe, references, tasks, train
from jaxsel.data import pool as pool_lib
from jaxsel.data import tokenizer as tokenizer_lib
from tests.workers import probe_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_FIELDS = [f.name for f in dataclasses.fields(tasks.MultipleChoice)][:7]
CLOZE_FIELDS = [f.name for f in dataclasses.fields(references.Reference)]

# Evaluates saved params, cloze items and a task on a 2 x 4 (data x fsdp) mesh of 8 devices.
EIGHT_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jaxsel import evaluate, references, tasks, train
    from tests.workers import probe_worker
    data = np.load(sys.argv[1])
    trainer = train.Trainer(probe_worker.tiny_config(data=2, fsdp=4))
    structure = jax.tree.structure(trainer.abstract_params())
    params = jax.device_put(jax.tree.unflatten(
        structure, [data[f"param_{i}"] for i in range(structure.num_leaves)]),
        trainer.param_shardings)
    items = references.Reference(*(data[f"cloze_{k}"] for k in sys.argv[3].split(",")))
    mc = tasks.MultipleChoice(*(data[f"mc_{k}"] for k in sys.argv[4].split(",")))
    cloze = evaluate.cloze_accuracy(trainer, params, items, 8, per_item=True)
    choice = evaluate.multiple_choice(trainer, params, mc, 24, per_item=True)
    np.savez(sys.argv[2], cloze_loss=cloze["loss"], correct_I=cloze["correct_I"],
             loglik_C=choice["loglik_C"], pred_I=choice["pred_I"])
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The synthetic corpus' held-out pool; a tiny model at init and after 300 steps on the
    held-out prose (so it knows those documents); cloze items and a continuation task made of
    them; the 8-device worker evaluating the trained model (started at once, it runs while this
    process compiles)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    config = probe_worker.tiny_config()
    config.optim.update(lr=1e-2, schedule="constant")
    config.train.steps = 300
    config.data.update(source="synthetic", synthetic_docs_per_domain=120, heldout_fraction=0.5,
                       cache_dir=str(tmp / "cache"))
    heldout = pool_lib.build_pools(config)["heldout"]
    trainer = train.Trainer(config)
    fresh = trainer.init_params(config.seed)
    state = trainer.new_state(fresh)
    rng = np.random.default_rng(0)
    prose = heldout.ids_of_domain("prose")
    for _ in range(config.train.steps):
        batch = heldout.rows(rng.choice(prose, probe_worker.BATCH))
        state, _ = trainer.train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    cloze = references.cloze_from_pool(heldout, prose, 40)
    mc = tasks.continuation_task(heldout, prose, 32, 4, context_len=8, continuation_len=4,
                                 seed=0)
    inputs, eight = tmp / "inputs.npz", tmp / "eight.npz"
    np.savez(inputs, **{f"param_{i}": np.asarray(x)
                        for i, x in enumerate(jax.tree.leaves(state.params))},
             **{f"cloze_{k}": getattr(cloze, k) for k in CLOZE_FIELDS},
             **{f"mc_{k}": getattr(mc, k) for k in MC_FIELDS})
    worker = subprocess.Popen(
        [sys.executable, "-c", EIGHT_DEVICES, str(inputs), str(eight), ",".join(CLOZE_FIELDS),
         ",".join(MC_FIELDS)], cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"})
    try:
        yield dict(trainer=trainer, fresh=fresh, params=state.params, heldout=heldout,
                   cloze=cloze, mc=mc, worker=worker, eight=eight)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def _full_logp(model, params, tokens_BxL, segments_BxL):
    """log-softmax of a plain full-logit forward, float32."""
    return jax.nn.log_softmax(model.apply(params, tokens_BxL, segments_BxL).astype(jnp.float32))


_full_logp_jit = jax.jit(_full_logp, static_argnums=0)


def _multibyte_texts(rng, count: int) -> list[str]:
    """Short documents of words with 1- to 4-byte UTF-8 characters (rare random CJK characters
    and emoji among them, which a small BPE leaves split into byte tokens), each starting with an
    ASCII word."""
    words = ["the", "data", "café", "naïve", "Größe", "ñandú", "Ωμέγα", "東京", "😀"]
    docs = []
    for _ in range(count):
        picked = [str(w) for w in rng.choice(words, int(rng.integers(4, 8)))]
        picked.append(chr(0x4E00 + int(rng.integers(3000))) + chr(0x1F300 + int(rng.integers(200))))
        rng.shuffle(picked)
        docs.append("Doc " + " ".join(picked))
    return docs


def test_bits_per_byte_equals_hand_computation(tmp_path):
    """On a pool of multi-byte text: a row's scored bytes are the UTF-8 bytes of the decoded text
    of its next-token targets (every token of its document after the first; `<eos>` decodes to
    nothing), and per domain and over all rows, perplexity = exp(nats / tokens) and bits per
    byte = nats / bytes / ln 2, the nats summed from a plain forward's token log-probabilities."""
    texts = _multibyte_texts(np.random.default_rng(0), 48)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "domain": f"d{i % 2}"}) + "\n"
                            for i, t in enumerate(texts)))
    config = probe_worker.tiny_config()
    config.data.update(source="jsonl", paths=(str(path),), domain_field="domain",
                       packing="document", heldout_fraction=0.5,
                       cache_dir=str(tmp_path / "cache"))
    heldout = pool_lib.build_pools(config)["heldout"]
    tokenizer = tokenizer_lib.load_tokenizer(heldout.tokenizer_path)
    trainer = train.Trainer(config)
    params = trainer.init_params(1)
    ids = np.arange(len(heldout))
    rows = heldout.rows(ids)
    logp = np.asarray(_full_logp_jit(trainer.model, params, rows["tokens"], rows["segments"]))
    nats, tokens, bytes_, chars = (np.zeros(len(ids)) for _ in range(4))
    split_char = False
    for r in ids:
        n = int((rows["segments"][r] > 0).sum())
        assert set(rows["segments"][r][:n].tolist()) == {1}  # One whole document per row.
        row = rows["tokens"][r][:n].tolist()
        text = texts[int(heldout.doc_ids_of(r)[0])]
        first, scored = tokenizer.decode(row[:1]), tokenizer.decode(row[1:])
        assert first + scored == text and row[-1] == tokenizer_lib.eos_id(tokenizer)
        bytes_[r], chars[r] = len(scored.encode("utf-8")), len(scored)
        nats[r] = -sum(logp[r, t, row[t + 1]] for t in range(n - 1))
        tokens[r] = n - 1
        split_char |= any("\ufffd" in tokenizer.decode([t]) for t in row[1:])
    assert split_char  # Some tokens hold part of a character: decoding them alone would miscount.
    assert (bytes_ > chars).all()  # Multi-byte characters in every row.
    domains = np.asarray(heldout.domains)
    want_ppl, want_bpb = {}, {}
    for name, mask in [*((n, domains == i) for i, n in enumerate(heldout.domain_names)),
                       ("all", domains >= 0)]:
        want_ppl[name] = math.exp(nats[mask].sum() / tokens[mask].sum())
        want_bpb[name] = nats[mask].sum() / bytes_[mask].sum() / math.log(2)
    assert len(want_ppl) == 3
    got = evaluate.scores_by_domain(trainer, params, heldout, ids, batch_size=5)
    assert got["perplexity"] == pytest.approx(want_ppl, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(want_bpb, rel=1e-5)
    np.testing.assert_array_equal(evaluate.scored_bytes(heldout, ids, chunk_rows=3), bytes_)


def test_no_bits_per_byte_without_a_byte_level_tokenizer():
    """A tokenizer whose ids stand for no fixed bytes (here word-level) gives no bits per byte;
    perplexity is unchanged."""
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    assert tokenizer_lib.token_bytes(word_level) is None
    sums = np.array([[2.0, 4.0], [3.0, 2.0]])
    got = evaluate.domain_scores(sums, None, np.array([0, 1]), ["x", "y", "z"])
    assert got["bits_per_byte"] == {}
    assert got["perplexity"] == pytest.approx(
        {"x": math.exp(0.5), "y": math.exp(1.5), "all": math.exp(5 / 6)})


def test_losses_at_equals_full_logits(run):
    model, params = run["trainer"].model, run["params"]
    rows = run["heldout"].rows(np.arange(6))
    tokens, segments = rows["tokens"], rows["segments"].copy()
    segments[5, 20:] = 0  # Padding, and pairs across documents, among the positions.
    positions = np.random.default_rng(1).integers(0, tokens.shape[1], (6, 9)).astype(np.int32)
    losses, correct, mask = jax.jit(loss.losses_at, static_argnums=0)(
        model, params, tokens, segments, positions)
    logits = jax.jit(model.apply)(params, tokens, segments)
    full_losses, full_mask = loss.token_losses(logits, tokens, segments)
    take = lambda x: np.take_along_axis(np.asarray(x), positions, 1)  # noqa: E731
    np.testing.assert_allclose(losses, take(full_losses), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask, take(full_mask) > 0)
    assert 0 < np.asarray(mask).mean() < 1
    targets = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    np.testing.assert_array_equal(correct, take(np.argmax(logits, -1) == targets))
    assert 0 < np.asarray(correct).mean() < 1


def test_cloze_accuracy_equals_loop(run):
    trainer, params, cloze = run["trainer"], run["params"], run["cloze"]
    correct = []
    for r in range(len(cloze.tokens_RxL)):
        tokens, segments = cloze.tokens_RxL[r:r + 1], cloze.segments_RxL[r:r + 1]
        logp = np.asarray(_full_logp_jit(trainer.model, params, tokens, segments))[0]
        counted = cloze.positions_RxK[r][cloze.weights_RxK[r] > 0]
        correct.append(all(np.argmax(logp[t]) == tokens[0, t + 1] for t in counted))
    got = evaluate.cloze_accuracy(trainer, params, cloze, batch_size=7, per_item=True)
    np.testing.assert_array_equal(got["correct_I"], correct)
    assert got["accuracy"] == np.mean(correct) and got["items"] == len(correct)
    p, n = np.mean(correct), len(correct)
    assert got["accuracy_stderr"] == pytest.approx(np.sqrt(p * (1 - p) / (n - 1)))
    assert 0 < got["accuracy"] < 1  # A comparison with both outcomes.
    reference_loss = jax.jit(lambda p, ref: probe.reference_loss(trainer.model, p, ref, 4))
    assert got["loss"] == pytest.approx(float(reference_loss(params, cloze)), rel=1e-5)
    one = evaluate.cloze_accuracy(trainer, params, cloze, batch_size=1)
    assert one["accuracy"] == got["accuracy"]
    assert one["loss"] == pytest.approx(got["loss"], rel=1e-6)


def _loop_multiple_choice(model, params, items, tokenizer, seq_len):
    """Per item, each choice's log-likelihood from a full forward of its own context + choice
    (lm-evaluation-harness' split, cut to `seq_len` on the left); argmax and length-normalised
    argmax."""
    logliks, pred, pred_norm = [], [], []
    for context, choices, _ in items:
        stripped = context.rstrip()
        context_ids = tokenizer.encode(stripped, add_special_tokens=False).ids
        scores = []
        for choice in choices:
            whole = tokenizer.encode(stripped + context[len(stripped):] + " " + choice,
                                     add_special_tokens=False).ids
            choice_ids = whole[len(context_ids):]
            ids = (context_ids + choice_ids)[-seq_len:]
            # Padded to one shape (one compile): causal attention keeps padding out of `ids`.
            tokens = np.zeros((1, seq_len), np.int32)
            tokens[0, :len(ids)] = ids
            segments = (np.arange(seq_len) < len(ids))[None].astype(np.int32)
            logp = np.asarray(_full_logp_jit(model, params, tokens, segments))[0]
            start = len(ids) - len(choice_ids)
            scores.append(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))
        logliks += scores
        pred.append(np.argmax(scores))
        pred_norm.append(np.argmax(np.array(scores) / [len(c) for c in choices]))
    return np.array(logliks), np.array(pred), np.array(pred_norm)


def test_multiple_choice_equals_loop(run):
    trainer, params, heldout = run["trainer"], run["params"], run["heldout"]
    tokenizer = tokenizer_lib.load_tokenizer(heldout.tokenizer_path)
    rows = heldout.rows(heldout.ids_of_domain("prose")[:6])
    words = [w for r in rows["tokens"] for w in tokenizer.decode(r.tolist()).split()]
    rng = np.random.default_rng(2)
    items = []
    for i in range(8):  # Contexts of 3-40 words (some cut), 2-4 choices of 1-4 words.
        context = " ".join(words[i * 7:i * 7 + int(rng.integers(3, 40))])
        choices = [" ".join(rng.choice(words, int(rng.integers(1, 5))))
                   for _ in range(int(rng.integers(2, 5)))]
        items.append((context, choices, int(rng.integers(len(choices)))))
    seq_len = 32
    mc = tasks.multiple_choice_from_texts(items, tokenizer, seq_len)
    assert mc.num_items == 8 and mc.truncated > 0
    logliks, pred, pred_norm = _loop_multiple_choice(trainer.model, params, items, tokenizer,
                                                     seq_len)
    got = evaluate.multiple_choice(trainer, params, mc, batch_size=5, per_item=True)
    np.testing.assert_allclose(got["loglik_C"], logliks, rtol=1e-5)
    np.testing.assert_array_equal(got["pred_I"], pred)
    np.testing.assert_array_equal(got["pred_norm_I"], pred_norm)
    assert got["acc"] == np.mean(pred == mc.answers_I) and got["items"] == 8
    assert got["acc_norm"] == np.mean(pred_norm == mc.answers_I)
    for field in ("acc", "acc_norm"):
        p = got[field]
        assert got[f"{field}_stderr"] == pytest.approx(np.sqrt(p * (1 - p) / 7))
    assert not np.array_equal(pred, pred_norm)  # Lengths matter here.
    one = evaluate.multiple_choice(trainer, params, mc, batch_size=1, per_item=True)
    np.testing.assert_array_equal(one["pred_I"], got["pred_I"])
    np.testing.assert_array_equal(one["pred_norm_I"], got["pred_norm_I"])


def test_acc_and_acc_norm_differ_by_construction(run):
    """Choice 1 extends choice 0, so its log-likelihood is lower (acc picks 0); dividing by a
    length 1000 times larger makes its normalised score higher (acc_norm picks 1)."""
    mc = tasks.multiple_choice_from_tokens([([5, 6, 7], [[8], [8, 9, 10]], 1)], seq_len=8)
    mc = dataclasses.replace(mc, choice_lengths_C=np.array([1.0, 1000.0], np.float32))
    got = evaluate.multiple_choice(run["trainer"], run["fresh"], mc, 2, per_item=True)
    assert got["loglik_C"][1] < got["loglik_C"][0] < 0
    assert (got["acc"], got["acc_norm"]) == (0.0, 1.0)
    assert got["acc_stderr"] is None  # One item: no standard error.


def test_continuation_task_planted_signal(run):
    """At init, accuracy is chance (1/4, within 3 binomial standard deviations); a model trained
    on the documents the task is made of picks their true continuations far more often."""
    trainer, mc = run["trainer"], run["mc"]
    fresh = evaluate.multiple_choice(trainer, run["fresh"], mc, 16)
    trained = evaluate.multiple_choice(trainer, run["params"], mc, 16)
    chance, n = 0.25, mc.num_items
    assert abs(fresh["acc"] - chance) <= 3 * np.sqrt(chance * (1 - chance) / n)
    assert fresh["acc_norm"] == fresh["acc"]  # Equal-length choices.
    assert trained["acc"] >= 0.7 and trained["acc"] > fresh["acc"] + 0.3


def test_eight_devices_match_one_device(run):
    trainer, params = run["trainer"], run["params"]
    cloze = evaluate.cloze_accuracy(trainer, params, run["cloze"], 8, per_item=True)
    choice = evaluate.multiple_choice(trainer, params, run["mc"], 24, per_item=True)
    assert run["worker"].wait(timeout=300) == 0
    eight = np.load(run["eight"])
    np.testing.assert_array_equal(eight["correct_I"], cloze["correct_I"])
    np.testing.assert_array_equal(eight["pred_I"], choice["pred_I"])
    np.testing.assert_allclose(eight["loglik_C"], choice["loglik_C"], rtol=1e-5)
    assert float(eight["cloze_loss"]) == pytest.approx(cloze["loss"], rel=1e-5)


def test_bad_input_names_the_argument(run, monkeypatch):
    trainer, params, cloze, mc = run["trainer"], run["params"], run["cloze"], run["mc"]
    empty = cloze.replace(**{k: np.asarray(getattr(cloze, k))[:0] for k in CLOZE_FIELDS})
    with pytest.raises(ValueError, match="items: needs"):
        evaluate.cloze_accuracy(trainer, params, empty, 4)
    pad = trainer.model.cfg.max_seq_len - cloze.tokens_RxL.shape[1] + 1
    longer = cloze.replace(**{k: np.pad(getattr(cloze, k), ((0, 0), (0, pad)))
                              for k in ("tokens_RxL", "segments_RxL")})
    with pytest.raises(ValueError, match="items: rows have .* max_seq_len"):
        evaluate.cloze_accuracy(trainer, params, longer, 4)
    with pytest.raises(ValueError, match="items: token ids"):
        evaluate.cloze_accuracy(trainer, params, cloze.replace(tokens_RxL=cloze.tokens_RxL + 512),
                                4)
    with pytest.raises(ValueError, match="items: positions"):
        evaluate.cloze_accuracy(trainer, params,
                                cloze.replace(positions_RxK=cloze.positions_RxK + 32), 4)
    weights = np.asarray(cloze.weights_RxK).copy()
    weights[3] = 0
    with pytest.raises(ValueError, match="items: row 3 has no next-token target"):
        evaluate.cloze_accuracy(trainer, params, cloze.replace(weights_RxK=weights), 4)
    for batch_size in (0, -4):
        with pytest.raises(ValueError, match="batch_size"):
            evaluate.multiple_choice(trainer, params, mc, batch_size)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of the 2"):
        evaluate.cloze_accuracy(trainer, params, cloze, 3)
    monkeypatch.undo()
    nothing = tasks.multiple_choice_from_tokens([([], [[1]], 0)], 8)
    with pytest.raises(ValueError, match="mc: no items"):
        evaluate.multiple_choice(trainer, params, nothing, 4)
    with pytest.raises(ValueError, match="mc: answers_I"):
        evaluate.multiple_choice(trainer, params,
                                 dataclasses.replace(mc, answers_I=mc.answers_I + 4), 4)
    with pytest.raises(ValueError, match="mc: item_C"):
        evaluate.multiple_choice(trainer, params, dataclasses.replace(mc, item_C=mc.item_C[::-1]),
                                 4)
