"""HF Trainer: a real (tiny, locally built) GPT-2, exact resume from checkpoint-N, weights in the logs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from _helpers import assert_two_rank_run, run_torchrun  # noqa: E402
from domainmix.integrations.hf_trainer import STATE_FILE, DomainMixTrainer  # noqa: E402

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
    with pytest.raises(ValueError, match="the sampler has batch_size=6, rank 0 of 1; the arguments ask for "):
        DomainMixTrainer(model=trainer.model, args=args, train_dataset=EXAMPLE.dataset(),
                         sampler=trainer.sampler, controller=trainer.controller)  # fmt: skip


def test_the_example_script_runs_and_resumes(tmp_path: Path) -> None:
    script = ROOT / "examples" / "hf_trainer_train.py"
    for extra in ((), ("--resume", str(tmp_path / "checkpoint-6"))):
        done = subprocess.run(
            [sys.executable, str(script), "--out", str(tmp_path), *extra], capture_output=True
        )
        assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["log"][-1]["domainmix/alpha/web"] == pytest.approx(result["mixture"][0], abs=1e-4)


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
