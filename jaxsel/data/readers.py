"""Readers of real data: jsonl, parquet, text folders, TFDS (array_record); the `Document`.

Paths go through `etils.epath`, so `data.paths` may name local files or, where the file system's
package is installed (gcsfs, or TensorFlow's gfile), `gs://` objects; a remote glob takes `*` and
`?` but not the recursive `**`.

Every reader yields `Document`s with a stable integer id. Bad records (invalid UTF-8, broken JSON,
a missing or non-string text field, empty text, unreadable files) never stop a read and never
vanish: they are skipped and counted by reason in the `skipped` counter the caller passes in,
which the pool build writes into its report. `Skip`, `decode` and `read_text` are shared with
the local corpus (`jaxsel.data.local_corpus`), which reads files the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from etils import epath

from jaxsel import files

DEFAULT_DOMAIN = "default"


@dataclasses.dataclass(frozen=True)
class Document:
    """One document. `doc_id` is stable for the same source; `label` is "" unless the source
    knows a ground truth (the synthetic corpus: "clean", "near_duplicate", "junk"), and
    `copy_of` is -1 unless the source knows the document is a near-duplicate of another (the
    synthetic corpus: the id of the document it copies)."""

    doc_id: int
    text: str
    domain: str
    label: str = ""
    copy_of: int = -1


class Skip(Exception):
    """A bad record; `reason` is the key it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("invalid_utf8") from e


def read_bytes(path: Path | epath.Path) -> bytes:
    """The file's bytes, decompressed if its name ends in `.gz`."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
        raise Skip("unreadable_file") from e


def read_text(path: Path | epath.Path) -> str:
    return decode(read_bytes(path))


def stat_key(path: Path | epath.Path) -> tuple[str, int, int]:
    """A file's path, size and modification time (ns on a local disk, as the store reports it
    elsewhere): what a cache key names a file by without reading it."""
    if not files.is_remote(path):
        st = os.stat(path)
        return str(path), st.st_size, st.st_mtime_ns
    st = epath.Path(path).stat()
    return str(path), int(st.length), int(st.mtime)


def source_files(d) -> list[epath.Path]:
    """The files a jsonl, parquet or text source reads, in reading order."""
    return _text_dir_files(_text_folder(d)) if d.source == "text" else _expand_paths(d.paths)


# ------------------------------------------------------------------------------------------------
# Records: one validation for jsonl, parquet and TFDS.


def _record_to_document(record: Any, doc_id: int, text_field: str, domain_field: str,
                        default_domain: str) -> Document:
    """Validates one record (a mapping) into a Document, raising `Skip(reason)` if it is bad."""
    if not isinstance(record, dict):
        raise Skip("not_an_object")
    text = record.get(text_field)
    if text is None:
        raise Skip("missing_text_field")
    if isinstance(text, bytes):
        text = decode(text)
    if not isinstance(text, str):
        raise Skip("non_string_text")
    if not text.strip():
        raise Skip("empty_text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # A lone surrogate, e.g. from a JSON "\ud800" escape.
        raise Skip("invalid_unicode") from e
    domain = default_domain
    if domain_field:
        value = record.get(domain_field)
        if value is None:
            raise Skip("missing_domain_field")
        domain = decode(value) if isinstance(value, bytes) else str(value)
    return Document(doc_id, text, domain)


def _documents_from_records(records: Iterable[Any], text_field: str, domain_field: str,
                            default_domain: str, skipped: collections.Counter,
                            ) -> Iterator[Document]:
    """Validates records in order; a record may also be a `Skip` (it failed before parsing).

    The doc id is the record's position, bad records included, so ids stay stable if the
    validation rules change."""
    for doc_id, record in enumerate(records):
        try:
            if isinstance(record, Skip):
                raise record
            yield _record_to_document(record, doc_id, text_field, domain_field, default_domain)
        except Skip as skip:
            skipped[skip.reason] += 1


def _glob(pattern: str) -> list[epath.Path]:
    """The files a path or glob names: a local one through `glob` (`**` recursive), any other
    (`gs://...`) through `epath` from the part before its first wildcard."""
    pattern = os.path.expanduser(pattern)
    if not files.is_remote(pattern):
        matches = glob.glob(pattern, recursive=True)
    elif not glob.has_magic(pattern):
        matches = [pattern]
    else:
        parts = pattern.split("/")
        first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        matches = epath.Path("/".join(parts[:first])).glob("/".join(parts[first:]))
    return [p for p in map(epath.Path, matches) if p.is_file()]


def _expand_paths(paths) -> list[epath.Path]:
    """`data.paths` (a tuple of files or globs) -> sorted unique files."""
    files: set[epath.Path] = set()
    for pattern in paths:
        matches = _glob(pattern)
        if not matches:
            raise ValueError(f"data.paths: {pattern!r} matches no file")
        files.update(matches)
    if not files:
        raise ValueError("data.paths: empty; give a tuple of files or globs")
    return sorted(files)


def _jsonl_records(files: list[epath.Path]) -> Iterator[Any]:
    """Parsed JSON lines in file order; an undecodable, blank or broken line yields a `Skip`."""
    for path in files:
        with path.open("rb") as f:
            for line in f:
                try:
                    text = decode(line)
                    if not text.strip():
                        raise Skip("blank_line")
                    try:
                        yield json.loads(text)
                    except json.JSONDecodeError as e:
                        raise Skip("invalid_json") from e
                except Skip as skip:
                    yield skip


def jsonl_documents(d, skipped: collections.Counter) -> Iterator[Document]:
    return _documents_from_records(_jsonl_records(_expand_paths(d.paths)), d.text_field,
                                   d.domain_field, DEFAULT_DOMAIN, skipped)


def parquet_documents(d, skipped: collections.Counter) -> Iterator[Document]:
    import pyarrow.parquet as pq

    def records() -> Iterator[Any]:
        columns = [d.text_field] + ([d.domain_field] if d.domain_field else [])
        for path in _expand_paths(d.paths):
            with path.open("rb") as f:
                file = pq.ParquetFile(f)
                missing = [c for c in columns if c not in file.schema_arrow.names]
                if missing:
                    raise ValueError(f"data.text_field/data.domain_field: {path} has no column "
                                     f"{missing}; columns are {file.schema_arrow.names}")
                for batch in file.iter_batches(columns=columns):
                    yield from batch.to_pylist()

    return _documents_from_records(records(), d.text_field, d.domain_field, DEFAULT_DOMAIN,
                                   skipped)


# ------------------------------------------------------------------------------------------------
# Text folder: one domain per first-level subfolder, one document per file.


def _text_folder(d) -> str:
    """The one folder `data.paths` names for `data.source='text'`."""
    if len(d.paths) != 1:
        raise ValueError(f"data.paths: {tuple(d.paths)} must name one folder for "
                         "data.source='text'")
    return d.paths[0]


def _text_dir_files(folder: str) -> list[epath.Path]:
    """The files under `folder` (hidden ones left out), sorted."""
    root = epath.Path(os.path.expanduser(folder))
    if not root.is_dir():
        raise ValueError(f"data.paths: {folder!r} is not a folder (data.source='text')")
    files = [epath.Path(top) / name for top, _, names in root.walk() for name in names]
    return sorted(p for p in files
                  if not any(part.startswith(".") for part in p.relative_to(root).parts))


def text_dir_documents(d, skipped: collections.Counter) -> Iterator[Document]:
    """One document per file (`.gz` files are decompressed); the doc id is the file's position
    in sorted order."""
    folder = _text_folder(d)
    root = epath.Path(os.path.expanduser(folder))
    for doc_id, path in enumerate(_text_dir_files(folder)):
        rel = path.relative_to(root).parts
        domain = rel[0] if len(rel) > 1 else DEFAULT_DOMAIN
        try:
            text = read_text(path)
            if not text.strip():
                raise Skip("empty_text")
        except Skip as skip:
            skipped[skip.reason] += 1
            continue
        yield Document(doc_id, text, domain)


# ------------------------------------------------------------------------------------------------
# TFDS: array_record data sources, random access, no TensorFlow at read time.


def tfds_source(d):
    import tensorflow_datasets as tfds

    return tfds.data_source(d.tfds_name, split=d.tfds_split, data_dir=d.tfds_data_dir or None)


def tfds_documents(d, skipped: collections.Counter, chunk: int = 1024) -> Iterator[Document]:
    source = tfds_source(d)

    def records() -> Iterator[Any]:
        for start in range(0, len(source), chunk):
            yield from source.__getitems__(range(start, min(start + chunk, len(source))))

    default_domain = d.tfds_name.split(":")[0]
    return _documents_from_records(records(), d.text_field, d.domain_field, default_domain,
                                   skipped)
