"""HF Trainer: a real (tiny, locally built) GPT-2, exact resume from checkpoint-N, weights in the logs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import domainmix.strategies as S  # noqa: E402
from _helpers import assert_two_rank_run, run_torchrun  # noqa: E402
from domainmix import WeightingController, weighted_loss  # noqa: E402
from domainmix.integrations import hf_trainer  # noqa: E402
from domainmix.integrations.hf_trainer import (  # noqa: E402
    STATE_FILE,
    DomainMixTrainer,
    causal_lm_per_example_loss,
)
from domainmix.sampling import DomainBatchSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("web", "code", "books")


def load_example():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location(
        "hf_trainer_train", ROOT / "examples" / "hf_trainer_train.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = load_example()


class Recording(EXAMPLE.RecordingTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logged: list[dict[str, float]] = []

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        self.logged.append(self.state.log_history[-1])


def make(out: Path, steps: int = 12) -> Recording:
    return EXAMPLE.build(out, steps, Recording)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    full = make(tmp_path / "full")
    full.train()
    assert (tmp_path / "full" / "checkpoint-6" / STATE_FILE).is_file()
    assert full.controller.weights.mixture.tolist() != [1 / 3] * 3  # the weights moved
    assert {f"domainmix/{w}/{n}" for w in ("alpha", "q", "achieved") for n in NAMES} <= set(full.logged[0])
    # the first window (steps 1-2, uniform q, 2 per domain per batch of 6): a third each
    assert [full.logged[0][f"domainmix/achieved/{n}"] for n in NAMES] == pytest.approx([1 / 3] * 3)

    resumed = make(tmp_path / "full")  # same output_dir: it resumes from checkpoint-6
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert resumed.record["batches"] == full.record["batches"][6:]
    assert torch.equal(resumed.controller.weights.mixture, full.controller.weights.mixture)
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_with_gradient_accumulation_the_controller_steps_once_per_optimizer_step(tmp_path: Path) -> None:
    """Each micro-batch is observed and the optimizer step ends the controller's step: the micro-batches
    of an optimizer step share α, update_every counts optimizer steps, and a resume stays exact."""
    full = EXAMPLE.build(tmp_path / "full", 12, Recording, accumulation=2)
    full.train()
    mixtures = full.record["mixture"]
    assert len(mixtures) == 24 and full.controller.step_count == 12
    assert all(mixtures[2 * i] == mixtures[2 * i + 1] for i in range(12))  # one α per optimizer step
    assert len({tuple(m) for m in mixtures}) > 1  # and it moved
    resumed = EXAMPLE.build(tmp_path / "full", 12, Recording, accumulation=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert resumed.record["batches"] == full.record["batches"][12:]
    assert torch.equal(resumed.controller.weights.mixture, full.controller.weights.mixture)
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_multipliers_divide_by_the_shares_of_the_batch_in_hand(tmp_path: Path, accumulation: int) -> None:
    """Accelerate's DataLoaderShard pulls a batch ahead, so the sampler's last batch is the next one: on
    the batch after each change of q, α/q divided by the new shares while the batch had the old ones."""
    trainer = EXAMPLE.build(tmp_path, 12, Recording, accumulation=accumulation)
    moving_q = S.chain(  # q far from uniform and moving: batches of 6 then differ in composition
        S.exponentiated_gradient(lambda s, w: s.loss, step_size=5.0, target="sampling"), S.floor(0.1)
    )
    trainer.controller = WeightingController(moving_q, list(NAMES), update_every=2, sampler=trainer.sampler)
    seen: list[tuple[list[float], list[float], list[float]]] = []
    real = hf_trainer.weighted_loss

    def spy(losses: torch.Tensor, ids: torch.Tensor, multipliers: torch.Tensor, **kw: Any) -> torch.Tensor:
        drawn = (torch.bincount(ids, minlength=3) / len(ids)).tolist()  # stratified: the batch's own shares
        seen.append((drawn, multipliers.tolist(), trainer.controller.weights.mixture.tolist()))
        return real(losses, ids, multipliers, **kw)

    hf_trainer.weighted_loss = spy
    try:
        trainer.train()
    finally:
        hf_trainer.weighted_loss = real
    assert len(seen) == 12 * accumulation and len({tuple(d) for d, _, _ in seen}) > 1  # q moved
    for drawn, multipliers, alpha in seen:
        assert [m * d for m, d in zip(multipliers, drawn, strict=True)] == pytest.approx(alpha)


def test_errors(tmp_path: Path) -> None:
    trainer = make(tmp_path)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)}
    batch["example_id"] = torch.arange(2)
    with pytest.raises(ValueError, match="the training batch has no 'domain_id' entry"):
        trainer.compute_loss(trainer.model.train(), batch)
    with pytest.raises(
        ValueError, match="does not exist; the checkpoint was not written by a DomainMixTrainer"
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[]
    )
    grouped = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=6,
        use_cpu=True,
        report_to=[],
        train_sampling_strategy="group_by_length",
    )
    with pytest.raises(
        ValueError, match="train_sampling_strategy='group_by_length' asks for another training"
    ):
        DomainMixTrainer(model=trainer.model, args=grouped, train_dataset=EXAMPLE.dataset(),
                         sampler=trainer.sampler, controller=trainer.controller)  # fmt: skip
    with pytest.raises(ValueError, match="the sampler has batch_size=6, rank 0 of 1; the arguments ask for "):
        DomainMixTrainer(model=trainer.model, args=args, train_dataset=EXAMPLE.dataset(),
                         sampler=trainer.sampler, controller=trainer.controller)  # fmt: skip


def test_the_example_script_runs_and_resumes(tmp_path: Path) -> None:
    script = ROOT / "examples" / "hf_trainer_train.py"
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for out, extra in ((full, ()), (resumed, ("--resume", str(full / "checkpoint-6")))):
        done = subprocess.run([sys.executable, str(script), "--out", str(out), *extra], capture_output=True)
        assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((resumed / "result.json").read_text())
    assert result["log"][-1]["domainmix/alpha/web"] == pytest.approx(result["mixture"][0], abs=1e-4)
    # it resumed at step 6, not from the start: the steps after the checkpoint, the same batches and weights
    ran, after = (json.loads((out / "rank0.json").read_text()) for out in (full, resumed))
    assert len(ran["batches"]) > 6 and after["batches"] == ran["batches"][6:]
    np.testing.assert_allclose(after["mixture"], ran["mixture"][6:], rtol=0, atol=1e-12)


def test_two_processes_share_the_weights_and_resume_exactly(tmp_path: Path) -> None:
    script = ROOT / "examples" / "hf_trainer_train.py"
    done = run_torchrun(script, "--out", str(tmp_path / "full"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert_two_rank_run(tmp_path / "full", EXAMPLE.SIZES, 6)  # one global plan, identical weights
    checkpoint = str(tmp_path / "full" / "checkpoint-6")
    done = run_torchrun(script, "--out", str(tmp_path / "resumed"), "--resume", checkpoint)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        full = json.loads((tmp_path / "full" / f"rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / "resumed" / f"rank{rank}.json").read_text())
        assert full["world"] == resumed["world"] == 2
        assert resumed["batches"] == full["batches"][6:]
        assert resumed["mixture"] == full["mixture"][6:]
        assert resumed["parameters"] == full["parameters"]  # DDP kept the ranks' models equal too
    ranks = [json.loads((tmp_path / "full" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["parameters"] == ranks[1]["parameters"]


def test_gradient_accumulation_averages_the_micro_batches(tmp_path: Path) -> None:
    """With accumulation 2, the optimizer sees the mean of the micro-batches' weighted-loss gradients."""

    class Grab(TrainerCallback):
        grad: torch.Tensor | None = None

        def on_pre_optimizer_step(
            self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
        ) -> None:
            Grab.grad = model.lm_head.weight.grad.clone()

    class Keep(DomainMixTrainer):
        batches: list[dict[str, torch.Tensor]] = []

        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            inputs.pop("example_id")
            if model.training:
                self.batches.append({k: v.clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=6, gradient_accumulation_steps=2,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    model = GPT2LMHeadModel(config)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    offsets = [sum(EXAMPLE.SIZES[:d]) for d in range(3)]
    domains = {n: range(o, o + s) for n, o, s in zip(NAMES, offsets, EXAMPLE.SIZES, strict=True)}
    sampler = DomainBatchSampler(domains, 6, [0.5, 0.3, 0.2], min_count=1, seed=5)
    controller = WeightingController(S.fixed([0.2, 0.3, 0.5], [0.5, 0.3, 0.2]), list(NAMES), sampler=sampler)
    trainer = Keep(
        model=model, args=args, train_dataset=EXAMPLE.dataset(), data_collator=default_data_collator,
        sampler=sampler, controller=controller, callbacks=[Grab()],
    )  # fmt: skip
    trainer.train()
    reference = GPT2LMHeadModel(config)
    reference.load_state_dict(start)
    assert len(Keep.batches) == 2
    for batch in Keep.batches:
        ids = batch.pop("domain_id")
        loss = weighted_loss(
            causal_lm_per_example_loss(reference(**batch), batch), ids, controller.loss_multipliers()
        )
        (loss / 2).backward()
    assert Grab.grad is not None
    torch.testing.assert_close(Grab.grad, reference.lm_head.weight.grad)


def test_resume_refusals(tmp_path: Path) -> None:
    trainer = make(tmp_path / "none")
    with pytest.raises(ValueError, match="no valid checkpoint found in output directory"):
        trainer.train(resume_from_checkpoint=True)  # transformers refuses it too: never start afresh
    # A stop between the Trainer's files and the domain state: True resumes from the last complete one.
    full = make(tmp_path / "full")
    full.train()
    (tmp_path / "full" / "checkpoint-12" / STATE_FILE).unlink()
    resumed = make(tmp_path / "full")
    with pytest.warns(
        RuntimeWarning, match=r"checkpoint-12 has no domainmix_state.pt .* resuming from .*checkpoint-6"
    ):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.record["batches"] == full.record["batches"][6:]

    # Accumulation 2 over epochs of 5 batches: a checkpoint 2 batches into an epoch cannot resume exactly.
    def epochs_of(length: int, out: Path) -> DomainMixTrainer:
        args = TrainingArguments(
            output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=6,
            gradient_accumulation_steps=2, save_strategy="steps", save_steps=1, report_to=[], use_cpu=True,
            seed=0, disable_tqdm=True,
        )  # fmt: skip
        offsets = [sum(EXAMPLE.SIZES[:d]) for d in range(3)]
        domains = {n: range(o, o + s) for n, o, s in zip(NAMES, offsets, EXAMPLE.SIZES, strict=True)}
        sampler = DomainBatchSampler(domains, 6, min_count=1, num_batches=length, seed=5)
        controller = WeightingController(
            __import__("domainmix").strategies.uniform(), list(NAMES), sampler=sampler
        )
        model = EXAMPLE.GPT2LMHeadModel(
            EXAMPLE.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
        )
        return DomainMixTrainer(
            model=model, args=args, train_dataset=EXAMPLE.dataset(), data_collator=default_data_collator,
            sampler=sampler, controller=controller,
        )  # fmt: skip

    epochs_of(5, tmp_path / "five").train()
    with pytest.raises(
        ValueError, match="2 batches into an epoch of 5, which is not a multiple of gradient_acc"
    ):
        epochs_of(5, tmp_path / "five").train(resume_from_checkpoint=str(tmp_path / "five" / "checkpoint-1"))
    epochs_of(4, tmp_path / "four").train()
    epochs_of(4, tmp_path / "four").train(resume_from_checkpoint=str(tmp_path / "four" / "checkpoint-1"))
