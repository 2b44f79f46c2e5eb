"""Two gloo processes: the all-reduced gradient statistics equal the single-process ones on all examples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from _helpers import run_torchrun
from domainmix.stats import (
    DomainGradients,
    domain_gradient_products,
    micro_batch_gradients,
    per_example_gradients,
)

WORKER = Path(__file__).resolve().parent / "_gradients_worker.py"


def load_worker():
    spec = importlib.util.spec_from_file_location("_gradients_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def from_json(record: dict) -> DomainGradients:
    return DomainGradients(*(torch.tensor(record[f], dtype=torch.float64) for f in DomainGradients._fields))


@pytest.mark.distributed
def test_two_rank_pooled_statistics_equal_single_process(tmp_path: Path) -> None:
    done = run_torchrun(WORKER, "--out", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]

    worker = load_worker()
    model, x, y, ids = worker.problem()
    k = worker.NUM_DOMAINS
    whole = per_example_gradients(model, worker.loss_fn, x, y, ids, k)

    # Every rank holds the statistics of all 40 examples: the pooled estimator, not a mean of two.
    assert ranks[0]["pooled"] == ranks[1]["pooled"]
    for r in ranks:
        pooled = from_json(r["pooled"])
        for a, b in zip(pooled, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        torch.testing.assert_close(
            torch.tensor(r["pooled"]["variance"], dtype=torch.float64), whole.variance(), rtol=0, atol=1e-10
        )

    # reduce=False kept each rank's own shard, so the reduction above did the pooling.
    for rank, r in enumerate(ranks):
        rows = worker.shard(rank)
        local = per_example_gradients(model, worker.loss_fn, x[rows], y[rows], ids[rows], k)
        for a, b in zip(from_json(r["local"]), local, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert ranks[0]["local"]["count"] != whole.count.tolist()

    # Micro-batches are cut within each rank's shard; the pooled result merges the shards' micro-batches.
    shards = [
        micro_batch_gradients(model, worker.loss_fn, x[s], y[s], ids[s], k, micro_batch_size=2)
        for s in (worker.shard(0), worker.shard(1))
    ]
    merged = shards[0].merged(shards[1])
    assert ranks[0]["micro"] == ranks[1]["micro"]
    for a, b in zip(from_json(ranks[0]["micro"]), merged, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)

    # DoGE's products pool the per-domain gradient sums: equal to one process holding both shards (its
    # target rows are both shards' first three rows, like the ranks' targets).
    assert ranks[0]["products"] == ranks[1]["products"]
    both = torch.cat([torch.arange(0, 3), torch.arange(worker.SPLIT, worker.SPLIT + 3)])
    losses = worker.loss_fn(model(x), y)
    expected = domain_gradient_products(
        losses, ids, k, list(model.parameters()), target_losses=losses[both], max_norm=0.5
    )
    assert ranks[0]["tap"] == ranks[1]["tap"]
    for key in ("products", "tap"):  # the one-backward tap pools the same sums
        for field in expected._fields:
            torch.testing.assert_close(
                torch.tensor(ranks[0][key][field], dtype=torch.float64),
                getattr(expected, field),
                rtol=0,
                atol=1e-10,
            )
