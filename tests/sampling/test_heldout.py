"""split_heldout: sizes, determinism, and held-out hygiene through the real sampler (check A.6)."""

from __future__ import annotations

import numpy as np
import pytest

from domainmix.sampling import DomainBatchSampler, split_heldout

DOMAINS = {"a": range(0, 1000), "b": range(1000, 1300), "c": np.arange(5000, 5040)}


def test_sizes_disjoint_and_complete() -> None:
    split = split_heldout(DOMAINS, 0.2, seed=3)
    assert list(split.train) == list(split.heldout) == ["a", "b", "c"]
    for name, index in DOMAINS.items():
        train, held = split.train[name], split.heldout[name]
        assert len(held) == round(0.2 * len(index))
        assert not set(train.tolist()) & set(held.tolist())
        assert sorted(train.tolist() + held.tolist()) == sorted(list(index))


def test_counts_and_per_domain_fractions() -> None:
    split = split_heldout(DOMAINS, count={"a": 10, "b": 0, "c": 39})
    assert [len(split.heldout[n]) for n in DOMAINS] == [10, 0, 39]
    split = split_heldout(DOMAINS, {"a": 0.5, "b": 0.1, "c": 0.0})
    assert [len(split.heldout[n]) for n in DOMAINS] == [500, 30, 0]


def test_deterministic_and_seeded_per_domain() -> None:
    one, two = split_heldout(DOMAINS, 0.2, seed=1), split_heldout(DOMAINS, 0.2, seed=1)
    for name in DOMAINS:
        assert np.array_equal(one.heldout[name], two.heldout[name])
    other = split_heldout(DOMAINS, 0.2, seed=2)
    assert not np.array_equal(one.heldout["a"], other.heldout["a"])
    # Growing one domain leaves the others' split untouched.
    grown = split_heldout({**DOMAINS, "b": range(1000, 1400)}, 0.2, seed=1)
    assert np.array_equal(grown.heldout["a"], one.heldout["a"])
    assert np.array_equal(grown.heldout["c"], one.heldout["c"])


def test_heldout_never_reaches_a_training_batch() -> None:
    """Check A.6 of docs/reproduction.md: no estimation index in a training batch (changing q)."""
    split = split_heldout(DOMAINS, 0.25, seed=0)
    held = set().union(*(set(v.tolist()) for v in split.heldout.values()))
    sampler = DomainBatchSampler(split.train, 32, {"a": 0.2, "b": 0.3, "c": 0.5}, min_count=1, seed=5)
    seen: set[int] = set()
    for step, batch in enumerate(sampler):
        seen.update(batch)
        if step == 300:
            sampler.set_weights({"a": 0.05, "b": 0.05, "c": 0.9})
        if step == 600:
            break
    assert not seen & held
    train = set().union(*(set(v.tolist()) for v in split.train.values()))
    assert seen == train  # every training example was drawn: the check is not vacuous


def test_bad_arguments_are_collected() -> None:
    with pytest.raises(ValueError, match="given exactly when 'count' is not"):
        split_heldout(DOMAINS)
    with pytest.raises(ValueError, match="given exactly when 'count' is not"):
        split_heldout(DOMAINS, 0.1, count=3)
    with pytest.raises(ValueError) as info:
        split_heldout(DOMAINS, {"a": 1.0, "b": -0.1, "c": 0.1})
    message = str(info.value)
    assert "domain 'a'. Got 1.0" in message and "domain 'b'. Got -0.1" in message
    with pytest.raises(ValueError, match="would leave none to train on"):
        split_heldout(DOMAINS, count=40)
    with pytest.raises(ValueError, match="Got unknown \\['z'\\] and missing \\['c'\\]"):
        split_heldout(DOMAINS, {"a": 0.1, "b": 0.1, "z": 0.1})
    with pytest.raises(ValueError, match="'seed' parameter of split_heldout"):
        split_heldout(DOMAINS, 0.1, seed=-1)
    with pytest.raises(ValueError, match="'domains' parameter of split_heldout"):
        split_heldout({}, 0.1)


def test_a_domain_with_repeated_or_no_indices_is_refused() -> None:
    # Copies of index 5 would be split between train and held-out: the model would train on held-out data.
    with pytest.raises(
        ValueError, match=r"each dataset index once per domain \(domain 'a' lists index 5 3 times"
    ):
        split_heldout({"a": [0, 1, 2, 3, 4, 5, 5, 5], "b": [9, 10]}, 0.5)
    with pytest.raises(ValueError, match=r"domain 'b' has no examples"):
        split_heldout({"a": [0, 1], "b": []}, 0.5)
