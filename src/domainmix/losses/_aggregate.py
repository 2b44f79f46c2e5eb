"""Per-domain loss reduction and the importance-corrected training loss."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from domainmix._rows import check_inputs, masked_row_sums, row_sums
from domainmix._validation import Options, check_param, param_error
from domainmix.types import DomainWeights


class DomainLosses(NamedTuple):
    """Per-domain sums of a batch's losses, in float64 and detached.

    Sums and counts (not means) so that micro-batches, update windows and ranks aggregate exactly:
    merge with :meth:`merged`, then read :attr:`mean` and :attr:`var`.

    Attributes:
        sum: (k,) Σ ℓ over the domain's elements (examples, or unmasked tokens).
        count: (k,) number of elements.
        sum_sq: (k,) Σ ℓ².
    """

    sum: Tensor  # (k,)
    # A field named like tuple.count: public API since the first release, so keep it and silence mypy.
    count: Tensor  # type: ignore[assignment]  # (k,)
    sum_sq: Tensor  # (k,)

    @property
    def mean(self) -> Tensor:
        """(k,) mean loss; 0 where a domain has no elements (never NaN)."""
        return self.sum / self.count.clamp_min(1.0)

    @property
    def var(self) -> Tensor:
        """(k,) unbiased variance of the per-element loss; 0 where count < 2."""
        n = self.count
        centered = (self.sum_sq - self.sum * self.mean).clamp_min(0.0)
        return torch.where(n > 1, centered / (n - 1).clamp_min(1.0), torch.zeros_like(n))

    def merged(self, other: DomainLosses) -> DomainLosses:
        """Element-wise sum of two reductions (e.g. two micro-batches)."""
        return DomainLosses(self.sum + other.sum, self.count + other.count, self.sum_sq + other.sum_sq)


def domain_losses(
    losses: Tensor, domain_ids: Tensor, num_domains: int, mask: Tensor | None = None
) -> DomainLosses:
    """Reduce per-example (or per-token) losses to per-domain sums, counts and sums of squares.

    Args:
        losses: (N,) per-example losses, or (N, T) per-token losses of N sequences.
        domain_ids: (N,) integer domain of each example, in [0, num_domains).
        num_domains: k.
        mask: optional (N,) or (N, T) 0/1 mask with the shape of ``losses`` (padding tokens = 0).

    Returns:
        :class:`DomainLosses` in float64 on the losses' device, detached from the graph.

    Raises:
        ValueError: for wrong shapes or dtypes, or ids outside [0, k) (checked on CPU tensors).

    Examples:
        >>> import torch
        >>> r = domain_losses(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 0, 1]), 3)
        >>> r.mean.tolist(), r.count.tolist()
        ([1.5, 4.0, 0.0], [2.0, 1.0, 0.0])
    """
    m = check_inputs("domain_losses", losses, domain_ids, num_domains, mask)
    values = losses.detach().to(torch.float64)
    if mask is None:  # the common case, every step: no mask arithmetic
        per_row = 1 if values.ndim == 1 else values.shape[1]
        counts = torch.full(values.shape[:1], float(per_row), dtype=torch.float64, device=values.device)
        rows = (row_sums(values), counts, row_sums(values * values))
    else:
        m = m.detach().to(torch.float64)
        # where(), not multiplication: a NaN/inf loss on a masked-out (padding) token must not leak in.
        values = torch.where(m > 0, values, torch.zeros_like(values))
        rows = (row_sums(values * m), row_sums(m), row_sums(values * values * m))
    # One index_add_ of the (N, 3) rows: sums, counts and squares per domain in a single pass.
    totals = torch.zeros(num_domains, 3, dtype=torch.float64, device=values.device)
    totals.index_add_(0, domain_ids.to(values.device).long(), torch.stack(rows, dim=1))
    return DomainLosses(*totals.T)


Normalize = Literal["importance", "per_domain"]


def weighted_loss(
    losses: Tensor,
    domain_ids: Tensor,
    weights: DomainWeights | Tensor,
    *,
    mask: Tensor | None = None,
    normalize: Normalize = "importance",
    denominator: float | Tensor | None = None,
) -> Tensor:
    r"""The training loss for objective mixture α under sampling distribution q.

    ``normalize="importance"`` (default) multiplies each element by α_d / q_d and averages:

    .. math:: \mathcal{L} = \frac{1}{N} \sum_{x} \frac{\alpha_{d(x)}}{q_{d(x)}}\, \ell(x),
        \qquad \mathbb{E}_{x \sim q}\,\mathcal{L} = \sum_i \alpha_i L_i ,

    so its gradient is an unbiased estimate of ∇ Σ_i α_i L_i whatever q is (Salmani et al. 2025,
    arXiv:2511.06913; docs/algorithms.md §3; DoReMi's proxy loss uses the same α/q factor). Pass the
    multipliers of the distribution the sampler *realised* (``WeightingController.loss_multipliers()``
    does): a stratified sampler's rounded counts.

    Per-token losses: q draws sequences, so the unbiased form holds per sequence, with L_i the
    expected *summed* loss of a domain-i sequence (T̄_i tokens times its per-token loss), when the
    denominator is fixed: ``denominator=N`` (sequences) or N·T (token capacity) gives
    E 𝓛 = Σ_i α_i T̄_i L_i^tok / (1 or T), whatever q is. The default divides by the batch's unmasked
    tokens, about N Σ_j q_j T̄_j: a ratio whose scale moves with q when domains differ in length. So α
    weights a domain's tokens, not its per-token mean; for α on per-token means use ``"per_domain"``.

    ``normalize="per_domain"`` averages within each domain present in the batch and mixes the means by α,
    renormalised over the present domains:

    .. math:: \mathcal{L} = \sum_{i \in P} \alpha_i \bar\ell_i \Big/ \sum_{i \in P} \alpha_i .

    It is exact for stratified batches (every domain present, any counts) and needs no q.

    Args:
        losses: (N,) per-example or (N, T) per-token losses, with gradient.
        domain_ids: (N,) integer domain ids in [0, k).
        weights: a :class:`DomainWeights` (α and q), or a (k,) tensor of loss multipliers α/q
            (``"importance"`` only).
        mask: optional 0/1 mask with the shape of ``losses``.
        normalize: ``"importance"`` or ``"per_domain"``.
        denominator: ``"importance"`` only: a positive number (or one-element tensor) to divide by
            instead of the number of unmasked elements: the token count of the whole accumulated batch,
            so that micro-batches of unequal size sum to the exact loss, or a fixed count, so that the
            loss's scale does not move with q (above).

    Returns:
        A scalar tensor in the dtype of ``losses``.

    Raises:
        ValueError: for wrong shapes, dtypes, ids or options.
    """
    check_param("weighted_loss", "normalize", normalize, Options(("importance", "per_domain")))
    if isinstance(weights, DomainWeights):
        k = weights.num_domains
    elif isinstance(weights, Tensor) and weights.ndim == 1 and weights.is_floating_point():
        if normalize != "importance":
            raise param_error(
                "weighted_loss", "weights", "a DomainWeights when normalize='per_domain'", "a tensor"
            )
        k = weights.numel()
        # k numbers, checked every step: a NaN or negative multiplier would silently poison or flip the loss.
        if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise param_error(
                "weighted_loss", "weights", "loss multipliers that are finite and non-negative",
                weights.tolist(),
            )  # fmt: skip
    else:
        raise param_error(
            "weighted_loss", "weights", "a DomainWeights or a 1-D float tensor of loss multipliers", weights
        )
    if denominator is not None and normalize != "importance":
        raise param_error(
            "weighted_loss",
            "denominator",
            "None when normalize='per_domain' (it averages per domain)",
            denominator,
        )
    if denominator is not None:
        _check_denominator(denominator)
    if isinstance(weights, Tensor) and domain_ids.device.type == "cpu" and domain_ids.numel():
        top = int(domain_ids.max())  # a multiplier tensor too short for the ids, named as such
        if top >= k:
            raise param_error(
                "weighted_loss", "weights", f"one loss multiplier per domain (domain_ids reach {top}, "
                f"so at least {top + 1})", f"{k} multipliers",
            )  # fmt: skip
    m = check_inputs("weighted_loss", losses, domain_ids, k, mask)
    ids = domain_ids.to(losses.device).long()
    # Summed in at least float32, only the result in the losses' dtype: a float16 sum of a batch's token
    # losses passes 65504 (inf; with a mask, NaN and zero gradients that GradScaler takes for a good
    # step), and a bfloat16 count stops growing at 256.
    acc = torch.promote_types(losses.dtype, torch.float32)
    # Without a mask every element counts: skip the masking arithmetic (it dominates small batches).
    rows = row_sums(losses, acc) if mask is None else masked_row_sums(losses, m, acc)
    if normalize == "importance":
        multipliers = weights.loss_multipliers() if isinstance(weights, DomainWeights) else weights
        per_row = multipliers.to(losses.device, acc)[ids]
        # where(): a zero-weight domain's inf loss must not make 0 · inf = NaN of the whole loss
        total = torch.where(per_row > 0, rows * per_row, torch.zeros_like(rows)).sum()
        if denominator is None and mask is None:
            return (total / max(losses.numel(), 1)).to(losses.dtype)
        denom = m.sum(dtype=acc) if denominator is None else denominator
        scale = torch.as_tensor(denom, dtype=acc, device=losses.device).clamp_min(1e-12)
        return (total / scale).to(losses.dtype)
    # the gradient flows through index_add all the same
    sums = torch.zeros(k, dtype=acc, device=losses.device).index_add(0, ids, rows)
    counts = torch.zeros(k, dtype=acc, device=losses.device).index_add(0, ids, row_sums(m, acc))
    assert isinstance(weights, DomainWeights)  # checked above: per_domain rejects a plain tensor
    alpha = weights.mixture.to(losses.device, acc)
    present = counts > 0
    alpha = torch.where(present, alpha, torch.zeros_like(alpha))
    means = sums / counts.clamp_min(1.0)
    mixed = torch.where(alpha > 0, alpha * means, torch.zeros_like(means))  # as above: no 0 · inf
    return (mixed.sum() / alpha.sum().clamp_min(1e-12)).to(losses.dtype)


def _check_denominator(denominator: object) -> None:
    """Raise unless ``denominator`` is a finite positive real number or one-element real tensor."""
    if isinstance(denominator, Tensor):
        ok = denominator.numel() == 1 and not denominator.is_complex() and denominator.dtype != torch.bool
        value = float(denominator) if ok else math.nan
    else:
        ok = isinstance(denominator, (int, float)) and not isinstance(denominator, bool)
        value = float(denominator) if ok else math.nan  # type: ignore[arg-type]
    if not (math.isfinite(value) and value > 0):
        raise param_error(
            "weighted_loss", "denominator", "a finite positive number or one-element tensor", denominator
        )
