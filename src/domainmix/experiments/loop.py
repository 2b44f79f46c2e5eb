"""The training loop of every ``domainmix run`` experiment, written on the public API only.

One run = one task (data, model, loss, metric), one method (a loss-weight rule and a sampling rule,
``experiments/methods.py``) and one seed. The loop is an ordinary PyTorch SGD loop in the one order of
docs/design.md ("One step"): the sampler draws the batch, ``controller.step(losses, ids)`` observes it
and moves the weights when a window closes (its probes add the held-out losses and the gradient
variances the method reads), and ``weighted_loss`` applies the loss multipliers α/q.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from domainmix import WeightingController, strategies, weighted_loss
from domainmix.experiments.config import TrainConfig
from domainmix.experiments.methods import MethodContext, build_method
from domainmix.sampling import DomainBatchSampler, HeldoutSplit
from domainmix.stats import GradientVarianceProbe, HeldoutLossProbe, Probe


@dataclass
class Task:
    """Everything a run needs besides the method: data, split, model, loss and metric."""

    names: tuple[str, ...]
    """Domain names, in domain-id order."""
    inputs: Tensor
    """(N, ...) every training and held-out example."""
    targets: Tensor
    """(N,) their targets."""
    domains: Tensor
    """(N,) int64 domain id of each example."""
    split: HeldoutSplit
    """Indices into ``inputs``: training (the sampler's) and held-out (estimates only) per domain."""
    model: nn.Module
    """A freshly initialised model."""
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    """``loss_fn(outputs, targets)`` -> per-example losses (N,)."""
    evaluate: Callable[[nn.Module], dict[str, float]]
    """Metrics of the current model; ``"error"`` is the main curve."""
    noise_variances: tuple[float, ...] | None = None
    """True σ_i², for the oracle_gls ceiling (synthetic regression only)."""


def make_method(method: str, cfg: TrainConfig, task: Task) -> strategies.Strategy:
    """A method name (``fgls+va``) as ``combine(loss=<rule>, sampling=<rule>)`` for this task."""
    sizes = tuple(len(task.split.train[name]) for name in task.names)
    return build_method(method, cfg, MethodContext(sizes, task.noise_variances))


def make_probes(task: Task, cfg: TrainConfig, seed: int) -> list[Probe]:
    """What the task can observe: held-out losses, and gradient variances on random training examples."""
    names, model = task.names, task.model
    heldout = torch.as_tensor(np.concatenate([task.split.heldout[n] for n in names]))

    def heldout_losses() -> tuple[Tensor, Tensor]:
        return task.loss_fn(model(task.inputs[heldout]), task.targets[heldout]), task.domains[heldout]

    def draw(step: int) -> tuple[Tensor, Tensor, Tensor]:
        # Keyed by the step: independent of the batches, and nothing to checkpoint.
        rng = np.random.default_rng([seed, 17, step])
        probe = torch.as_tensor(
            np.concatenate([rng.choice(task.split.train[n], cfg.va_samples) for n in names])
        )
        return task.inputs[probe], task.targets[probe], task.domains[probe]

    return [
        HeldoutLossProbe(heldout_losses),
        GradientVarianceProbe(model, task.loss_fn, draw, method=cfg.va_estimator),
    ]


def learning_rate(cfg: TrainConfig) -> Callable[[int], float]:
    """The multiplier of ``cfg.lr`` at step t."""
    if cfg.lr_schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, cfg.steps) / cfg.steps))
    return lambda t: 1.0 / (1.0 + t / cfg.lr_decay_steps)


def train(task: Task, method: str, cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """Train ``task.model`` with ``method``; return the run's curves, final weights and wall time."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model, names = task.model, task.names
    # Uniform q until a sampling rule moves it (the protocol's start; without weights q ∝ sizes).
    sampler = DomainBatchSampler(
        task.split.train,
        cfg.batch_size,
        dict.fromkeys(names, 1.0),
        seed=seed,
        min_count=1,
        replacement=cfg.replacement,
    )
    controller = WeightingController(
        make_method(method, cfg, task),
        names,
        update_every=cfg.update_every,
        sampler=sampler,
        probes=make_probes(task, cfg, seed),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate(cfg))
    curves: dict[str, list[float]] = {}
    trajectory: dict[str, list[Any]] = {"steps": [], "loss_share": [], "sampling_share": []}

    def record(step: int) -> None:
        model.eval()
        with torch.no_grad():
            for name, value in task.evaluate(model).items():
                curves.setdefault(name, []).append(value)
        model.train()
        trajectory["steps"].append(step)
        trajectory["loss_share"].append(controller.weights.mixture.tolist())
        trajectory["sampling_share"].append(sampler.effective_sampling.tolist())

    batches = iter(sampler)
    diverged_at = None
    for step in range(cfg.steps):
        if step % cfg.eval_every == 0:
            record(step)
        batch = torch.as_tensor(next(batches))
        ids = task.domains[batch]
        with controller.record():
            per_example = task.loss_fn(model(task.inputs[batch]), task.targets[batch])
        controller.step(per_example, ids)
        loss = weighted_loss(per_example, ids, controller.loss_multipliers())
        if not torch.isfinite(loss.detach()):
            # The run stops here, before a non-finite gradient reaches the model; its later evaluations
            # are NaN (null in metrics.json), so the divergence shows in every mean instead of aborting
            # the other runs of the experiment.
            diverged_at = step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    if diverged_at is None:
        record(cfg.steps)
    else:
        for step in [*range(diverged_at + 1, cfg.steps), cfg.steps]:
            if step % cfg.eval_every == 0 or step == cfg.steps:
                trajectory["steps"].append(step)
                trajectory["loss_share"].append(controller.weights.mixture.tolist())
                trajectory["sampling_share"].append(sampler.effective_sampling.tolist())
                for values in curves.values():
                    values.append(math.nan)

    by_name = dict.fromkeys(names)
    error = curves.pop("error")
    return {
        "method": method,
        "seed": seed,
        "steps": trajectory["steps"],
        "error": error,
        "final_error": error[-1],
        "metrics": curves,
        "final_metrics": {name: values[-1] for name, values in curves.items()},
        "loss_share": dict(zip(by_name, controller.weights.mixture.tolist(), strict=True)),
        "sampling_share": dict(zip(by_name, sampler.effective_sampling.tolist(), strict=True)),
        "trajectory": trajectory,
        "wall_time_s": time.perf_counter() - start,
        "diverged_at": diverged_at,
    }
