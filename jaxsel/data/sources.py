"""Document sources: the reader `data.source` names, its cache fingerprint, and the rule that a
read yields at least one document.

`read_documents` dispatches to the readers of real data (`jaxsel.data.readers`: jsonl, parquet,
text folders, TFDS), the embedded local corpus (`jaxsel.data.local_corpus`) or the seeded
synthetic corpus (`jaxsel.data.synthetic`). A read in which every record was bad stops with an
error that names the source and the skip counts, instead of yielding an empty pool.

`source_fingerprint` names what a read depends on (files with sizes and mtimes, the local
corpus' packages with their versions, or the generator's parameters) cheaply, without reading any
text, so a pool built from it can be cached.
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from jaxsel.config import SOURCES
from jaxsel.data import local_corpus, readers, synthetic
from jaxsel.data.readers import Document

# Bump when the local or synthetic corpus changes for the same inputs (invalidates cached pools).
CORPUS_VERSION = 2
_SHOWN_FILES = 3  # The error for a source without documents names this many of its files.


def read_documents(data_config, skipped: collections.Counter, *,
                   seed: int | None = None) -> Iterator[Document]:
    """Yields the documents of `data_config.source`, counting bad records in `skipped`.

    `seed` (the experiment's `config.seed`) is required by the synthetic source only.
    `data_config.max_docs` > 0 keeps the first `max_docs` documents of each domain; documents
    dropped by that cap are counted as `skipped["over_max_docs"]`. Raises ValueError, once the
    source is exhausted, if it yielded no document.
    """
    d = data_config
    if d.source == "jsonl":
        docs = readers.jsonl_documents(d, skipped)
    elif d.source == "parquet":
        docs = readers.parquet_documents(d, skipped)
    elif d.source == "text":
        docs = readers.text_dir_documents(d, skipped)
    elif d.source == "tfds":
        docs = readers.tfds_documents(d, skipped)
    elif d.source == "local":
        docs = local_corpus.documents(d.max_docs, skipped)
    elif d.source == "synthetic":
        docs = synthetic.documents(_seed(seed), d.synthetic_docs_per_domain, d.seq_len)
    else:
        raise ValueError(f"data.source={d.source!r} is not one of {', '.join(SOURCES)}")
    return _require_documents(_cap_per_domain(docs, d.max_docs, skipped), d, skipped)


def source_fingerprint(data_config, *, seed: int | None = None) -> str:
    """A hash of everything a read of this source depends on, computed without reading text."""
    d = data_config
    parts: dict[str, Any] = dict(source=d.source, max_docs=d.max_docs, version=CORPUS_VERSION)
    if d.source in ("jsonl", "parquet", "text"):
        parts.update(text_field=d.text_field, domain_field=d.domain_field,
                     files=[readers.stat_key(p) for p in readers.source_files(d)])
    elif d.source == "tfds":
        parts.update(name=d.tfds_name, split=d.tfds_split, data_dir=d.tfds_data_dir,
                     text_field=d.text_field, domain_field=d.domain_field,
                     records=len(readers.tfds_source(d)))
    elif d.source == "local":
        parts.update(local_corpus.fingerprint_parts(local_corpus.discover()))
    elif d.source == "synthetic":
        parts.update(seed=_seed(seed), docs_per_domain=d.synthetic_docs_per_domain,
                     seq_len=d.seq_len)
    else:
        raise ValueError(f"data.source={d.source!r} is not one of {', '.join(SOURCES)}")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def manifest(data_config) -> dict[str, Any] | None:
    """What a read of the local corpus covers, for the pool report: the Python version and each
    domain's roots or packages (with their installed versions). None for the other sources,
    whose config (data.paths, data.tfds_name, the seed) names what they read."""
    if data_config.source != "local":
        return None
    return local_corpus.manifest(local_corpus.discover())


def _seed(seed: int | None) -> int:
    if seed is None:
        raise ValueError("data.source='synthetic' needs seed=config.seed")
    return seed


def _cap_per_domain(docs: Iterable[Document], max_docs: int,
                    skipped: collections.Counter) -> Iterator[Document]:
    counts: collections.Counter = collections.Counter()
    for doc in docs:
        counts[doc.domain] += 1
        if max_docs and counts[doc.domain] > max_docs:
            skipped["over_max_docs"] += 1
            continue
        yield doc


def _require_documents(docs: Iterable[Document], d,
                       skipped: collections.Counter) -> Iterator[Document]:
    found = False
    for doc in docs:
        found = True
        yield doc
    if not found:
        raise ValueError(_no_document_message(d, skipped))


def _no_document_message(d, skipped: collections.Counter) -> str:
    """One paragraph: the source, what was read, the skip counts by reason, what to check."""
    if d.source in ("jsonl", "parquet", "text"):
        files = readers.source_files(d)
        shown = ", ".join(str(p) for p in files[:_SHOWN_FILES])
        more = f" and {len(files) - _SHOWN_FILES} more" if len(files) > _SHOWN_FILES else ""
        where = f"data.paths={tuple(d.paths)} ({len(files)} file(s): {shown}{more})"
    elif d.source == "tfds":
        where = (f"data.tfds_name={d.tfds_name!r}, data.tfds_split={d.tfds_split!r}, "
                 f"data.tfds_data_dir={d.tfds_data_dir!r}")
    else:
        where = f"the {d.source} corpus"
    unit = {"text": "files", "local": "items"}.get(d.source, "records")
    if skipped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        what = f"all {sum(skipped.values())} {unit} were skipped ({reasons})"
    else:
        what = f"it holds no {unit} at all"
    if d.source == "text":
        check = "Each file must hold non-empty UTF-8 text (.gz files are decompressed)."
    elif d.source in ("jsonl", "parquet", "tfds"):
        fields = f"data.text_field={d.text_field!r}" + (
            f" and data.domain_field={d.domain_field!r}" if d.domain_field else "")
        check = f"Check {fields} against the records, and that their texts are non-empty UTF-8."
    else:
        check = f"Choose another data.source ({', '.join(SOURCES)})."
    return (f"data.source={d.source!r}: no document survived reading {where}; {what}, so there "
            f"is nothing to build a pool from. {check}")
