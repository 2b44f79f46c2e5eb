"""A clean corpus: docstrings out of code, near duplicates dropped, math problems
unique, and the held-out/train line overlap audited and enforced (docs/algorithms.md §4.1)."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from _fakes import FIXTURE, make_licence_wheel, with_archive

import domainmix.data._math as math_module
from domainmix.data import CorpusError, Document, Source, build_corpus, load_corpus
from domainmix.data._audit import Overlap, limit_for, overlaps
from domainmix.data._clean import NearDuplicateFilter, line_keys, normalize_line, strip_docstrings
from domainmix.data._sources import licence_texts, module_docstrings
from domainmix.data.cli import main

# --- docstrings ---------------------------------------------------------------------------------------


def test_strip_docstrings_removes_every_docstring_and_keeps_the_code() -> None:
    source = '''"""Module docstring
over two lines."""

import os  # a comment stays


class A:
    """Class docstring."""

    x = "not a docstring"

    def f(self):
        """Only a docstring."""

    async def g(self):
        \'\'\'Async docstring.\'\'\'  # trailing comment
        return os.sep


def h(): """Inline."""; return 1
'''
    stripped = strip_docstrings(source)
    assert stripped is not None
    tree = ast.parse(stripped)  # still valid Python
    assert module_docstrings(stripped) == []
    for gone in ("Module docstring", "over two lines", "Class docstring", "Only a", "Async", "Inline"):
        assert gone not in stripped
    for kept in ("import os  # a comment stays", 'x = "not a docstring"', "return os.sep", "return 1"):
        assert kept in stripped
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert isinstance(functions["f"].body[0], ast.Pass)  # a body that was only a docstring gets `pass`
    assert isinstance(functions["h"].body[0], ast.Return)  # the statement after `;` stays
    namespace: dict[str, object] = {}
    exec(compile(tree, "<stripped>", "exec"), namespace)
    assert namespace["h"]() == 1  # type: ignore[operator]


def test_strip_docstrings_counts_columns_in_utf8_bytes() -> None:
    source = 'class Ünïcode: """Döc."""\n'  # ast offsets are byte offsets: non-ASCII before the docstring
    assert strip_docstrings(source) == "class Ünïcode: pass\n"


def test_a_file_that_does_not_parse_is_refused_not_guessed() -> None:
    assert strip_docstrings("def (:\n") is None
    assert strip_docstrings("print 'python 2'\n") is None
    assert strip_docstrings("") == ""  # an empty module is valid and has nothing to strip


def test_real_stdlib_files_stay_valid_and_lose_their_docstrings() -> None:
    import json as json_module
    import textwrap

    for module in (json_module, textwrap, ast):
        source = Path(module.__file__ or "").read_text(encoding="utf-8")
        stripped = strip_docstrings(source)
        assert stripped is not None and module_docstrings(stripped) == []
        docs = {key for doc in module_docstrings(source) for key in line_keys(doc)}
        code = list(line_keys(stripped))
        assert sum(key in docs for key in code) <= 0.01 * len(code)


# --- near duplicates ----------------------------------------------------------------------------------

MIT = "\n".join(
    [
        "Permission is hereby granted, free of charge, to any person obtaining a copy",
        "of this software and associated documentation files (the Software), to deal",
        "in the Software without restriction, including without limitation the rights",
        "to use, copy, modify, merge, publish, distribute, sublicense, and/or sell",
        "copies of the Software, and to permit persons to whom the Software is",
        "furnished to do so, subject to the following conditions:",
        "The above copyright notice and this permission notice shall be included in",
        "all copies or substantial portions of the Software.",
        "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR",
        "IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY.",
    ]
)
MIT_VARIANT = MIT.replace("furnished to do so, subject to", "furnished to do so, provided that they obey")
UNRELATED = "\n".join(
    [f"Clause {i}: the licensee shall keep record number {i} of every copy made." for i in range(8)]
    + MIT.splitlines()[8:]  # shares only the warranty disclaimer, 2 of 10 lines
)


def test_normalisation_ignores_spacing_and_case() -> None:
    assert normalize_line("  THE  Software\tIS ") == "the software is"
    assert list(line_keys("short line\n" + "x" * 19 + "\n" + "y" * 20 + "\n")) == ["y" * 20]


def test_near_duplicate_licences_collapse_to_one() -> None:
    unique = NearDuplicateFilter()
    assert unique.keep(MIT)
    assert not unique.keep(MIT.upper().replace(" ", "  "))  # the same text up to case and spacing
    assert not unique.keep(MIT_VARIANT)  # 9 of its 10 lines are the first one's
    assert unique.keep(UNRELATED)  # 2 of 10 shared: a common disclaimer is no duplicate
    assert unique.dropped == 2
    assert list(NearDuplicateFilter().filter([MIT, MIT_VARIANT, UNRELATED])) == [MIT, UNRELATED]


def test_the_builder_drops_a_near_duplicate_licence(tmp_path: Path) -> None:
    licences = {
        "mit": ("Permissive", MIT + "\n"),
        "mit-variant": ("Permissive", MIT_VARIANT + "\n"),
        "other": ("Permissive", "\n".join(UNRELATED.splitlines()[:8]) + "\n"),
    }
    wheel = tmp_path / "cache" / "licensedcode_data-32.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    make_licence_wheel(wheel, licences)
    source = with_archive(licence_texts(), wheel)
    corpus = build_corpus(tmp_path / "c", sources={"legal": source}, cache=wheel.parent, chunk_bytes=128)
    entry = corpus.manifest["domains"]["legal"]
    assert entry["documents_available"] == 3 and entry["near_duplicates_dropped"] == 1
    assert entry["documents"] == 2
    kept = {
        line.split("\t")[1] for line in (corpus.root / "legal" / "index.tsv").read_text().splitlines()[1:]
    }
    assert len(kept) == 2 and "other" in kept  # one of the two MIT texts, whichever the seed orders first


# --- math ---------------------------------------------------------------------------------------------


def test_math_problems_never_repeat_so_test_and_train_are_disjoint(tmp_path: Path) -> None:
    stream = math_module.math_documents(0)
    lines = [line for _ in range(300) for line in next(stream)[1].splitlines()]
    assert len(lines) == len(set(lines)) == 300 * math_module.PROBLEMS_PER_DOCUMENT
    corpus = build_corpus(tmp_path / "m", domains=["math"], max_bytes_per_domain=200_000, chunk_bytes=2048)
    train = set(corpus.text("math", "train").splitlines())
    for split in ("validation", "test"):
        held_out = [line for line in corpus.text("math", split).splitlines() if line]
        assert held_out and not train & set(held_out)  # every line, short ones included


def test_an_exhausted_math_generator_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(math_module, "_TEMPLATES", (lambda rng: f"Compute {rng.randint(1, 9)} = ?",))
    with pytest.raises(math_module.MathExhaustedError, match="no new problem in 1000 draws after 9 problems"):
        math_module.math_document(0, 0)


# --- the audit and the build's refusal ----------------------------------------------------------------


def test_the_fixture_audit_passes_and_matches_its_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(FIXTURE)]) == 0
    table = capsys.readouterr().out
    rows = table.split("limits:")[0]
    assert "test \\ train" in rows and "validation \\ train" in rows and "!" not in rows
    assert main(["audit", str(FIXTURE), "--split", "test", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["passed"] is True and record["min_line_chars"] == 20
    pairs = record["pairs"]
    assert len(pairs) == 36 and {p["split"] for p in pairs} == {"test"}
    assert all(
        not p["exceeded"] and p["rate"] <= p["limit"] for p in pairs
    )  # below even without the interval
    recorded = [p for p in load_corpus(FIXTURE).manifest["overlap"]["pairs"] if p["split"] == "test"]
    assert recorded == pairs  # the build's own audit, recorded in the manifest


def _same_python(fixture: dict) -> bool:
    return sys.version_info[:3] == tuple(int(p) for p in fixture["python_version"].split("."))


@pytest.mark.parametrize(
    "domains",
    [
        pytest.param(["math"], id="math"),
        # Reading and parsing the whole standard library twice takes ~20 s: with the slow tests.
        pytest.param(["code", "docs", "math"], id="code-docs-math", marks=pytest.mark.slow),
    ],
)
def test_the_fixture_rebuilds_and_passes_the_audit(tmp_path: Path, domains: list[str]) -> None:
    # The domains that need no download; code and docs depend on the Python version that built them.
    fixture = dict(load_corpus(FIXTURE).manifest)
    if "code" in domains and not _same_python(fixture):
        pytest.skip(f"the fixture's code and docs were built by Python {fixture['python_version']}")
    corpus = build_corpus(
        tmp_path / "f",
        domains=domains,
        max_bytes_per_domain=fixture["max_bytes_per_domain"],
        chunk_bytes=fixture["chunk_bytes"],
        seed=fixture["seed"],
    )  # would raise CorpusError above a limit
    for domain in domains:
        assert corpus.manifest["domains"][domain] == fixture["domains"][domain]
    assert corpus.manifest["overlap"]["passed"] is True
    held_out = {s: {d: corpus.text(d, s) for d in domains} for s in ("validation", "test")}
    rows = overlaps({d: corpus.text(d, "train") for d in domains}, held_out)
    assert rows and not any(row.exceeded for row in rows)
    assert all(row.shared == 0 for row in rows if row.held_out != row.train)  # across domains: nothing


def _notes(prefix: str, count: int = 40) -> list[Document]:
    return [
        Document(
            f"n{i}", "".join(f"{prefix} note {i}, line {j}: something worth keeping\n" for j in range(20))
        )
        for i in range(count)
    ]


def _source(domain: str, documents: list[Document]) -> Source:
    return Source(domain, "hand-written", "CC0", "notes", lambda archive, seed: documents)


def test_the_build_refuses_a_document_copied_into_another_domain(tmp_path: Path) -> None:
    notes = _notes("A")
    sources = {"notes": _source("notes", notes), "copy": _source("copy", notes[:20] + _notes("B")[20:])}
    out = tmp_path / "c"
    with pytest.raises(CorpusError) as info:
        build_corpus(out, sources=sources, chunk_bytes=512)
    message = str(info.value)
    assert "The overlap of the 'copy' test split with the 'notes' train split must be at most 2.0%" in message
    assert "Got " in message and "lines; 95 % interval from" in message
    assert not (out / "manifest.json").exists()  # refused: never looks like a finished corpus
    build_corpus(tmp_path / "ok", sources={"notes": sources["notes"]}, chunk_bytes=512)  # alone it is clean


def test_the_build_refuses_text_repeated_across_splits(tmp_path: Path) -> None:
    # One document repeating a line is not a near duplicate of another document; its pieces reach every
    # split, and the audit catches it.
    repeated = Document("r", "The same sentence, over and over, in every piece.\n" * 400)
    source = _source("notes", _notes("A", 10) + [repeated])
    with pytest.raises(
        CorpusError, match=r"'notes' test split with the 'notes' train split must be at most 5\.0%"
    ):
        build_corpus(tmp_path / "c", sources={"notes": source}, chunk_bytes=512)


def test_audit_exits_1_on_a_leaking_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = Path(shutil.copytree(FIXTURE, tmp_path / "c"))
    test_file = copy / "drama" / "test.txt"
    test_file.write_text(test_file.read_text() + (copy / "drama" / "train.txt").read_text()[:3000])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["domains"]["drama"]["splits"]["test"]["sha256"] = hashlib.sha256(
        test_file.read_bytes()
    ).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["audit", str(copy), "--split", "test"]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("drama"))
    assert "!" in row
    # Not a corpus at all: 2, so that a script can tell a leak (1) from a wrong folder.
    assert main(["audit", str(tmp_path)]) == 2


def test_limits_and_the_interval() -> None:
    assert limit_for("code", "code") == 0.15 and limit_for("math", "math") == 0.0
    assert limit_for("docs", "code") == 0.02 and limit_for("notes", "notes") == 0.05
    one_shared = Overlap("test", "math", "math", 4000, 1, 0.0)
    assert one_shared.exceeded  # math must share nothing: one line fails it
    small = Overlap("validation", "legal", "legal", 32, 7, 0.12)  # the fixture's legal validation split
    assert small.rate > small.limit and not small.exceeded  # a shared paragraph in 32 lines is noise
    large = Overlap("test", "legal", "legal", 3200, 700, 0.12)  # the same rate on a real-size split
    assert large.exceeded and 0.2 < large.lower_bound < large.rate
