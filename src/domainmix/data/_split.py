"""Deterministic document splits: chunk documents into pieces, assign each piece by a hash of its id.

A piece's split depends only on ``(seed, domain, doc_id, piece number)``, never on the other documents,
so adding a document (or raising the size cap) moves no existing piece to another split. Chunking comes
first so that a domain of a few large documents (42 plays) still fills all three splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["SPLITS", "Piece", "assign_splits", "chunk_text", "hash_fraction", "split_rule"]

SPLITS = ("train", "validation", "test")


class Piece(NamedTuple):
    """A chunk of a document: ``text`` is whole lines as :func:`chunk_text` cuts them."""

    doc_id: str
    number: int
    text: str

    @property
    def id(self) -> str:
        """``doc_id#number``: unique within a domain."""
        return f"{self.doc_id}#{self.number}"


def hash_fraction(*parts: object) -> float:
    """A number in [0, 1) from SHA-256 of the parts joined by the unit separator; stable on every machine."""
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def chunk_text(text: str, chunk_bytes: int) -> list[str]:
    r"""Cut ``text`` into pieces of whole lines, each at most ``chunk_bytes`` UTF-8 bytes.

    A piece ends at the last blank line of its second half when there is one (a scene, a paragraph, a
    function), otherwise at the last line that fits. A single line longer than ``chunk_bytes`` becomes a
    piece of its own. Concatenating the pieces gives back ``text``. Lines are ``str.splitlines``'s, so a
    piece may also end at a form feed, ``\x1c``-``\x1e``, ``\x85``, ``\u2028`` or ``\u2029`` rather than
    at a newline (kept so that corpus format 2 rebuilds byte for byte; the audit and the deduplication
    read lines split at newlines only, so neither is affected).
    """
    lines = text.splitlines(keepends=True)
    sizes = [len(line.encode("utf-8")) for line in lines]
    pieces: list[str] = []
    start = 0
    while start < len(lines):
        end, total, paragraph_end = start, 0, None
        while end < len(lines) and (end == start or total + sizes[end] <= chunk_bytes):
            total += sizes[end]
            end += 1
            if not lines[end - 1].strip() and total >= chunk_bytes // 2:
                paragraph_end = end
        if end < len(lines) and paragraph_end is not None:
            end = paragraph_end
        pieces.append("".join(lines[start:end]))
        start = end
    return pieces


def split_rule(fractions: Sequence[float]) -> str:
    """The rule in words, for the manifest."""
    train, validation, test = fractions
    return (
        f"u = first 8 bytes of sha256(f'{{seed}}\\x1f{{domain}}\\x1f{{doc_id}}\\x1f{{piece}}') / 2**64; "
        f"test if u < {test}, validation if u < {test + validation}, else train "
        f"(train {train}). A split left empty takes the piece of smallest u from the largest split."
    )


def assign_splits(
    pieces: Sequence[Piece], *, domain: str, seed: int, fractions: Sequence[float]
) -> dict[str, list[Piece]]:
    """Split pieces into ``SPLITS`` by ``hash_fraction(seed, domain, doc_id, number)``, keeping their order.

    ``fractions`` is ``(train, validation, test)``, summing to one. With very few pieces a split can come
    out empty by chance; it then takes the piece of smallest hash value from the largest split (deterministic
    too), so with at least three pieces every split has text.
    """
    _, validation, test = fractions
    score = {p.id: hash_fraction(seed, domain, p.doc_id, p.number) for p in pieces}
    assigned: dict[str, list[Piece]] = {name: [] for name in SPLITS}
    for piece in pieces:
        u = score[piece.id]
        name = "test" if u < test else "validation" if u < test + validation else "train"
        assigned[name].append(piece)
    for name in ("test", "validation", "train"):
        largest = max(SPLITS, key=lambda s: len(assigned[s]))  # the first of equals: train before the others
        if not assigned[name] and len(assigned[largest]) > 1:
            donor = min(assigned[largest], key=lambda p: score[p.id])
            assigned[largest].remove(donor)
            assigned[name].append(donor)
    return assigned
