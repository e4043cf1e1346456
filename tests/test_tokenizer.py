"""Tokenizer: byte-level BPE training, exact round trips, caching, loading, size checks."""

import pytest

from jaxsel import config as config_lib
from jaxsel.data import tokenizer as tokenizer_lib

TEXTS = [f"def f{i}(x):\n    return x * {i}  # häufig, ÿ, 日本\n" for i in range(200)] + \
    ["The quick brown fox jumps over the lazy dog. " * 3] * 50


def _data_config(**overrides):
    c = config_lib.base_config("tiny").data
    c.update(overrides)
    return c


def _train(tmp_path, texts=TEXTS, vocab_size=300, **overrides):
    return tokenizer_lib.load_or_train_tokenizer(
        _data_config(**overrides), vocab_size, lambda: iter(texts), tmp_path)


def test_trained_tokenizer_round_trips_text_exactly_with_special_ids(tmp_path):
    tok = _train(tmp_path)
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("<eos>") == 1
    assert tokenizer_lib.eos_id(tok) == 1
    assert 256 < tok.get_vocab_size() <= 300
    for text in ["  leading spaces\ttabs\nnew lines  ", "unseen: ∑ 🙂 Ωmega", TEXTS[3]]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert 0 not in ids and 1 not in ids
    # Merges were learnt: frequent text is shorter in tokens than in bytes.
    assert len(tok.encode(TEXTS[-1]).ids) < 0.8 * len(TEXTS[-1].encode())


def test_special_token_text_inside_a_document_is_plain_text(tmp_path):
    tok = _train(tmp_path)
    ids = tok.encode("before <eos> after <pad>").ids
    assert 1 not in ids and 0 not in ids
    assert tok.decode(ids) == "before <eos> after <pad>"


def test_saved_tokenizer_loads_back_identically(tmp_path):
    tok = _train(tmp_path / "cache")
    path = tmp_path / "tok.json"
    tokenizer_lib.save_atomically(tok, path)
    loaded = _train(tmp_path / "other", texts=["unused"], tokenizer=str(path))
    assert tokenizer_lib.tokenizer_hash(loaded) == tokenizer_lib.tokenizer_hash(tok)
    assert loaded.encode(TEXTS[7] + " <eos>").ids == tok.encode(TEXTS[7] + " <eos>").ids


def test_cache_hit_does_not_retrain_and_new_texts_do(tmp_path, monkeypatch):
    first = _train(tmp_path)
    cached = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(cached) == 1

    def fail(*args, **kwargs):
        raise AssertionError("retrained despite a cached tokenizer")

    monkeypatch.setattr(tokenizer_lib, "train_bpe", fail)
    second = _train(tmp_path)
    assert tokenizer_lib.tokenizer_hash(second) == tokenizer_lib.tokenizer_hash(first)
    monkeypatch.undo()
    _train(tmp_path, texts=TEXTS[:100])
    _train(tmp_path, vocab_size=280)
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 3
    assert not list((tmp_path / "tokenizers").glob("*.tmp"))


def test_training_is_deterministic(tmp_path):
    a, b = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert tokenizer_lib.tokenizer_hash(a) == tokenizer_lib.tokenizer_hash(b)


def test_too_large_tokenizer_names_model_vocab_size(tmp_path):
    path = tmp_path / "tok.json"
    tokenizer_lib.save_atomically(_train(tmp_path), path)
    with pytest.raises(ValueError, match="model.vocab_size=270"):
        _train(tmp_path, vocab_size=270, tokenizer=str(path))
    with pytest.raises(ValueError, match="model.vocab_size=100"):
        _train(tmp_path, vocab_size=100)


def test_missing_or_broken_tokenizer_file_names_data_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer"):
        _train(tmp_path, tokenizer=str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        _train(tmp_path, tokenizer=str(broken))
