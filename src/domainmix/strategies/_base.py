"""The strategy contract: a pair of pure functions over explicit state (optax's pattern).

A strategy never holds mutable state. ``init(weights)`` returns its state (a NamedTuple, possibly
nested, of tensors and Python scalars); ``update(weights, state, stats)`` returns new weights and new
state. A checkpoint of a strategy is its state; a test is a hand-built :class:`DomainStats`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from domainmix._statistics import how_to_observe, statistic, statistics
from domainmix.types import DomainStats, DomainWeights

StrategyState = Any  # a NamedTuple (possibly nested) of tensors and Python scalars


class InitFn(Protocol):
    def __call__(self, weights: DomainWeights) -> StrategyState: ...


class UpdateFn(Protocol):
    def __call__(
        self, weights: DomainWeights, state: StrategyState, stats: DomainStats
    ) -> tuple[DomainWeights, StrategyState]: ...


class Strategy(NamedTuple):
    """A weighting method: ``init`` and ``update`` closures plus the statistics it reads.

    Attributes:
        init: ``init(weights) -> state``.
        update: ``update(weights, state, stats) -> (weights, state)``; pure, never mutates its inputs.
        requires: names of the :class:`DomainStats` fields that ``update`` reads. An empty set marks a
            statistic-free strategy (static weights, schedules) that a controller may evaluate at
            every step.
        name: a short label used in error messages and logs.
    """

    init: InitFn
    update: UpdateFn
    requires: frozenset[str] = frozenset()
    name: str = "strategy"


class EmptyState(NamedTuple):
    """State of a strategy that keeps none."""


def make_strategy(
    name: str,
    init: InitFn | None,
    update: Callable[[DomainWeights, StrategyState, DomainStats], tuple[DomainWeights, StrategyState]],
    requires: frozenset[str] | set[str] = frozenset(),
) -> Strategy:
    """Wrap closures into a :class:`Strategy` whose ``update`` first checks the statistics it needs.

    Raises (from the returned ``update``):
        ValueError: when a required statistic is missing or has the wrong shape, or when the number of
            domains in ``stats`` and ``weights`` differ.
    """
    requires = frozenset(requires)
    table = statistics()
    unknown = sorted(requires - set(table))
    if unknown:
        raise ValueError(f"Strategy {name!r} requires unknown statistics {unknown}; known: {list(table)}.")

    def checked_update(
        weights: DomainWeights, state: StrategyState, stats: DomainStats
    ) -> tuple[DomainWeights, StrategyState]:
        check_stats(name, requires, weights, stats)
        return update(weights, state, stats)

    return Strategy(init or (lambda weights: EmptyState()), checked_update, requires, name)


def check_stats(name: str, requires: frozenset[str], weights: DomainWeights, stats: DomainStats) -> None:
    """Raise a clear error unless ``stats`` carries every statistic in ``requires`` with the right shape."""
    k = weights.num_domains
    if not isinstance(stats, DomainStats):
        raise TypeError(f"Strategy {name!r} expects a DomainStats, got {type(stats).__name__}.")
    if stats.loss.shape != (k,) or stats.count.shape != (k,):
        raise ValueError(
            f"Strategy {name!r}: stats cover {tuple(stats.loss.shape)} domains but the weights have "
            f"{k} ({list(weights.names)})."
        )
    for field in sorted(requires):
        value = stats.get(field)
        declared = statistic(field)
        if value is None:
            raise ValueError(
                f"Strategy {name!r} requires the statistic {field!r}, but the DomainStats has none: "
                f"{how_to_observe(field)} before updating."
            )
        if not declared.fits(tuple(value.shape), k):
            raise ValueError(
                f"Strategy {name!r}: statistic {field!r} must have shape {declared.describe(k)}, "
                f"got {tuple(value.shape)}."
            )


def stateless(
    name: str,
    fn: Callable[[DomainWeights, DomainStats], DomainWeights],
    requires: frozenset[str] | set[str] = frozenset(),
) -> Strategy:
    """A strategy from a pure function of (weights, stats) that keeps no state."""

    def update_fn(
        weights: DomainWeights, state: EmptyState, stats: DomainStats
    ) -> tuple[DomainWeights, EmptyState]:
        return fn(weights, stats), state

    return make_strategy(name, None, update_fn, requires)


class ChainState(NamedTuple):
    """Child states of :func:`chain`, in order."""

    states: tuple[Any, ...]


def chain(*strategies: Strategy) -> Strategy:
    """Apply strategies in sequence; each sees the weights the previous one returned.

    ``requires`` is the union of the children's. The state is :class:`ChainState` with one entry per
    child, in order (optax's ``chain``).
    """
    if not strategies:
        raise ValueError(
            "The 'strategies' parameter of chain must be one or more Strategy. Got none instead."
        )
    for s in strategies:
        if not isinstance(s, Strategy):
            raise ValueError(
                "The 'strategies' parameter of chain must be Strategy objects. "
                f"Got {type(s).__name__} instead."
            )

    def init_fn(weights: DomainWeights) -> ChainState:
        return ChainState(tuple(s.init(weights) for s in strategies))

    def update_fn(
        weights: DomainWeights, state: ChainState, stats: DomainStats
    ) -> tuple[DomainWeights, ChainState]:
        if len(state.states) != len(strategies):
            raise ValueError(
                f"chain has {len(strategies)} strategies but its state has {len(state.states)} entries; "
                "was the state made by this chain's init?"
            )
        new_states = []
        for s, sub in zip(strategies, state.states, strict=True):
            weights, sub = s.update(weights, sub, stats)
            new_states.append(sub)
        return weights, ChainState(tuple(new_states))

    requires = frozenset().union(*(s.requires for s in strategies))
    return make_strategy("chain(" + ", ".join(s.name for s in strategies) + ")", init_fn, update_fn, requires)


class CombineState(NamedTuple):
    """States of the loss-side and sampling-side strategies of :func:`combine`."""

    loss: Any
    sampling: Any


def combine(*, loss: Strategy, sampling: Strategy) -> Strategy:
    """Choose the objective mixture α and the sampling distribution q with two independent strategies.

    The ``loss`` strategy runs first and only its output **mixture** α is kept; the ``sampling``
    strategy then sees (α, previous q) and only its output **sampling** q is kept. So
    ``combine(loss=fgls(...), sampling=variance_aware(...))`` gives FGLS loss weights with VA sampling
    (which allocates by α), and ``combine(loss=doremi(...), sampling=uniform())`` is DoReMi's proxy run
    (uniform sampling, importance-weighted loss). This separation is the point of Salmani et al. (2025).

    Args:
        loss: strategy whose mixture output sets α.
        sampling: strategy whose sampling output sets q.
    """
    for arg, s in (("loss", loss), ("sampling", sampling)):
        if not isinstance(s, Strategy):
            raise ValueError(
                f"The {arg!r} parameter of combine must be a Strategy. Got {type(s).__name__} instead."
            )

    def init_fn(weights: DomainWeights) -> CombineState:
        return CombineState(loss.init(weights), sampling.init(weights))

    def update_fn(
        weights: DomainWeights, state: CombineState, stats: DomainStats
    ) -> tuple[DomainWeights, CombineState]:
        from_loss, loss_state = loss.update(weights, state.loss, stats)
        staged = weights._replace(mixture=from_loss.mixture)
        from_sampling, sampling_state = sampling.update(staged, state.sampling, stats)
        return staged._replace(sampling=from_sampling.sampling), CombineState(loss_state, sampling_state)

    return make_strategy(
        f"combine(loss={loss.name}, sampling={sampling.name})",
        init_fn,
        update_fn,
        loss.requires | sampling.requires,
    )


def uniform_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, 1.0 / x.numel())


def multiplicative_step(x: torch.Tensor, log_step: torch.Tensor) -> torch.Tensor:
    r"""The distribution :math:`x_i e^{s_i} / \sum_j x_j e^{s_j}`, computed in log space.

    Entries at exactly 0 stay 0 (a domain left out stays out); a positive entry stays positive, at
    least the smallest normal float64: a step that drives it below that is an underflow, not an
    exclusion, and the smoothing and the later steps must still see the domain. The steps of the
    positive entries must be finite (the callers check them, naming their parameter).
    """
    logits = torch.where(x > 0, x.log() + log_step, torch.full_like(x, -torch.inf))
    moved = torch.softmax(logits, 0)
    moved = torch.where(x > 0, moved.clamp_min(torch.finfo(moved.dtype).tiny), moved)
    return moved / moved.sum()


def renormalize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to non-negative and divide by the sum (uniform if the sum vanishes)."""
    x = x.clamp_min(0.0)
    total = x.sum()
    return x / total if float(total) > 0 else uniform_like(x)
