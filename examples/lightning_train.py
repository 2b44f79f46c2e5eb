"""Multi-domain training with PyTorch Lightning: sampler and controller built in setup(), one callback.

    python examples/lightning_train.py --out /tmp/dm-lightning                 # one process
    torchrun --standalone --nproc_per_node=2 examples/lightning_train.py --out /tmp/dm-lightning --devices 2
    python examples/lightning_train.py --out /tmp/dm-res --resume /tmp/dm-lightning/ckpt/epoch=0-step=10.ckpt

``training_step`` keeps the plain loop's order (forward under ``controller.record()``, then
``controller.step``, then ``weighted_loss``), so the weights of a step are final before Lightning's
``ModelCheckpoint`` runs. With ``--accumulate A`` (``accumulate_grad_batches``) it calls
``controller.observe`` instead and the callback ends the controller's step after each optimizer step.
``DomainMixCallback`` checks the sampler's rank, stores the controller and the
sampler (at the consumed batch) in every checkpoint, restores them on ``ckpt_path=...`` and logs α and
q. Each rank writes ``rank{r}.json``: its batches, the weights after every step, the sampler's weight
history and the final parameters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from domainmix import WeightingController, strategies, weighted_loss
from domainmix.integrations.lightning import DomainMixCallback
from domainmix.sampling import DomainBatchSampler

NAMES = ("web", "code", "books")
SIZES = (3000, 1000, 2000)


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)  # the same data on every rank and in every run
    domain = torch.cat([torch.full((n,), i) for i, n in enumerate(SIZES)])
    x = torch.randn(sum(SIZES), 8, generator=g)
    noise = torch.tensor([0.1, 1.0, 0.5])[domain].unsqueeze(1) * torch.randn(sum(SIZES), 1, generator=g)
    return TensorDataset(torch.arange(sum(SIZES)), x, x.sum(1, keepdim=True) + noise, domain)


class Regression(LightningModule):
    def __init__(self, workers: int, accumulate: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 1)
        self.workers, self.accumulate = workers, accumulate
        self.record: dict[str, list[Any]] = {"batches": [], "mixture": [], "sampling": []}

    def setup(self, stage: str) -> None:
        # Here, not in __init__: the process group exists, so the sampler reads its rank and world size.
        offsets = [sum(SIZES[:i]) for i in range(len(SIZES))]
        self.sampler = DomainBatchSampler(
            {n: range(o, o + s) for n, o, s in zip(NAMES, offsets, SIZES, strict=True)},
            16,
            dict.fromkeys(NAMES, 1.0),
            min_count=1,
            seed=1234,
        )
        strategy = strategies.combine(
            loss=strategies.chain(
                strategies.exponentiated_gradient(lambda s, w: s.loss, step_size=0.5),
                strategies.mix_uniform(0.05),
            ),
            sampling=strategies.follow_mixture(),
        )
        self.controller = WeightingController(
            strategy, NAMES, update_every=5, sampler=self.sampler, check_sync=self.trainer.world_size > 1
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), batch_sampler=self.sampler, num_workers=self.workers)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        idx, x, y, ids = batch
        self.record["batches"].append(idx.tolist())
        with self.controller.record():  # the one order of a step: docs/design.md, "One step"
            per_example = ((self.net(x) - y) ** 2).squeeze(1)
        if self.accumulate > 1:  # the callback ends the step after each optimizer step
            self.controller.observe(per_example, ids)
        else:
            self.controller.step(per_example, ids)
        self.record["mixture"].append(self.controller.weights.mixture.tolist())
        self.record["sampling"].append(self.controller.weights.sampling.tolist())
        return weighted_loss(per_example, ids, self.controller.loss_multipliers())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (prefetching)")
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint to resume from")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    args = parser.parse_args()

    module = Regression(args.workers, args.accumulate)
    trainer = Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        use_distributed_sampler=False,  # the sampler already shards one global plan by rank
        callbacks=[
            ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=args.ckpt_every, save_top_k=-1),
            DomainMixCallback(),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    trainer.fit(module, ckpt_path=args.resume)
    result = {
        "history": module.sampler.weight_history,
        "params": [p.tolist() for p in module.net.parameters()],
        **module.record,
    }
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
