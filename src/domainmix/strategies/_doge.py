"""DoGE's generalization-estimation domain weights (Fan, Pagliardini, Jaggi 2024; methods.md §2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from domainmix._validation import Interval, Options, check_param, param_error
from domainmix.strategies._base import Strategy, chain, make_strategy
from domainmix.strategies._primitives import mix_uniform, track_average
from domainmix.types import DomainStats, DomainWeights


class DogeState(NamedTuple):
    """Last score per domain (reused while a domain is absent)."""

    scores: Tensor  # (k,) float64


def doge(
    learning_rate: float | Callable[[int], float],
    *,
    target: Literal["universal", "out_of_domain"] = "universal",
    mu: float = 0.01,
    score_clip: tuple[float, float] = (0.0, 5.0),
    smoothing: float = 0.0,
) -> Strategy:
    r"""DoGE: mirror ascent on how much each domain's gradient helps the target loss.

    One proxy SGD step θ⁺ = θ − η_t Σ_i α_i g_i changes the target loss by ≈ −η_t Σ_i α_i W_i, with the
    generalization estimation W_i = ⟨g_i, Σ_{j≠i} g_j⟩ (``target="universal"``, from ``grad_dot``) or
    W_i = ⟨g_i, g_target⟩ (``"out_of_domain"``, from ``target_grad_dot``). As in the reference code the
    score is normalised by the mean gradient norm and clipped,

    .. math::
        s_i = \mathrm{clip}\Big(\frac{\eta_t W_i}{\overline{\lVert g \rVert} + 10^{-6}},\
              \eta_t d_{\min},\ \eta_t d_{\max}\Big), \qquad
        \alpha_t = \mathrm{softmax}(\log \alpha_{t-1} + s / \mu),

    then mixed with the uniform distribution (ε = ``smoothing``, 0 in the reference code) and averaged
    over time (``WeightingController.averaged_weights``: the deliverable). g_i are the window's mean
    per-domain gradients, clipped per domain before the products if you follow the reference code
    (``GradientProductTap.products(..., max_norm=...)`` or ``domain_gradient_products``); ‖g_i‖ comes
    from ``grad_sq_norm``. A domain absent
    from the window keeps its last score.

    Deviations from the reference code, on purpose: the universal target is the j ≠ i sum over the
    training domains (the paper's formula); the reference code instead aligns each g_i with a separate
    uniform "mix" stream, self-alignment included (methods.md §2.7 P2): use ``"out_of_domain"`` with a
    held-out mix gradient for that. The proxy samples uniformly and α only reweights the loss
    (``combine(loss=doge(...), sampling=uniform())``), as in the reference code (P1).

    Args:
        learning_rate: η_t, the proxy optimizer's step size: a float or a function of the step.
        target: ``"universal"`` or ``"out_of_domain"``.
        mu: the Bregman coefficient µ > 0 (reference: 0.01 universal, 0.05 out-of-domain).
        score_clip: (d_min, d_max), the clip range in units of η_t (reference: (0, 5)).
        smoothing: ε in [0, 1].

    References:
        Fan, Pagliardini, Jaggi (2024), "DoGE: Domain Reweighting with Generalization Estimation",
        ICML, arXiv:2310.15393.
    """
    if not callable(learning_rate):
        check_param("doge", "learning_rate", learning_rate, Interval(float, 0.0, None, closed="neither"))
    check_param("doge", "target", target, Options(("universal", "out_of_domain")))
    check_param("doge", "mu", mu, Interval(float, 0.0, None, closed="neither"))
    check_param("doge", "smoothing", smoothing, Interval(float, 0.0, 1.0))
    lo, hi = _check_clip(score_clip)
    rate = learning_rate if callable(learning_rate) else (lambda step, value=float(learning_rate): value)
    universal = target == "universal"

    def init_fn(weights: DomainWeights) -> DogeState:
        return DogeState(torch.zeros(weights.num_domains, dtype=torch.float64))

    def update_fn(
        weights: DomainWeights, state: DogeState, stats: DomainStats
    ) -> tuple[DomainWeights, DogeState]:
        eta = float(rate(stats.step))
        present = stats.present
        if universal:
            dots = stats.grad_dot.to(torch.float64) * (present[:, None] & present[None, :])
            w = dots.sum(1) - dots.diagonal()
        else:
            w = stats.target_grad_dot.to(torch.float64)
        norms = stats.grad_sq_norm.to(torch.float64).clamp_min(0.0).sqrt()
        mean_norm = norms[present].mean() if bool(present.any()) else torch.tensor(0.0, dtype=torch.float64)
        fresh = (eta * w / (mean_norm + 1e-6)).clamp(eta * lo, eta * hi)
        scores = torch.where(present, fresh, state.scores)
        x = weights.mixture
        logits = torch.where(x > 0, x.log() + scores / mu, torch.full_like(x, -torch.inf))
        return weights._replace(mixture=torch.softmax(logits, 0)), DogeState(scores)

    needs = {"loss", "count", "grad_sq_norm", "grad_dot" if universal else "target_grad_dot"}
    step = make_strategy(f"doge_step({target})", init_fn, update_fn, needs)
    return chain(step, mix_uniform(float(smoothing)), track_average())


def _check_clip(score_clip: tuple[float, float]) -> tuple[float, float]:
    ok = (
        isinstance(score_clip, tuple)
        and len(score_clip) == 2
        and all(Interval(float, None, None).accepts(v) for v in score_clip)
        and score_clip[0] <= score_clip[1]
    )
    if not ok:
        raise param_error(
            "doge", "score_clip", "a pair (low, high) of finite numbers with low <= high", score_clip
        )
    return float(score_clip[0]), float(score_clip[1])
