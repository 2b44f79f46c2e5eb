"""Streaming Hugging Face datasets as domains: each source sharded by rank and by DataLoader worker.

    python examples/hf_streaming_train.py --out /tmp/dm-stream --steps 40
    torchrun --standalone --nproc_per_node=2 examples/hf_streaming_train.py --out /tmp/dm-stream

Three ``datasets.IterableDataset`` streams (built in memory here; ``load_dataset(..., streaming=True)``
in practice) go through ``streaming_sources``, which shards each by rank. ``DomainMixingIterable``
follows the sampling weights and tags every item with its domain; in two DataLoader workers, each source
shards itself by worker. The controller weights the loss from the per-domain losses. Each rank writes
``rank{r}.json`` with the domains of every batch and the final weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from domainmix import WeightingController, strategies, weighted_loss
from domainmix.integrations.hf_datasets import streaming_sources
from domainmix.sampling import DomainMixingIterable

NAMES = ("web", "code", "books")
NOISE = (0.1, 1.0, 0.5)


def stream(domain: int, n: int = 512) -> Dataset:
    g = torch.Generator().manual_seed(domain)
    x = torch.randn(n, 8, generator=g)
    y = x.sum(1) + NOISE[domain] * torch.randn(n, generator=g)
    return Dataset.from_dict({"x": x.tolist(), "y": y.tolist()}).to_iterable_dataset(num_shards=4)


def collate(items: list[tuple[str, dict]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([NAMES.index(name) for name, _ in items])
    x = torch.tensor([item["x"] for _, item in items])
    y = torch.tensor([item["y"] for _, item in items])
    return x, y, ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    sources = streaming_sources({n: stream(d) for d, n in enumerate(NAMES)})  # rank from the environment
    mixer = DomainMixingIterable(sources, mode="stratified", batch_size=16, seed=3)
    strategy = strategies.combine(
        loss=strategies.exponentiated_gradient(lambda s, w: s.loss, step_size=0.5),
        sampling=strategies.uniform(),
    )
    controller = WeightingController(strategy, NAMES, update_every=5)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(mixer, batch_size=16, num_workers=args.workers, collate_fn=collate)

    domains = []
    for _, (x, y, ids) in zip(range(args.steps), loader, strict=False):
        domains.append(ids.tolist())
        with controller.record():
            per_example = (model(x).squeeze(1) - y) ** 2
        controller.step(per_example, ids)
        loss = weighted_loss(per_example, ids, controller.loss_multipliers())
        opt.zero_grad()
        loss.backward()
        opt.step()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"domains": domains, "mixture": controller.weights.mixture.tolist()}
    (args.out / f"rank{mixer.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
