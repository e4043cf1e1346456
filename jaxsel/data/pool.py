"""The pool: documents tokenized once and packed into fixed-length sequences on disk.

A pool row is the selection unit: `seq_len` tokens from one domain, with per-token segment ids
(1, 2, 3, ... numbering the documents in the row; a document continued from the previous row
starts again at a new number; 0 only for padding) so attention and loss never cross a document
boundary. Documents are packed back to back (`data.packing = "concat"`: only a domain's last row
is padded), or each from the start of a row (`"document"`: its last row is padded). Each row keeps
its domain, a label (that of most of its tokens) and the ids of the documents in it.

Documents are split into train / held-out deterministically by a hash of their id. Held-out
documents are further dealt into `data.heldout_groups` document groups by a second hash of their
id, and each (domain, group) is packed on its own, so no held-out row holds documents of two
groups: the held-out roles (`jaxsel.roles`: target / target_eval / eval) are unions of groups, and
therefore never share a document. Both splits are built (`jaxsel.data.build`) in one streaming
pass into a temporary folder that is renamed into place when complete, under a key that hashes
everything the pool is built from; a second `build_pools` with the same inputs reads the cached
pool without reading the source. A source that yields no document, or a
split that gets none, stops the build with an error and leaves no pool behind.

Layout of a pool folder: `tokenizer.json`, and per split (`train/`, `heldout/`): `tokens.npy`,
`segments.npy` [N, L] int32, `domains.npy`, `labels.npy`, `groups.npy` (the held-out document
group of each row; 0 in train) [N] int32, `doc_offsets.npy` [N+1] and
`doc_ids.npy` [M] int64 (CSR: the doc ids of row i are `doc_ids[doc_offsets[i]:doc_offsets[i+1]]`),
and `pool.json`, the build report (for the local corpus it records what was read: each domain's
roots, or its packages with their installed versions); `near_duplicates.npy` [P, 2] int64, the
(original, copy) document ids of the near-duplicates the source planted (the synthetic corpus;
empty for real sources).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxsel import files
from jaxsel.data import build, sources
from jaxsel.data import tokenizer as tokenizer_lib
from jaxsel.data.build import FORMAT_VERSION, SPLITS

_ARRAYS = ("tokens", "segments", "domains", "labels", "groups", "doc_offsets", "doc_ids")


class Pool:
    """One split of a built pool, memory-mapped read-only.

    Attributes: `tokens`, `segments` [N, L] int32; `domains` [N] int32 indexing `domain_names`;
    `labels` [N] int32 indexing `label_names`; `groups` [N] int32, the held-out document group of
    each row (0 in train); `path` (the split's folder); `report` (pool.json);
    `tokenizer_path` (the tokenizer.json the pool was tokenized with); `token_bytes` (read on
    first use).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.report: dict[str, Any] = json.loads((self.path / "pool.json").read_text())
        arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        self.tokens: np.ndarray = arrays["tokens"]
        self.segments: np.ndarray = arrays["segments"]
        self.domains: np.ndarray = arrays["domains"]
        self.labels: np.ndarray = arrays["labels"]
        self.groups: np.ndarray = arrays["groups"]
        self._doc_offsets: np.ndarray = arrays["doc_offsets"]
        self._doc_ids: np.ndarray = arrays["doc_ids"]
        self.domain_names: list[str] = self.report["domain_names"]
        self.label_names: list[str] = self.report["label_names"]
        self.tokenizer_path = self.path.parent / "tokenizer.json"
        # (original, copy) document ids of planted near-duplicates, over both splits.
        self.near_duplicates: np.ndarray = np.load(self.path.parent / "near_duplicates.npy")

    @property
    def key(self) -> str:
        """`<pool folder>/<split>`: names this pool's content (the folder is keyed by its inputs),
        for the keys of what is computed from it (`stream.Target`)."""
        return f"{self.path.parent.name}/{self.path.name}"

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @functools.cached_property
    def token_bytes(self) -> np.ndarray | None:
        """[V] int64: the UTF-8 bytes each token id stands for in the text (0 for `<eos>` and
        `<pad>`), or None if the pool's tokenizer is not byte-level (`tokenizer.token_bytes`)."""
        return tokenizer_lib.token_bytes(tokenizer_lib.load_tokenizer(self.tokenizer_path))

    def doc_ids_of(self, i: int) -> np.ndarray:
        """The ids of the documents in row `i`, in order."""
        return np.asarray(self._doc_ids[self._doc_offsets[i]:self._doc_offsets[i + 1]])

    def doc_ids(self, ids) -> np.ndarray:
        """The distinct ids (sorted) of the documents in rows `ids`."""
        ids = np.asarray(ids, np.int64)
        starts = np.asarray(self._doc_offsets[ids])
        counts = self._doc_offsets[ids + 1] - starts
        # Entry j of row i sits at starts[i] + j: each row's offsets, then 0, 1, ... within it.
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.unique(self._doc_ids[np.repeat(starts, counts) + within])

    def ids_of_domain(self, name: str) -> np.ndarray:
        """The row ids of domain `name`."""
        if name not in self.domain_names:
            raise ValueError(f"domain {name!r} is not in this pool; domains: {self.domain_names}")
        return np.flatnonzero(self.domains == self.domain_names.index(name))

    def domain_counts(self, ids) -> dict[str, int]:
        """How many of rows `ids` each domain holds (domains with none left out)."""
        counts = np.bincount(self.domains[np.asarray(ids)], minlength=len(self.domain_names))
        return {name: int(c) for name, c in zip(self.domain_names, counts, strict=True) if c}

    def rows(self, ids) -> dict[str, np.ndarray]:
        """`tokens` and `segments` [len(ids), L] int32 of rows `ids` (one fancy-indexed read)."""
        return {"tokens": files.read_rows(self.tokens, np.asarray(ids)),
                "segments": files.read_rows(self.segments, np.asarray(ids))}

    def view(self, ids) -> dict[str, RowsView]:
        """`tokens` and `segments` of rows `ids` as `RowsView`s: read only where indexed, so a
        computation over many rows holds a batch of them at a time."""
        return {"tokens": RowsView(self.tokens, ids), "segments": RowsView(self.segments, ids)}


class RowsView:
    """Rows `ids` of a (memory-mapped) `[N, L]` array, read when indexed: `view[idx]` is the
    array's rows `ids[idx]`; `shape`, `ndim`, `dtype` and `len` are those of the selection."""

    def __init__(self, array: np.ndarray, ids):
        self.array, self.ids = array, np.asarray(ids, np.int64)
        self.shape = (len(self.ids), *array.shape[1:])
        self.ndim, self.dtype = array.ndim, array.dtype

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx) -> np.ndarray:
        return files.read_rows(self.array, self.ids[idx])


def cache_root(data_config) -> str:
    """`data.cache_dir`, else `$JAXSEL_CACHE`, else `~/.cache/jaxsel`; local or remote (`gs://`:
    pools are then built in, and read from, a local mirror, `files.mirror`)."""
    root = data_config.cache_dir or os.environ.get("JAXSEL_CACHE") or "~/.cache/jaxsel"
    return root if files.is_remote(root) else os.path.expanduser(root)


def build_pools(config) -> dict[str, Pool]:
    """The train and held-out pools of `config.data`, built once and then read from the cache."""
    d = config.data
    folder = os.path.join(cache_root(d), "pools", f"{d.source}-{pool_key(config)}")
    if not files.is_complete(folder):
        build.build(config, folder, cache_root(d))
    pools = {split: Pool(Path(files.mirror(folder)) / split) for split in SPLITS}
    vocab = pools["train"].report["vocab_size"]
    if vocab > config.model.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the pool's "
                         f"tokenizer vocabulary ({vocab}, {folder})")
    return pools


def pool_key(config) -> str:
    """A hash of everything a pool is built from: the source (file list with sizes and mtimes, or
    the generator's parameters), the split, seq_len, the tokenizer and the format version."""
    d = config.data
    if d.tokenizer:
        path = tokenizer_lib.tokenizer_file(d)
        tokenizer = ["file", hashlib.sha256(path.read_bytes()).hexdigest()]
    else:
        tokenizer = ["bpe", config.model.vocab_size, tokenizer_lib.MAX_TRAIN_CHARS]
    seed = config.seed if d.source == "synthetic" else None
    parts = dict(format=FORMAT_VERSION, source=sources.source_fingerprint(d, seed=seed),
                 seq_len=d.seq_len, heldout_fraction=d.heldout_fraction,
                 heldout_groups=d.heldout_groups, packing=d.packing, tokenizer=tokenizer)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
