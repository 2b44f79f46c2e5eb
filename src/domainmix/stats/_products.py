"""Inner products of per-domain mean gradients on a parameter subset (DoGE's generalization estimation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from domainmix._distributed import all_reduce_sum
from domainmix._rows import check_inputs, check_losses, element_mask, masked_row_sums, row_sums
from domainmix._validation import Interval, check_param, param_error


class GradientProducts(NamedTuple):
    """Gram matrix of the domains' mean gradients, their squared norms and their products with a target."""

    grad_dot: Tensor  # (k, k) ⟨g_i, g_j⟩
    grad_sq_norm: Tensor  # (k,) ‖g_i‖²
    target_grad_dot: Tensor | None  # (k,) ⟨g_i, g_target⟩, when a target loss was given
    # Shadows tuple.count, as DomainLosses.count does: public field names, kept.
    count: Tensor  # type: ignore[assignment]  # (k,) elements behind each g_i (0: absent, g_i = 0)


_SHOWN = 10  # offending entries listed in an error message


def domain_gradient_products(
    losses: Tensor,
    domain_ids: Tensor,
    num_domains: int,
    params: Sequence[Tensor],
    *,
    mask: Tensor | None = None,
    target_losses: Tensor | None = None,
    target_mask: Tensor | None = None,
    max_norm: float | None = None,
    reduce: bool = True,
) -> GradientProducts:
    r"""⟨g_i, g_j⟩ for the per-domain mean gradients g_i = ∇_θ mean_{x ∈ domain i} ℓ(x) on ``params``.

    One ``torch.autograd.grad`` per domain present, on the (small) parameter subset, reusing the
    forward graph of ``losses`` (``retain_graph``), so the caller's ordinary backward of the weighted loss
    still works afterwards: one forward, k subset backwards, one full backward, instead of the reference
    code's k + 1 full backwards and dense k × P matrix of all parameters (docs/algorithms.md §2.4). Only a
    (k, P_subset) float64 matrix is kept.

    Under ``torch.distributed`` (``reduce=True``) the per-domain gradient *sums* and element counts are
    all-reduced before dividing, so g_i is the mean over the global batch and every rank gets the same
    products. With ``max_norm`` each pooled g_i (and g_target) is rescaled to norm ≤ ``max_norm``
    first, as the DoGE reference code clips each domain's gradient before the products.

    Args:
        losses: (N,) per-example or (N, T) per-token losses, still attached to the graph.
        domain_ids: (N,) domain of each row, in [0, num_domains).
        num_domains: k ≥ 1.
        params: the parameter subset (leaf tensors with ``requires_grad``); exclude tied embeddings,
            whose gradient mixes the input and output roles.
        mask: optional 0/1 tensor shaped like ``losses`` (padding = 0).
        target_losses: optional losses of target data (out-of-domain DoGE), attached to the graph.
        target_mask: optional mask for ``target_losses``.
        max_norm: optional clip of each mean gradient's norm, > 0.
        reduce: pool across ranks when a process group is initialised.

    Returns:
        :class:`GradientProducts` in float64 on the parameters' device.

    References:
        Fan, Pagliardini, Jaggi (2024), "DoGE: Domain Reweighting with Generalization Estimation", §3.
    """
    caller = "domain_gradient_products"
    k = check_param(caller, "num_domains", num_domains, Interval(int, 1, None))
    check_max_norm(caller, max_norm)
    params = list(params)
    if not params:
        raise param_error(caller, "params", "a non-empty sequence of tensors with requires_grad", params)
    bad = [i for i, p in enumerate(params) if not (isinstance(p, Tensor) and p.requires_grad)]
    if bad:
        what = (
            type(params[bad[0]]).__name__ if not isinstance(params[bad[0]], Tensor) else "requires_grad=False"
        )
        raise param_error(
            caller, "params", "a non-empty sequence of tensors with requires_grad",
            f"entries {bad[:_SHOWN]} of {len(params)} are not (entry {bad[0]}: {what})",
        )  # fmt: skip
    m = check_inputs(caller, losses, domain_ids, k, mask)
    if not losses.requires_grad:
        raise param_error(caller, "losses", "an (N,) or (N, T) tensor attached to the graph", losses)
    ids = domain_ids.to(losses.device).long()
    acc = torch.promote_types(losses.dtype, torch.float32)  # a float16 sum of a domain's losses overflows
    sums = torch.zeros(k, dtype=acc, device=losses.device).index_add(0, ids, masked_row_sums(losses, m, acc))
    size = sum(p.numel() for p in params)
    buffer = ProductBuffer(k, size, params[0].device)
    buffer.counts[:k] = domain_counts(ids, m, k)
    for i in range(k):
        if float(buffer.counts[i]) > 0:
            _write_flat_grad(sums[i], params, buffer.matrix[i])
    if target_losses is not None:
        tm = target_elements(caller, target_losses, target_mask)
        _write_flat_grad(masked_row_sums(target_losses, tm).sum(), params, buffer.matrix[k])
        buffer.counts[k] = float(tm.sum(dtype=torch.float64))
    return buffer.finish(target=target_losses is not None, max_norm=max_norm, reduce=reduce)


def check_max_norm(caller: str, max_norm: float | None) -> None:
    """The clip of a mean gradient's norm: None, or a float > 0."""
    check_param(caller, "max_norm", max_norm, Interval(float, 0.0, None, closed="neither"), None)


def target_elements(caller: str, target_losses: Tensor, target_mask: Tensor | None) -> Tensor:
    """The target's 0/1 element mask as the losses' dtype (all ones without a mask), after checking both.

    The target rows have no domain ids, so :func:`~domainmix._rows.check_inputs` does not apply; its
    rules for the losses and the mask do.
    """
    check_losses(caller, "target_losses", target_losses)
    if not target_losses.requires_grad:
        raise param_error(caller, "target_losses", "attached to the graph", target_losses)
    return element_mask(caller, "target_mask", target_mask, target_losses)


def domain_counts(ids: Tensor, mask: Tensor, k: int) -> Tensor:
    """Elements (unmasked tokens) per domain, float64."""
    rows = row_sums(mask, torch.float64)  # summed in float64: a bfloat16 count is off by a few tokens
    return torch.zeros(k, dtype=torch.float64, device=rows.device).index_add(0, ids.to(rows.device), rows)


class ProductBuffer:
    """The (k + 1) × P float64 gradient-*sum* rows (the last for the target) and the k + 1 counts.

    One allocation: filled in place by the caller, all-reduced once, normalised to means in place, so
    no copy of the matrix is ever made (the k + 1 rows are what the products need at minimum).
    """

    def __init__(self, k: int, size: int, device: torch.device) -> None:
        self.k = k
        self.packed = torch.zeros((k + 1) * size + k + 1, dtype=torch.float64, device=device)
        self.matrix = self.packed[: (k + 1) * size].view(k + 1, size)
        self.counts = self.packed[(k + 1) * size :]  # k domain counts, then the target's

    def finish(self, *, target: bool, max_norm: float | None, reduce: bool) -> GradientProducts:
        """Pool across ranks, divide sums by counts, clip each row, and take the products."""
        if reduce:
            all_reduce_sum(self.packed)
        self.matrix.div_(self.counts.clamp_min(1.0)[:, None])
        if max_norm is not None:
            self.matrix.mul_(
                (max_norm / self.matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
            )
        grads = self.matrix[: self.k]
        return GradientProducts(
            grads @ grads.T,
            (grads * grads).sum(1),
            grads @ self.matrix[self.k] if target else None,
            self.counts[: self.k].clone(),
        )


def _write_flat_grad(value: Tensor, params: list[Tensor], out: Tensor) -> None:
    """∇ value w.r.t. ``params``, flattened into the float64 row ``out`` (no concatenated temporary)."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    offset = 0
    for g, p in zip(grads, params, strict=True):
        if g is not None:  # an unused parameter keeps its zeros
            out[offset : offset + p.numel()].copy_(g.reshape(-1))
        offset += p.numel()
