"""Variance-Aware sampling: the allocation rule, its rounding and docs/reproduction.md's acceptance checks."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import domainmix.strategies as S
from _helpers import make_stats
from domainmix import WeightingController
from domainmix.sampling import DomainBatchSampler
from domainmix.stats import GradientVarianceProbe
from domainmix.types import DomainWeights


def va_step(alpha: list[float], grad_var: list[float], batch_size: int | None = None, min_count: int = 1):
    k = len(alpha)
    weights = DomainWeights.create([f"d{i}" for i in range(k)], alpha)
    strategy = S.variance_aware(batch_size, min_count=min_count) if batch_size else S.variance_aware()
    stats = make_stats(k, grad_var=torch.tensor(grad_var, dtype=torch.float64))
    new, _ = strategy.update(weights, strategy.init(weights), stats)
    return weights, new


def test_continuous_shares_are_alpha_times_standard_deviation() -> None:
    before, after = va_step([0.2, 0.3, 0.5], [4.0, 1.0, 9.0])
    score = torch.tensor([0.2 * 2.0, 0.3 * 1.0, 0.5 * 3.0], dtype=torch.float64)
    torch.testing.assert_close(after.sampling, score / score.sum())
    assert torch.equal(after.mixture, before.mixture)  # VA never moves α


def test_integer_allocation_is_largest_remainder_with_minimum() -> None:
    # α v = (0.5·1, 0.5·√2000): continuous share of domain 1 = 0.0219 → 0.70 examples of 32 → raised to 1.
    _, after = va_step([0.5, 0.5], [1.0, 2000.0], batch_size=32)
    assert after.sampling.tolist() == [1 / 32, 31 / 32]


@pytest.mark.parametrize(
    ("alpha", "variance", "target"),
    [
        # docs/reproduction.md check B.3 with v_i² ∝ C_i σ_i² (d cancels): the analytic VA shares of domain 1.
        ([0.5, 0.5], [100 * 1, 1 * 20], 0.69),  # fig1abc, w = 1
        ([20 / 21, 1 / 21], [100 * 1, 1 * 20], 0.978),  # fig1abc, FGLS
        ([20 / 21, 1 / 21], [1 * 1, 100 * 20], 0.309),  # fig1def, FGLS
        ([0.5, 0.5], [100 * 1, 1 * 1], 0.909),  # fig4abc
        ([0.5, 0.5], [1 * 1, 1 * 20], 0.183),  # fig4def, w = 1
        ([20 / 21, 1 / 21], [1 * 1, 1 * 20], 0.817),  # fig4def, FGLS
    ],
)
def test_salmani_analytic_shares(alpha: list[float], variance: list[float], target: float) -> None:
    _, continuous = va_step(alpha, variance)
    assert abs(float(continuous.sampling[0]) - target) < 0.005
    _, rounded = va_step(alpha, variance, batch_size=32)
    assert abs(float(rounded.sampling[0]) - target) <= 0.5 / 32 + 1e-12


def best_integer_allocation(a: list[float], total: int) -> float:
    return min(sum(x * x / b for x, b in zip(a, (b1, total - b1), strict=True)) for b1 in range(1, total))


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.01, 1.0),
    st.floats(1e-3, 1e3),
    st.floats(1e-3, 1e3),
)
def test_rounded_allocation_is_optimal_or_within_one_unit(alpha1: float, v1: float, v2: float) -> None:
    """Check A.3: for K = 2, B = 32 the rounded VA allocation minimises Σ a_i²/b_i, or is one off."""
    alpha = [alpha1, 1.0 - alpha1 + 1e-3]
    _, after = va_step(alpha, [v1, v2], batch_size=32)
    b = [round(float(q) * 32) for q in after.sampling]
    total = sum(alpha)
    a = [x / total * v**0.5 for x, v in zip(alpha, (v1, v2), strict=True)]
    objective = sum(x * x / bi for x, bi in zip(a, b, strict=True))
    best = best_integer_allocation(a, 32)
    neighbours = [
        sum(x * x / bi for x, bi in zip(a, (b[0] + d, b[1] - d), strict=True))
        for d in (-1, 1)
        if 1 <= b[0] + d <= 31
    ]
    assert objective <= best * (1 + 1e-12) or min(neighbours) <= best * (1 + 1e-12)
    assert objective >= sum(a) ** 2 / 32 * (1 - 1e-12)  # the continuous optimum bounds it below


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6).filter(lambda a: sum(a) > 0.1),
    st.data(),
)
def test_allocation_invariants(alpha: list[float], data: st.DataObject) -> None:
    """Check A.4: Σb = B, b_i ≥ 1 for active domains, permutation equivariance, scale invariance."""
    k = len(alpha)
    variance = data.draw(st.lists(st.floats(1e-2, 1e2), min_size=k, max_size=k))
    before, after = va_step(alpha, variance, batch_size=64)
    b = (after.sampling * 64).round()
    assert int(b.sum()) == 64
    active = before.mixture > 0
    assert bool((b[active] >= 1).all()) and bool((b[~active] == 0).all())
    # Scale invariance and permutation equivariance. Tied rounding remainders leave several optimal
    # allocations, picked by float rounding (scaled: compare only distinct remainders) or by index
    # (permuted: the same multiset always, the same order when the remainders are distinct).
    score = before.mixture * torch.tensor(variance, dtype=torch.float64).sqrt()
    remainders = (64 * score / score.sum()) % 1
    distinct = len({round(float(r), 9) for r in remainders}) == k
    _, scaled = va_step(alpha, [9.0 * v for v in variance], batch_size=64)
    perm = list(reversed(range(k)))
    _, permuted = va_step([alpha[i] for i in perm], [variance[i] for i in perm], batch_size=64)
    assert sorted(permuted.sampling.tolist()) == sorted(after.sampling.tolist())
    if distinct:
        assert torch.equal(scaled.sampling, after.sampling)
        assert torch.equal(permuted.sampling, after.sampling[perm])


def test_zero_variance_domain_keeps_its_minimum() -> None:
    _, after = va_step([0.5, 0.5, 0.0], [0.0, 4.0, 4.0], batch_size=16, min_count=2)
    assert (after.sampling * 16).round().tolist() == [2.0, 14.0, 0.0]
    _, after = va_step([0.5, 0.5], [0.0, 0.0])
    assert after.sampling.tolist() == [0.5, 0.5]  # no signal at all: q ∝ α


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="'batch_size' parameter of variance_aware"):
        S.variance_aware(0)
    with pytest.raises(ValueError, match="'min_count' parameter of variance_aware"):
        S.variance_aware(4, min_count=5)
    with pytest.raises(
        ValueError, match="'min_count' parameter of variance_aware must be left out when batch_size"
    ):
        S.variance_aware(min_count=5)
    with pytest.raises(ValueError, match=r"'min_count' parameter .* batch_size // active domains = 5 // 3"):
        va_step([0.2, 0.3, 0.5], [1.0, 1.0, 1.0], batch_size=5, min_count=2)


def test_combined_with_fgls_allocates_by_the_new_loss_weights() -> None:
    names = ["a", "b"]
    strategy = S.combine(loss=S.fgls(smoothing=1.0), sampling=S.variance_aware(32))
    weights = DomainWeights.create(names)
    stats = make_stats(
        2,
        heldout_loss=torch.tensor([1.0, 20.0], dtype=torch.float64),
        heldout_count=torch.tensor([500.0, 500.0], dtype=torch.float64),
        grad_var=torch.tensor([1.0, 2000.0], dtype=torch.float64),
    )
    new, _ = strategy.update(weights, strategy.init(weights), stats)
    torch.testing.assert_close(new.mixture, torch.tensor([20 / 21, 1 / 21], dtype=torch.float64))
    assert new.sampling.tolist() == [10 / 32, 22 / 32]  # 32 · 0.309 = 9.9 → 10


def test_every_loss_and_sampling_pair_composes() -> None:
    loss_rules = {"uniform": S.uniform(), "fgls": S.fgls(), "erma": S.erma(), "oracle": S.oracle_gls([1, 20])}
    sampling_rules = {"uniform": S.uniform(), "va": S.variance_aware(32)}
    weights = DomainWeights.create(["a", "b"])
    stats = make_stats(
        2,
        heldout_loss=torch.tensor([1.0, 20.0], dtype=torch.float64),
        heldout_loss_var=torch.tensor([2.0, 800.0], dtype=torch.float64),
        heldout_count=torch.tensor([500.0, 500.0], dtype=torch.float64),
        grad_var=torch.tensor([1.0, 2000.0], dtype=torch.float64),
    )
    for (ln, loss), (sn, sampling) in itertools.product(loss_rules.items(), sampling_rules.items()):
        strategy = S.combine(loss=loss, sampling=sampling)
        new, _ = strategy.update(weights, strategy.init(weights), stats)
        if ln == "uniform":
            assert new.mixture.tolist() == [0.5, 0.5], ln
        else:
            assert float(new.mixture[0]) > 0.5, ln  # every loss rule moves α towards the quiet domain
        if sn == "uniform":
            assert new.sampling.tolist() == [0.5, 0.5], sn
        else:
            assert float(new.sampling[0]) < 0.5, (ln, sn)


def _va_on_the_training_batch(va: S.Strategy, steps: int = 24) -> tuple[WeightingController, list[str]]:
    """The README's recipe with v_i estimated on the step's own training batch: domain 'a'
    has tiny gradients, so VA gives it its minimum count."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1e-3, 1.0, 3.0], dtype=torch.float64)
    ids_all = torch.arange(300) // 100
    x = torch.randn(300, 4, generator=g, dtype=torch.float64) * scale[ids_all, None]
    y = torch.randn(300, generator=g, dtype=torch.float64) * scale[ids_all]
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out.squeeze(-1) - target) ** 2

    sampler = DomainBatchSampler({n: range(i * 100, i * 100 + 100) for i, n in enumerate("abc")}, 16)
    last: list[torch.Tensor] = []
    probe = GradientVarianceProbe(model, loss_fn, lambda step: (x[last[0]], y[last[0]], ids_all[last[0]]))
    controller = WeightingController(va, list("abc"), update_every=2, sampler=sampler, probes=[probe])
    batches = iter(sampler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            last[:] = [torch.as_tensor(next(batches))]
            losses = loss_fn(model(x[last[0]]), y[last[0]])
            controller.step(losses, ids_all[last[0]])
    return controller, [str(w.message) for w in caught]


def test_va_on_the_training_batch_never_freezes() -> None:
    """Default min_count=2: every active domain keeps two slots, so the batch always defines v_i."""
    controller, warned = _va_on_the_training_batch(S.variance_aware(16))
    assert warned == [] and controller.state_dict()["num_skipped"] == 0
    assert controller.weights.sampling.tolist()[0] == 2 / 16  # the minimum: still estimable


def test_va_with_one_slot_on_the_training_batch_says_why_it_skips() -> None:
    controller, warned = _va_on_the_training_batch(S.variance_aware(16, min_count=1))
    assert controller.state_dict()["num_skipped"] > 0
    assert "{'grad_var': ['a'" in warned[-1] and "fewer than two examples" in warned[-1]


def test_a_minimum_the_batch_cannot_hold_is_refused_at_init() -> None:
    """20 domains cannot each get 2 of a batch of 32: refused when the controller is built, naming
    min_count, instead of at the first update after the warm-up."""
    strategy = S.variance_aware(32)
    wanted = r"'min_count' parameter of variance_aware must be at most .*32 // 20"
    with pytest.raises(ValueError, match=wanted):
        strategy.init(DomainWeights.create(tuple(f"d{i}" for i in range(20))))
    strategy.init(DomainWeights.create(tuple(f"d{i}" for i in range(16))))  # 16 x 2 = 32 fits
