"""Chunking and the hash split: deterministic, disjoint, stable when documents are added."""

from __future__ import annotations

import pytest

from domainmix.data._split import SPLITS, Piece, assign_splits, chunk_text, hash_fraction

FRACTIONS = (0.9, 0.05, 0.05)


def test_hash_fraction_is_pinned() -> None:
    # A change here silently reshuffles every corpus ever built: it must be deliberate.
    assert hash_fraction(0, "drama", "hamlet", 0) == pytest.approx(0.2565827351235989, abs=1e-15)
    assert 0 <= hash_fraction("x") < 1
    assert hash_fraction(1, "a") != hash_fraction(0, "a")


def test_chunk_text_round_trips_and_respects_the_size() -> None:
    text = "".join(f"line {i} " + "x" * (i % 37) + "\n" + ("\n" if i % 7 == 0 else "") for i in range(400))
    pieces = chunk_text(text, 300)
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= 300 for p in pieces)
    assert all(p.endswith("\n") for p in pieces)


def test_chunk_text_prefers_paragraph_ends_and_keeps_long_lines_whole() -> None:
    paragraph = "a" * 30 + "\n" + "b" * 30 + "\n\n"  # 64 bytes
    pieces = chunk_text(paragraph * 3, 150)
    assert pieces == [paragraph * 2, paragraph]  # cut after the blank line, not mid-paragraph
    long_line = "z" * 500 + "\n"
    assert chunk_text("short\n" + long_line + "tail\n", 100) == ["short\n", long_line, "tail\n"]
    assert chunk_text("", 100) == []


def _pieces(doc_ids: list[str], per_doc: int = 10) -> list[Piece]:
    return [Piece(d, i, f"{d} {i}\n") for d in doc_ids for i in range(per_doc)]


def test_splits_are_deterministic_disjoint_and_near_the_fractions() -> None:
    pieces = _pieces([f"doc{i}" for i in range(200)])
    first = assign_splits(pieces, domain="code", seed=0, fractions=FRACTIONS)
    second = assign_splits(pieces, domain="code", seed=0, fractions=FRACTIONS)
    assert first == second
    ids = [p.id for name in SPLITS for p in first[name]]
    assert sorted(ids) == sorted(p.id for p in pieces)  # every piece exactly once
    shares = {name: len(first[name]) / len(pieces) for name in SPLITS}
    assert shares["train"] == pytest.approx(0.9, abs=0.03)
    assert shares["validation"] == pytest.approx(0.05, abs=0.02)
    other_seed = assign_splits(pieces, domain="code", seed=1, fractions=FRACTIONS)
    assert other_seed != first
    other_domain = assign_splits(pieces, domain="docs", seed=0, fractions=FRACTIONS)
    assert other_domain != first


def test_adding_documents_moves_no_existing_piece() -> None:
    small = _pieces([f"doc{i}" for i in range(100)])
    large = _pieces([f"doc{i}" for i in range(150)])
    before = assign_splits(small, domain="drama", seed=0, fractions=FRACTIONS)
    after = assign_splits(large, domain="drama", seed=0, fractions=FRACTIONS)
    where = {p.id: name for name in SPLITS for p in after[name]}
    assert all(where[p.id] == name for name in SPLITS for p in before[name])


def test_an_empty_split_takes_the_smallest_hash_piece() -> None:
    pieces = _pieces(["only"], per_doc=3)
    assigned = assign_splits(pieces, domain="legal", seed=0, fractions=FRACTIONS)
    assert all(len(assigned[name]) == 1 for name in SPLITS)
    assert assigned == assign_splits(pieces, domain="legal", seed=0, fractions=FRACTIONS)
