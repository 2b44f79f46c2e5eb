"""The training loop of every ``domainmix run`` experiment, written on the public API only.

One run = one task (data, model, loss, metric), one method (a loss-weight rule and a sampling rule) and
one seed. The loop is an ordinary PyTorch SGD loop; domainmix adds four lines to it: the sampler draws
the batch, ``weighted_loss`` applies the loss multipliers α/q, the held-out losses and gradient
variances go into the controller's collector when a window closes, and ``controller.step()`` moves
the weights.
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

from domainmix import WeightingController, domain_losses, strategies, weighted_loss
from domainmix.experiments.config import TrainConfig, parse_method
from domainmix.sampling import DomainBatchSampler, HeldoutSplit
from domainmix.stats import gradient_variance

HELDOUT_STATS = frozenset({"heldout_loss", "heldout_loss_var", "heldout_count"})


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
    """A method name (``fgls+va``) as ``combine(loss=<rule>, sampling=<rule>)``."""
    loss_rule, sampling_rule = parse_method(method)
    sizes = [len(task.split.train[name]) for name in task.names]
    if loss_rule == "oracle_gls":
        if task.noise_variances is None:
            raise ValueError(f"Method {method!r} needs the true noise variances; this task has none.")
        loss = strategies.oracle_gls(task.noise_variances, domain_sizes=sizes)
    elif loss_rule == "fgls":
        loss = strategies.delay(
            strategies.fgls(domain_sizes=sizes, smoothing=cfg.fgls_smoothing), cfg.warmup_steps
        )
    elif loss_rule == "erma":
        loss = strategies.delay(
            strategies.erma(domain_sizes=sizes, step_size=cfg.erma_step_size), cfg.warmup_steps
        )
    else:
        loss = strategies.uniform()
    sampling = (
        strategies.variance_aware(cfg.batch_size, min_count=1)
        if sampling_rule == "va"
        else strategies.uniform()
    )
    return strategies.combine(loss=loss, sampling=sampling)


def learning_rate(cfg: TrainConfig) -> Callable[[int], float]:
    """The multiplier of ``cfg.lr`` at step t."""
    if cfg.lr_schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, cfg.steps) / cfg.steps))
    return lambda t: 1.0 / (1.0 + t / cfg.lr_decay_steps)


def train(task: Task, method: str, cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """Train ``task.model`` with ``method``; return the run's curves, final weights and wall time."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    k, model, names = len(task.names), task.model, task.names
    sampler = DomainBatchSampler(
        task.split.train, cfg.batch_size, seed=seed, min_count=1, replacement=cfg.replacement
    )
    controller = WeightingController(
        make_method(method, cfg, task), names, update_every=cfg.update_every, sampler=sampler
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate(cfg))
    heldout = torch.as_tensor(np.concatenate([task.split.heldout[n] for n in names]))
    probe_rng = np.random.default_rng([seed, 17])  # VA's gradient samples; independent of the batches
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

    def observe_window() -> None:
        """The statistics the method reads, on data it never trains on (held-out) or at random (VA)."""
        if controller.requires & HELDOUT_STATS:
            with torch.no_grad():
                losses = task.loss_fn(model(task.inputs[heldout]), task.targets[heldout])
            controller.collector.observe(domain_losses(losses, task.domains[heldout], k), source="heldout")
        if "grad_var" in controller.requires:
            probe = torch.as_tensor(
                np.concatenate([probe_rng.choice(task.split.train[n], cfg.va_samples) for n in names])
            )
            variance = gradient_variance(
                model, task.loss_fn, task.inputs[probe], task.targets[probe], task.domains[probe], k,
                method=cfg.va_estimator,
            )  # fmt: skip
            controller.collector.observe_stat("grad_var", variance)

    batches = iter(sampler)
    for step in range(cfg.steps):
        if step % cfg.eval_every == 0:
            record(step)
        batch = torch.as_tensor(next(batches))
        per_example = task.loss_fn(model(task.inputs[batch]), task.targets[batch])
        loss = weighted_loss(per_example, task.domains[batch], controller.loss_multipliers())
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(
                f"{method} (seed {seed}) diverged at step {step}: loss {loss.detach().item()}."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if controller.should_update(step + 1):
            observe_window()
        controller.step()
    record(cfg.steps)

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
    }
