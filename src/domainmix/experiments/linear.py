"""Linear regression across domains that differ in input scale C_i and noise σ_i² (salmani.md §7.1).

y = θ_gtᵀx + ε with x ~ N(0, C_i I_d), ε ~ N(0, σ_i²), θ_gt uniform on the unit sphere, loss
ℓ = ½ (xᵀθ − y)², SGD from θ = 0. The metric is ‖θ − θ_gt‖. Loss weights set the error floor
(GLS: w_i ∝ 1/σ_i²); sampling weights set the speed (VA: b_i ∝ α_i √(C_i σ_i²) near θ_gt).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from domainmix.experiments.config import LINEAR_SETTINGS, LinearConfig
from domainmix.experiments.loop import Task
from domainmix.sampling import split_heldout


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """ℓ = ½ (ŷ − y)² per example."""
    return 0.5 * (outputs.squeeze(-1) - targets) ** 2


def make_task(cfg: LinearConfig, seed: int) -> Task:
    """Draw the data of ``seed``: n_i training plus held-out examples per domain; a zero-initialised model."""
    g = torch.Generator().manual_seed(seed)
    k, d = len(cfg.input_scales), cfg.dim
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    theta /= theta.norm()
    per_domain = cfg.train_per_domain + cfg.heldout_per_domain
    domains = torch.arange(k).repeat_interleave(per_domain)
    scale = torch.tensor(cfg.input_scales, dtype=torch.float64)[domains].sqrt()
    noise = torch.tensor(cfg.noise_variances, dtype=torch.float64)[domains].sqrt()
    x = torch.randn(k * per_domain, d, generator=g, dtype=torch.float64) * scale[:, None]
    y = x @ theta + noise * torch.randn(k * per_domain, generator=g, dtype=torch.float64)
    names = tuple(f"d{i + 1}" for i in range(k))
    split = split_heldout(
        {name: range(i * per_domain, (i + 1) * per_domain) for i, name in enumerate(names)},
        count=cfg.heldout_per_domain,
        seed=seed,
    )
    model = nn.Linear(d, 1, bias=False).to(torch.float64)
    nn.init.zeros_(model.weight)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"error": float((m.weight.detach()[0] - theta).norm())}

    return Task(names, x, y, domains, split, model, squared_error, evaluate, cfg.noise_variances)


SETTINGS = LINEAR_SETTINGS
CONFIG = LinearConfig
METRIC = "‖θ − θ_gt‖"
LOG_Y = True
