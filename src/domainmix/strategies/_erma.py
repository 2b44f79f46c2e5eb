"""ERMA loss weights for any model (Salmani et al. 2025, arXiv:2511.06913, §3; docs/algorithms.md §3.4)."""

from __future__ import annotations

import warnings

import torch

from domainmix._validation import Interval, check_param, param_error
from domainmix.strategies._base import Strategy, make_strategy, multiplicative_step
from domainmix.strategies._population import (
    LossWeightState,
    WeightsLike,
    check_optional,
    initial_loss_weights,
)
from domainmix.types import DomainStats, DomainWeights

ErmaState = LossWeightState  # w, π and c; shared with the other loss-weight rules


def erma(
    population: WeightsLike | None = None,
    domain_sizes: WeightsLike | None = None,
    *,
    step_size: float = 0.5,
) -> Strategy:
    r"""ERM-aware loss weights from held-out means and variances of the per-example loss.

    An exponentiated-gradient step on the relative generalisation-gap bound
    R(w) = S(w) / L̄(w), with L̄ = Σ_j π_j w_j L_j and S² = Σ_j c_j π_j w_j² Var_j:

    .. math::
        w_i \leftarrow w_i \exp\!\Big(\gamma\, \pi_i
            \Big(\frac{L_i}{\bar L} - \frac{c_i w_i \mathrm{Var}_i}{S^2}\Big)\Big),
        \qquad w \leftarrow w / \textstyle\sum_j \pi_j w_j, \qquad \alpha = \pi \odot w .

    Its fixed point is w_i ∝ n_i L_i / (π_i Var_i); for Gaussian residuals under ℓ = ½ r² that is
    FGLS's 1/σ_i². The paper's quoted update is w_i ∝ w_i exp(γ₁ π_i G(t) L_i − γ₂ π_i w_i Var_i) with
    G(t) undefined in the available sources: this scale-free form (γ₁ = γ₂ = γ, G = S²/L̄, divided
    through by S²) is **reconstructed** (docs/algorithms.md §3.4) and centres the step, Σ π_i w_i (·) = 0.
    c_i = π_i / n'_i is 1 when n ∝ π. Domains with fewer than two held-out examples in the window keep
    their weight and drop out of L̄ and S². Moves α only.

    Args:
        population: π by name or in domain order; uniform if omitted.
        domain_sizes: training examples n_i; taken ∝ π if omitted.
        step_size: γ > 0. With σ² = (1, 20) (target share 20/21), γ = 0.5 converges to the fixed point
            while γ = 1 oscillates around it (shares 0.909–0.963 after 300 updates, measured by
            ``tests/strategies/test_salmani_loss_weights.py``); the reference simulation's γ ≥ 3
            diverged.

    References:
        Salmani, Worah, Razaviyayn, Mirrokni (2025), "Sampling and Loss Weights in Multi-Domain
        Training", arXiv:2511.06913, §3 (ERMA).
    """
    check_optional("erma", "population", population)
    check_optional("erma", "domain_sizes", domain_sizes)
    check_param("erma", "step_size", step_size, Interval(float, 0.0, None, closed="neither"))
    gamma = float(step_size)

    def init_fn(weights: DomainWeights) -> ErmaState:
        return initial_loss_weights("erma", weights.names, population, domain_sizes)

    def update_fn(
        weights: DomainWeights, state: ErmaState, stats: DomainStats
    ) -> tuple[DomainWeights, ErmaState]:
        w, pi, c = state
        seen = (stats["heldout_count"] > 1) & (pi > 0)
        mean = torch.where(seen, stats["heldout_loss"].to(torch.float64), 0.0)
        var = torch.where(seen, stats["heldout_loss_var"].to(torch.float64), 0.0)
        level = (pi * w * mean).sum()
        spread = (c * pi * w * w * var).sum()
        if seen.any() and float(level) <= 0:
            # the step divides by L̄: losses that are not positive (a log-likelihood, a shifted loss) would
            # stop ERMA for good without a word
            warnings.warn(
                f"erma: the held-out mean loss L̄ = {float(level):.4g} is not positive; ERMA's step needs "
                "positive losses (it divides by L̄). The weights stay as they were.",
                RuntimeWarning,
                stacklevel=2,
            )
        if not seen.any() or float(level) <= 0 or float(spread) <= 0:
            return weights._replace(mixture=pi * w), state  # no usable estimate in this window
        step = torch.where(seen, gamma * pi * (mean / level - c * w * var / spread), 0.0)
        if not torch.isfinite(step).all():
            raise param_error(
                "erma", "step_size", "small enough for a finite step γ π_i (L_i / L̄ - c_i w_i S_i² / S²) "
                f"(held-out losses {mean.tolist()}, variances {var.tolist()})", gamma,
            )  # fmt: skip
        # in log space: exp(step) of a finite but large step overflows; the weights are π-normalised after
        w = multiplicative_step(w, step)
        w = w / (pi * w).sum()
        return weights._replace(mixture=pi * w), state._replace(loss_weights=w)

    return make_strategy("erma", init_fn, update_fn, {"heldout_loss", "heldout_loss_var", "heldout_count"})
