"""Two processes on the gloo backend: identical weights on every rank, exact global batch composition."""

from __future__ import annotations

from pathlib import Path

import pytest

from _helpers import assert_two_rank_run, run_torchrun

ROOT = Path(__file__).resolve().parents[1]
SIZES = (3000, 1000, 2000)


@pytest.mark.distributed
def test_two_rank_gloo_run(tmp_path: Path) -> None:
    done = run_torchrun(ROOT / "examples" / "distributed_train.py", "--out", str(tmp_path), "--steps", "40")
    assert done.returncode == 0, done.stderr[-4000:]
    assert_two_rank_run(tmp_path, SIZES, 16)
