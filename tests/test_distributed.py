"""Two processes on the gloo backend: identical weights on every rank, exact global batch composition."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from _helpers import run_torchrun
from domainmix.sampling import allocate_counts

ROOT = Path(__file__).resolve().parents[1]
SIZES = (3000, 1000, 2000)


@pytest.mark.distributed
def test_two_rank_gloo_run(tmp_path: Path) -> None:
    done = run_torchrun(ROOT / "examples" / "distributed_train.py", "--out", str(tmp_path), "--steps", "40")
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # The weights moved, and they are bit-for-bit identical on both ranks after every step.
    assert ranks[0]["mixture"] == ranks[1]["mixture"]
    assert ranks[0]["sampling"] == ranks[1]["sampling"]
    assert ranks[0]["mixture"][-1] != ranks[0]["mixture"][0]

    offsets = [0, SIZES[0], SIZES[0] + SIZES[1]]

    def domain_of(i: int) -> int:
        return max(d for d, o in enumerate(offsets) if i >= o)

    # Every global batch (union of the ranks' batches) has exactly the stratified allocation of the
    # sampling weights in force for it, and no example twice.
    sampling = [[1 / 3] * 3] + ranks[0]["sampling"][:-1]
    for step, (a, b) in enumerate(zip(ranks[0]["batches"], ranks[1]["batches"], strict=True)):
        assert len(a) == len(b) == 16
        union = a + b
        assert len(set(union)) == len(union)
        counts = Counter(domain_of(i) for i in union)
        expected = allocate_counts(torch.tensor(sampling[step], dtype=torch.float64), 32, min_count=1)
        assert [counts[d] for d in range(3)] == list(expected), f"step {step}"
