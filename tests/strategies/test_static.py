"""Static weights and schedules: hand-computed values."""

from __future__ import annotations

import pytest
import torch

import domainmix.strategies as S
from _helpers import make_stats
from domainmix.types import DomainWeights

NAMES = ("a", "b", "c")


def run_once(strategy: S.Strategy, step: int = 0, weights: DomainWeights | None = None) -> DomainWeights:
    w = weights or DomainWeights.create(NAMES)
    out, _ = strategy.update(w, strategy.init(w), make_stats(3, step=step))
    return out


def test_uniform() -> None:
    out = run_once(S.uniform(), weights=DomainWeights.create(NAMES, [1.0, 0.0, 0.0]))
    assert out.mixture.tolist() == [1 / 3] * 3 and out.sampling.tolist() == [1 / 3] * 3


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 5.0])
def test_temperature_values(t) -> None:
    sizes = [100, 400, 0]
    out = run_once(S.temperature(sizes, t))
    raw = [100 ** (1 / t), 400 ** (1 / t), 0.0]
    expected = [x / sum(raw) for x in raw]
    assert out.mixture.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.sampling.tolist() == pytest.approx(expected, rel=1e-12)


def test_temperature_two_is_square_root() -> None:
    out = run_once(S.temperature({"c": 900, "a": 100, "b": 400}, 2.0))  # by name, any order
    assert out.mixture.tolist() == pytest.approx([10 / 60, 20 / 60, 30 / 60], rel=1e-14)


def test_proportional() -> None:
    s = S.proportional([1, 3, 4])
    assert s.name == "proportional"
    assert run_once(s).mixture.tolist() == pytest.approx([0.125, 0.375, 0.5], rel=1e-15)


def test_fixed_mixture_and_sampling() -> None:
    out = run_once(S.fixed({"a": 2.0, "b": 1.0, "c": 1.0}, [1.0, 1.0, 2.0]))
    assert out.mixture.tolist() == [0.5, 0.25, 0.25]
    assert out.sampling.tolist() == [0.25, 0.25, 0.5]
    assert run_once(S.fixed(torch.tensor([1.0, 0.0, 3.0]))).sampling.tolist() == [0.25, 0.0, 0.75]


STAGES = [(2, [1.0, 0.0, 0.0]), (5, [0.0, 1.0, 0.0]), (9, [0.0, 0.0, 1.0])]


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, None),  # before the first stage: incoming weights pass through
        (1, None),
        (2, [1.0, 0.0, 0.0]),  # at a boundary the new stage applies
        (4, [1.0, 0.0, 0.0]),
        (5, [0.0, 1.0, 0.0]),
        (8, [0.0, 1.0, 0.0]),
        (9, [0.0, 0.0, 1.0]),
        (10_000, [0.0, 0.0, 1.0]),
    ],
)
def test_schedule_stage_selection(step, expected) -> None:
    incoming = DomainWeights.create(NAMES, [0.2, 0.3, 0.5], [0.1, 0.1, 0.8])
    out = run_once(S.schedule(STAGES), step=step, weights=incoming)
    if expected is None:
        assert out is incoming
    else:
        assert out.mixture.tolist() == expected and out.sampling.tolist() == expected


def test_schedule_state_holds_resolved_stages() -> None:
    s = S.schedule([(0, {"c": 1.0, "a": 1.0, "b": 2.0}), (3, [1.0, 1.0, 2.0])])
    state = s.init(DomainWeights.create(NAMES))
    assert state.starts == (0, 3)
    assert state.mixtures.tolist() == [[0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]


def test_static_output_is_not_the_state_tensor() -> None:
    s = S.fixed([1.0, 1.0, 2.0])
    w = DomainWeights.create(NAMES)
    state = s.init(w)
    out, _ = s.update(w, state, make_stats(3))
    out.mixture.mul_(0)  # a caller mutating its result must not corrupt the strategy state
    assert state.mixture.tolist() == [0.25, 0.25, 0.5]
