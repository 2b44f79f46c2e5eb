"""Demo: a synthetic three-domain linear regression where the loss weights matter.

Three domains share one true parameter θ* but differ in label noise (σ = 0.1, 1, 3). Each run trains
the same linear model by SGD from the same seed, drawing batches with a :class:`DomainBatchSampler`
and weighting the loss with the controller's α/q multipliers; only the strategy differs:

* ``uniform``: α = q = 1/3 (ordinary least squares by SGD).
* ``group_dro``: exponentiated gradient towards the domains with the *highest* loss (Group DRO's rule)
  — here that means the noisiest domain, and the estimate gets worse.
* ``inverse_loss``: α ∝ 1 / (mean squared residual), a generalised-least-squares heuristic built from
  the public primitives in a few lines, with sampling kept uniform (so α/q ≠ 1).
* ``inverse_loss+resample``: the same α, but sampling follows it (q = α, multipliers 1).

Run: ``domainmix demo`` (about 10 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from domainmix import (
    DomainStats,
    DomainWeights,
    WeightingController,
    strategies,
    weighted_loss,
)
from domainmix.sampling import DomainBatchSampler

NAMES = ("clean", "noisy", "very_noisy")
NOISE = (0.1, 1.0, 3.0)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo run."""

    examples_per_domain: int = 4000
    """Training examples in each domain."""
    dim: int = 10
    """Input dimension d."""
    batch_size: int = 48
    """Examples per batch."""
    steps: int = 1500
    """SGD steps per method."""
    lr: float = 0.02
    """Initial learning rate, decayed as lr / (1 + step / 300)."""
    update_every: int = 50
    """Steps per statistics window."""
    warmup_steps: int = 200
    """Steps before the first weight update."""
    seed: int = 0
    """Seed for data, sampler and model."""


def inverse_loss() -> strategies.Strategy:
    """α_i ∝ 1 / L_i from the window's mean training loss, smoothed; q left as it is."""

    def rule(weights: DomainWeights, stats: DomainStats) -> DomainWeights:
        inv = torch.where(stats.present, 1.0 / stats.loss.clamp_min(1e-8), weights.mixture)
        return weights._replace(mixture=inv / inv.sum())

    return strategies.chain(
        strategies.stateless("inverse_loss", rule, requires={"loss", "count"}),
        strategies.ema(0.5, target="mixture"),
    )


def method_strategies() -> dict[str, strategies.Strategy]:
    """The strategies compared by the demo."""
    return {
        "uniform": strategies.uniform(),
        "group_dro": strategies.combine(
            loss=strategies.chain(
                strategies.exponentiated_gradient(lambda s, w: s.loss, step_size=0.1),
                strategies.mix_uniform(0.01),
            ),
            sampling=strategies.uniform(),
        ),
        "inverse_loss": strategies.combine(loss=inverse_loss(), sampling=strategies.uniform()),
        "inverse_loss+resample": strategies.chain(inverse_loss(), strategies.follow_mixture()),
    }


def make_data(cfg: DemoConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (N, d), targets (N,), domain ids (N,) and the true parameter θ* (d,)."""
    g = torch.Generator().manual_seed(cfg.seed)
    theta = torch.randn(cfg.dim, generator=g)
    theta /= theta.norm()
    n = cfg.examples_per_domain
    x = torch.randn(n * len(NAMES), cfg.dim, generator=g)
    domain = torch.arange(len(NAMES)).repeat_interleave(n)
    noise = torch.tensor(NOISE)[domain] * torch.randn(n * len(NAMES), generator=g)
    return x, x @ theta + noise, domain, theta


def train(cfg: DemoConfig, strategy: strategies.Strategy) -> dict[str, object]:
    """Train one linear model with ``strategy``; return the final error and weights."""
    x, y, domain, theta_star = make_data(cfg)
    n = cfg.examples_per_domain
    sampler = DomainBatchSampler(
        {name: range(i * n, (i + 1) * n) for i, name in enumerate(NAMES)},
        cfg.batch_size,
        seed=cfg.seed,
        mode="stratified",
        min_count=1,
    )
    controller = WeightingController(
        strategy, NAMES, update_every=cfg.update_every, warmup_steps=cfg.warmup_steps, sampler=sampler
    )
    theta = torch.zeros(cfg.dim, requires_grad=True)
    batches = iter(sampler)
    for step in range(cfg.steps):
        idx = torch.as_tensor(next(batches))
        with controller.record():
            per_example = 0.5 * (x[idx] @ theta - y[idx]) ** 2
        controller.step(per_example, domain[idx])
        loss = weighted_loss(per_example, domain[idx], controller.loss_multipliers())
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= cfg.lr / (1 + step / 300) * grad
    return {
        "error": float((theta.detach() - theta_star).norm()),
        "mixture": controller.weights.mixture.tolist(),
        "sampling": sampler.effective_sampling.tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every method and print a table."""
    parser = argparse.ArgumentParser(prog="domainmix demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DemoConfig.steps, help="SGD steps per method")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed, help="random seed")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seed < 0:
        parser.error(f"--steps must be >= 1 and --seed >= 0; got --steps {args.steps} --seed {args.seed}")
    cfg = DemoConfig(steps=args.steps, seed=args.seed)
    print(
        f"3 domains {NAMES}, label noise σ = {NOISE}, d = {cfg.dim}, B = {cfg.batch_size}, {cfg.steps} steps"
    )
    header = f"{'method':<24}{'‖θ−θ*‖':>9}   {'loss mixture α':<22}{'sampling q':<22}{'sec':>5}"
    print(header)
    print("-" * len(header))
    for name, strategy in method_strategies().items():
        start = time.perf_counter()
        result = train(cfg, strategy)
        fmt = " ".join(f"{v:.3f}" for v in result["mixture"])  # type: ignore[union-attr]
        fmq = " ".join(f"{v:.3f}" for v in result["sampling"])  # type: ignore[union-attr]
        print(f"{name:<24}{result['error']:>9.4f}   {fmt:<22}{fmq:<22}{time.perf_counter() - start:>5.1f}")
    print("\nLoss weights move the error: down-weighting noisy domains (inverse_loss) beats uniform;")
    print("up-weighting them (group_dro) hurts. Sampling q changes the gradient noise, not the target.")
    return 0
