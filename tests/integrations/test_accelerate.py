"""Accelerate, two CPU processes: the supported loader keeps the global plan; prepare(loader) is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from _helpers import assert_two_rank_run, run_torchrun  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "accelerate_train.py"


@pytest.mark.distributed
def test_prepare_loader_keeps_the_global_plan_on_two_processes(tmp_path: Path) -> None:
    done = run_torchrun(EXAMPLE, "--out", str(tmp_path), "--steps", "30")
    assert done.returncode == 0, done.stderr[-4000:]
    assert_two_rank_run(tmp_path, (3000, 1000, 2000), 16)


@pytest.mark.distributed
def test_accelerator_prepare_of_the_loader_is_refused(tmp_path: Path) -> None:
    done = run_torchrun(EXAMPLE, "--out", str(tmp_path), "--steps", "5", "--wrong-way")
    assert done.returncode != 0
    assert (
        "DomainBatchSampler is being iterated under accelerate.data_loader.BatchSamplerShard" in done.stderr
    )
    assert not list(tmp_path.glob("rank*.json"))


def test_prepare_loader_checks_the_sampler() -> None:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from domainmix.integrations.accelerate import prepare_loader
    from domainmix.sampling import DomainBatchSampler

    accelerator = Accelerator(cpu=True)
    with pytest.raises(ValueError, match="'loader' parameter of prepare_loader must be a DataLoader with"):
        prepare_loader(accelerator, DataLoader(list(range(4)), batch_size=2))
    other = DomainBatchSampler({"a": range(4)}, 2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="a sampler of rank 0 in a world of 1"):
        prepare_loader(accelerator, DataLoader(list(range(4)), batch_sampler=other))
    sampler = DomainBatchSampler({"a": range(2), "b": range(2, 4)}, 2, num_batches=3)
    batches = list(prepare_loader(accelerator, DataLoader(torch.arange(4), batch_sampler=sampler)))
    assert [sorted(b.tolist()) for b in batches] == [sorted(s) for s in DomainBatchSampler(
        {"a": range(2), "b": range(2, 4)}, 2, num_batches=3)]  # fmt: skip


def test_batch_dispatching_is_refused() -> None:
    """dispatch_batches (Accelerate's default for an iterable dataset): rank 0 alone iterates and splits."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from torch.utils.data import DataLoader

    from domainmix.sampling import DomainBatchSampler, DomainMixingIterable

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=True))
    sampler = DomainBatchSampler({"a": range(100), "b": range(100, 200)}, 4, num_batches=4, seed=1)
    loader = accelerator.prepare(DataLoader(torch.arange(200), batch_sampler=sampler))
    with pytest.raises(
        ValueError, match="DomainBatchSampler is being iterated under accelerate.data_loader.DataLoaderD"
    ):
        next(iter(loader))
    mixing = DomainMixingIterable({"a": list(range(10)), "b": list(range(10, 20))}, batch_size=4, seed=1)
    loader = accelerator.prepare(DataLoader(mixing, batch_size=4, collate_fn=lambda items: items))
    with pytest.raises(
        ValueError, match="DomainMixingIterable is being iterated under accelerate.data_loader.DataL"
    ):
        next(iter(loader))


def test_split_batches_is_refused() -> None:
    from accelerate import Accelerator, DataLoaderConfiguration
    from torch.utils.data import DataLoader

    from domainmix.integrations.accelerate import prepare_loader
    from domainmix.sampling import DomainBatchSampler

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    sampler = DomainBatchSampler({"a": range(4)}, 2)
    with pytest.raises(
        ValueError, match="'accelerator' parameter of prepare_loader must be an Accelerator without"
    ):
        prepare_loader(accelerator, DataLoader(list(range(4)), batch_sampler=sampler))


@pytest.mark.distributed
def test_a_resume_continues_the_run_on_two_processes(tmp_path: Path) -> None:
    """The README's recipe under Accelerate, whose loader pulls a batch ahead: the sampler saved at the
    consumed batch (``state_dict(consumed=step)``) with the model, optimizer and controller, at the end
    of a statistics window (``update_every=5``: mid-window the window's sums are each rank's own); the
    resumed run gives each rank the full run's batches and weights from the checkpoint on."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    done = run_torchrun(EXAMPLE, "--out", str(full), "--steps", "30", "--save-at", "10")
    assert done.returncode == 0, done.stderr[-4000:]
    checkpoint = str(full / "checkpoint.pt")
    done = run_torchrun(EXAMPLE, "--out", str(resumed), "--steps", "30", "--resume", checkpoint)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        ran, after = (json.loads((out / f"rank{rank}.json").read_text()) for out in (full, resumed))
        assert after["batches"] == ran["batches"][10:]
        assert after["mixture"] == ran["mixture"][10:] and after["sampling"] == ran["sampling"][10:]
