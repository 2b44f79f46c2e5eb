"""DoReMi: one hand-computed step, stale scores, the time average and the per-token clipping path."""

from __future__ import annotations

import math

import pytest
import torch

import domainmix.strategies as S
from _helpers import make_stats
from domainmix import StatsCollector, WeightingController, domain_losses
from domainmix.types import DomainWeights


def test_one_hand_computed_step() -> None:
    strategy = S.doremi(step_size=1.0, smoothing=0.1)
    weights = DomainWeights.create(["a", "b", "c"])
    stats = make_stats(3, excess_loss=[0.0, math.log(2.0), math.log(4.0)])
    new, state = strategy.update(weights, strategy.init(weights), stats)
    # α' ∝ (1/3)·(1, 2, 4) → (1, 2, 4)/7; α = 0.9·α' + 0.1/3
    expected = [0.9 * x / 7 + 0.1 / 3 for x in (1.0, 2.0, 4.0)]
    assert new.mixture.tolist() == pytest.approx(expected, abs=1e-12)
    assert new.sampling.tolist() == weights.sampling.tolist()  # α only


def test_absent_domain_keeps_its_last_score_and_average_is_the_deliverable() -> None:
    controller = WeightingController(
        S.combine(loss=S.doremi(step_size=0.5, smoothing=0.0), sampling=S.uniform()), ["a", "b"]
    )
    first = make_stats(2, step=1, excess_loss=[1.0, 0.0])
    controller.update(first)
    second = make_stats(2, step=2, count=[0.0, 10.0], excess_loss=[0.0, 0.0])  # "a" absent: score 1 again
    controller.update(second)
    logits = torch.tensor([1.0, 0.0], dtype=torch.float64)
    a1 = torch.softmax(0.5 * logits, 0)
    a2 = torch.softmax(a1.log() + 0.5 * logits, 0)
    torch.testing.assert_close(controller.weights.mixture, a2)
    # The deliverable: the mean of the α after each update, found inside combine's loss side.
    torch.testing.assert_close(controller.averaged_weights().mixture, (a1 + a2) / 2)


def test_average_from_the_chain() -> None:
    strategy = S.doremi(step_size=1.0, smoothing=0.0)
    weights = DomainWeights.create(["a", "b"])
    state = strategy.init(weights)
    seen = []
    for excess in ([1.0, 0.0], [0.0, 1.0], [2.0, 0.0]):
        weights, state = strategy.update(weights, state, make_stats(2, excess_loss=excess))
        seen.append(weights.mixture)
    controller_average = state.states[-1].average()
    torch.testing.assert_close(controller_average[0], torch.stack(seen).mean(0))


def test_excess_is_clipped_per_token_before_averaging() -> None:
    loss = torch.tensor([[2.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
    ref = torch.tensor([[1.0, 1.5, 1.0], [0.5, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    collector = StatsCollector(2)
    collector.observe(domain_losses(loss, torch.tensor([0, 1]), 2, mask))
    collector.observe(
        domain_losses((loss - ref).clamp_min(0), torch.tensor([0, 1]), 2, mask), source="excess"
    )
    stats = collector.summarize(step=1)
    # domain 0: tokens (2-1)=1 and max(0.5-1.5, 0)=0 → mean 0.5 (the plain mean excess would be 0);
    # domain 1: 0.5, 0, 1 → 0.5.
    assert stats.excess_loss.tolist() == [0.5, 0.5]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'step_size' parameter of doremi"):
        S.doremi(step_size=0.0)
    with pytest.raises(ValueError, match="'smoothing' parameter of doremi"):
        S.doremi(smoothing=1.5)


def test_a_domain_never_seen_sinks_to_the_smoothing_share() -> None:
    """The documented start (docs/design.md): score 0 is the lowest excess, so an unseen domain loses
    weight to those with a positive excess, down to c/k, and recovers once it appears."""
    strategy = S.doremi()  # η = 1, c = 1e-3
    w = DomainWeights.create(("a", "b", "late"))
    state = strategy.init(w)
    for _ in range(50):
        w, state = strategy.update(w, state, make_stats(3, excess_loss=[0.2, 0.2, 0.0], count=[8, 8, 0]))
    assert w.mixture.tolist() == pytest.approx([0.4991, 0.4991, 0.0019], abs=5e-5)
    assert float(w.mixture[2]) > 1e-3 / 3  # never below the smoothing share
    for _ in range(50):
        w, state = strategy.update(w, state, make_stats(3, excess_loss=[0.2, 0.2, 0.5], count=[8, 8, 8]))
    assert float(w.mixture[2]) > 0.9
