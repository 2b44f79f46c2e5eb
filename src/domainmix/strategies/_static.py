"""Static weights and schedules: strategies that read no statistics.

Each sets both vectors (α = q: plain resampling, loss multipliers 1). To use one for only one side,
wrap it in :func:`combine`, e.g. ``combine(loss=fgls(...), sampling=temperature(sizes, 2.0))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from typing import NamedTuple

import torch
from torch import Tensor

from domainmix._tree import from_arguments
from domainmix._validation import Interval, check_param, check_weight_vector, param_error
from domainmix.strategies._base import Strategy, make_strategy
from domainmix.types import DomainStats, DomainWeights

SizesLike = Mapping[str, int] | Sequence[int]
WeightsLike = Mapping[str, float] | Sequence[float] | Tensor


class StaticState(NamedTuple):
    """The resolved target vectors, fixed at ``init`` once the domain names are known."""

    mixture: Tensor  # (k,)
    sampling: Tensor  # (k,)


from_arguments(StaticState, "mixture", "sampling")  # re-resolved on a resume, not restored


def _static(name: str, resolve: Callable[[tuple[str, ...]], tuple[Tensor, Tensor]]) -> Strategy:
    def init_fn(weights: DomainWeights) -> StaticState:
        mixture, sampling = resolve(weights.names)
        return StaticState(mixture, sampling)

    def update_fn(
        weights: DomainWeights, state: StaticState, stats: DomainStats
    ) -> tuple[DomainWeights, StaticState]:
        del stats
        return weights._replace(mixture=state.mixture.clone(), sampling=state.sampling.clone()), state

    return make_strategy(name, init_fn, update_fn)


def uniform() -> Strategy:
    """Uniform weights: α_i = q_i = 1/k."""

    def resolve(names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        x = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
        return x, x.clone()

    return _static("uniform", resolve)


def _check_sizes(caller: str, sizes: SizesLike) -> SizesLike:
    values = list(sizes.values()) if isinstance(sizes, Mapping) else sizes
    if isinstance(sizes, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise param_error(caller, "domain_sizes", "a non-empty mapping or sequence of domain sizes", sizes)
    if not all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 0 for v in values):
        raise param_error(caller, "domain_sizes", "non-negative ints", sizes)
    if sum(values) == 0:
        raise param_error(caller, "domain_sizes", "sizes with a positive total", sizes)
    return sizes


def temperature(domain_sizes: SizesLike, temperature: float = 1.0) -> Strategy:
    r"""Temperature-scaled size weights, as in multilingual pre-training.

    .. math:: \alpha_i = q_i = n_i^{1/T} \,/\, \sum_j n_j^{1/T}

    T = 1 is size-proportional, T → ∞ uniform over non-empty domains.

    Args:
        domain_sizes: n_i, by name or in domain order.
        temperature: T > 0.
    """
    _check_sizes("temperature", domain_sizes)
    check_param("temperature", "temperature", temperature, Interval(float, 0.0, None, closed="neither"))
    t = float(temperature)

    def resolve(names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        n = check_weight_vector("temperature", "domain_sizes", domain_sizes, names, normalize=False)
        x = torch.where(n > 0, (n / n.max()) ** (1.0 / t), torch.zeros_like(n))
        x = x / x.sum()
        return x, x.clone()

    return _static(f"temperature({t:g})", resolve)


def proportional(domain_sizes: SizesLike) -> Strategy:
    """Size-proportional weights, α_i = q_i = n_i / Σ_j n_j (``temperature`` with T = 1)."""
    _check_sizes("proportional", domain_sizes)
    return temperature(domain_sizes, 1.0)._replace(name="proportional")


def fixed(mixture: WeightsLike, sampling: WeightsLike | None = None) -> Strategy:
    """Fixed weights given by the user; ``sampling`` defaults to ``mixture``.

    Args:
        mixture: α by name, or in domain order.
        sampling: q by name, or in domain order; must be positive wherever α is.
    """
    _check_weights_like("fixed", "mixture", mixture)
    if sampling is not None:
        _check_weights_like("fixed", "sampling", sampling)

    def resolve(names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        w = DomainWeights.create(names, mixture, sampling)
        return w.mixture, w.sampling

    return _static("fixed", resolve)


def _check_weights_like(caller: str, name: str, weights: object) -> None:
    values: list[object] | None
    if isinstance(weights, Mapping):
        values = list(weights.values())
    elif isinstance(weights, Tensor):
        values = weights.tolist() if weights.ndim == 1 else None
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        values = list(weights)
    else:
        values = None
    numbers = [v for v in values or () if isinstance(v, Real) and not isinstance(v, bool)]
    if not values or len(numbers) != len(values):
        raise param_error(caller, name, "a non-empty mapping, sequence or 1-D tensor of numbers", weights)
    # Sign, finiteness and the zero-sum check need no domain names: fail here, not at init.
    check_weight_vector(caller, name, [float(v) for v in numbers], [str(i) for i in range(len(numbers))])


class ScheduleState(NamedTuple):
    """Start steps and the resolved weights of each stage."""

    starts: tuple[int, ...]
    mixtures: Tensor  # (stages, k)


from_arguments(ScheduleState, "starts", "mixtures")  # re-resolved on a resume, not restored


def schedule(stages: Sequence[tuple[int, WeightsLike]]) -> Strategy:
    """Piecewise-constant weights as data: ``[(start_step, weights), ...]``.

    At step t the stage with the largest ``start_step ≤ t`` applies (α = q = its weights); before the
    first stage the incoming weights pass through unchanged. Levanter's multi-stage mixtures and
    Energon's step schedules are this.

    Args:
        stages: (start_step, weights) pairs with strictly increasing non-negative start steps; weights by
            name or in domain order.
    """
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
        raise param_error("schedule", "stages", "a non-empty list of (start_step, weights) pairs", stages)
    starts = []
    for entry in stages:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise param_error("schedule", "stages", "(start_step, weights) pairs", entry)
        start, weights = entry
        check_param("schedule", "start_step", start, Interval(int, 0, None))
        _check_weights_like("schedule", "weights", weights)
        starts.append(int(start))
    if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise param_error("schedule", "stages", "ordered by strictly increasing start_step", starts)

    def init_fn(weights: DomainWeights) -> ScheduleState:
        rows = [check_weight_vector("schedule", "weights", w, weights.names) for _, w in stages]
        return ScheduleState(tuple(starts), torch.stack(rows))

    def update_fn(
        weights: DomainWeights, state: ScheduleState, stats: DomainStats
    ) -> tuple[DomainWeights, ScheduleState]:
        active = [i for i, s in enumerate(state.starts) if s <= stats.step]
        if not active:
            return weights, state
        x = state.mixtures[active[-1]].clone()
        return weights._replace(mixture=x, sampling=x.clone()), state

    return make_strategy("schedule", init_fn, update_fn)


__all__ = ["ScheduleState", "StaticState", "fixed", "proportional", "schedule", "temperature", "uniform"]
