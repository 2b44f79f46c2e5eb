"""torchrun worker for test_gradients_distributed.py: each rank holds a shard of the examples.

    torchrun --standalone --nproc_per_node=2 tests/stats/_gradients_worker.py --out DIR

Writes ``rank{r}.json`` with the pooled (``reduce=True``) and local (``reduce=False``) statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from domainmix.stats import (
    DomainGradients,
    GradientProductTap,
    domain_gradient_products,
    micro_batch_gradients,
    per_example_gradients,
)

NUM_EXAMPLES = 40
NUM_DOMAINS = 3
SPLIT = 17  # rank 0 holds examples [0, 17), rank 1 the rest: unequal shards


def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, NUM_DOMAINS, (NUM_EXAMPLES,), generator=g)
    x = torch.randn(NUM_EXAMPLES, 3, generator=g, dtype=torch.float64) + ids.unsqueeze(1)
    y = torch.randint(0, 4, (NUM_EXAMPLES,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(torch.float64)
    return model, x, y, ids


def shard(rank: int) -> slice:
    return slice(0, SPLIT) if rank == 0 else slice(SPLIT, NUM_EXAMPLES)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def as_json(stats: DomainGradients) -> dict[str, list]:
    return {
        **{field: getattr(stats, field).tolist() for field in stats._fields},
        "variance": stats.variance().tolist(),
    }


def products(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, reduce: bool = True
) -> dict:
    """DoGE's products on these rows; the first three rows of the shard double as target data."""
    losses = loss_fn(model(x), y)
    out = domain_gradient_products(
        losses,
        ids,
        NUM_DOMAINS,
        list(model.parameters()),
        target_losses=losses[:3],
        max_norm=0.5,
        reduce=reduce,
    )
    return {field: getattr(out, field).tolist() for field in out._fields}


def tap_products(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> dict:
    """The same products from GradientProductTap (the target rows in a forward of their own)."""
    tap = GradientProductTap(model)
    with tap.record():
        losses = loss_fn(model(x), y)
        target = loss_fn(model(x[:3]), y[:3])
    out = tap.products(losses, ids, NUM_DOMAINS, target_losses=target, max_norm=0.5)
    tap.remove()
    return {field: getattr(out, field).tolist() for field in out._fields}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, x, y, ids = problem()
    rows = shard(rank)
    common = (model, loss_fn, x[rows], y[rows], ids[rows], NUM_DOMAINS)
    record = {
        "rank": rank,
        "world": world,
        "pooled": as_json(per_example_gradients(*common, chunk_size=3)),
        "local": as_json(per_example_gradients(*common, chunk_size=3, reduce=False)),
        "micro": as_json(micro_batch_gradients(*common, micro_batch_size=2)),
        "products": products(model, x[rows], y[rows], ids[rows]),
        "tap": tap_products(model, x[rows], y[rows], ids[rows]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    # As in examples/distributed_train.py: gloo's C++ teardown occasionally aborts after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
