"""Building a pool: documents split into train / held-out and held-out groups, tokenized once,
packed into fixed-length rows per domain and written split by split (the layout is
`jaxsel.data.pool`'s). `build(config, folder, tokenizer_cache)` streams the source once into a
temporary folder that `files.atomic_path` renames (or uploads) into place when complete.
"""

from __future__ import annotations

import collections
import dataclasses
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


def build(config, folder: str, tokenizer_cache: str) -> None:
    """Builds both splits into a temporary folder and renames (or uploads) it to `folder` when
    complete; a tokenizer trained for it is cached under `tokenizer_cache`."""
    d = config.data
    seed = config.seed if d.source == "synthetic" else None
    start = time.time()
    try:
        with files.atomic_path(folder) as tmp:
            tmp = Path(tmp)
            tmp.mkdir()
            _build_into(tmp, d, config.model.vocab_size, seed, key=os.path.basename(folder),
                        start=start, tokenizer_cache=tokenizer_cache)
    except OSError:
        if not files.is_complete(folder):  # Not a concurrent build of the same pool: an error.
            raise


def _build_into(tmp: Path, d, vocab_size: int, seed, *, key: str, start: float,
                tokenizer_cache: str) -> None:
    def train_texts() -> Iterator[str]:
        splitter = Splitter(d.heldout_fraction)
        docs = sources.read_documents(d, collections.Counter(), seed=seed)
        return (doc.text for doc in docs if not splitter.is_heldout(doc))

    logging.info("pool %s: loading or training the tokenizer", key)
    tok = tokenizer_lib.load_or_train_tokenizer(d, vocab_size, train_texts, tokenizer_cache)
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
