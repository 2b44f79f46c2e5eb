"""The plain loop with checkpoints: prefetching DataLoader workers, atomic saves, exact resume.

    python examples/plain_train.py --out /tmp/dm-plain --steps 60
    python examples/plain_train.py --out /tmp/dm-plain --steps 60 --resume   # after a crash or a kill

Every ``--save-every`` steps the model, optimizer, controller and sampler go into one checkpoint,
written to a temporary file and renamed, so a kill at any moment leaves the previous checkpoint
intact. The sampler is saved at the batch the loop consumed (``state_dict(consumed=step)``): the two
workers run ahead of the loop. ``--resume`` continues from the checkpoint. Each step appends its batch
to ``batches.jsonl``; the final parameters and weights go to ``final.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from domainmix import WeightingController, strategies, weighted_loss
from domainmix.sampling import DomainBatchSampler

NAMES = ("web", "code", "books")
SIZES = (3000, 1000, 2000)


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    domain = torch.cat([torch.full((n,), i) for i, n in enumerate(SIZES)])
    x = torch.randn(sum(SIZES), 8, generator=g)
    noise = torch.tensor([0.1, 1.0, 0.5])[domain].unsqueeze(1) * torch.randn(sum(SIZES), 1, generator=g)
    return TensorDataset(torch.arange(sum(SIZES)), x, x.sum(1, keepdim=True) + noise, domain)


def save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a kill before this line leaves the previous checkpoint as it was


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.pt"

    offsets = [sum(SIZES[:i]) for i in range(len(SIZES))]
    sampler = DomainBatchSampler(
        {n: range(o, o + s) for n, o, s in zip(NAMES, offsets, SIZES, strict=True)},
        16,
        dict.fromkeys(NAMES, 1.0),
        min_count=1,
        seed=7,
    )
    strategy = strategies.combine(
        loss=strategies.chain(
            strategies.exponentiated_gradient(lambda s, w: s.loss, step_size=0.5),
            strategies.mix_uniform(0.05),
        ),
        sampling=strategies.follow_mixture(),
    )
    controller = WeightingController(strategy, NAMES, update_every=5, sampler=sampler)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = 0
    if args.resume:
        if not ckpt.exists():
            parser.error(f"--resume: no checkpoint at {ckpt} (run once without --resume first)")
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        controller.load_state_dict(state["controller"])
        sampler.load_state_dict(state["sampler"])
        step = state["step"]

    loader = DataLoader(make_data(), batch_sampler=sampler, num_workers=2)
    # resumed from a finished run: nothing to do (the sampler never ends, the check in the loop comes late)
    batches = loader if step < args.steps else []
    with open(args.out / "batches.jsonl", "a") as log:
        for idx, x, y, ids in batches:
            with controller.record():  # the one order of a step: docs/design.md, "One step"
                per_example = ((model(x) - y) ** 2).squeeze(1)
            controller.step(per_example, ids)
            # the workers run ahead of the loop: divide by the shares of the batch in hand (batch `step`)
            loss = weighted_loss(per_example, ids, controller.loss_multipliers(sampler.sampling_of(step)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            log.write(json.dumps({"step": step, "batch": idx.tolist()}) + "\n")
            log.flush()
            if step % args.save_every == 0:
                save(ckpt, {
                    "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "controller": controller.state_dict(), "sampler": sampler.state_dict(consumed=step),
                })  # fmt: skip
            if step >= args.steps:
                break
    final = {
        "params": [p.tolist() for p in model.parameters()],
        "mixture": controller.weights.mixture.tolist(),
    }
    (args.out / "final.json").write_text(json.dumps(final))


if __name__ == "__main__":
    main()
