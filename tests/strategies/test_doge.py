"""DoGE: hand-computed steps (universal with its self term, leave-one-out, out-of-domain), clipping,
stale scores, arguments."""

from __future__ import annotations

import pytest
import torch

import domainmix.strategies as S
from _helpers import make_stats
from domainmix.types import DomainWeights

GRADS = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)


def stats_for(grads: torch.Tensor, **fields):
    return make_stats(3, step=10, grad_dot=grads @ grads.T, grad_sq_norm=(grads * grads).sum(1), **fields)


def test_universal_includes_each_domains_own_term() -> None:
    """W_i = ⟨g_i, g_mix⟩ with g_mix the gradient of a uniformly mixed batch: the self term is in it."""
    eta, mu = 0.01, 0.05
    g_mix = GRADS.mean(0)  # a uniformly mixed target batch's mean gradient
    strategy = S.doge(eta, mu=mu, score_clip=(-100.0, 100.0))
    weights = DomainWeights.create(["a", "b", "c"])
    new, state = strategy.update(
        weights, strategy.init(weights), stats_for(GRADS, target_grad_dot=GRADS @ g_mix)
    )
    gram = GRADS @ GRADS.T
    w = gram.sum(1) / 3  # ⟨g_i, (1/k) Σ_j g_j⟩ = (Σ_{j≠i} ⟨g_i, g_j⟩ + ‖g_i‖²) / k
    torch.testing.assert_close(w, (gram.sum(1) - gram.diagonal() + gram.diagonal()) / 3)
    assert w.tolist() == pytest.approx([1 / 3, 2.5 / 3, -0.25 / 3])  # hand: (0+1, 0.5+2, -1.5+1.25) / 3
    scores = eta * w / (GRADS.norm(dim=1).mean() + 1e-6)
    expected = torch.softmax(torch.log(torch.full((3,), 1 / 3, dtype=torch.float64)) + scores / mu, 0)
    torch.testing.assert_close(new.mixture, expected)
    # Without the self term (leave_one_out) domain a, which only helps itself, gets no credit at all.
    _, loo = S.doge(eta, target="leave_one_out", mu=mu, score_clip=(-100.0, 100.0)).update(
        weights, strategy.init(weights), stats_for(GRADS)
    )
    assert float(loo.states[0].scores[0]) == 0.0 < float(state.states[0].scores[0])


def test_leave_one_out_step_by_hand() -> None:
    eta, mu = 0.01, 0.05
    strategy = S.doge(eta, target="leave_one_out", mu=mu, score_clip=(-100.0, 100.0))
    weights = DomainWeights.create(["a", "b", "c"])
    new, _ = strategy.update(weights, strategy.init(weights), stats_for(GRADS))
    gram = GRADS @ GRADS.T
    w = gram.sum(1) - gram.diagonal()  # ⟨g_i, Σ_{j≠i} g_j⟩
    assert w.tolist() == [0.0, 0.5, -1.5]
    mean_norm = GRADS.norm(dim=1).mean()
    scores = eta * w / (mean_norm + 1e-6)
    expected = torch.softmax(torch.log(torch.full((3,), 1 / 3, dtype=torch.float64)) + scores / mu, 0)
    torch.testing.assert_close(new.mixture, expected)
    assert new.sampling.tolist() == weights.sampling.tolist()


def test_default_clip_never_rewards_negative_transfer() -> None:
    strategy = S.doge(0.01, target="leave_one_out", mu=0.05)  # clip to [0, 5η]: negative alignment scores 0
    weights = DomainWeights.create(["a", "b", "c"])
    new, state = strategy.update(weights, strategy.init(weights), stats_for(GRADS))
    scores = state.states[0].scores
    assert scores[2] == 0.0 and scores[0] == 0.0 and scores[1] > 0
    assert float(new.mixture[1]) > float(new.mixture[0]) == pytest.approx(float(new.mixture[2]))


def test_out_of_domain_and_learning_rate_schedule() -> None:
    target = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # η_t of the optimizer step t counted from 0: the window closing after 10 steps weights step t = 9.
    strategy = S.doge(lambda t: 0.1 / (t + 1), target="out_of_domain", mu=1.0, score_clip=(-10.0, 10.0))
    weights = DomainWeights.create(["a", "b", "c"])
    stats = stats_for(GRADS, target_grad_dot=GRADS @ target)
    assert stats.step == 10
    new, _ = strategy.update(weights, strategy.init(weights), stats)
    scores = 0.01 * (GRADS @ target) / (GRADS.norm(dim=1).mean() + 1e-6)  # η_9 = 0.01
    torch.testing.assert_close(new.mixture, torch.softmax(scores, 0))
    # A linear warm-up from 0 (a LambdaLR's factor at t = 0 is 0): the first step's update moves nothing.
    warm = S.doge(lambda t: 1e-3 * t / 5, target="out_of_domain", mu=1.0, score_clip=(-10.0, 10.0))
    first, _ = warm.update(weights, warm.init(weights), stats.replace(step=1))
    torch.testing.assert_close(first.mixture, weights.mixture)
    for bad in (-1e-3, float("nan")):
        broken = S.doge(lambda t, bad=bad: bad, target="out_of_domain")
        with pytest.raises(
            ValueError, match=r"'learning_rate' parameter of doge must be a function returning"
        ):
            broken.update(weights, broken.init(weights), stats)


def test_absent_domain_keeps_its_score() -> None:
    strategy = S.doge(0.01, target="leave_one_out", mu=0.05, score_clip=(-100.0, 100.0))
    weights = DomainWeights.create(["a", "b", "c"])
    _, state = strategy.update(weights, strategy.init(weights), stats_for(GRADS))
    before = state.states[0].scores.clone()
    absent = stats_for(GRADS * 3).replace(count=torch.tensor([10.0, 0.0, 10.0], dtype=torch.float64))
    _, state = strategy.update(weights, state, absent)
    assert state.states[0].scores[1] == before[1]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'learning_rate' parameter of doge"):
        S.doge(0.0)
    with pytest.raises(ValueError, match="'target' parameter of doge"):
        S.doge(0.1, target="mix")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'score_clip' parameter of doge"):
        S.doge(0.1, score_clip=(5.0, 0.0))
    S.doge(0.1, score_clip=[0.0, 5.0])  # a list, as YAML configs give it
    with pytest.raises(ValueError, match="'mu' parameter of doge"):
        S.doge(0.1, mu=0.0)


def test_stale_score_keeps_its_step_size_and_zero_weight_stays_zero() -> None:
    mu = 0.05
    strategy = S.doge(lambda t: 0.1 / (t + 1), target="leave_one_out", mu=mu, score_clip=(-100.0, 100.0))
    weights = DomainWeights.create(["a", "b", "c"], [0.5, 0.5, 0.0])
    first, state = strategy.update(weights, strategy.init(weights), stats_for(GRADS))  # 10 steps: η_9 = 0.01
    exponent = state.states[0].scores.clone()  # s / µ, computed with η_9
    absent = make_stats(3, step=20, grad_dot=GRADS @ GRADS.T, grad_sq_norm=(GRADS * GRADS).sum(1)).replace(
        count=torch.tensor([10.0, 0.0, 10.0], dtype=torch.float64)
    )
    second, state = strategy.update(first, state, absent)  # 20 steps: η_19 = 0.005 for the present domains
    assert state.states[0].scores[1] == exponent[1]  # the absent domain replays η_9's exponent
    present = [0, 2]
    mask = torch.tensor([True, False, True])
    gram = (GRADS @ GRADS.T) * (mask[:, None] & mask[None, :])
    w = gram.sum(1) - gram.diagonal()
    fresh = 0.005 * w / (GRADS[present].norm(dim=1).mean() + 1e-6) / mu
    torch.testing.assert_close(state.states[0].scores[present], fresh[present])
    assert first.mixture[2] == 0.0 and second.mixture[2] == 0.0
    logits = first.mixture[:2].log() + torch.stack([fresh[0], exponent[1]])
    torch.testing.assert_close(second.mixture[:2], torch.softmax(logits, 0))
