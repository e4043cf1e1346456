"""Document sources: jsonl, parquet, text folders, TFDS (array_record), the local corpus, synthetic.

Every source yields `Document`s with a stable integer id. Bad records (invalid UTF-8, broken JSON,
a missing or non-string text field, empty text, unreadable files) never stop a read and never
vanish: they are skipped and counted by reason in the `skipped` counter the caller passes in,
which the pool build writes into its report.

`source_fingerprint` names what a read depends on (files with sizes and mtimes, or the generator's
parameters) cheaply, without reading any text, so a pool built from it can be cached.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import string
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxsel.config import SOURCES

DEFAULT_DOMAIN = "default"

# The local corpus splits long files into documents of at most this many characters (at line
# boundaries), so that one huge file neither dominates a domain nor makes one giant document.
LOCAL_DOC_CHARS = 16_000
MAN_ROOT = Path("/usr/share/man")
DOC_ROOT = Path("/usr/share/doc")
_DOC_SUFFIXES = (".txt", ".md", ".rst")
MIN_MAN_PAGES = 50  # A man page language with fewer pages gets no domain.
MAX_PARSE_BYTES = 256_000  # Larger .py files are not parsed for docstrings (generated code).
# Bump when the local or synthetic corpus changes for the same inputs (invalidates cached pools).
CORPUS_VERSION = 1


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


class _Skip(Exception):
    """A bad record; `reason` is the key it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_documents(data_config, skipped: collections.Counter, *,
                   seed: int | None = None) -> Iterator[Document]:
    """Yields the documents of `data_config.source`, counting bad records in `skipped`.

    `seed` (the experiment's `config.seed`) is required by the synthetic source only.
    `data_config.max_docs` > 0 keeps the first `max_docs` documents of each domain; documents
    dropped by that cap are counted as `skipped["over_max_docs"]`.
    """
    source = data_config.source
    if source == "jsonl":
        docs = _jsonl_documents(data_config, skipped)
    elif source == "parquet":
        docs = _parquet_documents(data_config, skipped)
    elif source == "text":
        docs = _text_dir_documents(data_config, skipped)
    elif source == "tfds":
        docs = _tfds_documents(data_config, skipped)
    elif source == "local":
        docs = local_documents(data_config.max_docs, skipped)
    elif source == "synthetic":
        if seed is None:
            raise ValueError("data.source='synthetic' needs seed=config.seed")
        docs = synthetic_documents(seed, data_config.synthetic_docs_per_domain,
                                   data_config.seq_len)
    else:
        raise ValueError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")
    return _cap_per_domain(docs, data_config.max_docs, skipped)


def source_fingerprint(data_config, *, seed: int | None = None) -> str:
    """A hash of everything a read of this source depends on, computed without reading text."""
    d = data_config
    parts: dict[str, Any] = dict(source=d.source, max_docs=d.max_docs, version=CORPUS_VERSION)
    if d.source in ("jsonl", "parquet", "text"):
        files = _text_dir_files(d.paths) if d.source == "text" else _expand_paths(d.paths)
        parts.update(text_field=d.text_field, domain_field=d.domain_field,
                     files=[_stat_key(p) for p in files])
    elif d.source == "tfds":
        parts.update(name=d.tfds_name, split=d.tfds_split, data_dir=d.tfds_data_dir,
                     text_field=d.text_field, domain_field=d.domain_field,
                     records=len(_tfds_source(d)))
    elif d.source == "local":
        parts.update(python=sys.version, doc_chars=LOCAL_DOC_CHARS,
                     # Every file item (the reference topics come with the Python version).
                     files=[(domain, _stat_key(key)) for domain, items in
                            local_items().items() for key, _ in items if isinstance(key, Path)])
    elif d.source == "synthetic":
        if seed is None:
            raise ValueError("data.source='synthetic' needs seed=config.seed")
        parts.update(seed=seed, docs_per_domain=d.synthetic_docs_per_domain, seq_len=d.seq_len)
    else:
        raise ValueError(f"data.source={d.source!r} is not one of {', '.join(SOURCES)}")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def _cap_per_domain(docs: Iterable[Document], max_docs: int,
                    skipped: collections.Counter) -> Iterator[Document]:
    counts: collections.Counter = collections.Counter()
    for doc in docs:
        counts[doc.domain] += 1
        if max_docs and counts[doc.domain] > max_docs:
            skipped["over_max_docs"] += 1
            continue
        yield doc


# ------------------------------------------------------------------------------------------------
# Records: one validation for jsonl, parquet and TFDS.


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Skip("invalid_utf8") from e


def _record_to_document(record: Any, doc_id: int, text_field: str, domain_field: str,
                        default_domain: str) -> Document:
    """Validates one record (a mapping) into a Document, raising `_Skip(reason)` if it is bad."""
    if not isinstance(record, dict):
        raise _Skip("not_an_object")
    text = record.get(text_field)
    if text is None:
        raise _Skip("missing_text_field")
    if isinstance(text, bytes):
        text = _decode(text)
    if not isinstance(text, str):
        raise _Skip("non_string_text")
    if not text.strip():
        raise _Skip("empty_text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # A lone surrogate, e.g. from a JSON "\ud800" escape.
        raise _Skip("invalid_unicode") from e
    domain = default_domain
    if domain_field:
        value = record.get(domain_field)
        if value is None:
            raise _Skip("missing_domain_field")
        domain = _decode(value) if isinstance(value, bytes) else str(value)
    return Document(doc_id, text, domain)


def _documents_from_records(records: Iterable[Any], text_field: str, domain_field: str,
                            default_domain: str, skipped: collections.Counter,
                            ) -> Iterator[Document]:
    """Validates records in order; a record may also be a `_Skip` (it failed before parsing).

    The doc id is the record's position, bad records included, so ids stay stable if the
    validation rules change."""
    for doc_id, record in enumerate(records):
        try:
            if isinstance(record, _Skip):
                raise record
            yield _record_to_document(record, doc_id, text_field, domain_field, default_domain)
        except _Skip as skip:
            skipped[skip.reason] += 1


def _expand_paths(paths: str) -> list[Path]:
    """`data.paths` (comma-separated files or globs) -> sorted unique files."""
    files: set[Path] = set()
    for pattern in (p.strip() for p in paths.split(",")):
        if not pattern:
            continue
        matches = [Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True)]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise ValueError(f"data.paths: {pattern!r} matches no file")
        files.update(matches)
    if not files:
        raise ValueError("data.paths: empty; give comma-separated files or globs")
    return sorted(files)


def _jsonl_records(files: list[Path]) -> Iterator[Any]:
    """Parsed JSON lines in file order; an undecodable, blank or broken line yields a `_Skip`."""
    for path in files:
        with path.open("rb") as f:
            for line in f:
                try:
                    text = _decode(line)
                    if not text.strip():
                        raise _Skip("blank_line")
                    try:
                        yield json.loads(text)
                    except json.JSONDecodeError as e:
                        raise _Skip("invalid_json") from e
                except _Skip as skip:
                    yield skip


def _jsonl_documents(d, skipped: collections.Counter) -> Iterator[Document]:
    return _documents_from_records(_jsonl_records(_expand_paths(d.paths)), d.text_field,
                                   d.domain_field, DEFAULT_DOMAIN, skipped)


def _parquet_documents(d, skipped: collections.Counter) -> Iterator[Document]:
    import pyarrow.parquet as pq

    def records() -> Iterator[Any]:
        columns = [d.text_field] + ([d.domain_field] if d.domain_field else [])
        for path in _expand_paths(d.paths):
            file = pq.ParquetFile(path)
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


def _text_dir_files(folder: str) -> list[Path]:
    root = Path(os.path.expanduser(folder.strip()))
    if not root.is_dir():
        raise ValueError(f"data.paths: {folder!r} is not a folder (data.source='text')")
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _text_dir_documents(d, skipped: collections.Counter) -> Iterator[Document]:
    """One document per file (`.gz` files are decompressed); the doc id is the file's position
    in sorted order."""
    root = Path(os.path.expanduser(d.paths.strip()))
    for doc_id, path in enumerate(_text_dir_files(d.paths)):
        rel = path.relative_to(root).parts
        domain = rel[0] if len(rel) > 1 else DEFAULT_DOMAIN
        try:
            text = _read_text(path)
            if not text.strip():
                raise _Skip("empty_text")
        except _Skip as skip:
            skipped[skip.reason] += 1
            continue
        yield Document(doc_id, text, domain)


# ------------------------------------------------------------------------------------------------
# TFDS: array_record data sources, random access, no TensorFlow at read time.


def _tfds_source(d):
    import tensorflow_datasets as tfds

    return tfds.data_source(d.tfds_name, split=d.tfds_split, data_dir=d.tfds_data_dir or None)


def _tfds_documents(d, skipped: collections.Counter, chunk: int = 1024) -> Iterator[Document]:
    source = _tfds_source(d)

    def records() -> Iterator[Any]:
        for start in range(0, len(source), chunk):
            yield from source.__getitems__(range(start, min(start + chunk, len(source))))

    default_domain = d.tfds_name.split(":")[0]
    return _documents_from_records(records(), d.text_field, d.domain_field, default_domain,
                                   skipped)


# ------------------------------------------------------------------------------------------------
# The local corpus: real text every Python install has, plus man pages and docs where present.

# An item is (key, reader): the key is a Path (or a topic name), the reader returns its text or
# raises `_Skip`.
Item = tuple[Any, Callable[[], str]]


def local_items(man_root: Path = MAN_ROOT, doc_root: Path = DOC_ROOT) -> dict[str, list[Item]]:
    """Domain -> its items in sorted order. Discovery only lists folders; nothing is read."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site_dirs = sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
    items: dict[str, list[Item]] = {
        "code": [(p, functools.partial(_read_text, p)) for p in _python_files([stdlib])],
        "docstrings": [(p, functools.partial(_read_docstrings, p))
                       for p in _python_files(site_dirs)],
        "reference": [(topic, functools.partial(_topic_text, topic))
                      for topic in _pydoc_topics()],
    }
    for lang, files in sorted(_man_files(man_root).items()):
        items[f"man_{lang}"] = [(p, functools.partial(_read_man_page, p)) for p in files]
    items["docs"] = [(p, functools.partial(_read_text, p)) for p in _doc_files(doc_root)]
    return {domain: its for domain, its in items.items() if its}


def local_documents(max_docs: int, skipped: collections.Counter,
                    items: dict[str, list[Item]] | None = None) -> Iterator[Document]:
    """Reads the local corpus domain by domain; long texts become several documents.

    With `max_docs` > 0 a domain reads only the items it needs: items are visited in a strided
    order over the sorted list (every k-th item first, then the next offset) so a capped domain
    still spans the whole alphabet of files instead of its first few.
    """
    items = local_items() if items is None else items
    doc_id = 0
    for domain, domain_items in items.items():
        texts = _read_items(_strided(domain_items, max_docs), skipped)
        chunks = (chunk for text in texts for chunk in split_text(text, LOCAL_DOC_CHARS))
        for chunk in itertools.islice(chunks, max_docs or None):  # Lazy: stops reading early.
            yield Document(doc_id, chunk, domain)
            doc_id += 1


def _strided(items: list[Item], max_docs: int) -> list[Item]:
    stride = max(1, len(items) // max_docs) if max_docs else 1
    return [items[i] for offset in range(stride) for i in range(offset, len(items), stride)]


def _read_items(items: list[Item], skipped: collections.Counter) -> Iterator[str]:
    """The items' non-empty texts, in order; bad ones are counted in `skipped`."""
    for _, read in items:
        try:
            text = read()
            if not text.strip():
                raise _Skip("empty_text")
        except _Skip as skip:
            skipped[skip.reason] += 1
            continue
        yield text


def split_text(text: str, max_chars: int) -> list[str]:
    """Splits `text` at line boundaries into pieces of at most `max_chars` (a longer single line
    is cut hard); pieces that are only whitespace are dropped."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        for part in (line[i:i + max_chars] for i in range(0, len(line), max_chars)):
            if size + len(part) > max_chars:
                pieces.append("".join(current))
                current, size = [], 0
            current.append(part)
            size += len(part)
    pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def _walk_files(root: Path, keep: Callable[[str], bool],
                skip_dirs: frozenset[str] = frozenset()) -> list[str]:
    """Regular files under `root` whose name passes `keep`, sorted as strings. Symlinks are
    skipped (they duplicate a real file); `os.scandir` and strings avoid a stat and a Path per
    file."""
    out: list[str] = []
    stack = [str(root)] if root.is_dir() else []
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in skip_dirs:
                        stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False) and keep(entry.name):
                    out.append(entry.path)
    return sorted(out)


def _python_files(roots: list[Path]) -> list[Path]:
    """`.py` files under `roots`, without installed packages (when a root is the stdlib) and
    bytecode caches."""
    skip = frozenset({"site-packages", "dist-packages", "__pycache__"})
    paths = (p for root in roots for p in _walk_files(root, lambda n: n.endswith(".py"), skip))
    return [Path(p) for p in sorted(paths)]


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
        raise _Skip("unreadable_file") from e


def _read_text(path: Path) -> str:
    return _decode(_read_bytes(path))


def _read_docstrings(path: Path) -> str:
    """The module's, classes' and functions' docstrings, found with `ast` (nothing is imported).

    Files over `MAX_PARSE_BYTES` (generated tables, mostly) are skipped: parsing is the cost."""
    raw = _read_bytes(path)
    if len(raw) > MAX_PARSE_BYTES:
        raise _Skip("too_large_to_parse")
    try:
        tree = ast.parse(_decode(raw))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _Skip("unparsable_python") from e
    return "\n\n".join(_docstrings(tree))


_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of `node` and of the definitions in its statement bodies (expressions are not
    visited: they hold no docstrings, and walking them is most of the cost)."""
    if isinstance(node, _DOCSTRING_NODES):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            yield doc
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, ()):
            if isinstance(child, ast.stmt | ast.excepthandler):
                yield from _docstrings(child)


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return sorted(topics)


def _topic_text(topic: str) -> str:
    from pydoc_data.topics import topics

    return topics[topic]


def _man_files(man_root: Path) -> dict[str, list[Path]]:
    """Language -> man page files. `man_root/manN/*` is English, `man_root/<lang>/manN/*` is
    `<lang>` (an encoding suffix as in `de.UTF-8` is dropped). Languages with fewer than
    `MIN_MAN_PAGES` pages are left out: a domain of a handful of pages is noise, not a domain."""
    by_lang: dict[str, list[Path]] = collections.defaultdict(list)
    prefix = len(str(man_root)) + 1
    for path in _walk_files(man_root, lambda name: True):
        parts = path[prefix:].split(os.sep)
        if len(parts) == 2 and parts[0].startswith("man"):
            by_lang["en"].append(Path(path))
        elif len(parts) == 3 and parts[1].startswith("man"):
            by_lang[parts[0].split(".")[0]].append(Path(path))
    return {lang: files for lang, files in by_lang.items() if len(files) >= MIN_MAN_PAGES}


def _doc_files(doc_root: Path) -> list[Path]:
    """README / .txt / .md / .rst files (gzipped or not) under `doc_root`."""
    def keep(name: str) -> bool:
        base = name.removesuffix(".gz")
        return base.upper().startswith("README") or base.endswith(_DOC_SUFFIXES)

    return [Path(p) for p in _walk_files(doc_root, keep)]


# Requests and macros that only lay out the page; other macros keep their arguments as text.
_TROFF_DROP = frozenset({
    "TH", "Dd", "Dt", "Os", "ds", "nr", "if", "ie", "el", "ig", "so", "ft", "ps", "vs", "ta",
    "ll", "in", "ti", "ne", "hy", "nh", "ad", "na", "tr", "cc", "mso", "ss", "PD", "PP", "LP",
    "P", "br", "sp", "fi", "nf", "RS", "RE", "UC"})
_TROFF_NAMED = {"-": "-", "(em": "--", "(en": "-", "(aq": "'", "(dq": '"', "(lq": '"',
                "(rq": '"', "(bu": "*", "(co": "(c)", "e": "\\", "~": " ", " ": " "}
_TROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?\d+|\*(?:\[[^\]]*\]|\(..|.)|n(?:\(..|.)|\[[^\]]*\]"
    r"|\(..|[&|^%:c0e~ -])")


def strip_troff(source: str) -> str:
    """Crude troff -> text: drops comments, macro definitions and layout requests, keeps the
    arguments of text macros (`.SH NAME`, `.B word`), and removes inline escapes (`\\fB`)."""
    lines: list[str] = []
    in_definition = False
    for line in source.splitlines():
        if in_definition:
            in_definition = line.strip() != ".."
            continue
        if line.startswith((".\\\"", "'\\\"", ".\\#")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].strip().partition(" ")
            if name in ("de", "de1", "am"):
                in_definition = True
                continue
            if name in _TROFF_DROP or not args:
                continue
            line = args.replace('"', "")
        line = _TROFF_ESCAPE.sub(lambda m: _TROFF_NAMED.get(m.group(0)[1:], ""), line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _read_man_page(path: Path) -> str:
    source = _read_text(path)
    if source.lstrip().startswith(".so "):
        raise _Skip("man_alias")  # `.so other.1`: an alias whose text lives in another page.
    return strip_troff(source)


# ------------------------------------------------------------------------------------------------
# Synthetic corpus with known structure.


@dataclasses.dataclass(frozen=True)
class _SyntheticDomain:
    """A domain's statistics: words drawn from its own alphabet with a Zipf law, in a template."""

    name: str
    alphabet: str
    vocab_size: int
    zipf: float
    template: str  # "prose" | "code" | "table"
    # Words per token of the template's text under a BPE trained on this corpus (measured at
    # vocab 2048), to size documents in tokens.
    words_per_token: float


SYNTHETIC_DOMAINS = (
    _SyntheticDomain("prose", "abcdefgh", 2000, 1.1, "prose", 0.68),
    _SyntheticDomain("code", "ijklmnop", 600, 1.4, "code", 0.41),
    _SyntheticDomain("tables", "qrstuvwxyz", 200, 1.8, "table", 0.22),
)
CLEAN, NEAR_DUPLICATE, JUNK = SYNTHETIC_LABELS = ("clean", "near_duplicate", "junk")


def synthetic_documents(seed: int, docs_per_domain: int, seq_len: int) -> Iterator[Document]:
    """A seeded corpus with known structure, for tests of selectors.

    Domains `prose`, `code`, `tables` differ in alphabet, vocabulary size, Zipf exponent and
    template, so their token statistics are clearly different. Each has `docs_per_domain`
    documents of 65-95% of a `seq_len` sequence (in tokens, roughly). A tenth of them (at least
    one) are near-duplicates: a copy of another document of the domain with ~5% of its words
    changed, label "near_duplicate", `copy_of` the id of the document it copies, placed at a
    random position in the domain. All other
    documents, the originals included, are "clean". The `junk` domain holds
    `docs_per_domain // 4` (at least one) junk documents, label "junk": alternately random
    character soup and one short unit repeated.
    """
    if docs_per_domain < 2:
        raise ValueError(f"data.synthetic_docs_per_domain must be >= 2, got {docs_per_domain}")
    doc_id = 0
    for index, spec in enumerate(SYNTHETIC_DOMAINS):
        rng = np.random.default_rng([seed, index])
        first = doc_id
        for text, label, copy_of in _synthetic_domain_docs(spec, rng, docs_per_domain, seq_len):
            yield Document(doc_id, text, spec.name, label, -1 if copy_of < 0 else first + copy_of)
            doc_id += 1
    rng = np.random.default_rng([seed, len(SYNTHETIC_DOMAINS)])
    for i in range(max(1, docs_per_domain // 4)):
        text = _junk_soup(rng, seq_len) if i % 2 == 0 else _junk_repeat(rng, seq_len)
        yield Document(doc_id, text, JUNK, JUNK)
        doc_id += 1


def _doc_fraction(rng: np.random.Generator) -> float:
    """A document's length as a fraction of a sequence: most rows then hold one main document."""
    return rng.uniform(0.65, 0.95)


def _synthetic_domain_docs(spec: _SyntheticDomain, rng: np.random.Generator, n_docs: int,
                           seq_len: int) -> list[tuple[str, str, int]]:
    """`(text, label, copy_of)` in the domain's order; `copy_of` is the position (in that order)
    of the document a near-duplicate copies, -1 for the others."""
    vocab = _pseudo_words(spec.alphabet, spec.vocab_size, rng)
    probs = 1.0 / np.arange(1, len(vocab) + 1) ** spec.zipf
    probs /= probs.sum()
    n_dups = max(1, n_docs // 10)
    clean = []
    for _ in range(n_docs - n_dups):
        n_words = max(4, int(seq_len * _doc_fraction(rng) * spec.words_per_token))
        words = [vocab[i] for i in rng.choice(len(vocab), size=n_words, p=probs)]
        clean.append(_render(spec.template, words, rng))
    originals = rng.choice(len(clean), size=min(n_dups, len(clean)), replace=False)
    dups = [_perturb(clean[i], vocab, rng) for i in originals]
    docs = [(t, CLEAN, -1) for t in clean] + [
        (t, NEAR_DUPLICATE, int(i)) for t, i in zip(dups, originals, strict=True)]
    order = rng.permutation(len(docs))
    position = np.argsort(order)  # position[j]: where docs[j] lands.
    return [(text, label, -1 if source < 0 else int(position[source]))
            for text, label, source in (docs[j] for j in order)]


def _pseudo_words(alphabet: str, n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct random words of 2-8 letters from `alphabet`."""
    words: dict[str, None] = {}
    while len(words) < n:
        ends = np.cumsum(rng.integers(2, 9, size=n))
        letters = "".join(rng.choice(list(alphabet), size=int(ends[-1])))
        for start, end in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True):
            words.setdefault(letters[start:end])
    return list(words)[:n]


def _render(template: str, words: list[str], rng: np.random.Generator) -> str:
    """Lays words out in the domain's template; words stay space-separated tokens."""
    out: list[str] = []
    i = 0
    while i < len(words):
        if template == "prose":
            n = int(rng.integers(6, 18))
            sentence = words[i:i + n]
            out.append(" ".join([sentence[0].capitalize()] + sentence[1:]) + ".")
        elif template == "code":
            n = 4
            w = (words[i:i + n] + words[:n])[:n]
            out.append(f"{w[0]} = {w[1]} ( {w[2]} , {w[3]} )\n")
        else:
            n = 2
            w = (words[i:i + n] + words[:n])[:n]
            a, b = rng.integers(0, 1000, size=2)
            out.append(f"{w[0]} {w[1]} | {a} | {b / 7:.2f}\n")
        i += n
    return " ".join(out)


def _perturb(text: str, vocab: list[str], rng: np.random.Generator) -> str:
    """A near-duplicate: ~5% (at least one) of the vocabulary words replaced by other words."""
    tokens = text.split(" ")
    index = {w: i for i, w in enumerate(vocab)}
    positions = [i for i, t in enumerate(tokens) if t in index]
    for i in rng.choice(positions, size=max(1, len(positions) // 20), replace=False):
        shift = int(rng.integers(1, len(vocab)))  # Never 0: the word always changes.
        tokens[i] = vocab[(index[tokens[i]] + shift) % len(vocab)]
    return " ".join(tokens)


def _junk_soup(rng: np.random.Generator, seq_len: int) -> str:
    """Random printable characters (about one token each)."""
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    return "".join(rng.choice(chars, size=int(seq_len * _doc_fraction(rng))))


def _junk_repeat(rng: np.random.Generator, seq_len: int) -> str:
    """One short random unit repeated (about 2 tokens per repeat)."""
    unit = "".join(rng.choice(list(string.ascii_lowercase + "#*=~"), size=int(rng.integers(1, 5))))
    return " ".join([unit] * int(seq_len * _doc_fraction(rng) / 2))
