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
therefore never share a document. Both splits
are built in one streaming pass into a temporary folder that is renamed into place when complete,
under a key that hashes everything the pool is built from; a second `build_pools` with the same
inputs reads the cached pool without reading the source. A source that yields no document, or a
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

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from jaxsel import files
from jaxsel.data import readers, sources
from jaxsel.data import tokenizer as tokenizer_lib

FORMAT_VERSION = 2
SPLITS = ("train", "heldout")
# Tokenize this many documents per `encode_batch` call (the Rust side runs them in parallel).
_ENCODE_BATCH = 256
# A domain's packer hands full rows to the writer once it holds this many tokens.
_FLUSH_TOKENS = 1 << 20
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
        _build(config, folder)
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


class Splitter:
    """Deterministic train / held-out assignment of documents read in order.

    A document is held out when a hash of its id falls below `heldout_fraction`; in addition, the
    second document of a domain is held out if none before it was, so every domain with at least
    two documents has a held-out one (and its first document is in train when the hash says so).
    """

    def __init__(self, heldout_fraction: float):
        self.heldout_fraction = heldout_fraction
        self._seen: collections.Counter = collections.Counter()
        self._has_heldout: set[str] = set()

    def is_heldout(self, doc: readers.Document) -> bool:
        position = self._seen[doc.domain]
        self._seen[doc.domain] += 1
        heldout = unit_hash(doc.doc_id) < self.heldout_fraction or (
            position == 1 and doc.domain not in self._has_heldout)
        if heldout:
            self._has_heldout.add(doc.domain)
        return heldout


def unit_hash(doc_id: int, salt: bytes = b"") -> float:
    """A uniform number in [0, 1) that depends only on `doc_id` (and `salt`: another stream)."""
    digest = hashlib.blake2b(int(doc_id).to_bytes(8, "little", signed=True), digest_size=8,
                             salt=salt)
    return int.from_bytes(digest.digest(), "little") / 2.0**64


def heldout_group(doc_id: int, num_groups: int) -> int:
    """The held-out document group (of `num_groups`) of a document: a hash of its id
    independent of the train / held-out one."""
    return int(unit_hash(doc_id, b"groups") * num_groups)


# ------------------------------------------------------------------------------------------------
# Packing.


@dataclasses.dataclass
class Rows:
    """Packed rows of one domain: tokens / segments [n, L], labels [n], and the doc ids of each
    row as `doc_counts` [n] (how many) and `doc_ids` (all of them, row after row)."""

    tokens: np.ndarray
    segments: np.ndarray
    labels: np.ndarray
    doc_counts: np.ndarray
    doc_ids: np.ndarray


class DomainPacker:
    """Packs one domain's documents (each `tokens + [eos]`) back to back into rows of `seq_len`."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._tokens: list[np.ndarray] = []  # One array per buffered document (or its rest).
        self._doc_ids: list[int] = []
        self._labels: list[int] = []
        self.pending = 0  # Buffered tokens.

    def add(self, tokens: np.ndarray, doc_id: int, label: int) -> None:
        self._tokens.append(tokens)
        self._doc_ids.append(doc_id)
        self._labels.append(label)
        self.pending += len(tokens)

    def pop_rows(self, final: bool) -> Rows | None:
        """The full rows buffered so far (and, if `final`, the last one padded with 0); the rest
        of a document cut by the last full row stays buffered for the next row."""
        L = self.seq_len
        n = -(-self.pending // L) if final else self.pending // L
        if n == 0:
            return None
        lengths = np.array([len(t) for t in self._tokens])
        flat = np.concatenate(self._tokens)
        doc_of_token = np.repeat(np.arange(len(lengths)), lengths)
        cut = min(n * L, len(flat))
        tokens_NxL = np.zeros(n * L, np.int32)
        tokens_NxL[:cut] = flat[:cut]
        doc_NxL = np.full(n * L, -1)
        doc_NxL[:cut] = doc_of_token[:cut]
        tokens_NxL, doc_NxL = tokens_NxL.reshape(n, L), doc_NxL.reshape(n, L)
        valid = doc_NxL >= 0
        segments_NxL = np.where(valid, doc_NxL - doc_NxL[:, :1] + 1, 0).astype(np.int32)
        labels = np.asarray(self._labels)
        label_NxL = np.where(valid, labels[np.maximum(doc_NxL, 0)], -1)
        first, last = doc_NxL[:, 0], doc_NxL.max(axis=1)
        doc_ids = np.asarray(self._doc_ids, np.int64)
        rows = Rows(tokens=tokens_NxL, segments=segments_NxL,
                    labels=_majority(label_NxL, labels.max() + 1),
                    doc_counts=last - first + 1,
                    doc_ids=np.concatenate([doc_ids[a:b + 1]
                                            for a, b in zip(first, last, strict=True)]))
        self._keep_rest(flat, lengths, cut)
        return rows

    def _keep_rest(self, flat: np.ndarray, lengths: np.ndarray, cut: int) -> None:
        ends = np.cumsum(lengths)
        k = int(np.searchsorted(ends, cut, side="right"))  # First document not fully packed.
        rest = [flat[cut:ends[k]]] if k < len(lengths) else []
        self._tokens = rest + self._tokens[k + 1:]
        self._doc_ids, self._labels = self._doc_ids[k:], self._labels[k:]
        self.pending = len(flat) - cut


def _majority(label_NxL: np.ndarray, num_labels: int) -> np.ndarray:
    """Per row, the label held by most tokens (-1 = padding is ignored; ties: lowest index)."""
    counts = np.stack([(label_NxL == k).sum(axis=1) for k in range(num_labels)], axis=1)
    return counts.argmax(axis=1).astype(np.int32)


class _SplitWriter:
    """Appends rows of one split to disk and finalizes them into .npy files.

    Tokens and segments stream to raw files (memory stays bounded by one flush); the per-row
    metadata is small and kept in memory.
    """

    def __init__(self, folder: Path, seq_len: int):
        self.folder, self.seq_len = folder, seq_len
        folder.mkdir(parents=True)
        self._raw = {name: (folder / f"{name}.bin").open("wb") for name in ("tokens", "segments")}
        self._meta: dict[str, list[np.ndarray]] = {"domains": [], "labels": [], "groups": [],
                                                   "doc_counts": [], "doc_ids": []}
        self.rows = 0

    def write(self, rows: Rows, domain: int, group: int) -> None:
        self._raw["tokens"].write(rows.tokens.tobytes())
        self._raw["segments"].write(rows.segments.tobytes())
        n = len(rows.tokens)
        self._meta["domains"].append(np.full(n, domain, np.int32))
        self._meta["groups"].append(np.full(n, group, np.int32))
        self._meta["labels"].append(rows.labels)
        self._meta["doc_counts"].append(rows.doc_counts)
        self._meta["doc_ids"].append(rows.doc_ids)
        self.rows += n

    def finalize(self) -> None:
        for name, f in self._raw.items():
            f.close()
            raw = self.folder / f"{name}.bin"
            src = np.memmap(raw, np.int32, "r", shape=(self.rows, self.seq_len)) if self.rows \
                else np.zeros((0, self.seq_len), np.int32)
            dst = np.lib.format.open_memmap(self.folder / f"{name}.npy", "w+", np.int32,
                                            (self.rows, self.seq_len))
            step = max(1, _FLUSH_TOKENS // self.seq_len)
            for start in range(0, self.rows, step):
                dst[start:start + step] = src[start:start + step]
            dst.flush()
            del src, dst
            raw.unlink()
        meta = {k: np.concatenate(v) if v else np.zeros(0, np.int64)
                for k, v in self._meta.items()}
        np.save(self.folder / "domains.npy", meta["domains"].astype(np.int32))
        np.save(self.folder / "labels.npy", meta["labels"].astype(np.int32))
        np.save(self.folder / "groups.npy", meta["groups"].astype(np.int32))
        offsets = np.concatenate([[0], np.cumsum(meta["doc_counts"])]).astype(np.int64)
        np.save(self.folder / "doc_offsets.npy", offsets)
        np.save(self.folder / "doc_ids.npy", meta["doc_ids"].astype(np.int64))


# ------------------------------------------------------------------------------------------------
# Building.


def _build(config, folder: str) -> None:
    """Builds both splits into a temporary folder and renames (or uploads) it to `folder` when
    complete."""
    d = config.data
    seed = config.seed if d.source == "synthetic" else None
    start = time.time()
    try:
        with files.atomic_path(folder) as tmp:
            tmp = Path(tmp)
            tmp.mkdir()
            _build_into(tmp, d, config.model.vocab_size, seed, key=os.path.basename(folder),
                        start=start)
    except OSError:
        if not files.is_complete(folder):  # Not a concurrent build of the same pool: an error.
            raise


def _build_into(tmp: Path, d, vocab_size: int, seed, *, key: str, start: float) -> None:
    def train_texts() -> Iterator[str]:
        splitter = Splitter(d.heldout_fraction)
        docs = sources.read_documents(d, collections.Counter(), seed=seed)
        return (doc.text for doc in docs if not splitter.is_heldout(doc))

    logging.info("pool %s: loading or training the tokenizer", key)
    tok = tokenizer_lib.load_or_train_tokenizer(d, vocab_size, train_texts, cache_root(d))
    tok.save(str(tmp / "tokenizer.json"))
    skipped: collections.Counter = collections.Counter()
    docs = sources.read_documents(d, skipped, seed=seed)
    stats = _pack(docs, tok, d, tmp)
    _check_splits(stats, d)
    np.save(tmp / "near_duplicates.npy", np.asarray(stats.near_duplicates, np.int64)
            .reshape(-1, 2))
    _write_reports(tmp, stats, skipped, d, tok, key=key, seconds=time.time() - start)


def _check_splits(stats: _BuildStats, d) -> None:
    """Stops the build if a split holds no document (a domain without held-out documents is
    fine: the held-out roles skip it)."""
    counts = {split: sum(c["documents"] for c in stats.per_domain[split].values())
              for split in SPLITS}
    total = sum(counts.values())
    if not counts["train"]:
        raise ValueError(
            f"The train split is empty: all {total} documents that data.source={d.source!r} "
            f"yielded were held out (data.heldout_fraction={d.heldout_fraction}), so there is "
            f"nothing to train on. Lower data.heldout_fraction or give the source more documents.")
    if not counts["heldout"]:
        cap = f" (data.max_docs={d.max_docs} caps each domain)" if d.max_docs else ""
        raise ValueError(
            f"The held-out split is empty: none of the {total} documents that "
            f"data.source={d.source!r} yielded was held out, so there is nothing to evaluate on. "
            f"Each of its {len(stats.domain_names)} domain(s) holds a single document (a "
            f"domain's second document is always held out) and none hashed below "
            f"data.heldout_fraction={d.heldout_fraction}. Raise data.heldout_fraction, or give "
            f"a domain at least two documents{cap}.")


@dataclasses.dataclass
class _BuildStats:
    domain_names: list[str]
    label_names: list[str]
    documents_read: int
    # split -> domain -> {"documents", "tokens", "sequences"}; split -> label -> sequences.
    per_domain: dict[str, dict[str, collections.Counter]]
    per_label: dict[str, collections.Counter]
    near_duplicates: list[tuple[int, int]]  # (original, copy) document ids.


def _pack(docs: Iterable[readers.Document], tok, d, folder: Path) -> _BuildStats:
    """Tokenizes documents in batches and packs them per (split, domain, held-out group) into the
    split writers."""
    eos = tokenizer_lib.eos_id(tok)
    domains: dict[str, int] = {}
    labels: dict[str, int] = {}
    writers = {split: _SplitWriter(folder / split, d.seq_len) for split in SPLITS}
    packers: dict[tuple[str, str, int], DomainPacker] = {}
    per_domain = {s: collections.defaultdict(collections.Counter) for s in SPLITS}
    per_label = {s: collections.Counter() for s in SPLITS}
    splitter = Splitter(d.heldout_fraction)
    documents_read = 0
    near_duplicates = []

    def emit(split: str, domain: str, group: int, rows: Rows | None) -> None:
        if rows is None:
            return
        writers[split].write(rows, domains[domain], group)
        per_domain[split][domain]["sequences"] += len(rows.tokens)
        label_names = list(labels)
        per_label[split].update(label_names[k] for k in rows.labels)

    progress = tqdm.tqdm(desc=f"pool {folder.name}", unit=" doc", mininterval=1.0)
    for batch in _batched(docs, _ENCODE_BATCH):
        encodings = tok.encode_batch_fast([doc.text for doc in batch], add_special_tokens=False)
        for doc, encoding in zip(batch, encodings, strict=True):
            split = "heldout" if splitter.is_heldout(doc) else "train"
            group = heldout_group(doc.doc_id, d.heldout_groups) if split == "heldout" else 0
            domains.setdefault(doc.domain, len(domains))
            labels.setdefault(doc.label, len(labels))
            tokens = np.asarray(encoding.ids + [eos], np.int32)
            packer = packers.setdefault((split, doc.domain, group), DomainPacker(d.seq_len))
            if d.packing == "document" and packer.pending:  # Each document starts a row.
                emit(split, doc.domain, group, packer.pop_rows(final=True))
            packer.add(tokens, doc.doc_id, labels[doc.label])
            if doc.copy_of >= 0:
                near_duplicates.append((doc.copy_of, doc.doc_id))
            counts = per_domain[split][doc.domain]
            counts["documents"] += 1
            counts["tokens"] += len(tokens)
            if packer.pending >= _FLUSH_TOKENS:
                emit(split, doc.domain, group, packer.pop_rows(final=False))
        documents_read += len(batch)
        progress.update(len(batch))
    progress.close()
    for (split, domain, group), packer in packers.items():
        emit(split, domain, group, packer.pop_rows(final=True))
    for writer in writers.values():
        writer.finalize()
    return _BuildStats(list(domains), list(labels), documents_read, per_domain, per_label,
                       near_duplicates)


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_reports(folder: Path, stats: _BuildStats, skipped: collections.Counter, d, tok,
                   key: str, seconds: float) -> None:
    corpus_manifest = sources.manifest(d)
    for split in SPLITS:
        domains = {name: {k: int(stats.per_domain[split][name][k])
                          for k in ("documents", "tokens", "sequences")}
                   for name in stats.domain_names}
        report = dict(
            split=split, key=key, format_version=FORMAT_VERSION, source=d.source,
            documents_read=stats.documents_read, skipped=dict(sorted(skipped.items())),
            documents=sum(v["documents"] for v in domains.values()),
            tokens=sum(v["tokens"] for v in domains.values()),
            sequences=sum(v["sequences"] for v in domains.values()),
            domains=domains, domain_names=stats.domain_names, label_names=stats.label_names,
            label_sequences={name: int(stats.per_label[split][name])
                             for name in stats.label_names},
            seq_len=d.seq_len, heldout_fraction=d.heldout_fraction,
            heldout_groups=d.heldout_groups, packing=d.packing,
            near_duplicate_pairs=len(stats.near_duplicates),
            local_corpus=corpus_manifest,
            tokenizer=d.tokenizer or "trained byte-level BPE",
            tokenizer_hash=tokenizer_lib.tokenizer_hash(tok),
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), build_seconds=round(seconds, 2))
        (folder / split / "pool.json").write_text(json.dumps(report, indent=1))
