"""The embedded local corpus: real text every Python install has, plus man pages and docs.

Domains: `code` (the standard library's source), `docstrings` (the docstrings of the fixed, named
packages `DOCSTRING_PACKAGES`, all dependencies of jaxsel, read from the file lists their installers
recorded, so installing or upgrading any other package changes nothing), `reference` (the Python
reference topics in `pydoc_data`), and where the machine has them `man_<lang>` (man pages, one
domain per language) and `docs` (README and text files under /usr/share/doc).

`discover` lists each domain's items without reading any text, with what they are read from
(`Domain.read_from`: the roots, or the packages with their installed versions); `manifest`
records that in the pool report and `fingerprint_parts` in the pool's cache key.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import importlib.metadata
import itertools
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jaxsel.data.readers import Document, Skip, decode, read_bytes, read_text, stat_key

# Long files are split into documents of at most this many characters (at line boundaries), so
# that one huge file neither dominates a domain nor makes one giant document.
DOC_CHARS = 16_000
# The distributions (as pip names them) whose docstrings make the `docstrings` domain: direct
# dependencies of jaxsel (pyproject.toml) that are mostly Python with documented APIs. A fixed
# list, so the corpus changes only when one of these is upgraded (its version is in the key).
DOCSTRING_PACKAGES = ("absl-py", "flax", "grain", "jax", "matplotlib", "ml-collections", "numpy",
                      "optax", "orbax-checkpoint", "scipy", "tqdm")
MAN_ROOT = Path("/usr/share/man")
DOC_ROOT = Path("/usr/share/doc")
_DOC_SUFFIXES = (".txt", ".md", ".rst")
MIN_MAN_PAGES = 50  # A man page language with fewer pages gets no domain.
MAX_PARSE_BYTES = 256_000  # Larger .py files are not parsed for docstrings (generated code).

# An item is (key, reader): the key is a Path (or a topic name), the reader returns its text or
# raises `Skip`.
Item = tuple[Any, Callable[[], str]]


@dataclasses.dataclass(frozen=True)
class Domain:
    """A domain's items, sorted by key, and what they are read from: `{"roots": [paths]}`, or
    `{"packages": {name: {"version": installed version or None, "files": files read}}}`."""

    items: list[Item]
    read_from: dict[str, Any]


def discover(man_root: Path = MAN_ROOT, doc_root: Path = DOC_ROOT) -> dict[str, Domain]:
    """Domain -> its items and sources. Discovery only lists folders and reads the packages'
    file lists; no text is read. Domains without items are left out."""
    from pydoc_data import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    packages, package_files = _package_files(DOCSTRING_PACKAGES)
    domains = {
        "code": Domain([(p, functools.partial(read_text, p)) for p in _python_files(stdlib)],
                       {"roots": [str(stdlib)]}),
        "docstrings": Domain([(p, functools.partial(_read_docstrings, p)) for p in package_files],
                             {"packages": packages}),
        "reference": Domain([(topic, functools.partial(topics.topics.__getitem__, topic))
                             for topic in sorted(topics.topics)], {"roots": [topics.__file__]}),
    }
    for lang, files in sorted(_man_files(man_root).items()):
        domains[f"man_{lang}"] = Domain(
            [(p, functools.partial(_read_man_page, p)) for p in files],
            {"roots": sorted({str(p.parent.parent) for p in files})})
    domains["docs"] = Domain([(p, functools.partial(read_text, p)) for p in _doc_files(doc_root)],
                             {"roots": [str(doc_root)]})
    return {name: domain for name, domain in domains.items() if domain.items}


def manifest(domains: dict[str, Domain]) -> dict[str, Any]:
    """What the corpus reads, for the pool report: the Python version and each domain's roots
    or packages (with their installed versions)."""
    return {"python": sys.version,
            "domains": {name: domain.read_from for name, domain in domains.items()}}


def fingerprint_parts(domains: dict[str, Domain]) -> dict[str, Any]:
    """What a read depends on, without reading text: the manifest, the document size, and the
    size and mtime of every file read from a root. A package is named by its version instead,
    so reinstalling the same version keeps the key."""
    files = [(name, stat_key(key)) for name, domain in domains.items()
             if "roots" in domain.read_from for key, _ in domain.items if isinstance(key, Path)]
    return dict(manifest=manifest(domains), doc_chars=DOC_CHARS, files=files)


def documents(max_docs: int, skipped: collections.Counter,
              domains: dict[str, Domain] | None = None) -> Iterator[Document]:
    """Reads the corpus domain by domain; long texts become several documents.

    With `max_docs` > 0 a domain reads only the items it needs: items are visited in a strided
    order over the sorted list (every k-th item first, then the next offset) so a capped domain
    still spans the whole alphabet of files instead of its first few.
    """
    domains = discover() if domains is None else domains
    doc_id = 0
    for name, domain in domains.items():
        texts = _read_items(_strided(domain.items, max_docs), skipped)
        chunks = (chunk for text in texts for chunk in split_text(text, DOC_CHARS))
        for chunk in itertools.islice(chunks, max_docs or None):  # Lazy: stops reading early.
            yield Document(doc_id, chunk, name)
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
                raise Skip("empty_text")
        except Skip as skip:
            skipped[skip.reason] += 1
            continue
        yield text


def _package_files(names: tuple[str, ...]) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """Per distribution its installed version (None if it is not installed) and how many `.py`
    files its installer recorded; and all those files, sorted as strings."""
    packages: dict[str, dict[str, Any]] = {}
    files: list[str] = []
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = {"version": None, "files": 0}
            continue
        mine = [str(dist.locate_file(f)) for f in dist.files or () if f.suffix == ".py"]
        packages[name] = {"version": dist.version, "files": len(mine)}
        files += mine
    return packages, [Path(p) for p in sorted(set(files))]


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


def _python_files(stdlib: Path) -> list[Path]:
    """The standard library's `.py` files, without installed packages and bytecode caches."""
    skip = frozenset({"site-packages", "dist-packages", "__pycache__"})
    return [Path(p) for p in _walk_files(stdlib, lambda n: n.endswith(".py"), skip)]


def _read_docstrings(path: Path) -> str:
    """The module's, classes' and functions' docstrings, found with `ast` (nothing is imported).

    Files over `MAX_PARSE_BYTES` (generated tables, mostly) are skipped: parsing is the cost."""
    raw = read_bytes(path)
    if len(raw) > MAX_PARSE_BYTES:
        raise Skip("too_large_to_parse")
    try:
        tree = ast.parse(decode(raw))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise Skip("unparsable_python") from e
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
    source = read_text(path)
    if source.lstrip().startswith(".so "):
        raise Skip("man_alias")  # `.so other.1`: an alias whose text lives in another page.
    return strip_troff(source)


