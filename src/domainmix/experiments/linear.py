"""Linear regression across domains that differ in input scale C_i and noise σ_i² (arXiv:2511.06913, Fig. 1).

y = θ_gtᵀx + ε with x ~ N(0, C_i I_d), ε ~ N(0, σ_i²), θ_gt uniform on the unit sphere, loss
ℓ = ½ (xᵀθ − y)², SGD from θ = 0. The metric is ‖θ − θ_gt‖. Loss weights set the error floor
(GLS: w_i ∝ 1/σ_i²); sampling weights set the speed (VA: b_i ∝ α_i √(C_i σ_i²) near θ_gt).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from domainmix.experiments.config import LINEAR_SETTINGS, LinearConfig
from domainmix.experiments.loop import Task
from domainmix.sampling import HeldoutSplit, split_heldout


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """ℓ = ½ (ŷ − y)² per example."""
    return 0.5 * (outputs.squeeze(-1) - targets) ** 2


def unit_vector(g: torch.Generator, d: int) -> Tensor:
    """θ_gt uniform on the unit sphere."""
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    return theta / theta.norm()


def gaussian_inputs(g: torch.Generator, scales: Tensor, per_domain: int, d: int) -> tuple[Tensor, Tensor]:
    """X ~ N(0, C_i I_d), ``per_domain`` rows per domain in domain order, and each row's domain id."""
    domains = torch.arange(scales.numel()).repeat_interleave(per_domain)
    x = torch.randn(len(domains), d, generator=g, dtype=torch.float64) * scales[domains].sqrt()[:, None]
    return x, domains


def domain_split(k: int, per_domain: int, heldout: int, seed: int) -> tuple[tuple[str, ...], HeldoutSplit]:
    """Names d1..dk over consecutive blocks of ``per_domain`` rows, ``heldout`` of each held out."""
    names = tuple(f"d{i + 1}" for i in range(k))
    blocks = {name: range(i * per_domain, (i + 1) * per_domain) for i, name in enumerate(names)}
    return names, split_heldout(blocks, count=heldout, seed=seed)


def zero_linear(d: int) -> nn.Linear:
    """The linear model θᵀx (no bias), started at θ = 0."""
    model = nn.Linear(d, 1, bias=False).to(torch.float64)
    nn.init.zeros_(model.weight)
    return model


def make_task(cfg: LinearConfig, seed: int) -> Task:
    """Draw the data of ``seed``: n_i training plus held-out examples per domain; a zero-initialised model."""
    g = torch.Generator().manual_seed(seed)
    k, d = len(cfg.input_scales), cfg.dim
    theta = unit_vector(g, d)
    per_domain = cfg.train_per_domain + cfg.heldout_per_domain
    x, domains = gaussian_inputs(g, torch.tensor(cfg.input_scales, dtype=torch.float64), per_domain, d)
    noise = torch.tensor(cfg.noise_variances, dtype=torch.float64)[domains].sqrt()
    y = x @ theta + noise * torch.randn(k * per_domain, generator=g, dtype=torch.float64)
    names, split = domain_split(k, per_domain, cfg.heldout_per_domain, seed)
    model = zero_linear(d)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"error": float((m.weight.detach()[0] - theta).norm())}

    return Task(names, x, y, domains, split, model, squared_error, evaluate, cfg.noise_variances)


SETTINGS = LINEAR_SETTINGS
CONFIG = LinearConfig
METRIC = "‖θ − θ_gt‖"
LOG_Y = True
