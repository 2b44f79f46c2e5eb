"""Tokens: raw UTF-8 bytes by default (no dependency), or a byte-level BPE trained locally on the corpus.

The BPE is the ``tokenizers`` library's ``ByteLevelBPETokenizer`` trained on the train splits only, so
validation and test text never shapes the vocabulary. Training needs no network (measured: vocab 4,096 on
5 MB in 1.2 s; docs/algorithms.md §4).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from domainmix._atomic import atomic_path
from domainmix._validation import Interval, check_param, param_error

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from domainmix.data._corpus import Corpus

__all__ = ["bpe_path", "encode", "load_tokenizer", "train_bpe"]

BYTE_VOCAB_SIZE = 256


def _tokenizers() -> ModuleType:
    # Imported late: it is an optional dependency.
    # The hub client that tokenizers can pull in must never try the network from here.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(
            "A BPE tokenizer needs the 'tokenizers' package: pip install 'domainmix[data]' "
            "(byte-level tokens need nothing: pass tokenizer=None)"
        ) from error
    return tokenizers


def bpe_path(corpus_dir: str | Path, vocab_size: int) -> Path:
    """Where :func:`train_bpe` saves by default: ``<corpus>/tokenizer-bpe<vocab_size>.json``."""
    return Path(corpus_dir) / f"tokenizer-bpe{vocab_size}.json"


def train_bpe(
    corpus: str | Path | Corpus,
    vocab_size: int = 4096,
    *,
    out: str | Path | None = None,
    min_frequency: int = 2,
) -> Path:
    """Train a byte-level BPE on the corpus's train splits (all domains) and save ``tokenizer.json``.

    Args:
        corpus: a corpus folder or a loaded :class:`Corpus` (its checksums are verified on load).
        vocab_size: the vocabulary size, the 256 byte tokens included; >= 257.
        out: the file to write; default ``bpe_path(corpus, vocab_size)`` inside the corpus folder.
        min_frequency: a pair must occur this often to be merged.

    Returns:
        The path of the saved tokenizer, for :func:`encode` or :meth:`Corpus.tokens`.

    Raises:
        ImportError: ``tokenizers`` is not installed.
    """
    from domainmix.data._corpus import Corpus, load_corpus

    vocab_size = check_param("train_bpe", "vocab_size", vocab_size, Interval(int, BYTE_VOCAB_SIZE + 1, None))
    min_frequency = check_param("train_bpe", "min_frequency", min_frequency, Interval(int, 1, None))
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    tokenizers = _tokenizers()
    model = tokenizers.ByteLevelBPETokenizer()
    files = [str(corpus.path(domain, "train")) for domain in corpus.domains]
    model.train(files, vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False)
    target = Path(out) if out is not None else bpe_path(corpus.root, vocab_size)
    with atomic_path(target) as temporary:
        model.save(str(temporary))
    return target


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` written by :func:`train_bpe`."""
    if not Path(path).is_file():
        raise param_error("load_tokenizer", "path", "an existing tokenizer.json file", str(path))
    tokenizer: Tokenizer = _tokenizers().Tokenizer.from_file(str(path))
    return tokenizer


def encode(text: str, tokenizer: str | Path | Tokenizer | None = None) -> NDArray[np.uint8 | np.int32]:
    """Token ids of ``text``.

    Args:
        text: the text.
        tokenizer: ``None`` for byte-level tokens, else a tokenizer file or a loaded ``tokenizers.Tokenizer``.

    Returns:
        ``uint8`` bytes of the UTF-8 text (vocabulary 256), or ``int32`` BPE ids.
    """
    if not isinstance(text, str):
        raise param_error("encode", "text", "a str", text)
    if tokenizer is None:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int32)
