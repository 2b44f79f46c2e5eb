"""DoGE's generalization-estimation domain weights (Fan, Pagliardini, Jaggi 2024, arXiv:2310.15393).

Reference-code choices and our deviations: ``docs/algorithms.md`` §2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from domainmix._validation import Interval, Options, check_param, param_error
from domainmix.strategies._base import Strategy, chain
from domainmix.strategies._primitives import exponentiated_gradient, mix_uniform, track_average
from domainmix.types import DomainStats, DomainWeights

ScoreFn = Callable[[DomainStats, DomainWeights], Tensor]


def doge(
    learning_rate: float | Callable[[int], float],
    *,
    target: Literal["universal", "out_of_domain", "leave_one_out"] = "universal",
    mu: float = 0.01,
    score_clip: tuple[float, float] = (0.0, 5.0),
    smoothing: float = 0.0,
) -> Strategy:
    r"""DoGE: mirror ascent on how much each domain's gradient helps the target loss.

    One proxy SGD step θ⁺ = θ − η_t Σ_i α_i g_i changes the target loss by ≈ −η_t Σ_i α_i W_i, with the
    generalization estimation W_i = ⟨g_i, g_target⟩ (``target_grad_dot``). The target decides the mode:

    * ``"universal"``: g_target is the gradient of a separate, uniformly mixed batch of the training
      domains, as the reference code runs it. W_i then includes domain i's own term (≈ ‖g_i‖² / k, the
      part of the mixed batch that is domain i): a domain that mostly helps itself gets credit for it.
    * ``"out_of_domain"``: g_target is the gradient of a batch of a held-out target domain.
    * ``"leave_one_out"``: W_i = ⟨g_i, Σ_{j≠i} g_j⟩ from the training batch's own ``grad_dot`` (no target
      batch, one forward less; the paper's formula without the self term, biased against self-helping
      domains). Using the same batch's ⟨g_i, g_i⟩ instead would add its noise ‖g_i − E g_i‖² to W_i.

    As in the reference code the score is normalised by the mean gradient norm and clipped,

    .. math::
        s_i = \mathrm{clip}\Big(\frac{\eta_t W_i}{\overline{\lVert g \rVert} + 10^{-6}},\
              \eta_t d_{\min},\ \eta_t d_{\max}\Big), \qquad
        \alpha_t = \mathrm{softmax}(\log \alpha_{t-1} + s / \mu),

    then mixed with the uniform distribution (ε = ``smoothing``, 0 in the reference code) and averaged
    over time (``WeightingController.averaged_weights``: the deliverable). g_i are the window's mean
    per-domain gradients, clipped per domain before the products if you follow the reference code
    (``GradientProductTap.products(..., max_norm=...)`` or ``domain_gradient_products``); ‖g_i‖ comes
    from ``grad_sq_norm``. A domain absent from the window keeps its last score (the whole exponent
    s_i / µ, with the η_t it was computed with); a domain with α_i = 0 stays at 0.

    The strategy is the chain ``exponentiated_gradient(s / µ, step 1) → mix_uniform(ε) →
    track_average()``: the same mirror step as DoReMi's, around DoGE's score.

    The proxy samples uniformly and α only reweights the loss (``combine(loss=doge(...),
    sampling=uniform())``), as in the reference code (``docs/algorithms.md`` §2.5). ``universal`` and
    ``out_of_domain`` compute the same thing from ``target_grad_dot``; the loop decides what the target
    batch is (``GradientProductProbe(tap, target=...)``).

    Args:
        learning_rate: η_t, the proxy optimizer's step size: a float, or a function of the optimizer
            step t counted from 0 (the update an α_t weights; a ``LambdaLR``'s t) returning η_t ≥ 0.
        target: ``"universal"``, ``"out_of_domain"`` or ``"leave_one_out"``.
        mu: the Bregman coefficient µ > 0 (reference: 0.01 universal, 0.05 out-of-domain).
        score_clip: (d_min, d_max), the clip range in units of η_t (reference: (0, 5)).
        smoothing: ε in [0, 1].

    References:
        Fan, Pagliardini, Jaggi (2024), "DoGE: Domain Reweighting with Generalization Estimation",
        ICML, arXiv:2310.15393.
    """
    if not callable(learning_rate):
        check_param("doge", "learning_rate", learning_rate, Interval(float, 0.0, None, closed="neither"))
    check_param("doge", "target", target, Options(("universal", "out_of_domain", "leave_one_out")))
    check_param("doge", "mu", mu, Interval(float, 0.0, None, closed="neither"))
    check_param("doge", "smoothing", smoothing, Interval(float, 0.0, 1.0))
    clip = _check_clip(score_clip)
    rate = learning_rate if callable(learning_rate) else _constant(float(learning_rate))
    leave_one_out = target == "leave_one_out"
    needs = {"loss", "count", "grad_sq_norm", "grad_dot" if leave_one_out else "target_grad_dot"}
    # Named doge_exponent, not doge_step: the state holds s/µ where the former doge_step held s, so a
    # checkpoint of the old form is refused by name (WeightingController.load_state_dict), not misread.
    return chain(
        exponentiated_gradient(
            _exponent(rate, leave_one_out, clip, float(mu)),
            1.0,
            requires=needs,
            name=f"doge_exponent({target})",
        ),
        mix_uniform(float(smoothing)),
        track_average(),
    )


def _exponent(
    rate: Callable[[int], float], leave_one_out: bool, clip: tuple[float, float], mu: float
) -> ScoreFn:
    r"""DoGE's score divided by µ: the increment of log α_i that ``exponentiated_gradient`` applies.

    .. math:: s_i / \mu = \mathrm{clip}\big(\eta_t W_i / (\overline{\lVert g \rVert} + 10^{-6}),\
        \eta_t d_{\min}, \eta_t d_{\max}\big) / \mu ,

    with the mean norm over the domains present. η_t and 1/µ are folded into the score, and the mirror
    step is 1, rather than a step size η_t/µ times a score W: so a domain absent from the window replays
    the exponent it last had, computed with that window's η_t (the reference code's stale scores), and
    the arithmetic is the reference code's (divide by µ) to the last bit.
    """
    lo, hi = clip

    def exponent(stats: DomainStats, weights: DomainWeights) -> Tensor:
        del weights
        # stats.step counts the steps done, so the update it weights is the optimizer's step
        # stats.step - 1 counted from 0, the t a LambdaLR (and the reference code's get_last_lr) sees.
        eta = rate(stats.step - 1)
        if not Interval(float, 0.0, None).accepts(eta):
            raise param_error(
                "doge",
                "learning_rate",
                "a function returning finite numbers >= 0",
                f"{eta!r} at step {stats.step - 1}",
            )
        eta = float(eta)
        present = stats.present
        if leave_one_out:
            # Absent domains' rows and columns are zero-filled products; mask them all the same.
            dots = stats["grad_dot"].to(torch.float64) * (present[:, None] & present[None, :])
            w = dots.sum(1) - dots.diagonal()
        else:
            w = stats["target_grad_dot"].to(torch.float64)
        norms = stats["grad_sq_norm"].to(torch.float64).clamp_min(0.0).sqrt()
        mean_norm = norms[present].mean() if bool(present.any()) else torch.tensor(0.0, dtype=torch.float64)
        return (eta * w / (mean_norm + 1e-6)).clamp(eta * lo, eta * hi) / mu

    return exponent


def _constant(value: float) -> Callable[[int], float]:
    def rate(step: int) -> float:
        del step
        return value

    return rate


def _check_clip(score_clip: tuple[float, float]) -> tuple[float, float]:
    ok = (
        isinstance(score_clip, (tuple, list))
        and len(score_clip) == 2
        and all(Interval(float, None, None).accepts(v) for v in score_clip)
        and score_clip[0] <= score_clip[1]
    )
    if not ok:
        raise param_error(
            "doge", "score_clip", "a pair (low, high) of finite numbers with low <= high", score_clip
        )
    return float(score_clip[0]), float(score_clip[1])
