"""One contract, every strategy: add a strategy to ``STRATEGIES`` with one line and it gets every check.

Each row is ``row(id, factory, stats=...)``: ``factory(k)`` builds the strategy for k domains and
``stats(k, step)`` builds the DomainStats it reads (the default fills every statistic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

import domainmix.strategies as S
from _helpers import TASKS, assert_same, full_stats, torch_roundtrip
from domainmix import _tree
from domainmix.stats import statistics
from domainmix.types import DomainStats, DomainWeights

BASE_STATS = frozenset({"loss", "count"})


class Case(NamedTuple):
    factory: Callable[[int], S.Strategy]
    stats: Callable[[int, int], DomainStats] = full_stats


def row(
    case_id: str, factory: Callable[[int], S.Strategy], stats: Callable[[int, int], DomainStats] = full_stats
):
    return pytest.param(Case(factory, stats), id=case_id)


def sizes(k: int) -> list[int]:
    return [100 * (i + 1) ** 2 for i in range(k)]


def ramp(k: int) -> list[float]:
    return [float(i + 1) for i in range(k)]


def loss_score(stats: DomainStats, weights: DomainWeights) -> torch.Tensor:
    del weights
    return stats.loss


def excess_score(stats: DomainStats, weights: DomainWeights) -> torch.Tensor:
    del weights
    return (stats.loss - stats.ref_loss).clamp_min(0.0)


def eg(k: int) -> S.Strategy:
    return S.exponentiated_gradient(loss_score, 0.5)


def eg_ref(k: int) -> S.Strategy:
    """A strategy that needs a statistic beyond loss/count (DoReMi-shaped)."""
    return S.exponentiated_gradient(excess_score, 0.5, requires={"loss", "count", "ref_loss"}, name="eg_ref")


STRATEGIES = [
    row("uniform", lambda k: S.uniform()),
    row("proportional", lambda k: S.proportional(sizes(k))),
    row("temperature", lambda k: S.temperature(sizes(k), 2.0)),
    row("fixed", lambda k: S.fixed(ramp(k))),
    row("fixed_mixture_sampling", lambda k: S.fixed(ramp(k), ramp(k)[::-1])),
    row("schedule", lambda k: S.schedule([(0, ramp(k)), (2, ramp(k)[::-1]), (4, [1.0] * k)])),
    row("mix_uniform", lambda k: S.mix_uniform(0.1)),
    row("mix_uniform_both", lambda k: S.mix_uniform(0.3, target="both")),
    row("floor", lambda k: S.floor(0.2)),
    row("normalize", lambda k: S.normalize()),
    row("ema", lambda k: S.ema(0.9)),
    row("track_average", lambda k: S.track_average()),
    row("follow_mixture", lambda k: S.follow_mixture()),
    row("exponentiated_gradient", eg),
    row(
        "exponentiated_gradient_sampling",
        lambda k: S.exponentiated_gradient(loss_score, 0.5, target="sampling"),
    ),
    row("exponentiated_gradient_ref_loss", eg_ref),
    row("chain", lambda k: S.chain(eg(k), S.mix_uniform(0.05), S.ema(0.5), S.track_average())),
    row("chain_ref_loss", lambda k: S.chain(S.uniform(), eg_ref(k), S.mix_uniform(1e-3))),
    row(
        "combine",
        lambda k: S.combine(
            loss=S.chain(eg(k), S.mix_uniform(0.05)), sampling=S.chain(S.follow_mixture(), S.floor(0.1))
        ),
    ),
    row("combine_ref_loss", lambda k: S.combine(loss=eg_ref(k), sampling=S.temperature(sizes(k), 2.0))),
    row("fgls", lambda k: S.fgls()),
    row("fgls_population_sizes", lambda k: S.fgls(ramp(k), sizes(k), smoothing=1.0)),
    row("erma", lambda k: S.erma()),
    row("erma_population_sizes", lambda k: S.erma(ramp(k), sizes(k), step_size=0.5)),
    row("oracle_gls", lambda k: S.oracle_gls(ramp(k))),
    row("combine_fgls_uniform", lambda k: S.combine(loss=S.fgls(), sampling=S.uniform())),
    row("variance_aware", lambda k: S.variance_aware()),
    row("variance_aware_integer", lambda k: S.variance_aware(32, min_count=2)),
    row("combine_fgls_va", lambda k: S.combine(loss=S.fgls(), sampling=S.variance_aware(32))),
    row("delay", lambda k: S.delay(eg(k), 3)),
    row(
        "combine_delay_fgls_va",
        lambda k: S.combine(loss=S.delay(S.fgls(), 2), sampling=S.variance_aware(16)),
    ),
    row("doremi", lambda k: S.doremi()),
    row("doremi_proxy", lambda k: S.combine(loss=S.doremi(0.5, 0.01), sampling=S.uniform())),
    row("doge", lambda k: S.doge(1e-3)),
    row("doge_leave_one_out", lambda k: S.doge(1e-3, target="leave_one_out")),
    row(
        "doge_out_of_domain",
        lambda k: S.doge(lambda step: 1e-3 / (1 + step), target="out_of_domain", mu=0.05),
    ),
    row("combine_erma_va", lambda k: S.combine(loss=S.erma(), sampling=S.variance_aware(32))),
    row("dids", lambda k: S.dids(TASKS, min_history=3, history=4)),
]

NEEDS_EXTRA = [
    p for p in STRATEGIES if p.values[0].factory(4).requires - BASE_STATS
]  # rows that read a statistic beyond loss/count

K = 4
STEPS = 6
BUILDING_BLOCKS = {"make_strategy", "stateless"}  # what strategies are made with, not strategies


def test_every_exported_strategy_has_a_row() -> None:
    """A factory added to ``domainmix.strategies`` must join this table (a row named after it)."""
    factories = {name for name in S.__all__ if name[0].islower()} - BUILDING_BLOCKS
    ids = [p.id for p in STRATEGIES]
    missing = sorted(f for f in factories if not any(i == f or i.startswith(f + "_") for i in ids))
    assert not missing, f"add a row to STRATEGIES for {missing}"


def initial_weights(k: int) -> list[DomainWeights]:
    names = [f"d{i}" for i in range(k)]
    out = [DomainWeights.create(names)]
    if k > 1:
        # α has a zero (a domain that carries no loss); q differs from α everywhere.
        alpha = [0.0] + ramp(k - 1)
        out.append(DomainWeights.create(names, alpha, ramp(k)[::-1]))
    return out


def run(strategy: S.Strategy, weights: DomainWeights, stats_seq: list[DomainStats], state: Any = None):
    state = strategy.init(weights) if state is None else state
    outputs = []
    for stats in stats_seq:
        weights, state = strategy.update(weights, state, stats)
        outputs.append(weights)
    return outputs, state


def stats_sequence(case: Case, k: int, start: int = 1, steps: int = STEPS) -> list[DomainStats]:
    return [case.stats(k, step) for step in range(start, start + steps)]


def assert_valid(weights: DomainWeights, k: int) -> None:
    assert len(weights.names) == k
    for field in ("mixture", "sampling"):
        x = getattr(weights, field)
        assert isinstance(x, torch.Tensor), field
        assert x.dtype == torch.float64, (field, x.dtype)
        assert x.shape == (k,), (field, x.shape)
        assert torch.isfinite(x).all(), (field, x)
        assert (x >= 0).all(), (field, x)
        assert abs(float(x.sum()) - 1.0) < 1e-9, (field, x)
    starved = (weights.mixture > 0) & (weights.sampling <= 0)
    assert not starved.any(), f"q = 0 where α > 0: {weights}"


def tensor_leaves(plain: Any):
    if isinstance(plain, torch.Tensor):
        yield plain
    elif isinstance(plain, dict):
        for v in plain.values():
            yield from tensor_leaves(v)
    elif isinstance(plain, (list, tuple)):
        for v in plain:
            yield from tensor_leaves(v)


def snapshot(x: Any) -> Any:
    if isinstance(x, DomainStats):
        return {field: _tree.to_plain(value) for field, value in x.as_dict().items()}
    return _tree.to_plain(x)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", STRATEGIES)
def test_outputs_on_simplex(case: Case) -> None:
    strategy = case.factory(K)
    for w0 in initial_weights(K):
        outputs, _ = run(strategy, w0, stats_sequence(case, K))
        for w in outputs:
            assert w.names == w0.names
            assert_valid(w, K)


@pytest.mark.parametrize("case", STRATEGIES)
def test_does_not_mutate_inputs(case: Case) -> None:
    strategy = case.factory(K)
    for w0 in initial_weights(K):
        weights, state = w0, strategy.init(w0)
        for stats in stats_sequence(case, K):
            before = (snapshot(weights), snapshot(state), snapshot(stats))
            new_weights, new_state = strategy.update(weights, state, stats)
            assert_same((snapshot(weights), snapshot(state), snapshot(stats)), before, "inputs after update")
            weights, state = new_weights, new_state
        # init must not mutate (or keep aliases that a later in-place change would leak through).
        before = snapshot(w0)
        strategy.init(w0)
        assert_same(snapshot(w0), before, "weights after init")


@pytest.mark.parametrize("case", STRATEGIES)
def test_deterministic(case: Case) -> None:
    strategy = case.factory(K)
    for w0 in initial_weights(K):
        first, state1 = run(strategy, w0, stats_sequence(case, K))
        # the same object again (no hidden state in closures), and a freshly built one
        for again in (strategy, case.factory(K)):
            second, state2 = run(again, w0, stats_sequence(case, K))
            assert_same([tuple(w) for w in second], [tuple(w) for w in first])
            assert_same(snapshot(state2), snapshot(state1))


def round_trip_sequence(case: Case) -> list[DomainStats]:
    """The round trip's steps: the first after the save misses domain 1, so what the state kept of it
    (stale scores, the last estimate) decides that step."""
    seq = stats_sequence(case, K, steps=STEPS)
    return [*seq[:3], without_domain(seq[3], 1), *seq[4:]]


def tail_depends_on_state(case: Case) -> bool:
    """Whether the steps after the save differ when the saved state is replaced by a fresh ``init``."""
    strategy = case.factory(K)
    w0 = initial_weights(K)[1]
    seq = round_trip_sequence(case)
    head, state = run(strategy, w0, seq[:3])
    kept, _ = run(strategy, head[-1], seq[3:], state=state)
    reset, _ = run(strategy, head[-1], seq[3:])
    return any(
        not (torch.equal(a.mixture, b.mixture) and torch.equal(a.sampling, b.sampling))
        for a, b in zip(kept, reset, strict=True)
    )


def test_the_round_trip_is_not_vacuous() -> None:
    """The rows whose tail reads the restored state (17 of 38 when written: the learning rules; static
    weights, transforms of the incoming weights and rules of the current window alone do not) make the
    round trip able to fail when a restore loses the state."""
    depends = [p.id for p in STRATEGIES if tail_depends_on_state(p.values[0])]
    assert len(depends) >= 15, depends


@pytest.mark.parametrize("case", STRATEGIES)
def test_state_round_trip(case: Case) -> None:
    strategy = case.factory(K)
    for w0 in initial_weights(K):
        seq = round_trip_sequence(case)
        expected, _ = run(strategy, w0, seq)
        head, state = run(strategy, w0, seq[:3])
        plain = torch_roundtrip(_tree.to_plain(state))
        # A fresh strategy object, as after a restart; the template comes from its init.
        fresh = case.factory(K)
        restored = _tree.from_plain(fresh.init(head[-1]), plain)
        assert_same(snapshot(restored), snapshot(state), "restored state")
        tail, _ = run(fresh, head[-1], seq[3:], state=restored)
        assert_same([tuple(w) for w in head + tail], [tuple(w) for w in expected])


@pytest.mark.parametrize("case", NEEDS_EXTRA)
def test_missing_required_statistic_raises_naming_it(case: Case) -> None:
    strategy = case.factory(K)
    w0 = initial_weights(K)[0]
    state = strategy.init(w0)
    for field in sorted(strategy.requires - BASE_STATS):
        stats = case.stats(K, 1).replace(**{field: None})
        with pytest.raises(ValueError, match=f"requires the statistic '{field}'"):
            strategy.update(w0, state, stats)
        wrong_shape = torch.zeros(K + 1, dtype=torch.float64)
        with pytest.raises(ValueError, match=f"statistic '{field}' must have shape"):
            strategy.update(w0, state, case.stats(K, 1).replace(**{field: wrong_shape}))


def test_table_has_a_strategy_with_extra_requirements() -> None:
    assert len(NEEDS_EXTRA) >= 3  # the check above must not be vacuous


@pytest.mark.parametrize("case", STRATEGIES)
def test_stats_over_other_number_of_domains_raise(case: Case) -> None:
    strategy = case.factory(K)
    w0 = initial_weights(K)[0]
    with pytest.raises(ValueError, match="stats cover"):
        strategy.update(w0, strategy.init(w0), case.stats(K + 1, 1))


def without_domain(stats: DomainStats, domain: int) -> DomainStats:
    """``stats`` with ``domain`` absent: by convention its counts and means are 0 (never NaN); task axes
    ("t") are not domains."""
    mask = torch.ones(stats.loss.shape[0], dtype=torch.float64)
    mask[domain] = 0.0
    table = statistics()

    def zero_absent(name: str, v: torch.Tensor) -> torch.Tensor:
        for axis, dim in zip(table[name].shape, range(v.ndim), strict=True):
            if axis == "k":
                v = v * mask.view([-1 if d == dim else 1 for d in range(v.ndim)])
        return v

    return stats.replace(**{f: zero_absent(f, v) for f, v in stats.items()})


@pytest.mark.parametrize("case", STRATEGIES)
@pytest.mark.parametrize("absent", ["one", "all"])
def test_finite_with_absent_domains(case: Case, absent: str) -> None:
    strategy = case.factory(K)

    def blank(stats: DomainStats) -> DomainStats:
        if absent == "all":  # nothing seen at all: every statistic zero
            return stats.replace(**{f: torch.zeros_like(v) for f, v in stats.items()})
        return without_domain(stats, 1)

    for w0 in initial_weights(K):
        outputs, state = run(strategy, w0, [blank(s) for s in stats_sequence(case, K)])
        for w in outputs:
            assert_valid(w, K)
        tensors = list(tensor_leaves(_tree.to_plain(state)))
        assert all(bool(torch.isfinite(t).all()) for t in tensors), tensors


@pytest.mark.parametrize("case", STRATEGIES)
def test_single_domain(case: Case) -> None:
    strategy = case.factory(1)
    w0 = DomainWeights.create(["only"])
    outputs, _ = run(strategy, w0, stats_sequence(case, 1, steps=3))
    for w in outputs:
        assert w.names == ("only",)
        assert w.mixture.tolist() == [1.0] and w.sampling.tolist() == [1.0]
        assert w.mixture.dtype == torch.float64 and w.sampling.dtype == torch.float64
