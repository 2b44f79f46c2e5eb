"""Variance-Aware sampling (Salmani et al. 2025, arXiv:2511.06913, §4, Alg. 2; docs/algorithms.md §3.5)."""

from __future__ import annotations

import torch

from domainmix._apportion import allocate_counts
from domainmix._validation import Interval, check_param, param_error
from domainmix.strategies._base import EmptyState, Strategy, make_strategy
from domainmix.types import DomainStats, DomainWeights

_NEGLIGIBLE = 1e-9  # relative share given to an active domain whose gradient variance is exactly 0


def variance_aware(batch_size: int | None = None, *, min_count: int | None = None) -> Strategy:
    r"""Variance-Aware (VA) sampling: draw each domain in proportion to α_i times its gradient noise.

    With b_i examples of domain i in a batch of B and per-example loss weight α_i / b_i, the
    importance-corrected gradient is unbiased for Σ α_i ∇L̂_i and its variance is Σ α_i² v_i² / b_i,
    where v_i² = tr Cov_i[∇ℓ] is the within-domain gradient variance (the ``grad_var`` statistic). A
    Lagrange multiplier on Σ b_i = B gives the minimiser

    .. math::
        b_i^\star = B\, \frac{\alpha_i v_i}{\sum_j \alpha_j v_j}, \qquad
        \mathrm{Var}^\star = \frac{(\sum_i \alpha_i v_i)^2}{B},

    (α_i = π_i w_i / Σ π_j w_j, the paper's b_i ∝ π_i w_i v_i). With ``batch_size`` the shares are
    rounded to whole examples by largest remainder and every domain with α_i > 0 keeps at least
    ``min_count`` examples, so q = b / B is exactly what a stratified :class:`DomainBatchSampler` with
    the same global batch draws (b_i = 0 would drop the domain from the gradient and bias it). An
    active domain whose v_i is exactly 0 gets a negligible share (10⁻⁹ of the total), hence only its
    minimum count; if every v_i is 0, q ∝ α.

    The minimum defaults to two because a variance needs two examples: an estimate taken on the training
    batch (or on any draw that follows q) is undefined for a domain given one slot, every later window
    is skipped, and the allocation that caused it can never change: the weights would freeze. Two
    slots per active domain keep v_i estimable from the batch; pass ``min_count=1`` (or 0) only when
    v_i is estimated on examples drawn independently of q (``GradientVarianceProbe`` with its own draw).

    VA moves q only, never α: sampling changes the gradient noise, not the objective. Pair it with a
    loss-weight rule through ``combine(loss=fgls(...), sampling=variance_aware(B))``; the loss rule's α
    is the one VA allocates by. The rule assumes fixed per-batch counts; if domains are drawn i.i.d.,
    the optimum uses the second moment √(v_i² + ‖μ_i‖²) instead (docs/algorithms.md §3.5).

    Args:
        batch_size: the **global** batch size B (per-rank batch × world size) for the integer
            allocation, or None for the continuous shares q ∝ α v.
        min_count: with ``batch_size`` only: the least number of examples of each active domain, ≥ 0
            (default 2, the fewest that define a variance).

    References:
        Salmani, Worah, Razaviyayn, Mirrokni (2025), "Sampling and Loss Weights in Multi-Domain
        Training", arXiv:2511.06913, §4 (Variance-Aware sampling, Eq. 16).
    """
    total = check_param("variance_aware", "batch_size", batch_size, Interval(int, 1, None), None)
    if total is None and min_count is not None:  # a silently ignored minimum would be a surprise later
        raise param_error(
            "variance_aware", "min_count",
            "left out when batch_size is None (continuous shares have no counts)", min_count,
        )  # fmt: skip
    minimum = (
        2
        if min_count is None
        else check_param("variance_aware", "min_count", min_count, Interval(int, 0, None))
    )
    if total is not None and minimum > total:
        raise param_error("variance_aware", "min_count", f"at most batch_size = {total}", minimum)

    def check_minimum(active: int) -> None:
        if total is not None and minimum * active > total:
            raise param_error(
                "variance_aware", "min_count",
                f"at most batch_size // active domains = {total} // {active} = {total // active}", minimum,
            )  # fmt: skip

    def init_fn(weights: DomainWeights) -> EmptyState:
        check_minimum(int((weights.mixture > 0).sum()))  # at construction, not hours later at an update
        return EmptyState()

    def update_fn(
        weights: DomainWeights, state: EmptyState, stats: DomainStats
    ) -> tuple[DomainWeights, EmptyState]:
        active = weights.mixture > 0
        v = stats["grad_var"].to(torch.float64).clamp_min(0.0).sqrt()
        score = torch.where(active, weights.mixture * v, 0.0)
        if bool((score > 0).any()):
            # No gradient noise: the domain needs no samples beyond its minimum, yet must stay drawn.
            score = torch.where(active & (score <= 0), _NEGLIGIBLE * score.sum(), score)
        else:
            score = weights.mixture.clone()  # no signal at all: q ∝ α
        if total is None:
            q = score / score.sum()
        else:
            check_minimum(int(active.sum()))  # α may have gained domains since init
            q = torch.as_tensor(allocate_counts(score, total, minimum), dtype=torch.float64) / total
        return weights._replace(sampling=q), state

    return make_strategy("variance_aware", init_fn, update_fn, {"grad_var"})
