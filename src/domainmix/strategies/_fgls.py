"""One-shot FGLS loss weights (Salmani et al. 2025, arXiv:2511.06913, Alg. 1; docs/algorithms.md §3.3)."""

from __future__ import annotations

import torch

from domainmix._validation import Interval, check_param, check_weight_vector
from domainmix.strategies._base import Strategy, make_strategy
from domainmix.strategies._population import (
    LossWeightState,
    WeightsLike,
    check_optional,
    initial_loss_weights,
    population_and_ratio,
)
from domainmix.types import DomainStats, DomainWeights

FglsState = LossWeightState  # w, π and c; shared with the other loss-weight rules


def fgls(
    population: WeightsLike | None = None,
    domain_sizes: WeightsLike | None = None,
    *,
    smoothing: float = 0.5,
    floor: float = 1e-8,
) -> Strategy:
    r"""One-shot feasible generalised least squares: loss weights from held-out residual variances.

    Each update reads the held-out mean loss per domain, σ̂_i² (for the squared error ℓ = ½ r² this is
    half the residual mean square; the constant cancels), and moves the loss weights towards the GLS
    weights:

    .. math::
        \tilde w_i = \frac{n_i / \pi_i}{\max(\hat\sigma_i^2, \epsilon)}, \quad
        \tilde w \leftarrow \tilde w / \textstyle\sum_j \pi_j \tilde w_j, \quad
        w \leftarrow (1 - \beta)\, w + \beta\, \tilde w, \quad \alpha = \pi \odot w .

    With π ∝ n (or both left at their defaults) this is Corollary 3.2's w_i ∝ 1/σ_i². A domain with no
    held-out data in the window keeps its weight. Warm-up and update period are the controller's
    (``warmup_steps``, ``update_every``; the reference protocol uses 500 and 100). Held-out losses must
    come from a split never used for gradients (``StatsCollector.observe(..., source="heldout")``).
    The rule moves α only; pair it with a sampling strategy through :func:`combine`.

    Args:
        population: π by name or in domain order; uniform if omitted.
        domain_sizes: training examples n_i per domain; taken ∝ π if omitted.
        smoothing: β in (0, 1]; 1 jumps to the estimate.
        floor: ε > 0, lower bound on σ̂².

    References:
        Salmani, Worah, Razaviyayn, Mirrokni (2025), "Sampling and Loss Weights in Multi-Domain
        Training", arXiv:2511.06913, §3 (Aitken's theorem, Corollary 3.2, One-shot FGLS).
    """
    check_optional("fgls", "population", population)
    check_optional("fgls", "domain_sizes", domain_sizes)
    check_param("fgls", "smoothing", smoothing, Interval(float, 0.0, 1.0, closed="right"))
    check_param("fgls", "floor", floor, Interval(float, 0.0, None, closed="neither"))
    beta, eps = float(smoothing), float(floor)

    def init_fn(weights: DomainWeights) -> FglsState:
        return initial_loss_weights("fgls", weights.names, population, domain_sizes)

    def update_fn(
        weights: DomainWeights, state: FglsState, stats: DomainStats
    ) -> tuple[DomainWeights, FglsState]:
        seen = (stats["heldout_count"] > 0) & (state.population > 0)
        sigma2 = stats["heldout_loss"].to(torch.float64).clamp_min(eps)
        # n_i / π_i = 1 / ratio_i (up to a constant that the normalisation removes)
        target = torch.where(seen, 1.0 / (state.ratio.clamp_min(1e-300) * sigma2), state.loss_weights)
        target = target / (state.population * target).sum()
        w = (1 - beta) * state.loss_weights + beta * target
        w = w / (state.population * w).sum()
        return weights._replace(mixture=state.population * w), state._replace(loss_weights=w)

    return make_strategy("fgls", init_fn, update_fn, {"heldout_loss", "heldout_count"})


def oracle_gls(
    noise_variances: WeightsLike,
    population: WeightsLike | None = None,
    domain_sizes: WeightsLike | None = None,
) -> Strategy:
    r"""GLS loss weights from the *true* noise variances: an experimental ceiling, not a method.

    .. math::
        w_i \propto \frac{n_i / \pi_i}{\sigma_i^2}, \qquad \alpha = \pi \odot w / \textstyle\sum_j \pi_j w_j

    Args:
        noise_variances: σ_i² > 0 by name or in domain order.
        population: π; uniform if omitted.
        domain_sizes: n_i; taken ∝ π if omitted.
    """
    check_optional("oracle_gls", "noise_variances", noise_variances)
    check_optional("oracle_gls", "population", population)
    check_optional("oracle_gls", "domain_sizes", domain_sizes)

    def init_fn(weights: DomainWeights) -> FglsState:
        pi, ratio = population_and_ratio("oracle_gls", weights.names, population, domain_sizes)
        sigma2 = check_weight_vector(
            "oracle_gls", "noise_variances", noise_variances, weights.names, normalize=False
        )
        w = torch.where(
            (pi > 0) & (sigma2 > 0), 1.0 / (ratio.clamp_min(1e-300) * sigma2.clamp_min(1e-300)), 0.0
        )
        return FglsState(w / (pi * w).sum(), pi, ratio)

    def update_fn(
        weights: DomainWeights, state: FglsState, stats: DomainStats
    ) -> tuple[DomainWeights, FglsState]:
        del stats
        return weights._replace(mixture=state.population * state.loss_weights), state

    return make_strategy("oracle_gls", init_fn, update_fn)
