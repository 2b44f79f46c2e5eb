"""Row-wise checks and reductions of (N,) or (N, T) loss tensors, shared by ``losses`` and ``stats``.

A neutral module below both packages, so that neither imports the other's private helpers. Everything
here is pure tensor arithmetic on one batch: no domain weights, no statistics, no state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from domainmix._validation import Interval, check_param, param_error

__all__ = ["check_inputs", "check_losses", "element_mask", "masked_row_sums", "row_sums"]

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_inputs(
    caller: str, losses: Tensor, domain_ids: Tensor, num_domains: int, mask: Tensor | None
) -> Tensor:
    """Validate a batch of losses, their domain ids and an optional element mask.

    Args:
        caller: the public function's name, for the error message.
        losses: (N,) per-example or (N, T) per-token losses, floating point.
        domain_ids: (N,) integer domain of each row, in [0, num_domains).
        num_domains: k ≥ 1.
        mask: None, or a 0/1 tensor with the shape of ``losses`` (padding = 0).

    Returns:
        The element mask in the dtype of ``losses``: ``mask`` converted, or ones when it is None.

    Raises:
        ValueError: for wrong types, shapes or dtypes, or (on CPU tensors) ids outside [0, k).
    """
    check_param(caller, "num_domains", num_domains, Interval(int, 1, None))
    check_losses(caller, "losses", losses)
    if not isinstance(domain_ids, Tensor) or domain_ids.dtype not in _ID_DTYPES:
        raise param_error(caller, "domain_ids", "an integer tensor of shape (N,)", domain_ids)
    if domain_ids.shape != losses.shape[:1]:
        raise param_error(
            caller,
            "domain_ids",
            f"of shape ({losses.shape[0]},), one id per row of losses",
            f"shape {tuple(domain_ids.shape)}",
        )
    # A range check costs a device sync on accelerators, where index_add_ asserts on its own.
    if domain_ids.device.type == "cpu" and domain_ids.numel():
        lo, hi = int(domain_ids.min()), int(domain_ids.max())
        if lo < 0 or hi >= num_domains:
            raise param_error(
                caller, "domain_ids", f"ids in the range [0, {num_domains - 1}]", f"ids from {lo} to {hi}"
            )
    return element_mask(caller, "mask", mask, losses)


def check_losses(caller: str, name: str, losses: Tensor) -> None:
    """Raise unless ``losses`` (the parameter ``name``) is a floating-point (N,) or (N, T) tensor."""
    if not isinstance(losses, Tensor) or not losses.is_floating_point():
        raise param_error(caller, name, "a floating-point tensor of shape (N,) or (N, T)", losses)
    if losses.ndim not in (1, 2):
        raise param_error(caller, name, "of shape (N,) or (N, T)", f"shape {tuple(losses.shape)}")


def element_mask(caller: str, name: str, mask: Tensor | None, losses: Tensor) -> Tensor:
    """The 0/1 element mask ``mask`` (the parameter ``name``) in the dtype of ``losses``; ones if None.

    A mask of another shape is refused even when it broadcasts: it would miscount the elements. On CPU
    its values are checked too (0 or 1: a negative entry would count an element it leaves out, a NaN
    would reach the loss, a fraction would make counts that are not counts); on an accelerator that check
    would synchronise every step.
    """
    if mask is None:
        return torch.ones_like(losses)  # callers with a fast path for no mask ignore it
    if not isinstance(mask, Tensor) or mask.shape != losses.shape:
        raise param_error(
            caller,
            name,
            f"a tensor with the shape of the losses {tuple(losses.shape)}",
            mask if not isinstance(mask, Tensor) else f"shape {tuple(mask.shape)}",
        )
    if mask.device.type == "cpu" and mask.dtype != torch.bool and mask.numel():
        bad = mask[(mask != 0) & (mask != 1)]  # NaN is unequal to both
        if bad.numel():
            got = f"{bad.numel()} entries that are neither 0 nor 1, such as {bad[0].item()}"
            raise param_error(caller, name, "0/1 values (0 = padding) or a bool tensor", got)
    return mask.to(losses.dtype)


def row_sums(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(N,) sum of each row of an (N, T) tensor, accumulated in ``dtype`` (default: ``x``'s); an (N,)
    tensor is returned as it is (cast to ``dtype``)."""
    if x.ndim == 1:
        return x if dtype is None else x.to(dtype)
    return x.sum(dim=1, dtype=dtype)


def masked_row_sums(losses: Tensor, m: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(N,) per-row sums of ``losses`` under the element mask ``m``: Σ_t m_t ℓ_t, accumulated in ``dtype``.

    where(), not a product alone, so that a NaN or inf on a masked-out (padding) element cannot leak in
    (0 · inf is NaN).
    """
    return row_sums(torch.where(m > 0, losses, torch.zeros_like(losses)) * m, dtype)
