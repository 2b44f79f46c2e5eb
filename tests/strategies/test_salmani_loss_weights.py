"""FGLS, ERMA and oracle GLS: hand-computed steps and the invariants of check A.5 in docs/reproduction.md."""

from __future__ import annotations

import pytest
import torch

import domainmix.strategies as S
from _helpers import make_stats
from domainmix.types import DomainWeights

NAMES = ["a", "b"]


def heldout(mean, var=None, count=(100.0, 100.0)):
    return make_stats(
        len(mean),
        heldout_loss=list(mean),
        heldout_loss_var=list(var if var is not None else [1.0] * len(mean)),
        heldout_count=list(count),
    )


def step(strategy, stats, weights=None, state=None):
    weights = weights or DomainWeights.create(NAMES[: stats.num_domains])
    state = strategy.init(weights) if state is None else state
    return strategy.update(weights, state, stats)


def test_fgls_hand_computed_step() -> None:
    # σ̂² = (1, 20), β = 0.5, π uniform: w̃ ∝ (1, 1/20) normalised to Σ π w̃ = 1 → (40/21, 2/21);
    # w = 0.5·(1, 1) + 0.5·w̃ = (61/42, 23/42); Σ π w = 1 already; α = π w.
    out, state = step(S.fgls(smoothing=0.5), heldout([1.0, 20.0]))
    torch.testing.assert_close(state.loss_weights, torch.tensor([61 / 42, 23 / 42], dtype=torch.float64))
    torch.testing.assert_close(out.mixture, torch.tensor([61 / 84, 23 / 84], dtype=torch.float64))
    assert float((state.population * state.loss_weights).sum()) == pytest.approx(1.0)


def test_fgls_converges_to_inverse_noise_share_and_keeps_equal_noise_uniform() -> None:
    strategy = S.fgls(smoothing=0.5)
    weights, state = DomainWeights.create(NAMES), None
    for _ in range(30):
        weights, state = step(strategy, heldout([1.0, 20.0]), weights, state)
    assert float(weights.mixture[0]) == pytest.approx(20 / 21, abs=1e-6)
    same, same_state = step(S.fgls(), heldout([3.0, 3.0]))
    torch.testing.assert_close(same_state.loss_weights, torch.ones(2, dtype=torch.float64))
    assert same.sampling.tolist() == [0.5, 0.5]  # FGLS never touches q


def test_fgls_general_form_uses_sizes_over_population() -> None:
    # Equal noise, π = (1/2, 1/2), n = (3, 1): w ∝ n/π → (3, 1) → Σπw = 1 gives (1.5, 0.5); α = (.75, .25).
    out, _ = step(S.fgls(domain_sizes=[3, 1], smoothing=1.0), heldout([1.0, 1.0]))
    torch.testing.assert_close(out.mixture, torch.tensor([0.75, 0.25], dtype=torch.float64))


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_fgls_domain_without_heldout_data_keeps_its_weight_whatever_the_loss_units(scale: float) -> None:
    strategy = S.fgls(smoothing=1.0)
    weights = DomainWeights.create(["a", "b", "c"])
    first = make_stats(3, heldout_loss=[1.0, 4.0, 2.0], heldout_count=[100.0, 100.0, 100.0])
    w1, s1 = step(strategy, first, weights)
    # c unseen: it keeps w_c; a and b share out the weight they hold, π(w_a + w_b), as 1/σ̂² says.
    losses = [9.0 * scale, 1.0 * scale, 0.0]
    w2, s2 = step(strategy, make_stats(3, heldout_loss=losses, heldout_count=[100.0, 100.0, 0.0]), w1, s1)
    old = s1.loss_weights
    assert float(s2.loss_weights[2]) == pytest.approx(float(old[2]), rel=1e-14)
    held = float(old[0] + old[1])
    assert s2.loss_weights[:2].tolist() == pytest.approx([held * 0.1, held * 0.9], rel=1e-14)
    # One seen domain alone says nothing about how domains compare: nothing moves.
    w3, s3 = step(
        strategy, make_stats(3, heldout_loss=[5.0, 0.0, 0.0], heldout_count=[9.0, 0.0, 0.0]), w2, s2
    )
    torch.testing.assert_close(s3.loss_weights, s2.loss_weights)
    torch.testing.assert_close(w3.mixture, w2.mixture)


def test_a_population_domain_without_training_data_is_refused() -> None:
    for factory in (S.fgls, S.erma):
        with pytest.raises(
            ValueError, match=r"'domain_sizes' parameter of (fgls|erma) must be n_i > 0.*\['a'\]"
        ):
            factory(domain_sizes=[0, 5000]).init(DomainWeights.create(NAMES))
    with pytest.raises(ValueError, match="'domain_sizes' parameter of oracle_gls"):
        S.oracle_gls([1.0, 1.0], domain_sizes=[0, 5000]).init(DomainWeights.create(NAMES))
    # π_a = 0: a domain outside the population may have no data
    state = S.fgls(population=[0.0, 1.0], domain_sizes=[0, 5000]).init(DomainWeights.create(NAMES))
    assert state.loss_weights.tolist() == [0.0, 1.0]


def test_erma_hand_computed_step() -> None:
    # w = (1, 1), π = (.5, .5), L = (1, 2), Var = (1, 8): L̄ = 1.5, S² = .5 + 4 = 4.5
    # step_i = .5·(L_i/1.5 − Var_i/4.5) = (.5(2/3 − 2/9), .5(4/3 − 16/9)) = (2/9, −2/9)
    out, state = step(S.erma(step_size=1.0), heldout([1.0, 2.0], [1.0, 8.0]))
    w = torch.exp(torch.tensor([2 / 9, -2 / 9], dtype=torch.float64))
    w = w / (0.5 * w).sum()
    torch.testing.assert_close(state.loss_weights, w)
    torch.testing.assert_close(out.mixture, 0.5 * w)


def test_erma_fixed_point_is_mean_over_variance() -> None:
    mean, var = [0.5, 10.0], [0.5, 200.0]  # Gaussian residuals, ℓ = r²/2: σ² = (1, 20)
    strategy = S.erma()  # γ = 0.5
    weights, state = DomainWeights.create(NAMES), None
    for _ in range(300):
        weights, state = step(strategy, heldout(mean, var), weights, state)
    ratio = torch.tensor(mean) / torch.tensor(var)
    assert float(weights.mixture[0]) == pytest.approx(float(ratio[0] / ratio.sum()), abs=1e-4)  # 20/21
    # at the fixed point another update changes nothing
    again, _ = step(strategy, heldout(mean, var), weights, state)
    torch.testing.assert_close(again.mixture, weights.mixture)


def test_oracle_gls_weights() -> None:
    out, _ = step(S.oracle_gls({"a": 1.0, "b": 20.0}), heldout([0.0, 0.0]))
    torch.testing.assert_close(out.mixture, torch.tensor([20 / 21, 1 / 21], dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"'noise_variances' parameter of oracle_gls must be σ_i² > 0.*\['a'\]"
    ):
        S.oracle_gls([0.0, 20.0]).init(DomainWeights.create(NAMES))  # a noise-free domain: unbounded 1/σ²


@pytest.mark.parametrize(
    ("factory", "kwargs", "param"),
    [
        (S.fgls, {"smoothing": 0.0}, "smoothing"),
        (S.fgls, {"smoothing": 1.5}, "smoothing"),
        (S.fgls, {"floor": 0.0}, "floor"),
        (S.fgls, {"population": [1.0, -1.0]}, "population"),
        (S.erma, {"step_size": 0.0}, "step_size"),
        (S.erma, {"domain_sizes": [float("nan"), 1.0]}, "domain_sizes"),
        (S.oracle_gls, {"noise_variances": [0.0, 0.0]}, "noise_variances"),
    ],
)
def test_bad_arguments_name_the_parameter(factory, kwargs, param) -> None:
    with pytest.raises(ValueError, match=f"'{param}' parameter of {factory.__name__}"):
        factory(**kwargs)


def test_erma_unit_step_oscillates_but_stays_near_the_fixed_point() -> None:
    strategy = S.erma(step_size=1.0)
    weights, state, shares = DomainWeights.create(NAMES), None, []
    for _ in range(300):
        weights, state = step(strategy, heldout([0.5, 10.0], [0.5, 200.0]), weights, state)
        shares.append(float(weights.mixture[0]))
    assert all(abs(x - 20 / 21) < 0.05 for x in shares[-50:])
    assert max(shares[-50:]) - min(shares[-50:]) > 1e-3  # γ = 1 does not settle here: why 0.5 is default


def test_erma_large_finite_step_does_not_overflow() -> None:
    """w_b near its fixed point 1e-4, then one window where b's held-out loss jumps 1e4-fold: the step
    γ π_b L_b / L̄ is about 2,500, whose exp overflowed to inf and the mixture to NaN. In log space the
    mixture moves to b (the rule's own, large, step) and stays a distribution with a's weight positive."""
    strategy = S.erma()
    weights, state = step(strategy, heldout([1.0, 1.0], [1.0, 1e4]))
    for _ in range(400):
        weights, state = step(strategy, heldout([1.0, 1.0], [1.0, 1e4]), weights, state)
    assert float(weights.mixture[1]) < 1e-3
    weights, state = step(strategy, heldout([1.0, 1e4], [1.0, 1e4]), weights, state)
    assert torch.isfinite(weights.mixture).all() and float(weights.mixture.sum()) == pytest.approx(1.0)
    assert 0 < float(weights.mixture[0]) < 1e-300 and float(weights.mixture[1]) == pytest.approx(1.0)


def test_erma_warns_when_losses_are_not_positive() -> None:
    """ERMA divides by the mean held-out loss: with negative losses it stayed put forever, silently."""
    with pytest.warns(RuntimeWarning, match="not positive"):
        out, state = step(S.erma(), heldout([-1.0, -2.0], [1.0, 8.0]))
    assert out.mixture.tolist() == [0.5, 0.5]


def test_fgls_warns_on_negative_heldout_losses() -> None:
    """FGLS reads the held-out loss as a variance: a negative one is clamped to the floor, and the
    domain takes nearly all the weight; that is now said, not silent."""
    with pytest.warns(RuntimeWarning, match="negative held-out losses"):
        out, _ = step(S.fgls(), heldout([-1.0, 2.0], [1.0, 1.0]))
    assert float(out.mixture[0]) > 0.7
