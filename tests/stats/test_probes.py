"""Probes: each observes what it declares, the controller chooses them from the strategy's requires."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import domainmix.strategies as S
from _helpers import assert_resume_equivalent
from domainmix import StatsCollector, WeightingController, domain_losses
from domainmix.experiments.gpt import GPT, GPTConfig, per_token_loss
from domainmix.stats import (
    FisherProductProbe,
    GradientProductProbe,
    GradientProductTap,
    GradientVarianceProbe,
    HeldoutLossProbe,
    Probe,
    ReferenceLossProbe,
    StepLosses,
    gradient_variance,
)

K = 3


def linear_task(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    ids = torch.arange(30) % K
    torch.manual_seed(seed)
    return nn.Linear(4, 1).double(), x, y, ids


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(-1) - y) ** 2


def test_provides_derive_from_the_table() -> None:
    model, *_ = linear_task()
    assert HeldoutLossProbe(lambda: (torch.zeros(1), torch.zeros(1))).provides == {
        "heldout_loss", "heldout_loss_var", "heldout_count",
    }  # fmt: skip
    assert ReferenceLossProbe(lambda s: s.losses).provides == {"ref_loss", "excess_loss"}
    assert GradientVarianceProbe(model, mse, lambda t: (None, None, None)).provides == {"grad_var"}
    products = GradientProductProbe(lambda: GradientProductTap(model))
    assert products.provides == {"grad_dot", "grad_sq_norm"}
    with_target = GradientProductProbe(lambda: GradientProductTap(model), target=lambda: torch.zeros(1))
    assert with_target.provides == {"grad_dot", "grad_sq_norm", "target_grad_dot"}
    assert Probe().provides == frozenset()


def test_heldout_probe_observes_the_current_model_without_gradients() -> None:
    model, x, y, ids = linear_task()
    seen_grad = []

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        out = mse(model(x), y)
        seen_grad.append(out.requires_grad)
        return out, ids

    c = StatsCollector(K)
    HeldoutLossProbe(losses).observe_window(c, step=5)
    stats = c.summarize(5)
    expected = domain_losses(mse(model(x), y).detach(), ids, K)
    assert torch.equal(stats.heldout_loss, expected.mean) and torch.equal(stats.heldout_count, expected.count)
    assert seen_grad == [False]


def test_reference_probe_clips_per_token_before_the_mean() -> None:
    losses = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 1.0]], dtype=torch.float64)
    ref = torch.tensor([[2.0, 1.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([0, 1, 0])
    c = StatsCollector(2)
    probe = ReferenceLossProbe(lambda step: ref[step.indices])
    probe.observe_step(c, StepLosses(losses, ids, indices=torch.tensor([0, 1, 2])))
    stats = c.summarize(1)
    # domain 0: excess tokens max(1-2,0)=0, 2, 4, 0 -> mean 1.5 (not mean(1,3,5,1) - mean(2,1,1,1) = 1.25)
    assert stats.excess_loss.tolist() == [1.5, 1.0]
    assert stats.ref_loss.tolist() == [1.25, 1.0]
    with pytest.raises(ValueError, match="'reference'"):
        ReferenceLossProbe(lambda step: ref[:1]).observe_step(c, StepLosses(losses, ids))


def test_reference_probe_takes_the_excess_of_bfloat16_losses_in_float32() -> None:
    # ℓ = 8.03 in bfloat16 is 8.0 (its spacing at 8 is 1/16); against a float32 reference of 7.99 the
    # excess must be ≈ 0.01 for every token, not lost to a reference rounded to bfloat16 (8.0).
    losses = torch.full((2, 3), 8.03).to(torch.bfloat16)
    ref = torch.full((2, 3), 7.99)
    c = StatsCollector(1)
    ReferenceLossProbe(lambda step: ref).observe_step(c, StepLosses(losses, torch.zeros(2, dtype=torch.long)))
    assert c.summarize(1).excess_loss.tolist() == pytest.approx([8.0 - 7.99], rel=1e-4)  # was 0


def test_gradient_variance_probe_draws_by_step_and_matches_the_function() -> None:
    model, x, y, ids = linear_task()
    drawn = []

    def draw(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        drawn.append(step)
        return x, y, ids

    c = StatsCollector(K)
    GradientVarianceProbe(model, mse, draw).observe_window(c, step=7)
    assert drawn == [7]
    expected = gradient_variance(model, mse, x, y, ids, K)
    torch.testing.assert_close(c.summarize(7).grad_var, expected.to(torch.float64))


def test_gradient_product_probe_makes_its_tap_only_when_recording() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)).double()
    made = []

    def make() -> GradientProductTap:
        made.append(1)
        return GradientProductTap(model.ln)

    probe = GradientProductProbe(make, max_norm=10.0)
    assert probe.tap is None and not made
    seq = torch.randint(0, 256, (6, 9), generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    c = StatsCollector(K)
    with probe.record():
        per_token = per_token_loss(model(seq[:, :-1]), seq[:, 1:])
    probe.observe_step(c, StepLosses(per_token, ids))
    assert made == [1] and probe.tap is not None
    stats = c.summarize(1)
    with probe.record():  # the same forward again: the products must be those the probe handed in
        again = per_token_loss(model(seq[:, :-1]), seq[:, 1:])
    expected = probe.tap.products(again, ids, K, max_norm=10.0)
    torch.testing.assert_close(stats.grad_dot, expected.grad_dot)
    torch.testing.assert_close(stats.grad_sq_norm, expected.grad_sq_norm)
    assert made == [1]
    probe.close()  # the hooks leave the model
    assert not model.ln._forward_hooks


def test_controller_chooses_the_probes_its_strategy_reads() -> None:
    model, x, y, ids = linear_task()
    heldout = HeldoutLossProbe(lambda: (mse(model(x), y), ids))
    variance = GradientVarianceProbe(model, mse, lambda t: (x, y, ids))
    names = ["a", "b", "c"]
    both = [heldout, variance]
    assert WeightingController(S.uniform(), names, probes=both).probes == ()
    assert WeightingController(S.fgls(domain_sizes=[10] * K), names, probes=both).probes == (heldout,)
    va = S.combine(loss=S.fgls(domain_sizes=[10] * K), sampling=S.variance_aware(12))
    assert WeightingController(va, names, probes=both).probes == (heldout, variance)
    with pytest.raises(ValueError, match="'grad_var': 'gradient_variance'"):
        WeightingController(va, names, probes=[heldout])
    with pytest.raises(ValueError, match="'probes'"):
        WeightingController(va, names, probes=heldout)  # type: ignore[arg-type]


def test_window_probes_run_only_when_a_window_updates() -> None:
    calls: list[tuple[str, int]] = []

    class Counting(Probe):
        sources = ("heldout",)

        def observe_step(self, collector: StatsCollector, step: StepLosses) -> None:
            calls.append(("step", len(step.losses)))

        def observe_window(self, collector: StatsCollector, step: int) -> None:
            calls.append(("window", step))
            collector.observe(domain_losses(torch.ones(3), torch.arange(3), 3), source="heldout")

    c = WeightingController(
        S.fgls(domain_sizes=[5, 5, 5]), ["a", "b", "c"], update_every=2, warmup_steps=4, probes=[Counting()]
    )
    for _ in range(6):
        c.step(torch.ones(2), torch.tensor([0, 1]))
    # windows close at steps 2, 4, 6; the one at 2 is a warm-up window: neither its steps nor its
    # close are observed (it would be discarded)
    assert [call for call in calls if call[0] == "window"] == [("window", 4), ("window", 6)]
    assert calls.count(("step", 2)) == 4


def test_step_with_losses_feeds_the_training_stream() -> None:
    seen = []
    strategy = S.stateless("rec", lambda w, s: seen.append(s) or w, {"loss", "count"})
    c = WeightingController(strategy, ["a", "b"], update_every=2)
    c.step(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))
    c.step(torch.tensor([[2.0, 4.0]]), torch.tensor([0]), mask=torch.tensor([[1.0, 0.0]]))
    assert seen[0].loss.tolist() == [1.5, 3.0] and seen[0].count.tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="'domain_ids'"):
        c.step(torch.ones(2))


def test_controller_with_probes_resumes_exactly() -> None:
    """Probes keep no state: a resumed controller with the same probes continues bit for bit."""
    model, x, y, ids = linear_task()
    g = torch.Generator().manual_seed(3)
    steps = [torch.rand(6, generator=g, dtype=torch.float64) for _ in range(12)]
    step_ids = torch.tensor([0, 1, 2, 0, 1, 2])

    def draw(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(np.random.default_rng([0, step]).choice(30, 12))
        return x[rows], y[rows], ids[rows]

    def make() -> WeightingController:
        strategy = S.combine(loss=S.erma(domain_sizes=[10] * K, step_size=0.5), sampling=S.variance_aware(12))
        probes = [HeldoutLossProbe(lambda: (mse(model(x), y), ids)), GradientVarianceProbe(model, mse, draw)]
        return WeightingController(strategy, ["a", "b", "c"], update_every=3, probes=probes)

    def drive(c: WeightingController, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        c.step(steps[t], step_ids)
        return c.weights.mixture, c.weights.sampling

    assert_resume_equivalent(make, drive, midpoint=5, total=12)


def test_universal_target_products_include_each_domains_own_term() -> None:
    """DoGE's universal W_i = ⟨g_i, g_mix⟩ from a separate uniformly mixed batch, against autograd by hand."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)).double()
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, 256, (6, 9), generator=g)
    mix = torch.randint(0, 256, (3, 9), generator=g)  # one window of each domain: a uniform mix
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    params = [model.ln.weight, model.ln.bias]

    def mix_losses() -> torch.Tensor:
        return per_token_loss(model(mix[:, :-1]), mix[:, 1:])

    probe = GradientProductProbe(GradientProductTap(model.ln), target=mix_losses)
    assert probe.provides == {"grad_dot", "grad_sq_norm", "target_grad_dot"}
    c = StatsCollector(K)
    with probe.record():
        per_token = per_token_loss(model(seq[:, :-1]), seq[:, 1:])
    probe.observe_step(c, StepLosses(per_token, ids))
    got = c.summarize(1).target_grad_dot

    def flat_grad(loss: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.flatten() for t in torch.autograd.grad(loss, params, retain_graph=True)])

    losses = per_token_loss(model(seq[:, :-1]), seq[:, 1:])
    g_mix = flat_grad(mix_losses().mean())
    for i in range(K):
        g_i = flat_grad(losses[ids == i].mean())
        torch.testing.assert_close(got[i], g_i @ g_mix, rtol=1e-9, atol=1e-12)


def test_probe_settings_are_checked_at_construction() -> None:
    # not at the first window close, which can come after a long warm-up
    model, *_ = linear_task()
    draw = lambda step: (None, None, None)  # noqa: E731  # never called
    with pytest.raises(
        ValueError, match=r"'params' parameter of GradientVarianceProbe .*unknown: \['nope'\]"
    ):
        GradientVarianceProbe(model, mse, draw, params=["nope"])
    with pytest.raises(ValueError, match=r"'params' parameter of FisherProductProbe .*unknown: \['nope'\]"):
        FisherProductProbe(model, mse, draw, 1, params=["nope"])
    with pytest.raises(ValueError, match="'max_norm' parameter of GradientProductProbe"):
        GradientProductProbe(lambda: None, max_norm=-1.0)  # type: ignore[arg-type, return-value]
