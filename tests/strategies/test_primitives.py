"""One hand-computed step per primitive and combinator."""

from __future__ import annotations

import math

import pytest
import torch

import domainmix.strategies as S
from _helpers import make_stats
from domainmix.types import DomainStats, DomainWeights

NAMES = ("a", "b", "c")


def W(mixture, sampling=None) -> DomainWeights:
    return DomainWeights.create(NAMES, mixture, sampling)


def raw(mixture, sampling) -> DomainWeights:
    """Weights as a strategy might see them mid-chain (not validated: q may be 0 where α > 0)."""
    return DomainWeights(NAMES, t64(mixture), t64(sampling))


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def loss_score(stats: DomainStats, weights: DomainWeights) -> torch.Tensor:
    del weights
    return stats.loss


def test_exponentiated_gradient_step_with_stale_scores() -> None:
    eg = S.exponentiated_gradient(loss_score, 0.5)
    w = W([0.5, 0.25, 0.25])
    state = eg.init(w)
    assert state.scores.tolist() == [0.0, 0.0, 0.0]
    w1, state = eg.update(w, state, make_stats(3, loss=[2.0, 0.0, 4.0]))
    expected = torch.softmax(t64([0.5, 0.25, 0.25]).log() + 0.5 * t64([2.0, 0.0, 4.0]), 0)
    torch.testing.assert_close(w1.mixture, expected, rtol=1e-15, atol=0)
    assert w1.sampling.tolist() == [0.5, 0.25, 0.25]  # target="mixture" leaves q alone
    # c absent (count 0, loss 0 by convention): its last score 4.0 is reused, not 0.
    w2, state = eg.update(w1, state, make_stats(3, loss=[1.0, 3.0, 0.0], count=[5, 5, 0]))
    assert state.scores.tolist() == [1.0, 3.0, 4.0]
    expected2 = torch.softmax(expected.log() + 0.5 * t64([1.0, 3.0, 4.0]), 0)
    torch.testing.assert_close(w2.mixture, expected2, rtol=1e-14, atol=0)


def test_exponentiated_gradient_initial_score_and_zero_weights() -> None:
    eg = S.exponentiated_gradient(loss_score, 1.0, initial_score=2.0, target="sampling")
    w = W([1.0, 1.0, 0.0], [0.5, 0.5, 0.0])
    out, state = eg.update(w, eg.init(w), make_stats(3, loss=[1.0, 0.0, 9.0], count=[4, 0, 4]))
    # b never seen: initial score 2; c has q = 0 and stays 0 whatever its score.
    e = math.exp(1.0)
    assert out.sampling.tolist() == pytest.approx([e / (e + e**2), e**2 / (e + e**2), 0.0], rel=1e-14)
    assert state.scores.tolist() == [1.0, 2.0, 9.0]


def test_mix_uniform_formula_over_the_domains_in_play() -> None:
    w = W([0.5, 0.3, 0.2], [0.2, 0.2, 0.6])
    out, _ = S.mix_uniform(0.3).update(w, S.EmptyState(), make_stats(3))
    assert out.mixture.tolist() == pytest.approx(
        [0.7 * 0.5 + 0.1, 0.7 * 0.3 + 0.1, 0.7 * 0.2 + 0.1], rel=1e-15
    )
    assert out.sampling.tolist() == [0.2, 0.2, 0.6]
    # A domain set to 0 is excluded, not smoothed back in: the uniform part spreads over the others.
    excluded = W([0.7, 0.3, 0.0], [0.2, 0.2, 0.6])
    out, _ = S.mix_uniform(0.3).update(excluded, S.EmptyState(), make_stats(3))
    assert out.mixture.tolist() == pytest.approx([0.7 * 0.7 + 0.15, 0.7 * 0.3 + 0.15, 0.0], rel=1e-15)
    both, _ = S.mix_uniform(1.0, target="both").update(excluded, S.EmptyState(), make_stats(3))
    assert both.mixture.tolist() == [0.5, 0.5, 0.0] and both.sampling.tolist() == pytest.approx([1 / 3] * 3)


def test_floor_lifts_small_entries_and_keeps_zeros() -> None:
    w = W([1.0, 1.0, 0.0], [0.9, 0.1, 0.0])
    out, _ = S.floor(0.25).update(w, S.EmptyState(), make_stats(3))
    assert out.sampling.tolist() == pytest.approx([0.75, 0.25, 0.0], rel=1e-15)  # 0.1 lifted to ε exactly
    assert out.mixture.tolist() == [0.5, 0.5, 0.0]


def test_floor_water_fills_so_that_no_positive_entry_ends_below_the_floor() -> None:
    # k = 10, ε = 0.05: one entry holds 0.91, nine hold 0.01. Lifting and renormalising (the old rule)
    # left them at 0.05/1.36 = 0.037; water-filling pins the nine at ε and scales the big one to 0.55.
    x = [0.91] + [0.01] * 9
    strategy = S.floor(0.05)
    weights = DomainWeights.create([str(i) for i in range(10)], None, x)
    out, _ = strategy.update(weights, strategy.init(weights), make_stats(10))
    assert out.sampling.tolist() == pytest.approx([0.55] + [0.05] * 9, rel=1e-12)
    # ratios above the floor are kept; entries needing no lift are not moved
    y = [0.5, 0.3, 0.15, 0.05]
    four = DomainWeights.create(list("abcd"), None, y)
    out, _ = S.floor(0.1).update(four, S.EmptyState(), make_stats(4))
    q = out.sampling.tolist()
    assert (
        q[3] == pytest.approx(0.1)
        and q[0] / q[1] == pytest.approx(0.5 / 0.3)
        and sum(q) == pytest.approx(1.0)
    )
    assert min(q) >= 0.1 - 1e-15
    with pytest.raises(
        ValueError, match=r"'min_weight' parameter of floor must be at most 1/10 for 10 domains"
    ):
        S.floor(0.2).init(weights)


def test_normalize_clamps_negatives() -> None:
    w = W([1.0, 1.0, 1.0])._replace(mixture=t64([-1.0, 1.0, 3.0]))
    out, _ = S.normalize("mixture").update(w, S.EmptyState(), make_stats(3))
    assert out.mixture.tolist() == [0.0, 0.25, 0.75]


def test_ema_formula() -> None:
    ema = S.ema(0.75)
    w0 = W([0.6, 0.2, 0.2])
    state = ema.init(w0)
    w1, state = ema.update(raw([0.2, 0.2, 0.6], [0.0, 0.5, 0.5]), state, make_stats(3))
    assert w1.mixture.tolist() == pytest.approx([0.5, 0.2, 0.3], rel=1e-15)
    assert w1.sampling.tolist() == pytest.approx(
        [0.6 * 0.75, 0.2 * 0.75 + 0.125, 0.2 * 0.75 + 0.125], rel=1e-15
    )
    w2, state = ema.update(W([0.0, 1.0, 0.0]), state, make_stats(3))
    assert w2.mixture.tolist() == pytest.approx([0.375, 0.4, 0.225], rel=1e-15)
    passthrough, _ = S.ema(0.0).update(W([0.0, 1.0, 0.0]), S.ema(0.0).init(w0), make_stats(3))
    assert passthrough.mixture.tolist() == [0.0, 1.0, 0.0]


def test_track_average_after_three_updates() -> None:
    avg = S.track_average()
    state = avg.init(W([1.0, 1.0, 1.0]))
    assert state.average() is None
    ws = [W([1.0, 0.0, 0.0]), W([0.0, 1.0, 1.0]), raw([0.25, 0.25, 0.5], [0.0, 0.0, 1.0])]
    for w in ws:
        out, state = avg.update(w, state, make_stats(3))
        assert out is w  # weights pass through
    mixture, sampling = state.average()
    assert state.count == 3
    assert mixture.tolist() == pytest.approx([(1 + 0 + 0.25) / 3, (0 + 0.5 + 0.25) / 3, (0 + 0.5 + 0.5) / 3])
    assert sampling.tolist() == pytest.approx([(1 + 0) / 3, 0.5 / 3, (0.5 + 1) / 3])


def test_follow_mixture() -> None:
    out, _ = S.follow_mixture().update(W([0.2, 0.3, 0.5], [0.6, 0.2, 0.2]), S.EmptyState(), make_stats(3))
    assert out.sampling.tolist() == out.mixture.tolist() == pytest.approx([0.2, 0.3, 0.5])


def test_chain_applies_in_order_and_unions_requires() -> None:
    eg = S.exponentiated_gradient(lambda s, w: s.ref_loss, 1.0, requires={"loss", "count", "ref_loss"})
    chained = S.chain(S.fixed([1.0, 1.0, 2.0]), S.mix_uniform(0.5, target="both"), eg)
    assert chained.requires == {"loss", "count", "ref_loss"}
    w = W([1.0, 1.0, 1.0])
    out, state = chained.update(w, chained.init(w), make_stats(3, ref_loss=[0.0, 0.0, 0.0]))
    # fixed → (.25, .25, .5); mix 0.5 → (.125 + 1/6, .125 + 1/6, .25 + 1/6); EG with zero scores keeps it
    expected = [0.125 + 1 / 6, 0.125 + 1 / 6, 0.25 + 1 / 6]
    assert out.mixture.tolist() == pytest.approx(expected, rel=1e-14)
    assert out.sampling.tolist() == pytest.approx(expected, rel=1e-14)
    assert isinstance(state, S.ChainState) and len(state.states) == 3


def test_combine_takes_alpha_from_loss_side_and_q_from_sampling_side() -> None:
    seen: list[DomainWeights] = []

    def sampling_side(w: DomainWeights, stats: DomainStats) -> DomainWeights:
        seen.append(w)
        # q ∝ α · (1, 2, 3): reads the α it is given
        q = w.mixture * t64([1.0, 2.0, 3.0])
        return w._replace(mixture=t64([1.0, 0.0, 0.0]), sampling=q / q.sum())

    combined = S.combine(
        loss=S.fixed([2.0, 1.0, 1.0], [1.0, 1.0, 1.0]), sampling=S.stateless("q", sampling_side)
    )
    w = W([1.0, 1.0, 1.0], [0.2, 0.3, 0.5])
    out, state = combined.update(w, combined.init(w), make_stats(3))
    assert out.mixture.tolist() == [0.5, 0.25, 0.25]  # α from the loss side (its uniform q is ignored)
    # the sampling side saw the NEW α and the previous q
    assert seen[0].mixture.tolist() == [0.5, 0.25, 0.25] and seen[0].sampling.tolist() == [0.2, 0.3, 0.5]
    assert out.sampling.tolist() == pytest.approx([0.5 / 1.75, 0.5 / 1.75, 0.75 / 1.75], rel=1e-15)
    assert isinstance(state, S.CombineState)


def test_stateless_and_make_strategy_check_stats() -> None:
    s = S.stateless("needs_grad", lambda w, st: w, {"grad_dot"})
    w = W([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="'needs_grad' requires the statistic 'grad_dot'"):
        s.update(w, S.EmptyState(), make_stats(3))
    with pytest.raises(ValueError, match=r"statistic 'grad_dot' must have shape \(3, 3\)"):
        s.update(w, S.EmptyState(), make_stats(3, grad_dot=[1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="expects a DomainStats"):
        s.update(w, S.EmptyState(), {"loss": None})


def test_delay_holds_weights_and_state_until_start() -> None:
    inner = S.exponentiated_gradient(lambda s, w: s.loss, 1.0)
    delayed = S.delay(inner, 200)
    weights = DomainWeights.create(["a", "b"])
    state = delayed.init(weights)
    early = make_stats(2, step=100, loss=[1.0, 0.0])
    held, held_state = delayed.update(weights, state, early)
    assert held is weights and held_state is state
    moved, _ = delayed.update(weights, state, early.replace(step=200))
    expected, _ = inner.update(weights, inner.init(weights), early.replace(step=200))
    assert torch.equal(moved.mixture, expected.mixture) and float(moved.mixture[0]) > 0.5
    assert delayed.requires == inner.requires
    with pytest.raises(ValueError, match="'start_step' parameter of delay"):
        S.delay(inner, -1)
    with pytest.raises(ValueError, match="'strategy' parameter of delay"):
        S.delay("fgls", 1)  # type: ignore[arg-type]


def test_exponentiated_gradient_names_an_undeclared_statistic_its_score_reads() -> None:
    """A score reading heldout_loss without requires= got None ('NoneType' has no 'to')."""
    strategy = S.exponentiated_gradient(lambda s, w: s.heldout_loss, step_size=1.0)
    weights = DomainWeights.create(NAMES)
    with pytest.raises(ValueError, match=r"read the statistic 'heldout_loss', which is not in its requires="):
        strategy.update(weights, strategy.init(weights), make_stats(3))
    declared = S.exponentiated_gradient(lambda s, w: s["heldout_loss"], 1.0, requires={"heldout_loss"})
    assert declared.requires == {"heldout_loss", "count"}  # count: which domains the window saw
    new, _ = declared.update(weights, declared.init(weights), make_stats(3, heldout_loss=[0.0, 1.0, 0.0]))
    assert float(new.mixture[1]) > 1 / 3


@pytest.mark.parametrize("bad", [torch.ones(2), torch.ones(3, 1), [1.0, 2.0, 3.0]])
def test_exponentiated_gradient_refuses_a_score_of_the_wrong_shape(bad) -> None:
    strategy = S.exponentiated_gradient(lambda s, w: bad, step_size=1.0, name="eg")
    weights = DomainWeights.create(NAMES)
    with pytest.raises(
        ValueError, match=r"The 'score' parameter of eg must be a function returning a tensor"
    ):
        strategy.update(weights, strategy.init(weights), make_stats(3))


def test_a_step_that_underflows_a_weight_does_not_exclude_its_domain() -> None:
    """exp(-800) is 0 in float64: the step used to leave α_b = α_c = 0 exactly, which the smoothing and
    every later step read as domains left out on purpose (DoReMi then kept α = (1, 0, 0) for good, the
    paper's α_i >= c / k broken). A positive weight now stays positive, and the domains recover."""
    doremi = S.chain(S.exponentiated_gradient(loss_score, 1.0), S.mix_uniform(1e-3))
    w = W([1 / 3, 1 / 3, 1 / 3])
    w, state = doremi.update(w, doremi.init(w), make_stats(3, loss=[800.0, 0.0, 0.0]))
    assert w.mixture.tolist() == pytest.approx([1 - 2e-3 / 3, 1e-3 / 3, 1e-3 / 3], rel=1e-12)
    for _ in range(20):
        w, state = doremi.update(w, state, make_stats(3, loss=[0.0, 5.0, 5.0]))
    assert float(w.mixture[0]) < 1e-3 and w.mixture[1:].tolist() == pytest.approx([0.5, 0.5], abs=1e-3)
    eg = S.exponentiated_gradient(loss_score, 1.0)
    left_out = W([0.5, 0.5, 0.0])  # a weight of exactly 0 stays 0 whatever its score
    moved, _ = eg.update(left_out, eg.init(left_out), make_stats(3, loss=[0.0, 0.0, 900.0]))
    assert moved.mixture.tolist() == [0.5, 0.5, 0.0]


@pytest.mark.parametrize(
    ("eta", "loss", "param"), [(1e308, [1.0, 2.0, 3.0], "step_size"), (1.0, [1.0, math.inf, 0.0], "score")]
)
def test_exponentiated_gradient_names_a_step_that_is_not_finite(
    eta: float, loss: list[float], param: str
) -> None:
    """Finite statistics with a huge step size (or a score function returning inf) overflowed to an all-NaN
    mixture and an error naming neither."""
    eg = S.exponentiated_gradient(loss_score, eta)
    w = W([1 / 3, 1 / 3, 1 / 3])
    with pytest.raises(ValueError, match=f"'{param}' parameter of exponentiated_gradient"):
        eg.update(w, eg.init(w), make_stats(3, loss=loss))
