"""DomainWeights' constructors and its plain-Python form, on hand-computed cases (the errors are in
tests/test_bad_inputs.py)."""

from __future__ import annotations

import json

import pytest
import torch

from domainmix import DomainWeights

NAMES = ("web", "code", "books")


def test_loss_weights_times_population_give_the_mixture() -> None:
    """Salmani et al.'s objective Σ π_i w_i L_i as a convex combination: α = π ⊙ w / Σ π ⊙ w, by hand."""
    weights = DomainWeights.from_loss_weights(NAMES, [0.5, 0.3, 0.2], [1.0, 2.0, 0.0])
    assert weights.names == NAMES
    assert weights.mixture.tolist() == pytest.approx([0.5 / 1.1, 0.6 / 1.1, 0.0], abs=1e-15)
    assert torch.equal(weights.sampling, weights.mixture)  # sampling defaults to the mixture
    # the population is normalised, the loss weights are not (only their products matter)
    same = DomainWeights.from_loss_weights(NAMES, {"web": 5, "code": 3, "books": 2}, [10.0, 20.0, 0.0])
    assert same.mixture.tolist() == pytest.approx(weights.mixture.tolist(), abs=1e-15)
    sampled = DomainWeights.from_loss_weights(NAMES, [0.5, 0.3, 0.2], [1.0, 2.0, 0.0], [1.0, 1.0, 2.0])
    assert sampled.sampling.tolist() == [0.25, 0.25, 0.5]


def test_create_normalises_and_defaults() -> None:
    uniform = DomainWeights.create(NAMES)
    assert uniform.mixture.tolist() == pytest.approx([1 / 3] * 3)
    assert torch.equal(uniform.sampling, uniform.mixture)
    weights = DomainWeights.create(NAMES, {"books": 2.0, "web": 1.0, "code": 1.0}, [2.0, 1.0, 1.0])
    assert weights.mixture.tolist() == [0.25, 0.25, 0.5]  # a mapping is read by name, not by order
    assert weights.sampling.tolist() == [0.5, 0.25, 0.25]


def test_the_plain_python_form_round_trips_through_json() -> None:
    weights = DomainWeights.create(NAMES, [0.2, 0.3, 0.5], [0.1, 0.6, 0.3])
    data = json.loads(json.dumps(weights.as_dict()))
    assert data == {
        "names": list(NAMES),
        "mixture": {"web": 0.2, "code": 0.3, "books": 0.5},
        "sampling": {"web": 0.1, "code": 0.6, "books": 0.3},
    }
    back = DomainWeights.from_dict(data)
    assert back.names == weights.names
    assert torch.equal(back.mixture, weights.mixture) and torch.equal(back.sampling, weights.sampling)
