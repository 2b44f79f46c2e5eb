"""Loading the committed fixture corpus: byte tokens, checksum verification, BPE training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _fakes import FIXTURE

from domainmix.data import SPLITS, Corpus, CorpusError, encode, load_corpus, load_tokenizer, train_bpe

LIMIT = 100_000  # committed fixtures: at most 100 KB of text per domain


@pytest.fixture
def corpus_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "corpus"))


def test_fixture_is_six_small_domains() -> None:
    corpus = load_corpus(FIXTURE)
    assert corpus.domains == ("code", "docs", "drama", "scripture", "legal", "math")
    for domain in corpus.domains:
        assert sum(p.stat().st_size for p in (FIXTURE / domain).iterdir()) <= LIMIT
        assert all(corpus.text(domain, s) for s in SPLITS)
    assert corpus.manifest["domains"]["legal"]["options"] == {"categories": ["Permissive"]}


def test_byte_level_split_is_the_file_bytes() -> None:
    corpus = load_corpus(FIXTURE)
    train = corpus.split("train")
    assert list(train) == list(corpus.domains)
    for domain, tokens in train.items():
        assert tokens.dtype == np.uint8 and tokens.ndim == 1
        assert tokens.tobytes().decode("utf-8") == corpus.text(domain, "train")
        assert len(tokens) == corpus.manifest["domains"][domain]["splits"]["train"]["bytes"]
    assert np.array_equal(encode("héllo"), np.frombuffer("héllo".encode(), np.uint8))


def test_splits_of_the_fixture_share_no_piece() -> None:
    for domain in load_corpus(FIXTURE).domains:
        rows = [line.split("\t") for line in (FIXTURE / domain / "index.tsv").read_text().splitlines()[1:]]
        keys = [(doc, piece) for _, doc, piece, _ in rows]
        assert len(keys) == len(set(keys))
        assert {split for split, *_ in rows} == set(SPLITS)


def test_a_modified_file_fails_verification(corpus_copy: Path) -> None:
    path = corpus_copy / "drama" / "test.txt"
    path.write_text(path.read_text() + "An extra line.\n")
    (corpus_copy / "math" / "validation.txt").unlink()
    with pytest.raises(CorpusError) as info:
        load_corpus(corpus_copy)
    message = str(info.value)
    assert "drama/test.txt: sha256" in message and "math/validation.txt: missing" in message
    assert f"domainmix data build-corpus --out {corpus_copy}" in message
    assert isinstance(load_corpus(corpus_copy, verify=False), Corpus)  # opt out, at the caller's risk


def test_missing_or_foreign_manifest(tmp_path: Path, corpus_copy: Path) -> None:
    with pytest.raises(CorpusError, match="No manifest.json in"):
        load_corpus(tmp_path / "nothing")
    manifest = corpus_copy / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(CorpusError, match="Cannot read"):
        load_corpus(corpus_copy)
    manifest.write_text(json.dumps({"format": 99}))
    with pytest.raises(CorpusError, match="has format 99; this domainmix reads format 2"):
        load_corpus(corpus_copy)
    manifest.write_text(json.dumps({"format": 1}))  # the leaky corpus format 1
    with pytest.raises(CorpusError, match="has format 1; .* rebuild it with: domainmix data build-corpus"):
        load_corpus(corpus_copy)


def test_bad_split_or_domain_names() -> None:
    corpus = load_corpus(FIXTURE)
    with pytest.raises(ValueError, match=r"The 'name' parameter of Corpus.split must be one of \{'train'"):
        corpus.split("dev")
    with pytest.raises(ValueError, match="The 'domain' parameter of Corpus.path must be one of"):
        corpus.path("poetry", "train")
    with pytest.raises(ValueError, match="The 'text' parameter of encode must be a str"):
        encode(b"bytes")  # type: ignore[arg-type]


def test_bpe_trains_offline_on_the_train_splits(corpus_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tokenizers", reason="BPE is the optional 'tokenizers' dependency (domainmix[data])")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = train_bpe(corpus_copy, vocab_size=512)
    assert path == corpus_copy / "tokenizer-bpe512.json" and path.is_file()
    corpus = load_corpus(corpus_copy)  # the tokenizer file beside the corpus does not upset verification
    tokenizer = load_tokenizer(path)
    assert tokenizer.get_vocab_size() == 512
    text = corpus.text("drama", "test")
    ids = encode(text, path)
    assert ids.dtype == np.int32 and ids.max() < 512
    assert tokenizer.decode(ids.tolist()) == text  # byte-level BPE round-trips exactly
    assert len(ids) < len(text.encode()) / 1.5  # and compresses
    validation = corpus.split("validation", tokenizer=path)
    assert set(validation) == set(corpus.domains) and all(v.dtype == np.int32 for v in validation.values())
    again = train_bpe(corpus, vocab_size=512, out=corpus_copy / "again.json")
    assert again.read_text() == path.read_text()  # deterministic


def test_bpe_argument_errors(corpus_copy: Path) -> None:
    with pytest.raises(
        ValueError, match="The 'vocab_size' parameter of train_bpe must be an int in the range"
    ):
        train_bpe(corpus_copy, vocab_size=100)
    with pytest.raises(ValueError, match="The 'path' parameter of load_tokenizer must be an existing"):
        load_tokenizer(corpus_copy / "missing.json")
