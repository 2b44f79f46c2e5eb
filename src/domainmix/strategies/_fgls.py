"""One-shot FGLS loss weights (Salmani et al. 2025, arXiv:2511.06913, Alg. 1; docs/algorithms.md §3.3)."""

from __future__ import annotations

import warnings

import torch

from domainmix._validation import Interval, check_param, check_weight_vector, param_error
from domainmix.strategies._base import Strategy, make_strategy
from domainmix.strategies._population import (
    LossWeightState,
    WeightsLike,
    check_optional,
    initial_loss_weights,
    population_and_ratio,
    zero_in_population,
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
        \tilde w \leftarrow \tilde w\, \frac{\sum_j \pi_j w_j}{\sum_j \pi_j \tilde w_j}, \quad
        w \leftarrow (1 - \beta)\, w + \beta\, \tilde w, \quad \alpha = \pi \odot w .

    The sum and the normalisation run over the domains with held-out data in the window; the others keep
    their w exactly (so one seen domain alone changes nothing: σ̂² only compares domains). With π ∝ n
    (or both left at their defaults) this is Corollary 3.2's w_i ∝ 1/σ_i². Warm-up and update period
    are the controller's (``warmup_steps``, ``update_every``; the reference protocol uses 500 and
    100). Held-out losses must come from a split never used for gradients
    (``StatsCollector.observe(..., source="heldout")``).
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
        w, pi = state.loss_weights, state.population
        seen = (stats["heldout_count"] > 0) & (pi > 0)
        if not bool(seen.any()):
            return weights._replace(mixture=pi * w), state
        loss = stats["heldout_loss"].to(torch.float64)
        if bool((seen & (loss < 0)).any()):
            warnings.warn(
                f"fgls: negative held-out losses {loss.tolist()}; FGLS reads the held-out loss as a noise "
                f"variance σ̂² >= 0 (a squared-error loss), and clamps it to floor={eps:g}, which gives such "
                "a domain nearly all the weight.",
                RuntimeWarning,
                stacklevel=2,
            )
        sigma2 = loss.clamp_min(eps)
        # n_i / π_i = 1 / ratio_i (up to a constant that the normalisation removes)
        gls = torch.where(seen, 1.0 / (state.ratio.clamp_min(1e-300) * sigma2), 0.0)
        # The seen domains share out the weight Σ_seen π_i w_i they hold now, so that the others keep
        # their w exactly whatever the units of the loss (σ̂² only says how seen domains compare).
        held = (pi * torch.where(seen, w, 0.0)).sum()
        target = torch.where(seen, gls * held / (pi * gls).sum(), w)
        w = (1 - beta) * w + beta * target
        w = w / (pi * w).sum()
        return weights._replace(mixture=pi * w), state._replace(loss_weights=w)

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
        noise_variances: σ_i² by name or in domain order, > 0 wherever π_i > 0.
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
        zero = zero_in_population(weights.names, pi, sigma2)
        if zero:  # the GLS weight 1/σ² is unbounded: a noise-free domain is not a finite weighting
            raise param_error(
                "oracle_gls", "noise_variances", "σ_i² > 0 for every domain with population π_i > 0",
                f"σ² = 0 for {zero}",
            )  # fmt: skip
        w = torch.where(pi > 0, 1.0 / (ratio.clamp_min(1e-300) * sigma2.clamp_min(1e-300)), 0.0)
        return FglsState(w / (pi * w).sum(), pi, ratio)

    def update_fn(
        weights: DomainWeights, state: FglsState, stats: DomainStats
    ) -> tuple[DomainWeights, FglsState]:
        del stats
        return weights._replace(mixture=state.population * state.loss_weights), state

    return make_strategy("oracle_gls", init_fn, update_fn)
