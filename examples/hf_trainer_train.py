"""The Hugging Face Trainer on a domain sampler, with a controller weighting the loss.

    python examples/hf_trainer_train.py --out /tmp/dm-hf --steps 12
    python examples/hf_trainer_train.py --out /tmp/dm-hf --steps 12 --resume /tmp/dm-hf/checkpoint-6
    torchrun --standalone --nproc_per_node=2 examples/hf_trainer_train.py --out /tmp/dm-hf2

A one-layer GPT-2 built from its config (nothing is downloaded) learns three synthetic "domains" whose
tokens come from different ranges. ``DomainMixTrainer`` draws the batches from the sampler, weights the
loss by the controller's α/q, stores both states in each ``checkpoint-N`` and resumes them exactly. The
final weights and the log history go to ``result.json``; each rank writes ``rank{r}.json`` with the
examples of its batches and the weights after every step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, default_data_collator

from domainmix import WeightingController, strategies
from domainmix.integrations.hf_trainer import DomainMixTrainer
from domainmix.sampling import DomainBatchSampler

NAMES = ("web", "code", "books")
SIZES = (40, 24, 32)


def dataset() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for d, n in enumerate(SIZES):  # each domain draws its tokens from its own range: different losses
        for _ in range(n):
            ids = torch.randint(20 * d, 20 * d + 8 + 8 * d, (12,), generator=g)
            rows.append({"input_ids": ids, "labels": ids.clone(), "domain_id": d, "example_id": len(rows)})
    return rows


class RecordingTrainer(DomainMixTrainer):
    """Keeps, per training step, the examples of the batch and the weights after the controller's step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record: dict[str, list] = {"batches": [], "mixture": [], "sampling": []}

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        example_ids = inputs.pop("example_id")  # not a model input
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training:
            self.record["batches"].append(example_ids.tolist())
            self.record["mixture"].append(self.controller.weights.mixture.tolist())
            self.record["sampling"].append(self.controller.weights.sampling.tolist())
        return loss


def build(
    out: Path, steps: int, trainer_class: type[RecordingTrainer] = RecordingTrainer, accumulation: int = 1
) -> RecordingTrainer:
    """The trainer; ``trainer_class`` lets a test record what it sees."""
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=6, learning_rate=1e-3,
        save_strategy="steps", save_steps=6, logging_steps=3, report_to=[], use_cpu=True, seed=0,
        lr_scheduler_type="constant", disable_tqdm=True, gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    torch.manual_seed(0)
    # GPT-2's dropout (0.1) stays on: the random state resumes too
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    offsets = [sum(SIZES[:d]) for d in range(len(SIZES))]
    domains = {n: range(o, o + s) for n, o, s in zip(NAMES, offsets, SIZES, strict=True)}
    # after TrainingArguments, which sets up the process group: the sampler reads its rank from it
    sampler = DomainBatchSampler(domains, 6, dict.fromkeys(NAMES, 1.0), min_count=1, seed=5)
    strategy = strategies.combine(
        loss=strategies.exponentiated_gradient(lambda s, w: s.loss, step_size=0.5),
        sampling=strategies.follow_mixture(),
    )
    controller = WeightingController(strategy, NAMES, update_every=2, sampler=sampler)
    return trainer_class(
        model=model, args=args, train_dataset=dataset(), data_collator=default_data_collator,
        sampler=sampler, controller=controller,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint-N folder")
    args = parser.parse_args()
    trainer = build(args.out, args.steps)
    trainer.train(resume_from_checkpoint=args.resume)
    if trainer.is_world_process_zero():
        result = {"mixture": trainer.controller.weights.mixture.tolist(), "log": trainer.state.log_history}
        (args.out / "result.json").write_text(json.dumps(result))
    record = {
        "world": trainer.args.world_size,
        "history": trainer.sampler.weight_history,
        "parameters": [p.tolist() for p in trainer.model.parameters()],
        **trainer.record,
    }
    (args.out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
