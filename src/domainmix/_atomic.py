"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer goes through a temporary file in the target's folder and ``os.replace``, which is atomic
within one file system (hence the same folder). If the writer fails, the temporary file is removed and the
previous file, if any, is left as it was. The temporary file is flushed to disk (``fsync``) before the
rename, so a crash of the machine right after it cannot leave a renamed but empty file either, and on
POSIX the folder is flushed after it, so that the rename is on disk too.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]

PathLike = str | os.PathLike[str]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces ``path``, on an error it is removed.

    For writers that need a file name (``np.save``, ``savefig``). The temporary name lives in the same
    folder, starts with a dot and ends with the real suffix (``.figure.png.<random>.tmp.png``), because
    ``np.save`` appends ``.npy`` to a name without it and ``savefig`` picks the format from the suffix.
    The folder is created if missing. The file is not created in advance, so it gets the usual
    umask permissions (``mkstemp`` would make it 0600).

    Args:
        path: the file to write.

    Yields:
        The temporary path; the writer must create the file there.

    Raises:
        FileNotFoundError: if the writer exits cleanly without creating the temporary file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # pid + random token: two processes, or two threads, writing the same target never share a name.
    tail = f".{os.getpid()}-{secrets.token_hex(4)}.tmp{target.suffix}"
    # within the 255-byte name limit: a target name near it must not fail where a plain open() works
    room = max(_NAME_MAX - 1 - len(tail.encode()), 0)
    stem = target.name.encode()[:room].decode(errors="ignore")
    temporary = target.with_name(f".{stem}{tail}")
    try:
        yield temporary
        with open(temporary, "r+b") as written:  # writable: Windows' fsync (FlushFileBuffers) needs it
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)


_NAME_MAX = 255  # bytes in a file name on the usual file systems (ext4, APFS, NTFS in UTF-16 units)


def _sync_folder(folder: Path) -> None:
    """Flush the folder's entry for the renamed file, so that the rename itself survives a crash (POSIX)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`).

    Args:
        path: the file to write; its folder is created if missing.
        data: the whole new content.
    """
    with atomic_path(path) as temporary, open(temporary, "xb") as out:
        out.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, encoded as is (no newline translation on any platform).

    Args:
        path: the file to write; its folder is created if missing.
        text: the whole new content.
        encoding: the text encoding (default UTF-8).
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, **json_kwargs: Any) -> None:
    """Write ``json.dumps(obj, **json_kwargs)`` to ``path`` atomically, as UTF-8 (nothing is appended).

    The document is serialised before anything is written, so an object that cannot be serialised
    raises with the previous file untouched and no temporary file created.

    Args:
        path: the file to write; its folder is created if missing.
        obj: the JSON-serialisable object.
        **json_kwargs: passed to :func:`json.dumps` (``indent``, ``allow_nan``, ``sort_keys``...).
    """
    atomic_write_text(path, json.dumps(obj, **json_kwargs))
