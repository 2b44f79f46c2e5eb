"""Population proportions π and domain sizes n, resolved against the domain names at ``init``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from domainmix._tree import from_arguments
from domainmix._validation import check_weight_vector, param_error
from domainmix.types import DomainWeights

WeightsLike = Mapping[str, float] | Sequence[float] | Tensor


def check_optional(caller: str, name: str, value: WeightsLike | None) -> None:
    """Fail at configuration time for sign, finiteness and zero-sum problems (names checked at init)."""
    if value is None:
        return
    values = list(value.values()) if isinstance(value, Mapping) else value
    check_weight_vector(caller, name, values, [str(i) for i in range(len(values))])


def population_and_ratio(
    caller: str, names: tuple[str, ...], population: WeightsLike | None, domain_sizes: WeightsLike | None
) -> tuple[Tensor, Tensor]:
    """π (normalised; uniform by default) and c = π / n' with n' = n / Σn (1 where n ∝ π or both default).

    c is how far a domain's per-example weight in Σ π_i w_i L̂_i departs from the plain average: the
    GLS and ERMA rules need it (docs/algorithms.md §3.2, §3.4). Domains with π_i = 0 get c_i = 0.

    Raises:
        ValueError: when a domain with π_i > 0 has n_i = 0 (no training data to weight).
    """
    k = len(names)
    pi = (
        torch.full((k,), 1.0 / k, dtype=torch.float64)
        if population is None
        else check_weight_vector(caller, "population", population, names)
    )
    n = (
        pi.clone()
        if domain_sizes is None
        else check_weight_vector(caller, "domain_sizes", domain_sizes, names)
    )
    empty = zero_in_population(names, pi, n)
    if empty:  # its GLS weight n_i / π_i would be 0: the rule cannot weight data that does not exist
        raise param_error(
            caller, "domain_sizes", "n_i > 0 for every domain with population π_i > 0", f"n = 0 for {empty}"
        )
    ratio = torch.where(pi > 0, pi / n.clamp_min(1e-300), torch.zeros_like(pi))
    return pi, ratio


def zero_in_population(names: Sequence[str], pi: Tensor, values: Tensor) -> list[str]:
    """The domains with population π_i > 0 whose entry of ``values`` is 0."""
    return [n for n, share, v in zip(names, pi.tolist(), values.tolist(), strict=True) if share and not v]


class LossWeightState(NamedTuple):
    """Loss weights w (normalised so that Σ π_i w_i = 1), the population π and c_i = π_i / n'_i."""

    loss_weights: Tensor  # (k,) w
    population: Tensor  # (k,) π
    ratio: Tensor  # (k,) c

    def restarted(self, weights: DomainWeights) -> LossWeightState:
        """The state of hand-set weights (``WeightingController.override``): w = α / π, Σ π_i w_i = 1.

        α on a domain with π_i = 0 has no w to hold it; the rule's next update drops it (α = π ⊙ w).

        Raises:
            ValueError: when α puts no weight on any domain of the population.
        """
        pi = self.population
        w = torch.where(pi > 0, weights.mixture.to(torch.float64) / pi.clamp_min(1e-300), 0.0)
        total = float((pi * w).sum())
        if not total > 0:
            raise param_error(
                "WeightingController.override", "mixture", "positive on some domain with population π_i > 0",
                weights.mixture.tolist(),
            )  # fmt: skip
        return self._replace(loss_weights=w / total)


from_arguments(LossWeightState, "population", "ratio")  # re-resolved on a resume, not restored


def initial_loss_weights(
    caller: str, names: tuple[str, ...], population: WeightsLike | None, domain_sizes: WeightsLike | None
) -> LossWeightState:
    """Start at w = 1 wherever π > 0 (the plain π-weighted objective, Σ π_i w_i = 1)."""
    pi, ratio = population_and_ratio(caller, names, population, domain_sizes)
    return LossWeightState(torch.where(pi > 0, 1.0, 0.0).to(torch.float64), pi, ratio)
