"""Train or load a `tokenizers` BPE (tokenizer.json).

A trained tokenizer is byte-level BPE (every byte is in the vocabulary, so no text is unknown and
decoding reproduces the text exactly) with `<pad>` = 0 and `<eos>` = 1. It is cached under
`cache_dir` by a hash of the texts it was trained on and the vocabulary size, and saved atomically,
so the same training data always gives the same file and a killed run never leaves half of one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator

import numpy as np
import tokenizers
from etils import epath
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxsel import files

PAD, EOS = "<pad>", "<eos>"
SPECIAL_TOKENS = (PAD, EOS)  # In this order: ids 0 and 1.
# End-of-document tokens of common pretrained tokenizers, tried in order when loading one.
_EOS_CANDIDATES = (EOS, "<|endoftext|>", "</s>", "[SEP]")
# BPE training reads at most this many characters of the train split (a prefix, in order): more
# text changes the merges little and costs time and memory linearly.
MAX_TRAIN_CHARS = 200_000_000
_FORMAT_VERSION = 1


def load_or_train_tokenizer(data_config, vocab_size: int, texts: Callable[[], Iterator[str]],
                            cache_dir: str | os.PathLike) -> Tokenizer:
    """`data.tokenizer` if it names a tokenizer.json, else a byte-level BPE trained on `texts()`.

    `texts` returns a fresh iterator over the train split's texts each call (it is read once to
    hash, and again to train on a cache miss). Special tokens inside a document's text are
    encoded as ordinary text, so `<eos>` only ever marks the end of a document.
    """
    if data_config.tokenizer:
        path = tokenizer_file(data_config)
    else:
        path = _train_cached(vocab_size, texts, os.fspath(cache_dir))
    tokenizer = load_tokenizer(path)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({size} tokens, data.tokenizer={data_config.tokenizer!r})")
    return tokenizer


def tokenizer_file(data_config) -> epath.Path:
    """`data.tokenizer` (local or remote) as a path, checked to be a file."""
    path = files.path(data_config.tokenizer)
    if not path.is_file():
        raise ValueError(f"data.tokenizer={data_config.tokenizer!r}: no such file "
                         f"(expected a tokenizer.json)")
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer.json the way pools use it: special tokens inside text are plain text
    (`encode_special_tokens`, which tokenizer.json does not store)."""
    try:
        tokenizer = Tokenizer.from_str(files.path(path).read_text())
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file.
        raise ValueError(f"{str(path)!r} is not a valid tokenizer.json: {e}") from e
    tokenizer.encode_special_tokens = True
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    """The id that ends every document in a pool."""
    for token in _EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"data.tokenizer: the tokenizer has none of the end-of-document tokens "
                     f"{list(_EOS_CANDIDATES)}")


def token_bytes(tokenizer: Tokenizer) -> np.ndarray | None:
    """[V] int64: how many UTF-8 bytes each id adds to decoded text, or None when the tokenizer
    is not byte-level (its decoder is not `decoders.ByteLevel`), so no such fixed count exists.

    As the byte-level decoder decodes: special tokens add nothing (`decode` skips them); a token
    made of the byte alphabet's characters (`pre_tokenizers.ByteLevel.alphabet()`, one character
    per byte) adds one byte per character; any other token (an added token) adds its own UTF-8
    bytes. So the bytes of the text of any ids, even ids that cut a character, are the sum of
    theirs. Ids the vocabulary skips add nothing.
    """
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    out = np.zeros(max(vocab.values(), default=-1) + 1, np.int64)
    for token, i in vocab.items():
        if i not in special:
            out[i] = len(token) if set(token) <= alphabet else len(token.encode("utf-8"))
    return out


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, pre-tokenizer...)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def _train_cached(vocab_size: int, texts: Callable[[], Iterator[str]],
                  cache_dir: str) -> str:
    """The path of the cached tokenizer trained on `texts()`; trains and saves it on a miss."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"model.vocab_size={vocab_size}: a byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    digest = hashlib.sha256(f"{_FORMAT_VERSION}|{tokenizers.__version__}|{vocab_size}".encode())
    for text in _capped(texts()):
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    path = os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json")
    if not files.path(path).is_file():
        save_atomically(train_bpe(_capped(texts()), vocab_size), path)
    return path


def _capped(texts: Iterator[str]) -> Iterator[str]:
    total = 0
    for text in texts:
        if total >= MAX_TRAIN_CHARS:
            return
        yield text
        total += len(text)


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `<pad>` = 0 and `<eos>` = 1, trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_atomically(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Writes tokenizer.json via a temporary file and a rename: readers never see half a file."""
    with files.atomic_path(path) as tmp:
        tokenizer.save(tmp)
