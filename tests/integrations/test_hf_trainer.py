"""HF Trainer: a real (tiny, locally built) GPT-2, exact resume from checkpoint-N, weights in the logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, default_data_collator  # noqa: E402

from domainmix import WeightingController, strategies  # noqa: E402
from domainmix.integrations.hf_trainer import STATE_FILE, DomainMixTrainer  # noqa: E402
from domainmix.sampling import DomainBatchSampler  # noqa: E402

NAMES = ("web", "code", "books")
SIZES = (40, 24, 32)


def dataset() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for d, n in enumerate(SIZES):  # each domain draws its tokens from its own range: different losses
        for _ in range(n):
            ids = torch.randint(20 * d, 20 * d + 8 + 8 * d, (12,), generator=g)
            rows.append({"input_ids": ids, "labels": ids.clone(), "domain_id": d})
    return rows


class Recording(DomainMixTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[int]] = []
        self.logged: list[dict[str, float]] = []

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training:
            self.batches.append(inputs["input_ids"][:, 0].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        self.logged.append(self.state.log_history[-1])


def make(out: Path, steps: int = 12) -> Recording:
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=6, learning_rate=1e-3,
        save_strategy="steps", save_steps=6, logging_steps=3, report_to=[], use_cpu=True, seed=0,
        lr_scheduler_type="constant", disable_tqdm=True,
    )  # fmt: skip
    torch.manual_seed(0)
    # dropout stays at GPT-2's 0.1: the random state must resume too
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    offsets = [sum(SIZES[:d]) for d in range(3)]
    domains = {n: range(o, o + s) for n, o, s in zip(NAMES, offsets, SIZES, strict=True)}
    sampler = DomainBatchSampler(domains, 6, dict.fromkeys(NAMES, 1.0), min_count=1, seed=5)
    strategy = strategies.combine(
        loss=strategies.exponentiated_gradient(lambda s, w: s.loss, step_size=0.5),
        sampling=strategies.follow_mixture(),
    )
    controller = WeightingController(strategy, NAMES, update_every=2, sampler=sampler)
    return Recording(model=model, args=args, train_dataset=dataset(), data_collator=default_data_collator,
                     sampler=sampler, controller=controller)  # fmt: skip


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    full = make(tmp_path / "full")
    full.train()
    assert (tmp_path / "full" / "checkpoint-6" / STATE_FILE).is_file()
    assert full.controller.weights.mixture.tolist() != [1 / 3] * 3  # the weights moved
    assert {f"domainmix/alpha/{n}" for n in NAMES} <= set(full.logged[0])

    resumed = make(tmp_path / "full")  # same output_dir: it resumes from checkpoint-6
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert resumed.batches == full.batches[6:]
    assert torch.equal(resumed.controller.weights.mixture, full.controller.weights.mixture)
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_errors(tmp_path: Path) -> None:
    trainer = make(tmp_path)
    with pytest.raises(
        ValueError, match="does not exist; the checkpoint was not written by a DomainMixTrainer"
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[]
    )
    with pytest.raises(ValueError, match="the sampler has batch_size=6, rank 0 of 1; the arguments ask for "):
        DomainMixTrainer(model=trainer.model, args=args, train_dataset=dataset(), sampler=trainer.sampler,
                         controller=trainer.controller)  # fmt: skip
