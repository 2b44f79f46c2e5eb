"""DIDS's statistics: the diagonal Fisher and its products against a per-example loop, the gradient
sketch's Johnson-Lindenstrauss bound and chunk independence, the task axis in the collector and probe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from domainmix.stats import (
    FisherProductProbe,
    StatsCollector,
    fisher_products,
    gradient_sketch,
    last_parameters,
)
from domainmix.stats._sketch import project


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(1)


def setup(n: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randn(n, 2, dtype=torch.float64)
    return model, x, y


def loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]):
    """Per-example gradients and losses, one ordinary backward per example."""
    params = dict(model.named_parameters())
    rows, losses = [], []
    for i in range(x.shape[0]):
        loss = mse(model(x[i : i + 1]), y[i : i + 1])[0]
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
        losses.append(float(loss.detach()))
    return torch.stack(rows), torch.tensor(losses, dtype=torch.float64)


def test_fisher_and_products_equal_a_per_example_loop() -> None:
    model, x, y = setup()
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])  # groups 0, 1; tasks 2, 3 (k = 2, t = 2)
    names = [n for n, _ in model.named_parameters()]
    out = fisher_products(model, mse, x, y, ids, 2, 2, params=names, chunk_size=5)
    grads, losses = loop_gradients(model, x, y, names)
    fisher = (grads * grads).mean(0)  # the mean of per-example squares
    torch.testing.assert_close(out.fisher, fisher)
    means = torch.stack([grads[ids == c].mean(0) for c in range(4)])
    g, h = means[:2], means[2:]
    torch.testing.assert_close(out.cross, (g * fisher) @ h.T)
    torch.testing.assert_close(out.domain_sq, (g * fisher * g).sum(1))
    torch.testing.assert_close(out.task_sq, (h * fisher * h).sum(1))
    torch.testing.assert_close(out.task_loss, torch.stack([losses[ids == c].mean() for c in (2, 3)]))
    assert out.domain_count.tolist() == [3.0, 4.0] and out.task_count.tolist() == [2.0, 3.0]
    # The reference code squares batch-mean gradients instead: far smaller on noisy coordinates.
    batch_mean_sq = grads.mean(0) ** 2
    assert not torch.allclose(out.fisher, batch_mean_sq)
    assert float(batch_mean_sq.sum()) < 0.5 * float(out.fisher.sum())
    # The KL form from the products equals ½ (g − h)ᵀ F (g − h) computed directly.
    direct = 0.5 * (((g[:, None, :] - h[None, :, :]) ** 2) * fisher).sum(-1)
    torch.testing.assert_close(out.kl(), direct)
    torch.testing.assert_close(out.kernel(), 0.5 * (g * fisher) @ h.T)


def test_fisher_products_reject_bad_inputs() -> None:
    model, x, y = setup(4)
    with pytest.raises(ValueError, match="'num_tasks' parameter of fisher_products"):
        fisher_products(model, mse, x, y, torch.tensor([0, 0, 1, 1]), 1, 0)
    with pytest.raises(
        ValueError, match="'group_ids' parameter of fisher_products must be ids with examples"
    ):
        fisher_products(model, mse, x, y, torch.tensor([0, 0, 1, 1]), 1, 2)  # task 1 (id 2) has none
    with pytest.raises(
        ValueError, match="'domain_ids' parameter of fisher_products must be ids in the range"
    ):
        fisher_products(model, mse, x, y, torch.tensor([0, 0, 1, 5]), 1, 2)


def test_last_parameters_counts_tensors() -> None:
    model, _, _ = setup()
    assert last_parameters(model) == ["2.bias"]  # 10 % of 4 tensors, at least one
    assert last_parameters(model, 0.5) == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="'fraction' parameter of last_parameters"):
        last_parameters(model, 0.0)


def test_sketch_preserves_inner_products_within_the_jl_bound() -> None:
    # Achlioptas (2003), Thm 1.1: P(|‖Sx‖² − ‖x‖²| > ε‖x‖²) ≤ 2 exp(−d (ε²/2 − ε³/3) / 2) per vector;
    # by polarisation every ⟨Sa, Sb⟩ of unit vectors is then within ε of ⟨a, b⟩. 2 · 20² norms at
    # d = 1024, ε = 0.25: a failure probability below 0.003 (and the seed makes the test deterministic).
    d, eps = 1024, 0.25
    bound = 2 * math.exp(-d * (eps**2 / 2 - eps**3 / 3) / 2)
    assert 2 * 20**2 * bound < 3e-3
    gen = torch.Generator().manual_seed(1)
    vectors = torch.randn(20, 5000, generator=gen, dtype=torch.float64)
    vectors[1] = vectors[0] + 0.1 * vectors[1]  # a nearly parallel pair too
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    sketch = project(vectors, seed=0, dim=d)
    error = (sketch @ sketch.T - vectors @ vectors.T).abs()
    assert float(error.max()) <= eps
    assert float(error.mean()) < 3 / math.sqrt(d)  # typical error ~ 1/√d


def test_gradient_sketch_equals_projected_loop_gradients_whatever_the_chunk() -> None:
    model, x, y = setup(10)
    names = [n for n, _ in model.named_parameters()]
    grads, _ = loop_gradients(model, x, y, names)
    sketches = [
        gradient_sketch(model, mse, x, y, params=names, dim=64, seed=3, chunk_size=c) for c in (1, 3, 10)
    ]
    torch.testing.assert_close(sketches[0], project(grads, seed=3, dim=64))
    for other in sketches[1:]:
        torch.testing.assert_close(other, sketches[0], rtol=0, atol=1e-12)
    again = gradient_sketch(model, mse, x, y, params=names, dim=64, seed=3, chunk_size=3)
    assert torch.equal(again, sketches[1])  # deterministic
    other_seed = gradient_sketch(model, mse, x, y, params=names, dim=64, seed=4, chunk_size=3)
    assert not torch.allclose(other_seed, sketches[1])
    default = gradient_sketch(model, mse, x, y, dim=8)  # the last 10 % of the tensors: 2.bias
    assert default.shape == (10, 8)


def test_gradient_sketch_rejects_bad_arguments() -> None:
    model, x, y = setup(4)
    with pytest.raises(ValueError, match="'dim' parameter of gradient_sketch"):
        gradient_sketch(model, mse, x, y, dim=0)
    with pytest.raises(ValueError, match="'params' parameter of gradient_sketch"):
        gradient_sketch(model, mse, x, y, params=["nope"])


def test_collector_takes_the_task_axis_from_the_first_estimate() -> None:
    c = StatsCollector(2)
    c.observe_stat("fisher_cross", torch.ones(2, 3, dtype=torch.float64))
    c.observe_stat("fisher_cross", 3 * torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(
        ValueError,
        match=r"'value' parameter of StatsCollector.observe_stat must be a tensor of shape \(2, 3\)",
    ):
        c.observe_stat("fisher_cross", torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(t,\) for 'task_loss'"):
        c.observe_stat("task_loss", torch.ones(2, 2, dtype=torch.float64))
    stats = c.summarize(5)
    assert stats["fisher_cross"].tolist() == [[2.0] * 3] * 2 and stats.task_loss is None
    c.observe_stat("fisher_cross", torch.ones(2, 4, dtype=torch.float64))  # a new window: a new length
    restored = StatsCollector(2)
    restored.load_state_dict(c.state_dict())
    assert restored.summarize(6)["fisher_cross"].shape == (2, 4)


def test_probe_hands_in_the_round_statistics() -> None:
    model, x, y = setup(8)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    probe = FisherProductProbe(model, mse, lambda step: (x, y, ids), 2)
    assert probe.provides == {"fisher_cross", "fisher_domain_sq", "fisher_task_sq", "task_loss"}
    collector = StatsCollector(2)
    probe.observe_window(collector, 10)
    stats = collector.summarize(10)
    direct = fisher_products(model, mse, x, y, ids, 2, 2)
    torch.testing.assert_close(stats["fisher_cross"], direct.cross)
    torch.testing.assert_close(stats["task_loss"], direct.task_loss)
    with pytest.raises(ValueError, match="'num_tasks' parameter of FisherProductProbe"):
        FisherProductProbe(model, mse, lambda step: (x, y, ids), 0)


def test_a_group_absent_from_the_draw_is_unobserved_not_zero() -> None:
    # With a moving average the absent group keeps its previous products instead of reading a zero gradient.
    model, x, y = setup(8)
    full, lacking = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([0, 0, 0, 0, 2, 2, 3, 3])
    probe = FisherProductProbe(model, mse, lambda step: (x, y, full if step == 1 else lacking), 2)
    collector = StatsCollector(2, ema=0.5)
    probe.observe_window(collector, 1)
    first = collector.summarize(1)
    probe.observe_window(collector, 2)
    second = collector.summarize(2)
    assert second["fisher_domain_sq"][1] == first["fisher_domain_sq"][1] > 0
    assert torch.equal(second["fisher_cross"][1], first["fisher_cross"][1])
    assert second["fisher_domain_sq"][0] != first["fisher_domain_sq"][0]
