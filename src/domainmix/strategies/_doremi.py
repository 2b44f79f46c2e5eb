"""DoReMi's Group-DRO domain weights (Xie et al. 2023, arXiv:2305.10429, Alg. 1; docs/algorithms.md §1)."""

from __future__ import annotations

from torch import Tensor

from domainmix._validation import Interval, check_param
from domainmix.strategies._base import Strategy, chain
from domainmix.strategies._primitives import exponentiated_gradient, mix_uniform, track_average
from domainmix.types import DomainStats, DomainWeights


def _excess(stats: DomainStats, weights: DomainWeights) -> Tensor:
    del weights
    return stats["excess_loss"]


def doremi(step_size: float = 1.0, smoothing: float = 1e-3, *, initial_score: float = 0.0) -> Strategy:
    r"""DoReMi: exponentiated-gradient ascent on each domain's clipped excess loss over a reference model.

    With λ_i the window's mean over domain i's tokens of max(ℓ_θ − ℓ_ref, 0) (clipped per token, then
    averaged: ``StatsCollector.observe(domain_losses((loss - ref).clamp_min(0), ...), source="excess")``),

    .. math::
        \alpha' = \mathrm{softmax}(\log \alpha_{t-1} + \eta \lambda_t), \qquad
        \alpha_t = (1 - c)\, \alpha' + c\, [\alpha'_i > 0] / k' ,

    with k' the domains in play (all k unless some are set to α_i = 0 on purpose, which stay at 0), and
    the deliverable is the time average ᾱ = (1/T) Σ_t α_t (``WeightingController.averaged_weights``).
    A domain absent from the window reuses its last score; before its first observation the score is
    ``initial_score``, 0 by default rather than the reference code's log|V|, which with small batches
    and many domains inflates a missing domain's weight on the first steps (docs/algorithms.md §1.3). Moves α
    only: the proxy run samples uniformly (``combine(loss=doremi(), sampling=uniform())``) and the loss
    multipliers α/q reweight it, as in the reference code. Guard rails from DoReMi issue #5: put every
    domain in every batch (a stratified sampler with ``min_count=1``), and lower η (0.1) if the
    per-step weights swing to one-hot.

    Args:
        step_size: η > 0 (reference scripts: 1.0).
        smoothing: c in [0, 1], the uniform mixture (reference scripts: 1e-3).
        initial_score: λ assumed for a domain not yet observed.

    References:
        Xie, Pham, Dong, Du, Liu, Lu, Liang, Le, Ma, Yu (2023), "DoReMi: Optimizing Data Mixtures Speeds
        Up Language Model Pretraining", NeurIPS, arXiv:2305.10429, Algorithm 1.
    """
    check_param("doremi", "step_size", step_size, Interval(float, 0.0, None, closed="neither"))
    check_param("doremi", "smoothing", smoothing, Interval(float, 0.0, 1.0))
    check_param("doremi", "initial_score", initial_score, Interval(float, None, None))
    return chain(
        exponentiated_gradient(
            _excess,
            float(step_size),
            requires={"loss", "count", "excess_loss"},
            initial_score=float(initial_score),
            name="doremi_step",
        ),
        mix_uniform(float(smoothing)),
        track_average(),
    )
