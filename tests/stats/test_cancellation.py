"""CancellationScores: hand-computed steps, the plain-SGD invariant, selection, resume."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from _helpers import assert_resume_equivalent
from domainmix.stats import CancellationScores


def test_hand_computed_scores_and_selection() -> None:
    a, b, c, d = (torch.zeros(2, requires_grad=True) for _ in range(4))
    scores = CancellationScores([("a", a), ("b", b), ("c", c), ("d", d)])
    with torch.no_grad():
        a += torch.tensor([3.0, 4.0])  # moved 5
        b += torch.tensor([0.0, 1.0])  # moved 1
    a.grad, b.grad, d.grad = torch.tensor([0.0, 10.0]), torch.tensor([6.0, 8.0]), torch.ones(2)
    scores.update()  # c has no gradient: adds nothing; d has one but did not move: +inf
    assert scores.scores() == {"a": 2.0, "b": 10.0, "c": 0.0, "d": math.inf}
    with torch.no_grad():
        a += torch.tensor([0.0, 2.0])  # moved 2 since the last update
    d.grad = None
    scores.update()  # b did not move this time but has its gradient still: +inf
    assert scores.scores() == {"a": 7.0, "b": math.inf, "c": 0.0, "d": math.inf}
    assert scores.steps == 2
    assert scores.select(2) == ["a", "b"]  # c never had a gradient (frozen): never selected
    assert scores.select(-1)[0] in {"b", "d"}
    for bad in (0, 4, -4, 1.0):
        with pytest.raises(ValueError, match="'count' parameter"):
            scores.select(bad)
    with pytest.raises(ValueError, match="'named_parameters' parameter"):
        CancellationScores([])


def test_a_step_the_optimizer_skipped_adds_nothing() -> None:
    # GradScaler skips a step with inf/NaN gradients: no tensor moves; scoring it would give every tensor +inf
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    scores = CancellationScores([("a", a), ("b", b)])
    a.grad, b.grad = torch.tensor([math.inf, 0.0]), torch.ones(2)
    scores.update()
    assert scores.scores() == {"a": 0.0, "b": 0.0} and scores.steps == 1
    with torch.no_grad():
        a += torch.tensor([3.0, 4.0])
    a.grad, b.grad = torch.tensor([0.0, 10.0]), torch.ones(2)
    scores.update()  # moved, finite: scored (b has a gradient but did not move: +inf)
    assert scores.scores() == {"a": 2.0, "b": math.inf}
    restored = CancellationScores([("a", a), ("b", b)])
    restored.load_state_dict(scores.state_dict())
    assert restored.select(1) == ["a"] and restored.select(-1) == ["b"]


def test_plain_sgd_scores_every_tensor_one_over_the_learning_rate_per_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    scores = CancellationScores(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 3, dtype=torch.float64)).pow(2).mean().backward()
        optimizer.step()
        scores.update()  # Δw = −η ∇: ‖∇‖ / ‖Δw‖ = 1/η
    assert scores.scores() == pytest.approx(dict.fromkeys(scores.scores(), 3 / 0.05), rel=1e-9)


class _Tracked:
    """A tracker with its own tensors, stepped deterministically (the tensors are part of the state)."""

    def __init__(self) -> None:
        self.params = {"w": torch.zeros(3), "b": torch.zeros(2)}
        self.scores = CancellationScores(self.params.items())

    def state_dict(self) -> dict[str, Any]:
        return {"params": {n: p.clone() for n, p in self.params.items()}, "scores": self.scores.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, p in self.params.items():
            p.copy_(state["params"][n])
        self.scores.load_state_dict(state["scores"])


def _drive(tracked: _Tracked, t: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(t)
    for p in tracked.params.values():
        p.grad = torch.randn(p.shape, generator=g)
        p.add_(torch.randn(p.shape, generator=g))
    tracked.scores.update()
    return tracked.scores.scores()


def test_resume_equivalence() -> None:
    assert_resume_equivalent(_Tracked, _drive, midpoint=3, total=7)


def test_load_state_dict_rejects_other_tensors() -> None:
    state = CancellationScores([("x", torch.zeros(1))]).state_dict()
    with pytest.raises(ValueError, match="other tensor names"):
        CancellationScores([("y", torch.zeros(1))]).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        CancellationScores([("x", torch.zeros(1))]).load_state_dict({})
    # previous weights of another name or shape: refused before anything is assigned
    tracker = CancellationScores([("x", torch.zeros(2))])
    before = tracker.state_dict()
    for previous in ({}, {"x": torch.zeros(2), "c": torch.zeros(1)}, {"x": torch.zeros(3)}):
        bad = {**tracker.state_dict(), "steps": 5, "previous": previous}
        with pytest.raises(ValueError, match="other tensor names|other shapes"):
            tracker.load_state_dict(bad)
        assert tracker.state_dict()["steps"] == before["steps"]
