"""Logistic regression across domains that differ in input scale and label noise (arXiv:2511.06913, Fig. 2).

x ~ N(0, C_i I_d), y ~ Bernoulli(sigmoid(θ_gtᵀx)), and each training or held-out label of domain i is
flipped with probability ρ_i. The metrics are 1 − cos(θ, θ_gt) (the curve) and the accuracy on fresh
clean labels drawn under π (``accuracy``). The paper's label model is not public; this is the
reconstruction's reading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainmix.experiments.config import LOGISTIC_SETTINGS, LogisticConfig
from domainmix.experiments.linear import domain_split, gaussian_inputs, unit_vector, zero_linear
from domainmix.experiments.loop import Task

SETTINGS = LOGISTIC_SETTINGS
CONFIG = LogisticConfig
METRIC = "1 − cos(θ, θ_gt)"
LOG_Y = True


def logistic_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy on logits, per example."""
    return F.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets, reduction="none")


def _draw(g: torch.Generator, theta: Tensor, scales: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    x, domains = gaussian_inputs(g, scales, n, theta.numel())
    y = torch.bernoulli(torch.sigmoid(x @ theta), generator=g)
    return x, y, domains


def make_task(cfg: LogisticConfig, seed: int) -> Task:
    """Noisy-label training/held-out data, clean test data, a zero-initialised logistic model."""
    g = torch.Generator().manual_seed(seed)
    theta = unit_vector(g, cfg.dim)
    scales = torch.tensor(cfg.input_scales, dtype=torch.float64)
    per_domain = cfg.train_per_domain + cfg.heldout_per_domain
    x, y, domains = _draw(g, theta, scales, per_domain)
    flip = torch.rand(y.numel(), generator=g, dtype=torch.float64) < torch.tensor(cfg.flip_rates)[domains]
    y = torch.where(flip, 1.0 - y, y)
    test_x, test_y, _ = _draw(g, theta, scales, cfg.test_per_domain)  # clean labels, equal shares (π uniform)
    names, split = domain_split(scales.numel(), per_domain, cfg.heldout_per_domain, seed)
    model = zero_linear(cfg.dim)

    def evaluate(m: nn.Module) -> dict[str, float]:
        w = m.weight.detach()[0]
        cosine = float(w @ theta / (w.norm() * theta.norm())) if float(w.norm()) > 0 else 0.0
        accuracy = float(((test_x @ w > 0).to(torch.float64) == test_y).to(torch.float64).mean())
        return {"error": 1.0 - cosine, "accuracy": accuracy}

    return Task(names, x, y, domains, split, model, logistic_loss, evaluate)
