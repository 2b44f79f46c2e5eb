"""Gradient statistics for Variance-Aware sampling: oracles, naive loops, unbiasedness, merging, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domainmix import StatsCollector
from domainmix.stats import (
    DomainGradients,
    fisher_products,
    gradient_sketch,
    gradient_variance,
    micro_batch_gradients,
    per_example_gradients,
)

SIZES = (5, 11, 20)  # three domains of different sizes


def half_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - y) ** 2


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def linear_problem(seed: int = 0, sizes: tuple[int, ...] = SIZES, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]  # domains interleaved, not in blocks
    n = ids.numel()
    # Domain-dependent scale and offset: the domains' gradient variances differ.
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + ids.unsqueeze(1)) + ids.unsqueeze(1)
    y = torch.randn(n, generator=g, dtype=torch.float64) * 2
    model = nn.Linear(d, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    return model, x, y, ids


def closed_form_grads(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """∇_θ ½(xᵀθ − y)² = (xᵀθ − y) x, one row per example."""
    theta = model.weight.detach()[0]
    return ((x @ theta - y).unsqueeze(1) * x).numpy()


def numpy_stats(grads: np.ndarray, ids: torch.Tensor, k: int):
    ids = ids.numpy()
    sums = np.stack([grads[ids == i].sum(0) for i in range(k)])
    sq = np.array([(grads[ids == i] ** 2).sum() for i in range(k)])
    counts = np.array([(ids == i).sum() for i in range(k)], dtype=float)
    var = np.array(
        [np.var(grads[ids == i], axis=0, ddof=1).sum() if counts[i] > 1 else np.nan for i in range(k)]
    )
    return sums, sq, counts, var


def mlp(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(torch.float64)


def mlp_problem(seed: int = 2, sizes: tuple[int, ...] = SIZES):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    x = torch.randn(ids.numel(), 3, generator=g, dtype=torch.float64) + ids.unsqueeze(1)
    y = torch.randint(0, 4, (ids.numel(),), generator=g)
    return x, y, ids


def naive_grads(model: nn.Module, loss_fn, x, y, names: list[str] | None = None) -> np.ndarray:
    """One autograd.grad per example: the reference per-example gradients."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    rows = []
    for j in range(x.shape[0]):
        loss = loss_fn(model(x[j : j + 1]), y[j : j + 1]).sum()
        grads = torch.autograd.grad(loss, [named[n] for n in names])
        rows.append(torch.cat([gr.flatten() for gr in grads]).detach().numpy())
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------------------
# Per-example gradients


@pytest.mark.parametrize("chunk_size", [1, 7, sum(SIZES)])
def test_linear_regression_matches_closed_form(chunk_size: int) -> None:
    model, x, y, ids = linear_problem()
    stats = per_example_gradients(model, half_squared_error, x, y, ids, 3, chunk_size=chunk_size)
    sums, sq, counts, var = numpy_stats(closed_form_grads(model, x, y), ids, 3)
    assert stats.sum.dtype == torch.float64 and stats.sum.shape == (3, 4)
    np.testing.assert_allclose(stats.sum.numpy(), sums, rtol=0, atol=1e-10)
    np.testing.assert_allclose(stats.sq_norm.numpy(), sq, rtol=1e-12, atol=1e-10)
    assert stats.count.tolist() == list(map(float, SIZES))
    assert torch.equal(stats.examples, stats.count)
    np.testing.assert_allclose(stats.variance().numpy(), var, rtol=1e-12, atol=1e-10)
    assert var[0] != pytest.approx(var[2], rel=0.1)  # the oracle distinguishes the domains


def test_chunk_size_does_not_change_the_result() -> None:
    model, x, y, ids = linear_problem(seed=5)
    results = [
        per_example_gradients(model, half_squared_error, x, y, ids, 3, chunk_size=c) for c in (1, 7, 36, 1000)
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_mlp_matches_naive_loop_and_leaves_the_model_alone() -> None:
    model = mlp()
    x, y, ids = mlp_problem()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = per_example_gradients(model, cross_entropy, x, y, ids, 3, chunk_size=8)
    _, _, _, var = numpy_stats(naive_grads(model, cross_entropy, x, y), ids, 3)
    np.testing.assert_allclose(stats.variance().numpy(), var, rtol=1e-8)
    assert stats.num_params == sum(p.numel() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not stats.sum.requires_grad and stats.sum.grad_fn is None


def test_result_does_not_depend_on_the_callers_grad_mode() -> None:
    model = mlp()
    x, y, ids = mlp_problem()
    free = per_example_gradients(model, cross_entropy, x, y, ids, 3)
    with torch.no_grad():
        inside = per_example_gradients(model, cross_entropy, x, y, ids, 3)
        micro = micro_batch_gradients(model, cross_entropy, x, y, ids, 3, micro_batch_size=2)
    for a, b in zip(free, inside, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(micro.variance()).all()


def test_params_subset_matches_loop_restricted_to_it() -> None:
    model = mlp()
    x, y, ids = mlp_problem()
    subset = ["2.weight", "0.bias"]  # given out of model order: the vector follows named_parameters()
    stats = per_example_gradients(model, cross_entropy, x, y, ids, 3, params=subset)
    expected = naive_grads(model, cross_entropy, x, y, names=["0.bias", "2.weight"])
    sums, sq, _, var = numpy_stats(expected, ids, 3)
    assert stats.num_params == 5 + 20
    np.testing.assert_allclose(stats.sum.numpy(), sums, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.sq_norm.numpy(), sq, rtol=1e-10)
    np.testing.assert_allclose(stats.variance().numpy(), var, rtol=1e-8)
    micro = micro_batch_gradients(model, cross_entropy, x, y, ids, 3, micro_batch_size=2, params=subset)
    assert micro.num_params == 25
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_are_left_out_by_default() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    x, y, ids = mlp_problem()
    stats = per_example_gradients(model, cross_entropy, x, y, ids, 3)
    names = ["0.bias", "2.weight", "2.bias"]
    np.testing.assert_allclose(
        stats.variance().numpy(),
        numpy_stats(naive_grads(model, cross_entropy, x, y, names), ids, 3)[3],
        rtol=1e-8,
    )


class TwoInputs(nn.Module):
    """Tuple inputs, a buffer in the forward, and a weight shared by two layers (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(2, 3)
        self.c = nn.Linear(3, 3, bias=False)
        self.c.weight = self.a.weight  # one parameter under two names; named_parameters() lists it once
        self.register_buffer("scale", torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64))

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(u) + self.b(v)) * self.scale
        return self.c(h)


def test_tuple_inputs_buffers_and_tied_use() -> None:
    torch.manual_seed(4)
    model = TwoInputs().to(torch.float64)
    g = torch.Generator().manual_seed(4)
    u, v = (
        torch.randn(12, 3, generator=g, dtype=torch.float64),
        torch.randn(12, 2, generator=g, dtype=torch.float64),
    )
    y = torch.randint(0, 3, (12,), generator=g)
    ids = torch.tensor([0, 1] * 6)
    stats = per_example_gradients(model, cross_entropy, (u, v), y, ids, 2, chunk_size=5)
    named = dict(model.named_parameters())
    assert list(named) == ["a.weight", "b.weight", "b.bias"]
    rows = []
    for j in range(12):
        loss = cross_entropy(model(u[j : j + 1], v[j : j + 1]), y[j : j + 1]).sum()
        rows.append(
            torch.cat([gr.flatten() for gr in torch.autograd.grad(loss, list(named.values()))]).numpy()
        )
    sums, sq, _, var = numpy_stats(np.stack(rows), ids, 2)
    np.testing.assert_allclose(stats.sum.numpy(), sums, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.variance().numpy(), var, rtol=1e-8)


def test_empty_domains_and_single_examples_give_nan_variance() -> None:
    model, x, y, _ = linear_problem(sizes=(3,))
    ids = torch.tensor([0, 0, 1])  # domain 1 has one example, domain 2 none
    stats = per_example_gradients(model, half_squared_error, x, y, ids, 3)
    var = stats.variance()
    assert torch.isfinite(var[0]) and var[0] > 0
    assert torch.isnan(var[1:]).all()
    assert torch.isnan(stats.mean()[2]).all() and torch.isfinite(stats.mean()[:2]).all()
    assert stats.count.tolist() == [2.0, 1.0, 0.0]
    empty = per_example_gradients(model, half_squared_error, x[:0], y[:0], ids[:0], 3)
    assert empty.count.tolist() == [0.0, 0.0, 0.0] and torch.isnan(empty.variance()).all()


def test_mean_sq_norm_plain_and_unbiased() -> None:
    model, x, y, ids = linear_problem(seed=3)
    stats = per_example_gradients(model, half_squared_error, x, y, ids, 3)
    sums, _, counts, var = numpy_stats(closed_form_grads(model, x, y), ids, 3)
    plain = ((sums / counts[:, None]) ** 2).sum(1)
    np.testing.assert_allclose(stats.mean_sq_norm(unbiased=False).numpy(), plain, rtol=1e-12)
    # E‖ḡ‖² = ‖μ‖² + v²/n: the unbiased form removes the noise term.
    np.testing.assert_allclose(stats.mean_sq_norm().numpy(), plain - var / counts, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Micro-batch estimator


def test_micro_batch_matches_hand_built_means_and_drops_the_partial_tail() -> None:
    model, x, y, _ = linear_problem(seed=7, sizes=(11,))
    ids = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1])  # domain 0: 6 examples, domain 1: 5
    m_b = 2
    stats = micro_batch_gradients(model, half_squared_error, x, y, ids, 2, micro_batch_size=m_b)
    grads = closed_form_grads(model, x, y)
    for d, expected_batches in ((0, 3), (1, 2)):
        rows = grads[(ids == d).numpy()]
        rows = rows[: expected_batches * m_b]  # domain 1's fifth example is a partial micro-batch: dropped
        means = rows.reshape(expected_batches, m_b, -1).mean(1)
        assert stats.count[d] == expected_batches and stats.examples[d] == expected_batches * m_b
        np.testing.assert_allclose(stats.sum[d].numpy(), means.sum(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(float(stats.sq_norm[d]), (means**2).sum(), rtol=1e-12)
        # v̂² = m_b · Σ_coords var(micro-batch means, ddof=1): the micro-batch form (docs/algorithms.md §3.5).
        expected = m_b * np.var(means, axis=0, ddof=1).sum()
        np.testing.assert_allclose(float(stats.variance()[d]), expected, rtol=1e-12)


def test_micro_batch_of_one_equals_per_example() -> None:
    model, x, y, ids = linear_problem(seed=8)
    micro = micro_batch_gradients(model, half_squared_error, x, y, ids, 3, micro_batch_size=1)
    exact = per_example_gradients(model, half_squared_error, x, y, ids, 3)
    for a, b in zip(micro, exact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_micro_batch_estimator_is_unbiased_over_random_splits() -> None:
    # For a uniformly random order, the r·m_b examples kept form a simple random sample of the domain and
    # the micro-batches a random partition of it; then E[m_b · var(means)] equals the per-example ddof=1
    # estimate on all the domain's examples *exactly* (finite-population algebra; the tail dropped
    # because 62 is not a multiple of 4 does not change that). So the mean over many splits must agree
    # with the per-example value within a few standard errors of that mean; forgetting the factor m_b
    # (4x too small) or using ddof=0 would fail by far more than 4 standard errors.
    model, x, y, _ = linear_problem(seed=11, sizes=(62,), d=3)
    ids = torch.zeros(62, dtype=torch.long)
    target = float(per_example_gradients(model, half_squared_error, x, y, ids, 1).variance()[0])
    g = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(300):
        order = torch.randperm(62, generator=g)
        stats = micro_batch_gradients(
            model, half_squared_error, x[order], y[order], ids, 1, micro_batch_size=4
        )
        draws.append(float(stats.variance()[0]))
    draws = np.array(draws)
    se = draws.std(ddof=1) / np.sqrt(draws.size)
    assert se < 0.05 * target  # enough replicates to tell a biased estimator apart
    assert abs(draws.mean() - target) < 4 * se


def test_micro_batch_needs_two_micro_batches() -> None:
    model, x, y, _ = linear_problem(sizes=(9,))
    ids = torch.tensor([0] * 7 + [1] * 2)
    stats = micro_batch_gradients(model, half_squared_error, x, y, ids, 2, micro_batch_size=4)
    assert stats.count.tolist() == [1.0, 0.0]
    assert torch.isnan(stats.variance()).all()


def test_micro_batch_runs_train_mode_batch_norm_without_touching_running_stats() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(torch.float64)
    x, y, ids = mlp_problem(sizes=(8, 8))
    y = y % 2
    state = {n: t.clone() for n, t in model.state_dict().items()}
    stats = micro_batch_gradients(model, cross_entropy, x, y, ids, 2, micro_batch_size=4)
    assert torch.isfinite(stats.variance()).all()
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="'model' parameter of per_example_gradients.*BatchNorm"):
        per_example_gradients(model, cross_entropy, x, y, ids, 2)
    # the other per-example (vmap) estimators refuse it alike, rather than failing inside torch.func
    with pytest.raises(ValueError, match="'model' parameter of gradient_sketch.*BatchNorm"):
        gradient_sketch(model, cross_entropy, x, y, dim=4)
    with pytest.raises(ValueError, match="'model' parameter of fisher_products.*BatchNorm"):
        fisher_products(model, cross_entropy, x, y, ids, 1, 1)
    model.eval()
    assert torch.isfinite(per_example_gradients(model, cross_entropy, x, y, ids, 2).variance()).all()


def test_dropout_in_train_mode_gets_advice() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 4)).to(torch.float64)
    x, y, ids = mlp_problem()
    with pytest.raises(RuntimeError, match="eval"):
        per_example_gradients(model, cross_entropy, x, y, ids, 3)


# ---------------------------------------------------------------------------------------------------------
# Merging and the convenience wrapper


def test_merged_halves_equal_the_whole() -> None:
    model = mlp()
    x, y, ids = mlp_problem()
    whole = per_example_gradients(model, cross_entropy, x, y, ids, 3)
    h = x.shape[0] // 2
    first = per_example_gradients(model, cross_entropy, x[:h], y[:h], ids[:h], 3)
    second = per_example_gradients(model, cross_entropy, x[h:], y[h:], ids[h:], 3)
    merged = first.merged(second)
    assert isinstance(merged, DomainGradients)
    for a, b in zip(merged, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.variance(), whole.variance(), rtol=1e-10, atol=0)


def test_merging_different_estimators_or_shapes_is_refused() -> None:
    model = mlp()
    x, y, ids = mlp_problem()
    exact = per_example_gradients(model, cross_entropy, x, y, ids, 3)
    micro = micro_batch_gradients(model, cross_entropy, x, y, ids, 3, micro_batch_size=2)
    with pytest.raises(ValueError, match="'other' parameter of DomainGradients.merged.*same size"):
        exact.merged(micro)
    fewer = per_example_gradients(model, cross_entropy, x, y, ids, 3, params=["2.bias"])
    with pytest.raises(ValueError, match="'other' parameter of DomainGradients.merged.*shape"):
        exact.merged(fewer)
    # A domain absent from one side imposes nothing.
    only_two = micro_batch_gradients(
        model, cross_entropy, x, y, torch.full_like(ids, 2), 3, micro_batch_size=3
    )
    partial = micro_batch_gradients(
        model, cross_entropy, x[:4], y[:4], torch.tensor([0, 0, 1, 1]), 3, micro_batch_size=2
    )
    assert partial.merged(only_two).count.tolist() == [1.0, 1.0, float(x.shape[0] // 3)]


def test_gradient_variance_dispatches_and_feeds_the_collector() -> None:
    model = mlp()
    x, y, ids = mlp_problem()
    exact = gradient_variance(model, cross_entropy, x, y, ids, 3, chunk_size=4)
    torch.testing.assert_close(exact, per_example_gradients(model, cross_entropy, x, y, ids, 3).variance())
    micro = gradient_variance(model, cross_entropy, x, y, ids, 3, method="micro_batch", micro_batch_size=2)
    expected = micro_batch_gradients(model, cross_entropy, x, y, ids, 3, micro_batch_size=2).variance()
    torch.testing.assert_close(micro, expected, rtol=0, atol=0)
    collector = StatsCollector(3)
    collector.observe_stat("grad_var", exact)
    torch.testing.assert_close(collector.summarize(step=0).grad_var, exact)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def bad_calls():
    model, x, y, ids = linear_problem()
    n = ids.numel()
    f = half_squared_error
    cases = {
        "id_too_large": (
            lambda: per_example_gradients(model, f, x, y, ids.clamp_max(2) + 1, 3),
            "domain_ids",
        ),
        "id_negative": (lambda: per_example_gradients(model, f, x, y, ids - 1, 3), "domain_ids"),
        "float_ids": (lambda: per_example_gradients(model, f, x, y, ids.double(), 3), "domain_ids"),
        "short_inputs": (lambda: per_example_gradients(model, f, x[:-1], y, ids, 3), "inputs"),
        "short_targets": (lambda: per_example_gradients(model, f, x, y[:-1], ids, 3), "targets"),
        "inputs_list": (lambda: per_example_gradients(model, f, [x], y, ids, 3), "inputs"),
        "unknown_param": (lambda: per_example_gradients(model, f, x, y, ids, 3, params=["bias"]), "params"),
        "param_str": (lambda: per_example_gradients(model, f, x, y, ids, 3, params="weight"), "params"),
        "param_twice": (
            lambda: per_example_gradients(model, f, x, y, ids, 3, params=["weight", "weight"]),
            "params",
        ),
        "chunk_zero": (lambda: per_example_gradients(model, f, x, y, ids, 3, chunk_size=0), "chunk_size"),
        "chunk_float": (lambda: per_example_gradients(model, f, x, y, ids, 3, chunk_size=2.0), "chunk_size"),
        "num_domains_zero": (lambda: per_example_gradients(model, f, x, y, ids, 0), "num_domains"),
        "scalar_loss": (
            lambda: per_example_gradients(model, lambda o, t: f(o, t).mean(), x, y, ids, 3),
            "loss_fn",
        ),
        "micro_zero": (
            lambda: micro_batch_gradients(model, f, x, y, ids, 3, micro_batch_size=0),
            "micro_batch_size",
        ),
        "micro_scalar_loss": (
            lambda: micro_batch_gradients(
                model, lambda o, t: f(o, t).sum(), x, y, ids, 3, micro_batch_size=2
            ),
            "loss_fn",
        ),
        "micro_short_targets": (
            lambda: micro_batch_gradients(model, f, x, y[: n // 2], ids, 3, micro_batch_size=2),
            "targets",
        ),
        "method": (lambda: gradient_variance(model, f, x, y, ids, 3, method="exact"), "method"),
    }
    return cases


@pytest.mark.parametrize("case", list(bad_calls()))
def test_bad_inputs_name_the_parameter(case: str) -> None:
    call, name = bad_calls()[case]
    with pytest.raises(ValueError, match=f"The '{name}' parameter of "):
        call()


def test_unknown_param_lists_the_allowed_names() -> None:
    model = mlp()
    x, y, ids = mlp_problem()
    with pytest.raises(ValueError, match=r"from \['0.weight', '0.bias', '2.weight', '2.bias'\].*'nope'"):
        per_example_gradients(model, cross_entropy, x, y, ids, 3, params=["0.weight", "nope"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_example_gradients_under_the_callers_autocast(dtype: torch.dtype) -> None:
    """vmap of a LayerNorm under autocast failed ("expected scalar type BFloat16 but found Float") when
    controller.step ran inside the training loop's autocast block; autocast is off inside."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    x, y, ids = torch.randn(12, 6), torch.randint(0, 3, (12,)), torch.arange(12) % 2
    expected = per_example_gradients(
        model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y, ids, 2
    )
    with torch.autocast("cpu", dtype=dtype):
        got = per_example_gradients(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y, ids, 2)
    torch.testing.assert_close(got.sum, expected.sum)
    torch.testing.assert_close(got.sq_norm, expected.sq_norm)
