"""Per-example gradient features: gradients on a parameter subset, sketched by a seeded random projection.

DIDS (Shi et al. 2025, arXiv:2504.13227, §3, "gradient-based domain repartition") groups training
examples by their learning effect: the per-example gradient of a proxy model on the last parameter
tensors, reduced by a Johnson-Lindenstrauss projection before k-means (``domainmix.partition``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from domainmix._validation import Interval, check_param, param_error
from domainmix.stats._gradients import (
    Inputs,
    LossFn,
    _check_common,
    _example_loss,
    _run,
    _select_params,
    _split_params,
    check_per_example_model,
)

_BLOCK = 2048  # parameter coordinates per projection block: the only part of R ever held, (block, d)


def last_parameters(model: nn.Module, fraction: float = 0.1) -> list[str]:
    """Names of the last ``fraction`` of the parameter tensors, in ``named_parameters()`` order.

    DIDS's reference code differentiates the last 10 % of the parameter *tensors* (not of the parameter
    count): for a transformer, the last blocks and the final norm. With tied embeddings the order of
    ``named_parameters()`` decides whether the shared matrix is among them: check the list.

    Args:
        model: the module.
        fraction: share of the tensors, in (0, 1]; at least one tensor is chosen.

    Raises:
        ValueError: for a fraction outside (0, 1] or a model without trainable parameters.
    """
    check_param("last_parameters", "fraction", fraction, Interval(float, 0.0, 1.0, closed="right"))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise param_error("last_parameters", "model", "a module with trainable parameters", model)
    count = max(1, int(round(len(names) * float(fraction))))
    return names[-count:]


def rademacher_block(seed: int, block: int, rows: int, dim: int) -> Tensor:
    r"""Rows ``[block · 2048, block · 2048 + rows)`` of the projection R ∈ {±1/√d}^{P×d}, as float64.

    Each block of 2048 parameter coordinates has its own generator, seeded from (seed, block), so any
    block can be rebuilt alone: the (d × P) matrix is never held, and R does not depend on how the
    examples are chunked.
    """
    state = np.random.SeedSequence([seed, block]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    signs = torch.randint(0, 2, (rows, dim), generator=generator, dtype=torch.int8)
    scale: float = 1.0 / math.sqrt(dim)
    return (2.0 * signs.to(torch.float64) - 1.0) * scale


def project(flat: Tensor, seed: int, dim: int) -> Tensor:
    r"""(n, P) → (n, d): ``flat @ R`` block by block, in float64, R from :func:`rademacher_block`."""
    out = torch.zeros(flat.shape[0], dim, dtype=torch.float64, device=flat.device)
    for block, start in enumerate(range(0, flat.shape[1], _BLOCK)):
        part = flat[:, start : start + _BLOCK].to(torch.float64)
        out += part @ rademacher_block(seed, block, part.shape[1], dim).to(flat.device)
    return out


def gradient_sketch(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    params: Sequence[str] | None = None,
    dim: int = 1024,
    seed: int = 0,
    chunk_size: int = 32,
) -> Tensor:
    r"""(N, d) sketches s_x = Rᵀ ∇_θ ℓ(θ; x) of the per-example gradients on a parameter subset.

    The gradients come from ``torch.func.vmap(torch.func.grad(...))`` as in
    :func:`~domainmix.stats.per_example_gradients` (same model requirements: no train-mode BatchNorm,
    no dropout), ``chunk_size`` examples at a time. R is a P × d Rademacher matrix with entries ±1/√d,
    so E[⟨s_x, s_y⟩] = ⟨g_x, g_y⟩ and, for any n vectors, every inner product is kept within
    ε ‖g_x‖ ‖g_y‖ with high probability once d ≳ log(n) / ε² (Johnson-Lindenstrauss; Achlioptas 2003,
    "Database-friendly random projections", Theorem 1.1). R is generated 2048 rows at a time from
    (seed, block) and discarded: memory is O(chunk_size · P + 2048 · d), never O(P · d); the cost of
    regenerating R is O(P · d) per chunk, so larger chunks amortise it.

    The result depends on ``seed`` and ``dim``, not on ``chunk_size``: each example's row is its own
    gradient times the same R (computed in float64; the matrix products of different chunk sizes may
    round differently, by about 1e-16 relative).

    Args:
        model: the module; ``model(*inputs)`` returns the outputs for a batch.
        loss_fn: ``loss_fn(outputs, targets)`` → per-example losses of shape (n,).
        inputs: a tensor, or a tuple of tensors passed positionally, batched along dim 0 (N examples).
        targets: a tensor batched along dim 0.
        params: names of the parameters to differentiate (default: :func:`last_parameters`, the last
            10 % of the tensors, as the reference code).
        dim: d ≥ 1 (reference: 1024).
        seed: the projection's seed, an int ≥ 0.
        chunk_size: examples per vectorised gradient call, ≥ 1.

    Returns:
        (N, d) float64 tensor on the parameters' device.

    Raises:
        ValueError: for a bad argument or a ``loss_fn`` that does not return per-example losses.
    """
    caller = "gradient_sketch"
    d = check_param(caller, "dim", dim, Interval(int, 1, None))
    seed = check_param(caller, "seed", seed, Interval(int, 0, None))
    size = check_param(caller, "chunk_size", chunk_size, Interval(int, 1, None))
    n = targets.shape[0] if isinstance(targets, Tensor) and targets.ndim else 0
    ids = torch.zeros(n, dtype=torch.long)
    _, xs, _ = _check_common(caller, model, loss_fn, inputs, targets, ids, 1)
    names = _select_params(caller, model, last_parameters(model) if params is None else params)
    check_per_example_model(caller, model)
    active, frozen = _split_params(model, names)
    device = next(iter(active.values())).device

    per_example = vmap(grad(_example_loss(caller, model, loss_fn, frozen)), in_dims=(None, 0, 0))
    out = torch.zeros(n, d, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, n, size):
            chunk = slice(start, start + size)
            grads = _run(caller, per_example, active, tuple(x[chunk] for x in xs), targets[chunk])
            flat = torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in names], dim=1)
            out[chunk] = project(flat, seed, d)
    return out
