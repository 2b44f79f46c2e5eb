"""A model compiled with ``torch.compile`` in the README loop: the same losses and weights as eager.

``backend="aot_eager"`` traces and partitions the graph as inductor does (the part that can change what the
library sees: hooks, outputs, versions) but runs it with eager kernels, so the trajectories are bit for
bit those of the eager run and the test needs no C++ compiler. The tap's behaviour under compile is in
``tests/stats/test_tap.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from domainmix import WeightingController, strategies, weighted_loss
from domainmix.sampling import DomainBatchSampler

NAMES = ("web", "code", "books")
SIZES = (300, 100, 100)


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dom = torch.cat([torch.full((n,), i) for i, n in enumerate(SIZES)])
    x = torch.randn(len(dom), 8, generator=g) + dom[:, None].float()
    y = (x @ torch.randn(8, 4, generator=g) + torch.randn(len(dom), 4, generator=g)).argmax(1)
    return x, y, dom


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))


def online() -> strategies.Strategy:
    # q moves every update, so the batches' composition (the per-domain counts) changes from step to step
    return strategies.chain(
        strategies.exponentiated_gradient(lambda s, w: s.loss, step_size=2.0, target="sampling"),
        strategies.floor(0.05),
    )


def readme() -> strategies.Strategy:
    return strategies.combine(
        loss=strategies.chain(
            strategies.exponentiated_gradient(lambda s, w: s.loss, step_size=0.1),
            strategies.mix_uniform(0.01),
        ),
        sampling=strategies.uniform(),
    )


def trajectory(make: Callable[[], strategies.Strategy], compiled: bool, steps: int = 12) -> dict[str, Any]:
    x, y, dom = data()
    net = model()
    forward = torch.compile(net, backend="aot_eager") if compiled else net
    starts = [sum(SIZES[:i]) for i in range(len(SIZES))]
    sampler = DomainBatchSampler(
        {n: range(s, s + size) for n, s, size in zip(NAMES, starts, SIZES, strict=True)},
        24,
        min_count=1,
        seed=0,
    )
    controller = WeightingController(make(), list(NAMES), update_every=2, sampler=sampler)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    out: dict[str, list[Any]] = {"loss": [], "alpha": [], "q": [], "batch": []}
    for _, index in zip(range(steps), sampler, strict=False):
        with controller.record():
            per_example = F.cross_entropy(forward(x[index]), y[index], reduction="none")
        controller.step(per_example, dom[index])
        loss = weighted_loss(per_example, dom[index], controller.loss_multipliers())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out["loss"].append(loss.item())
        out["alpha"].append(controller.weights.mixture.tolist())
        out["q"].append(controller.weights.sampling.tolist())
        out["batch"].append(list(index))
    return out


@pytest.mark.parametrize("make", [readme, online], ids=["readme_loss_weights", "online_sampling"])
def test_a_compiled_model_follows_the_eager_trajectory(make: Callable[[], strategies.Strategy]) -> None:
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = trajectory(make, False), trajectory(make, True)
    assert counters["stats"]["unique_graphs"] == 1  # new weights and domain counts never recompile
    torch._dynamo.reset()
    assert compiled["batch"] == eager["batch"]
    assert compiled["q"] == eager["q"] and compiled["alpha"] == eager["alpha"]
    assert compiled["loss"] == eager["loss"]
    if make is online:
        assert len({tuple(q) for q in eager["q"]}) > 1  # q did move


def test_weighted_loss_inside_a_compiled_step_keeps_its_values_and_its_checks() -> None:
    """Its two data-dependent checks (finite, non-negative multipliers; ids in range) break the graph
    rather than being skipped: a bad multiplier still raises inside the compiled function."""
    torch._dynamo.reset()
    x, y, dom = data()
    net = model()

    def step(inputs: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return weighted_loss(F.cross_entropy(net(inputs), targets, reduction="none"), ids, m)

    compiled = torch.compile(step, backend="aot_eager")
    graphs = []
    for seed in range(3):  # new multipliers and a new domain mix every call
        g = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(dom), generator=g)[:32]
        m = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
        assert (
            compiled(x[index], y[index], dom[index], m).item()
            == step(x[index], y[index], dom[index], m).item()
        )
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[-1]  # compiled (in pieces) at the first call only
    with pytest.raises(ValueError, match="multipliers"):
        compiled(x[:32], y[:32], dom[:32], torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64))
    torch._dynamo.reset()
