"""Pin the public surface of ``domainmix.data``."""

from __future__ import annotations

import inspect

import domainmix.data

DATA = [
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


def test_public_names_and_docstrings() -> None:
    assert domainmix.data.__all__ == DATA
    for name in DATA:
        obj = getattr(domainmix.data, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, name
    assert domainmix.data.SPLITS == ("train", "validation", "test")
