"""Multi-domain training with Hugging Face Accelerate: the domain sampler outside accelerator.prepare.

    accelerate launch --cpu --num_processes 2 examples/accelerate_train.py --out /tmp/dm-accelerate
    # or: torchrun --standalone --nproc_per_node=2 examples/accelerate_train.py --out /tmp/dm-accelerate

The model and optimizer go through ``accelerator.prepare``; the loader goes through
``domainmix.integrations.accelerate.prepare_loader``, which places batches on the device without dealing
them out to the processes a second time (the sampler already gives each rank its share of one global
plan). Each rank writes ``rank{r}.json`` with its batches and the weights after every step. With
``--wrong-way`` the loader goes through ``accelerator.prepare`` and the sampler refuses it.

``--save-at N`` writes ``checkpoint.pt`` after step N (rank 0, written then renamed); ``--resume PATH``
continues from it. Accelerate's loader pulls a batch ahead of the loop, so the sampler is saved at the
batch the loop consumed: ``sampler.state_dict(consumed=N)``. Choose N at the end of a statistics window
(a multiple of ``update_every``): mid-window, the controller's window sums are each rank's own
(``docs/design.md``, "Distributed").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from domainmix import WeightingController, strategies, weighted_loss
from domainmix.integrations.accelerate import prepare_loader
from domainmix.sampling import DomainBatchSampler

NAMES = ("web", "code", "books")
SIZES = (3000, 1000, 2000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--wrong-way", action="store_true", help="pass the loader to accelerator.prepare")
    parser.add_argument("--save-at", type=int, default=None, help="write checkpoint.pt after this step")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint.pt to continue from")
    args = parser.parse_args()
    saved = torch.load(args.resume, weights_only=False) if args.resume else None

    accelerator = Accelerator(cpu=True)  # starts the process group: build the sampler after it
    torch.manual_seed(0)  # same data and initial model on every rank
    domain = torch.cat([torch.full((n,), i) for i, n in enumerate(SIZES)])
    x = torch.randn(sum(SIZES), 8)
    y = x.sum(1, keepdim=True) + torch.tensor([0.1, 1.0, 0.5])[domain].unsqueeze(1) * torch.randn(
        sum(SIZES), 1
    )
    offsets = [sum(SIZES[:i]) for i in range(len(SIZES))]
    sampler = DomainBatchSampler(
        {n: range(o, o + s) for n, o, s in zip(NAMES, offsets, SIZES, strict=True)},
        16,
        dict.fromkeys(NAMES, 1.0),
        min_count=1,
        seed=1234,
    )  # rank and world size come from the process group
    loader = DataLoader(TensorDataset(torch.arange(sum(SIZES)), x, y, domain), batch_sampler=sampler)
    loader = accelerator.prepare(loader) if args.wrong_way else prepare_loader(accelerator, loader)

    strategy = strategies.combine(
        loss=strategies.chain(
            strategies.exponentiated_gradient(lambda s, w: s.loss, step_size=0.5),
            strategies.mix_uniform(0.05),
        ),
        sampling=strategies.follow_mixture(),
    )
    controller = WeightingController(strategy, NAMES, update_every=5, sampler=sampler, check_sync=True)
    model = nn.Linear(8, 1)
    start = 0
    if saved is not None:  # the state is the same on every rank
        model.load_state_dict(saved["model"])
        controller.load_state_dict(saved["controller"])
        sampler.load_state_dict(saved["sampler"])
        start = saved["step"]
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])

    record: dict[str, list] = {"batches": [], "mixture": [], "sampling": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for step, (idx, xb, yb, ids) in zip(range(start, args.steps), loader, strict=False):
        record["batches"].append(idx.tolist())
        with controller.record():  # the one order of a step: docs/design.md, "One step"
            per_example = ((model(xb) - yb) ** 2).squeeze(1)
        controller.step(per_example, ids)
        # Accelerate's loader pulls a batch ahead: divide by the shares of the batch in hand (step `step`)
        loss = weighted_loss(per_example, ids, controller.loss_multipliers(sampler.sampling_of(step)))
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        record["mixture"].append(controller.weights.mixture.tolist())
        record["sampling"].append(controller.weights.sampling.tolist())
        if step + 1 == args.save_at and accelerator.is_main_process:
            state = {
                "step": step + 1, "model": accelerator.unwrap_model(model).state_dict(),
                "optimizer": opt.state_dict(), "controller": controller.state_dict(),
                "sampler": sampler.state_dict(consumed=step + 1),
            }  # fmt: skip
            torch.save(state, args.out / "checkpoint.tmp")
            (args.out / "checkpoint.tmp").replace(args.out / "checkpoint.pt")

    rank = accelerator.process_index
    (args.out / f"rank{rank}.json").write_text(
        json.dumps({"world": accelerator.num_processes, "history": sampler.weight_history, **record})
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
