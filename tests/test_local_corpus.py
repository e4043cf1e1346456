"""The local corpus: real domains, deterministic reads, man pages and docs, and a docstrings
domain that depends on its named packages (and their versions) only."""

import collections
import functools
import gzip
import importlib
import importlib.metadata
import shutil
import sys
import sysconfig

from jaxsel import config as config_lib
from jaxsel.data import local_corpus, sources


def _keys(domain):
    return [str(key) for key, _ in domain.items]


def test_local_corpus_has_real_domains_and_is_deterministic():
    domains = local_corpus.discover()
    for domain in domains.values():  # Discovery order is sorted, so reads are repeatable.
        assert _keys(domain) == sorted(_keys(domain))

    def read():
        skipped = collections.Counter()
        return [(d.doc_id, d.domain, d.text)
                for d in local_corpus.documents(1, skipped, domains)]

    docs = read()
    counts = collections.Counter(domain for _, domain, _ in docs)
    assert {"code", "docstrings", "reference"} <= set(counts) and len(counts) >= 3
    assert all(count == 1 for count in counts.values())
    assert all(text.strip() and len(text) <= local_corpus.DOC_CHARS for _, _, text in docs)
    assert read() == docs
    assert domains["code"].read_from == {"roots": [sysconfig.get_paths()["stdlib"]]}


def test_local_capped_domain_spreads_over_its_sorted_items():
    items = [(f"item{i:03d}", lambda i=i: f"text {i}") for i in range(100)]
    domains = {"d": local_corpus.Domain(items, {"roots": []})}
    docs = list(local_corpus.documents(5, collections.Counter(), domains))
    assert [d.text for d in docs] == [f"text {i}" for i in (0, 20, 40, 60, 80)]


def _troff_page(name: str) -> str:
    return (f'.\\" comment line\n.TH {name.upper()} 1 "2024"\n.SH NAME\n'
            f"{name} \\- does \\fBthings\\fR\n.SH SYNOPSIS\n.B {name}\n\\fIfile\\fP\n")


def test_man_pages_and_docs_become_domains_per_language(tmp_path, monkeypatch):
    monkeypatch.setattr(local_corpus, "MIN_MAN_PAGES", 2)
    man, doc = tmp_path / "man", tmp_path / "doc"
    for lang_dir in ("man1", "de/man1", "de.UTF-8/man8", "fi/man1"):
        (man / lang_dir).mkdir(parents=True)
    (man / "man1" / "foo.1.gz").write_bytes(gzip.compress(_troff_page("foo").encode()))
    (man / "man1" / "bar.1").write_text(_troff_page("bar"))
    (man / "man1" / "alias.1").write_text(".so man1/foo.1\n")
    (man / "man1" / "broken.1.gz").write_bytes(b"not gzip")
    (man / "man1" / "link.1.gz").symlink_to(man / "man1" / "foo.1.gz")
    (man / "de" / "man1" / "foo.1").write_text(_troff_page("foo"))
    (man / "de.UTF-8" / "man8" / "baz.8").write_text(_troff_page("baz"))
    (man / "fi" / "man1" / "only.1").write_text(_troff_page("only"))  # Under MIN_MAN_PAGES.
    (doc / "pkg").mkdir(parents=True)
    (doc / "pkg" / "README.md").write_text("# pkg\nread me\n")
    (doc / "pkg" / "notes.txt.gz").write_bytes(gzip.compress(b"some notes\n"))
    (doc / "pkg" / "copyright").write_text("not documentation")
    (doc / "pkg" / "index.html").write_text("<html>skipped</html>")

    domains = {k: v for k, v in local_corpus.discover(man, doc).items()
               if k.startswith("man_") or k == "docs"}
    assert {k: v.read_from for k, v in domains.items()} == {
        "man_en": {"roots": [str(man)]},
        "man_de": {"roots": [str(man / "de"), str(man / "de.UTF-8")]},
        "docs": {"roots": [str(doc)]}}
    skipped = collections.Counter()
    docs = list(local_corpus.documents(0, skipped, domains))
    by_domain = collections.defaultdict(list)
    for d in docs:
        by_domain[d.domain].append(d.text)
    assert sorted(by_domain) == ["docs", "man_de", "man_en"]
    assert len(by_domain["man_en"]) == 2 and len(by_domain["man_de"]) == 2
    assert sorted(by_domain["docs"]) == ["# pkg\nread me\n", "some notes\n"]
    assert skipped == {"man_alias": 1, "unreadable_file": 1}
    foo = next(t for t in by_domain["man_en"] if "foo" in t)
    assert "NAME" in foo and "foo - does things" in foo and "file" in foo
    assert "\\f" not in foo and ".TH" not in foo and "comment" not in foo


def test_split_text_keeps_all_text_in_pieces_of_bounded_size():
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(1, 200)) + "x" * 250 + "\nend\n"
    pieces = local_corpus.split_text(text, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert "".join(pieces) == text


# ------------------------------------------------------------------------------------------------
# The docstrings domain: the named packages, nothing else.


def test_docstrings_are_the_named_packages_files_with_their_versions():
    domain = local_corpus.discover()["docstrings"]
    expected, packages = set(), {}
    for name in local_corpus.DOCSTRING_PACKAGES:
        dist = importlib.metadata.distribution(name)
        files = {str(dist.locate_file(f)) for f in dist.files if str(f).endswith(".py")}
        expected |= files
        packages[name] = {"version": importlib.metadata.version(name), "files": len(files)}
    assert set(_keys(domain)) == expected
    assert domain.read_from == {"packages": packages}
    # Test tools are installed in this venv, but are no dependency of jaxsel: never read.
    pytest_files = {str(importlib.metadata.distribution("pytest").locate_file(f))
                    for f in importlib.metadata.distribution("pytest").files}
    assert not pytest_files & expected
    assert not {"pytest", "ruff"} & set(local_corpus.DOCSTRING_PACKAGES)


def _install(site, name, version):
    """Installs a fake distribution as pip would (an upgrade replaces the old dist-info): a
    module with docstrings and a dist-info whose RECORD lists its files."""
    module = name.replace("-", "_")
    for old in site.glob(f"{module}-*.dist-info"):
        shutil.rmtree(old)
    (site / module).mkdir(parents=True, exist_ok=True)
    (site / module / "__init__.py").write_text(f'"""The {name} package, {version}."""\n')
    (site / module / "core.py").write_text('def f():\n    """Does f."""\n')
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    record = [f"{module}/__init__.py", f"{module}/core.py", f"{info.name}/METADATA",
              f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in record))
    importlib.invalidate_caches()


def test_only_a_named_package_and_its_version_change_the_corpus(tmp_path, monkeypatch):
    site, other_site = tmp_path / "site", tmp_path / "other-site"
    site.mkdir()
    other_site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(other_site))
    monkeypatch.setattr(local_corpus, "DOCSTRING_PACKAGES", ("jaxsel-fake-listed", "tqdm"))
    monkeypatch.setattr(local_corpus, "discover", functools.partial(  # No man pages: faster.
        local_corpus.discover, man_root=tmp_path / "no-man", doc_root=tmp_path / "no-doc"))
    config = config_lib.base_config("tiny").data  # source "local"

    def state():
        domains = local_corpus.discover()
        return (_keys(domains["docstrings"]), domains["docstrings"].read_from,
                sources.source_fingerprint(config))

    files, read_from, key = state()
    assert read_from["packages"]["jaxsel-fake-listed"] == {"version": None, "files": 0}
    _install(site, "jaxsel-fake-listed", "1.0")
    files, read_from, installed_key = state()
    assert installed_key != key
    tqdm = importlib.metadata.distribution("tqdm")
    assert set(files) == {str(site / "jaxsel_fake_listed" / "__init__.py"),
                          str(site / "jaxsel_fake_listed" / "core.py")} | {
        str(tqdm.locate_file(f)) for f in tqdm.files if str(f).endswith(".py")}
    assert read_from["packages"]["jaxsel-fake-listed"] == {"version": "1.0", "files": 2}

    # Installing unrelated packages, beside it or in another site folder, changes nothing.
    _install(site, "jaxsel-fake-unrelated", "3.0")
    _install(other_site, "jaxsel-fake-other", "0.1")
    assert importlib.metadata.version("jaxsel-fake-unrelated") == "3.0"
    assert state() == (files, read_from, installed_key)

    # Upgrading the named one changes the key, and the manifest says so.
    _install(site, "jaxsel-fake-listed", "1.1")
    upgraded_files, upgraded_from, upgraded_key = state()
    assert upgraded_files == files and upgraded_key != installed_key
    assert upgraded_from["packages"]["jaxsel-fake-listed"]["version"] == "1.1"
    assert local_corpus.manifest(local_corpus.discover())["domains"]["docstrings"] == \
        upgraded_from
    assert local_corpus.manifest({})["python"] == sys.version
