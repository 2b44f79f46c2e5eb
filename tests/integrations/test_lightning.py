"""Lightning: exact resume from ModelCheckpoint on one process and on two (DDP, gloo), clear errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from _helpers import assert_two_rank_run, run_torchrun  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_train.py"
SIZES = (3000, 1000, 2000)


def run(out: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(out), *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]


def assert_resumed(full: Path, resumed: Path, ranks: int = 1, cut: int = 10) -> None:
    for r in range(ranks):
        a, b = (json.loads((d / f"rank{r}.json").read_text()) for d in (full, resumed))
        assert b["batches"] == a["batches"][cut:]
        assert b["mixture"] == a["mixture"][cut:]
        # a saved state holds the weight entries from the one in force at the batch before the saved one
        # (batch_sampling's) on
        start = max(batch for batch, _ in a["history"] if batch <= max(cut - 1, 0))
        assert b["history"] == [h for h in a["history"] if h[0] >= start]
        assert b["params"] == a["params"]


def test_one_process_resume_is_exact(tmp_path: Path) -> None:
    run(tmp_path / "full", "--steps", "20")
    run(tmp_path / "resumed", "--steps", "20", "--resume", str(tmp_path / "full/ckpt/epoch=0-step=10.ckpt"))
    assert_resumed(tmp_path / "full", tmp_path / "resumed")


@pytest.mark.slow
def test_one_process_resume_is_exact_with_prefetching_workers(tmp_path: Path) -> None:
    run(tmp_path / "full", "--steps", "20", "--workers", "2")
    ckpt = tmp_path / "full/ckpt/epoch=0-step=10.ckpt"
    run(tmp_path / "resumed", "--steps", "20", "--workers", "2", "--resume", str(ckpt))
    assert_resumed(tmp_path / "full", tmp_path / "resumed")


@pytest.mark.distributed
def test_two_processes_plan_and_resume_are_exact(tmp_path: Path) -> None:
    for out, extra in (
        ("full", ()),
        ("resumed", ("--resume", str(tmp_path / "full/ckpt/epoch=0-step=10.ckpt"))),
    ):
        done = run_torchrun(EXAMPLE, "--out", str(tmp_path / out), "--devices", "2", "--steps", "20", *extra)
        assert done.returncode == 0, done.stderr[-4000:]
    assert_two_rank_run(tmp_path / "full", SIZES, 16)
    assert_resumed(tmp_path / "full", tmp_path / "resumed", ranks=2)


def load_example():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("lightning_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_sampler_with_the_wrong_rank_is_refused(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from domainmix.integrations.lightning import DomainMixCallback
    from domainmix.sampling import DomainBatchSampler

    example = load_example()

    class Early(example.Regression):
        def setup(self, stage: str) -> None:
            super().setup(stage)
            self.sampler = DomainBatchSampler(
                {"a": range(10)}, 2, rank=1, world_size=2
            )  # as if built too early

    trainer = Trainer(max_steps=2, accelerator="cpu", callbacks=[DomainMixCallback()], logger=False,
                      enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="the sampler is rank 1 of 2, the trainer's process is rank 0 of 1"):
        trainer.fit(Early(0))


def test_with_gradient_accumulation_the_callback_steps_once_per_optimizer_step(tmp_path: Path) -> None:
    """training_step observes each micro-batch; the callback ends the step after the optimizer's: the two
    micro-batches of an optimizer step share α, and a resume from a checkpoint stays exact."""
    run(tmp_path / "full", "--steps", "20", "--accumulate", "2")
    mixtures = json.loads((tmp_path / "full" / "rank0.json").read_text())["mixture"]
    assert len(mixtures) == 40 and all(mixtures[2 * i] == mixtures[2 * i + 1] for i in range(20))
    assert len({tuple(m) for m in mixtures}) == 4  # update_every=5 optimizer steps: 3 updates seen
    ckpt = tmp_path / "full/ckpt/epoch=0-step=10.ckpt"  # 10 optimizer steps: 20 batches
    run(tmp_path / "resumed", "--steps", "20", "--accumulate", "2", "--resume", str(ckpt))
    assert_resumed(tmp_path / "full", tmp_path / "resumed", cut=20)


def test_a_training_step_that_steps_the_controller_under_accumulation_is_refused(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from domainmix.integrations.lightning import DomainMixCallback

    example = load_example()
    trainer = Trainer(max_steps=2, accelerator="cpu", accumulate_grad_batches=2,
                      callbacks=[DomainMixCallback()], logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="training_step must call controller.observe"):
        trainer.fit(example.Regression(0, accumulate=1))  # its training_step calls controller.step


def test_multipliers_divide_by_the_shares_of_the_batch_in_hand(tmp_path: Path) -> None:
    """Lightning's fetcher pulls a batch ahead: without the callback's set_batch_sampling, the batch after
    each change of q was weighted by the shares of the next batch."""
    import torch
    from lightning.pytorch import Trainer

    from domainmix.integrations.lightning import DomainMixCallback

    example = load_example()
    seen: list[tuple[list[float], list[float], list[float]]] = []
    real = example.weighted_loss
    module = example.Regression(0)

    def spy(losses: torch.Tensor, ids: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
        drawn = (torch.bincount(ids, minlength=3) / len(ids)).tolist()  # stratified: the batch's own shares
        seen.append((drawn, multipliers.tolist(), module.controller.weights.mixture.tolist()))
        return real(losses, ids, multipliers)

    example.weighted_loss = spy
    trainer = Trainer(max_steps=30, accelerator="cpu", callbacks=[DomainMixCallback()], logger=False,
                      enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module)
    assert len(seen) == 30 and len({tuple(d) for d, _, _ in seen}) > 1  # the batches' composition moved
    for drawn, multipliers, alpha in seen:
        assert [m * d for m, d in zip(multipliers, drawn, strict=True)] == pytest.approx(alpha)


def test_a_module_without_controller_is_refused(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from domainmix.integrations.lightning import DomainMixCallback

    example = load_example()
    trainer = Trainer(max_steps=2, accelerator="cpu", callbacks=[DomainMixCallback(controller="weights")],
                      logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"needs a WeightingController in .weights and a DomainBatchSampler"):
        trainer.fit(example.Regression(0))


def test_a_stateful_train_loader_resumes_at_the_consumed_batch(tmp_path: Path) -> None:
    """torchdata's loader state is saved by Lightning's fit loop with a batch prefetched; it must not
    override the callback's restore (the resume used to skip one batch)."""
    pytest.importorskip("torchdata")
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from domainmix.integrations.lightning import DomainMixCallback
    from domainmix.integrations.torchdata import StatefulDomainLoader

    example = load_example()

    class Stateful(example.Regression):
        def train_dataloader(self) -> StatefulDomainLoader:
            return StatefulDomainLoader(example.make_data(), batch_sampler=self.sampler)

    def fit(ckpt: Path | None = None) -> Stateful:
        module = Stateful(0)
        checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
        trainer = Trainer(max_steps=20, accelerator="cpu", use_distributed_sampler=False, logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[checkpoints, DomainMixCallback()])  # fmt: skip
        trainer.fit(module, ckpt_path=ckpt)
        return module

    full = fit()
    resumed = fit(tmp_path / "epoch=0-step=10.ckpt")
    assert resumed.record["batches"] == full.record["batches"][10:]
    assert resumed.record["mixture"] == full.record["mixture"][10:]
