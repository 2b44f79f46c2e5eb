"""A built corpus on disk: ``manifest.json`` and ``<domain>/{train,validation,test}.txt``, checked on load."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from domainmix._validation import Options, check_param, param_error
from domainmix.data._files import sha256_file
from domainmix.data._split import SPLITS

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["MANIFEST", "MANIFEST_FORMAT", "Corpus", "CorpusError", "load_corpus"]

MANIFEST = "manifest.json"
# The corpus version. 2 (domainmix 0.1): code without docstrings, near-duplicate documents
# dropped, math problems unique, the held-out/train line overlap measured and bounded (manifest
# "overlap"); a format-1 corpus leaks up to 38 % of its test lines and is refused, with the rebuild
# command. docs/algorithms.md §4.1 lists the changes.
MANIFEST_FORMAT = 2


class CorpusError(ValueError):
    """A corpus folder is missing, incomplete, or its files do not match ``manifest.json``."""


@dataclass(frozen=True)
class Corpus:
    """A multi-domain text corpus built by :func:`build_corpus`, read from disk.

    Attributes:
        root: the corpus folder.
        manifest: the parsed ``manifest.json`` (sources, licences, sizes, checksums, split rule).
    """

    root: Path
    manifest: Mapping[str, Any]

    @property
    def domains(self) -> tuple[str, ...]:
        """The domain names, in manifest order."""
        return tuple(self.manifest["domains"])

    def path(self, domain: str, split: str) -> Path:
        """The text file of one domain's split."""
        self._check(domain, split, "Corpus.path")
        file: str = self.manifest["domains"][domain]["splits"][split]["file"]
        return self.root / file

    def text(self, domain: str, split: str) -> str:
        """One domain's split as text (UTF-8)."""
        return self.path(domain, split).read_text(encoding="utf-8")

    def tokens(
        self, domain: str, split: str, tokenizer: str | Path | Tokenizer | None = None
    ) -> NDArray[np.uint8 | np.int32]:
        """One domain's split as tokens: bytes (``uint8``) by default, BPE ids (``int32``) with a tokenizer.

        Args:
            domain: a name from :attr:`domains`.
            split: ``"train"``, ``"validation"`` or ``"test"``.
            tokenizer: ``None`` for byte-level tokens, or a ``tokenizer.json`` from :func:`train_bpe`
                (a path or a loaded ``tokenizers.Tokenizer``).

        Returns:
            A 1-D array of token ids.
        """
        from domainmix.data._tokenize import encode

        if tokenizer is None:  # byte level: the file's bytes are the tokens; no decode and re-encode
            self._check(domain, split, "Corpus.tokens")
            return np.fromfile(self.path(domain, split), dtype=np.uint8)
        return encode(self.text(domain, split), tokenizer)

    def split(
        self, name: str, tokenizer: str | Path | Tokenizer | None = None
    ) -> dict[str, NDArray[np.uint8 | np.int32]]:
        """Every domain's tokens for one split: ``{domain: 1-D array}`` (see :meth:`tokens`)."""
        check_param("Corpus.split", "name", name, Options(SPLITS))
        if isinstance(tokenizer, (str, Path)):
            from domainmix.data._tokenize import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)  # once, not once per domain
        return {domain: self.tokens(domain, name, tokenizer) for domain in self.domains}

    def _check(self, domain: str, split: str, caller: str) -> None:
        if domain not in self.manifest["domains"]:
            raise param_error(caller, "domain", f"one of {list(self.domains)}", domain)
        check_param(caller, "split", split, Options(SPLITS))


def load_corpus(path: str | Path, *, verify: bool = True) -> Corpus:
    """Open a corpus folder written by :func:`build_corpus`.

    Args:
        path: the folder holding ``manifest.json``.
        verify: recompute every split file's SHA-256 and compare it with the manifest (about 0.1 s for
            18 MB); a corpus edited by hand or half rewritten is refused instead of silently used.

    Returns:
        The corpus.

    Raises:
        CorpusError: no manifest, an unreadable or unknown-format manifest, or files missing or
            different from their recorded checksums (all of them listed).
    """
    root = Path(path)
    manifest_path = root / MANIFEST
    rebuild = f"rebuild it with: domainmix data build-corpus --out {root}"
    if not manifest_path.is_file():
        raise CorpusError(f"No {MANIFEST} in {root}: not a corpus, or its build did not finish; {rebuild}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorpusError(f"Cannot read {manifest_path}: {error}; {rebuild}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorpusError(
            f"{manifest_path} has format {found!r}; this domainmix reads format {MANIFEST_FORMAT}; {rebuild}"
        )
    corpus = Corpus(root, manifest)
    if verify:
        problems = verify_files(corpus)
        if problems:
            listed = "\n".join(f"- {p}" for p in problems)
            raise CorpusError(
                f"The corpus in {root} does not match its {MANIFEST} (files modified, or a build was "
                f"interrupted):\n{listed}\nRe-run the build, or {rebuild}"
            )
    return corpus


def verify_files(corpus: Corpus) -> list[str]:
    """One line per split or index file that is missing or whose SHA-256 differs from the manifest."""
    problems = []
    for entry in corpus.manifest["domains"].values():
        records = [entry["splits"][name] for name in SPLITS] + [entry["index"]]
        for record in records:
            path = corpus.root / record["file"]
            if not path.is_file():
                problems.append(f"{record['file']}: missing")
                continue
            actual = sha256_file(path)
            if actual != record["sha256"]:
                problems.append(f"{record['file']}: sha256 {actual}, manifest says {record['sha256']}")
    return problems
