"""Small named building blocks that methods are chained from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor

from domainmix._statistics import statistics
from domainmix._validation import Interval, Options, check_param, param_error
from domainmix.strategies._base import (
    EmptyState,
    Strategy,
    make_strategy,
    multiplicative_step,
    renormalize,
    stateless,
)
from domainmix.types import DomainStats, DomainWeights

Target = Literal["mixture", "sampling", "both"]
_TARGETS = Options(("mixture", "sampling", "both"))


def _map(weights: DomainWeights, target: Target, fn: Callable[[Tensor], Tensor]) -> DomainWeights:
    """Apply ``fn`` to the vector(s) named by ``target``."""
    mixture = fn(weights.mixture) if target in ("mixture", "both") else weights.mixture
    sampling = fn(weights.sampling) if target in ("sampling", "both") else weights.sampling
    return weights._replace(mixture=mixture, sampling=sampling)


def normalize(target: Target = "both") -> Strategy:
    r"""Project onto the simplex by clamping negatives to zero and dividing by the sum.

    .. math:: x_i \leftarrow \max(x_i, 0) / \sum_j \max(x_j, 0)

    Args:
        target: which vector to act on: ``"mixture"`` (α), ``"sampling"`` (q) or ``"both"``.
    """
    check_param("normalize", "target", target, _TARGETS)
    return stateless(f"normalize({target})", lambda w, s: _map(w, target, renormalize))


def mix_uniform(smoothing: float, target: Target = "mixture") -> Strategy:
    r"""Mix with the uniform distribution over the domains in play (DoReMi's smoothing constant c).

    .. math:: x_i \leftarrow (1 - c)\,x_i + c\,[x_i > 0] / |\{j : x_j > 0\}|

    Over all k domains when every weight is positive, as in DoReMi; a domain set to weight 0 stays at
    0 (excluding a domain is a choice the smoothing must not undo).

    Args:
        smoothing: c in [0, 1].
        target: which vector to act on.
    """
    check_param("mix_uniform", "smoothing", smoothing, Interval(float, 0.0, 1.0))
    check_param("mix_uniform", "target", target, _TARGETS)
    c = float(smoothing)

    def mix(x: Tensor) -> Tensor:
        support = (x > 0).to(x.dtype)
        return (1 - c) * x + c * support / support.sum().clamp_min(1.0)

    return stateless(f"mix_uniform({c:g})", lambda w, s: _map(w, target, mix))


def floor(min_weight: float, target: Target = "sampling") -> Strategy:
    r"""Lift every positive entry to at least ``min_weight``, taking the mass from the others.

    Keeps a sampling distribution away from zero so that α/q stays bounded. Entries that are exactly zero
    stay zero (a zero-weight domain is a choice, not an accident). The result is the water-filling

    .. math:: x_i \leftarrow \max(s\,x_i,\ \epsilon)\,[x_i > 0], \qquad s \text{ such that } \sum_i x_i = 1,

    so every positive entry ends at ε or above and the entries above ε keep their ratios.

    Args:
        min_weight: ε in [0, 1) with k·ε ≤ 1, k counting every domain (checked at ``init``).
        target: which vector to act on.
    """
    check_param("floor", "min_weight", min_weight, Interval(float, 0.0, 1.0, closed="left"))
    check_param("floor", "target", target, _TARGETS)
    eps = float(min_weight)

    def init_fn(weights: DomainWeights) -> EmptyState:
        if eps * weights.num_domains > 1:
            raise param_error(
                "floor",
                "min_weight",
                f"at most 1/{weights.num_domains} for {weights.num_domains} domains",
                eps,
            )
        return EmptyState()

    def lift(x: Tensor) -> Tensor:
        x = renormalize(x)
        positive = x > 0
        pinned = torch.zeros_like(positive)
        # The scale s only falls as entries are pinned at ε, so the pinned set only grows: ≤ k rounds.
        for _ in range(x.numel()):
            free = positive & ~pinned
            if not bool(free.any()):  # ε · (entries in play) = 1: all at ε
                return torch.where(positive, eps, 0.0).to(x.dtype)
            scale = (1 - eps * int(pinned.sum())) / x[free].sum()
            now = pinned | (positive & (x * scale < eps))
            if torch.equal(now, pinned):
                break
            pinned = now
        return torch.where(pinned, eps, torch.where(positive, x * scale, 0.0)).to(x.dtype)

    def update_fn(
        weights: DomainWeights, state: EmptyState, stats: DomainStats
    ) -> tuple[DomainWeights, EmptyState]:
        del stats
        return _map(weights, target, lift), state

    return make_strategy(f"floor({eps:g})", init_fn, update_fn)


class ExponentiatedGradientState(NamedTuple):
    """Last score seen per domain, reused while a domain is absent from the window."""

    scores: Tensor  # (k,) float64


def exponentiated_gradient(
    score: Callable[[DomainStats, DomainWeights], Tensor],
    step_size: float,
    *,
    requires: frozenset[str] | set[str] = frozenset({"loss", "count"}),
    target: Literal["mixture", "sampling"] = "mixture",
    initial_score: float = 0.0,
    name: str = "exponentiated_gradient",
) -> Strategy:
    r"""Multiplicative-weights (mirror-descent) step on the simplex.

    .. math:: x_i \leftarrow \frac{x_i \exp(\eta\, s_i)}{\sum_j x_j \exp(\eta\, s_j)}

    The score of a domain absent from the window (count 0) is its last observed score (``initial_score``
    before the first observation): DoReMi's stale scores. Zero weights stay zero.

    Args:
        score: maps (stats, weights) to a (k,) score vector.
        step_size: η > 0.
        requires: the statistics ``score`` reads (``count`` is always added: the step reads which
            domains the window saw). Reading any other statistic raises, naming it.
        target: which vector the step moves.
        initial_score: score assumed for a domain never observed yet.
        name: label for errors and logs.
    """
    check_param(
        "exponentiated_gradient", "step_size", step_size, Interval(float, 0.0, None, closed="neither")
    )
    check_param("exponentiated_gradient", "target", target, Options(("mixture", "sampling")))
    check_param("exponentiated_gradient", "initial_score", initial_score, Interval(float, None, None))
    eta = float(step_size)

    def init_fn(weights: DomainWeights) -> ExponentiatedGradientState:
        return ExponentiatedGradientState(
            torch.full((weights.num_domains,), float(initial_score), dtype=torch.float64)
        )

    # update_fn reads the window's counts (a domain's presence) whatever the score reads.
    needs = frozenset(requires) | {"count"}

    def update_fn(
        weights: DomainWeights, state: ExponentiatedGradientState, stats: DomainStats
    ) -> tuple[DomainWeights, ExponentiatedGradientState]:
        k = weights.num_domains
        fresh = score(cast(DomainStats, _Required(stats, needs, name)), weights)
        if not isinstance(fresh, Tensor) or tuple(fresh.shape) != (k,):
            got = f"shape {tuple(fresh.shape)}" if isinstance(fresh, Tensor) else fresh
            raise param_error(name, "score", f"a function returning a tensor of shape ({k},)", got)
        fresh = fresh.to(torch.float64)
        scores = torch.where(stats.present, fresh, state.scores)
        x = getattr(weights, target)
        live = x > 0
        if not torch.isfinite(scores[live]).all():
            raise param_error(name, "score", "a function returning finite scores", scores.tolist())
        if not torch.isfinite(eta * scores[live]).all():
            need = f"small enough that step_size * score is finite (scores {scores.tolist()})"
            raise param_error(name, "step_size", need, eta)
        moved = multiplicative_step(x, eta * scores)
        new = weights._replace(mixture=moved) if target == "mixture" else weights._replace(sampling=moved)
        return new, ExponentiatedGradientState(scores)

    return make_strategy(name, init_fn, update_fn, needs)


class _Required:
    """The window's statistics as a score function sees them: only those in ``requires`` can be read.

    Reading another declared statistic raises, naming it and ``requires=``: the controller collects only
    what a strategy declares, so an undeclared statistic is None (or zeros) in some windows.
    """

    __slots__ = ("_stats", "_requires", "_owner")

    def __init__(self, stats: DomainStats, requires: frozenset[str], owner: str) -> None:
        self._stats, self._requires, self._owner = stats, requires, owner

    def _check(self, name: str) -> None:
        if name in statistics() and name not in self._requires:
            wanted = sorted(self._requires | {name})
            raise ValueError(
                f"The score of {self._owner!r} read the statistic {name!r}, which is not in its requires= "
                f"({sorted(self._requires)}): the controller collects only the statistics a strategy "
                f"requires. Pass requires={set(wanted)}."
            )

    def __getattr__(self, name: str) -> Any:
        self._check(name)
        return getattr(self._stats, name)

    def __getitem__(self, name: str) -> Tensor:
        self._check(name)
        return self._stats[name]


class EmaState(NamedTuple):
    """Exponential moving average of the weights."""

    mixture: Tensor  # (k,)
    sampling: Tensor  # (k,)

    def restarted(self, weights: DomainWeights) -> EmaState:
        """The average restarted at hand-set weights (``WeightingController.override``)."""
        return EmaState(weights.mixture.clone(), weights.sampling.clone())


def ema(decay: float, target: Target = "both") -> Strategy:
    r"""Smooth weight changes with an exponential moving average.

    .. math:: \bar x \leftarrow \beta\,\bar x + (1-\beta)\,x, \qquad x \leftarrow \bar x

    Salmani et al.'s "smooth" FGLS update is this with β = 1 − their smoothing.

    Args:
        decay: β in [0, 1); 0 passes the weights through.
        target: which vector to smooth.
    """
    check_param("ema", "decay", decay, Interval(float, 0.0, 1.0, closed="left"))
    check_param("ema", "target", target, _TARGETS)
    beta = float(decay)

    def init_fn(weights: DomainWeights) -> EmaState:
        return EmaState(weights.mixture.clone(), weights.sampling.clone())

    def update_fn(
        weights: DomainWeights, state: EmaState, stats: DomainStats
    ) -> tuple[DomainWeights, EmaState]:
        del stats
        mixture = beta * state.mixture + (1 - beta) * weights.mixture
        sampling = beta * state.sampling + (1 - beta) * weights.sampling
        out = weights._replace(
            mixture=mixture if target in ("mixture", "both") else weights.mixture,
            sampling=sampling if target in ("sampling", "both") else weights.sampling,
        )
        return out, EmaState(out.mixture, out.sampling)

    return make_strategy(f"ema({beta:g})", init_fn, update_fn)


class AverageState(NamedTuple):
    """Running sums for the time-averaged weights (DoReMi and DoGE output the average)."""

    count: int  # type: ignore[assignment]  # a public field; shadows tuple.count
    mixture_sum: Tensor  # (k,)
    sampling_sum: Tensor  # (k,)

    def average(self) -> tuple[Tensor, Tensor] | None:
        """(mean α, mean q) over the updates seen, or None before the first."""
        if self.count == 0:
            return None
        return self.mixture_sum / self.count, self.sampling_sum / self.count


def track_average() -> Strategy:
    r"""Pass the weights through and keep their running mean in the state.

    .. math:: \bar\alpha_T = \frac{1}{T} \sum_{t=1}^{T} \alpha_t

    DoReMi and DoGE deliver this average, not the last iterate. Read it with
    ``WeightingController.averaged_weights()`` or :meth:`AverageState.average`.
    """

    def init_fn(weights: DomainWeights) -> AverageState:
        zeros = torch.zeros(weights.num_domains, dtype=torch.float64)
        return AverageState(0, zeros, zeros.clone())

    def update_fn(
        weights: DomainWeights, state: AverageState, stats: DomainStats
    ) -> tuple[DomainWeights, AverageState]:
        del stats
        return weights, AverageState(
            state.count + 1, state.mixture_sum + weights.mixture, state.sampling_sum + weights.sampling
        )

    return make_strategy("track_average", init_fn, update_fn)


def follow_mixture() -> Strategy:
    """Set the sampling distribution to the mixture, q ← α: plain resampling, loss multipliers all 1."""
    return stateless("follow_mixture", lambda w, s: w._replace(sampling=w.mixture.clone()))


def delay(strategy: Strategy, start_step: int) -> Strategy:
    """Hold the weights until the window closing at ``start_step``; then run ``strategy`` as usual.

    A warm-up for one half of a :func:`combine`: ``combine(loss=delay(fgls(), 500),
    sampling=variance_aware(B))`` lets VA allocate from the first window while FGLS waits until the
    model is good enough for its residuals to mean noise rather than misfit (docs/algorithms.md §3.3). The
    controller's own ``warmup_steps`` would hold both. The wrapped strategy's state is untouched
    while held.

    Args:
        strategy: the strategy to hold.
        start_step: first ``stats.step`` at which it runs, an int ≥ 0.
    """
    if not isinstance(strategy, Strategy):
        raise ValueError(
            f"The 'strategy' parameter of delay must be a Strategy. Got {type(strategy).__name__} instead."
        )
    start = check_param("delay", "start_step", start_step, Interval(int, 0, None))

    def update_fn(weights: DomainWeights, state: object, stats: DomainStats) -> tuple[DomainWeights, object]:
        if stats.step < start:
            return weights, state
        return strategy.update(weights, state, stats)

    return make_strategy(f"delay({strategy.name}, {start})", strategy.init, update_fn, strategy.requires)


__all__ = [
    "AverageState",
    "EmaState",
    "EmptyState",
    "ExponentiatedGradientState",
    "delay",
    "ema",
    "exponentiated_gradient",
    "floor",
    "follow_mixture",
    "mix_uniform",
    "normalize",
    "track_average",
]
