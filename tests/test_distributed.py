"""Two processes on the gloo backend: identical weights on every rank, exact global batch composition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import assert_two_rank_run, run_torchrun
from domainmix._distributed import collective_device

ROOT = Path(__file__).resolve().parents[1]
SIZES = (3000, 1000, 2000)


@pytest.mark.distributed
def test_two_rank_gloo_run(tmp_path: Path) -> None:
    done = run_torchrun(ROOT / "examples" / "distributed_train.py", "--out", str(tmp_path), "--steps", "40")
    assert done.returncode == 0, done.stderr[-4000:]
    assert_two_rank_run(tmp_path, SIZES, 16)


@pytest.mark.distributed
def test_hand_set_weights_are_broadcast_from_rank_zero(tmp_path: Path) -> None:
    done = run_torchrun(
        ROOT / "examples" / "distributed_train.py",
        "--out",
        str(tmp_path),
        "--steps",
        "30",
        "--override-at",
        "15",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert_two_rank_run(tmp_path, SIZES, 16)  # identical weights on both ranks, exact global batches
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["sampling"][13] != [0.5, 0.25, 0.25]
    assert all(q == [0.5, 0.25, 0.25] for q in rank0["sampling"][14:])  # held from step 15 on
    assert [0.5, 0.25, 0.25] in [q for _, q in rank0["history"]]


@pytest.mark.parametrize(
    ("device", "config", "expected"),
    [
        ("cpu", "cpu:gloo,cuda:nccl", None),  # both served: in place
        ("cpu", "cpu:gloo", None),
        ("cuda", "cpu:gloo,cuda:nccl", None),
        ("cpu", "cuda:nccl", "cuda"),  # init_process_group("nccl"): CPU statistics go through the GPU
        ("cpu", "xpu:xccl", "xpu"),
        ("cuda", "cpu:gloo", "cpu"),
    ],
)
def test_collectives_run_on_a_device_the_process_group_serves(
    device: str, config: str, expected: str | None
) -> None:
    found = collective_device(torch.device(device), config)
    assert (found if found is None else found.type) == expected


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RANK": "x"}, r"'rank' parameter .* an int \(read from the environment variable RANK\). Got 'x'"),
        ({"WORLD_SIZE": "two"}, r"'world_size' parameter .* environment variable WORLD_SIZE\). Got 'two'"),
        (
            {"RANK": "3"},
            r"'rank' parameter .* \[0, 0\] \(read from the environment: RANK=3\) \(WORLD_SIZE unset",
        ),
    ],
)
def test_rank_and_world_size_from_the_environment_are_named_as_such(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], match: str
) -> None:
    from domainmix.sampling import DomainBatchSampler

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=match):
        DomainBatchSampler({"a": range(4)}, 2)
