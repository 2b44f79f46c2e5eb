"""The package's one atomic-write helper: all or nothing, no temporary file left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from domainmix._atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_writes_replace_the_file_and_leave_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"  # the folder is created
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write_text(target, "é\n")
    assert target.read_bytes() == "é\n".encode()  # UTF-8, no newline translation
    atomic_write_json(target, {"a": [1, 2]}, indent=1)
    assert target.read_text(encoding="utf-8") == json.dumps({"a": [1, 2]}, indent=1)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["out.bin"]


class _Boom(RuntimeError):
    pass


def test_a_failing_writer_keeps_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("previous", encoding="utf-8")
    with pytest.raises(_Boom), atomic_path(target) as temporary:
        temporary.write_text("half a fi", encoding="utf-8")
        raise _Boom
    with pytest.raises(ValueError, match="Out of range float"):
        atomic_write_json(target, {"x": float("nan")}, allow_nan=False)
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text(encoding="utf-8") == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_writer_that_creates_nothing_raises_and_keeps_the_file(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("kept", encoding="utf-8")
    with pytest.raises(FileNotFoundError), atomic_path(target):
        pass
    assert target.read_text(encoding="utf-8") == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_the_temporary_name_keeps_the_suffix_for_np_save(tmp_path: Path) -> None:
    target = tmp_path / "cache.npy"
    array = np.arange(6, dtype=np.float16).reshape(2, 3)
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary.suffix == ".npy"
        assert temporary.name.startswith(".cache.npy.")
        np.save(temporary, array)  # would write temporary + ".npy" if the name lacked the suffix
    np.testing.assert_array_equal(np.load(target), array)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npy"]


def test_the_temporary_name_keeps_the_suffix_for_savefig(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    target = tmp_path / "figure.png"
    with atomic_path(target) as temporary:
        fig.savefig(temporary)  # the format comes from the suffix
    plt.close(fig)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_a_target_name_near_the_length_limit_is_written(tmp_path: Path) -> None:
    # the temporary name adds a pid, a token and ".tmp": it is cut to fit where the target's name fits
    target = tmp_path / ("é" * 60 + "x" * 120 + ".json")  # 245 bytes in UTF-8
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
