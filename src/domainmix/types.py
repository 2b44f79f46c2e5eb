"""The two weight vectors and the per-domain statistics that strategies read.

Salmani et al. (2025) separate three kinds of weight: the population mixture π (how much each domain
matters at evaluation), the loss weights w (how much each domain's empirical risk counts) and the
sampling weights (how often each domain is drawn). domainmix stores two vectors on the simplex:

* the **mixture** α, the objective's weights: α_i = π_i w_i / Σ_j π_j w_j, and
* the **sampling** distribution q, the expected share of domain i in a batch.

The per-example loss multiplier α_i / q_i is derived, never stored: with it the stochastic gradient
(1/B) Σ_x (α_{d(x)} / q_{d(x)}) ∇ℓ(x) stays an unbiased estimate of ∇ Σ_i α_i L_i whatever q is.
Pure resampling sets q = α (multiplier 1); variance-aware sampling keeps α and moves q.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from domainmix._validation import check_weight_vector, param_error

__all__ = ["STAT_NAMES", "DomainStats", "DomainWeights"]

WeightsLike = Mapping[str, float] | Sequence[float] | Tensor


class DomainWeights(NamedTuple):
    """Objective mixture α and sampling distribution q over named domains.

    Build it with :meth:`create` (validates and normalises) or :meth:`from_loss_weights`.

    Attributes:
        names: domain names, in the order of the vectors.
        mixture: α, shape (k,), float64, on the simplex.
        sampling: q, shape (k,), float64, on the simplex; q_i > 0 wherever α_i > 0.
    """

    names: tuple[str, ...]
    mixture: Tensor  # (k,) alpha
    sampling: Tensor  # (k,) q

    @classmethod
    def create(
        cls,
        names: Sequence[str],
        mixture: WeightsLike | None = None,
        sampling: WeightsLike | None = None,
    ) -> DomainWeights:
        """Validate and normalise; ``mixture`` defaults to uniform, ``sampling`` to ``mixture``.

        Raises:
            ValueError: for duplicate or empty names, bad weights, or q_i = 0 where α_i > 0.
        """
        names = _check_names("DomainWeights.create", names)
        k = len(names)
        alpha = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if mixture is None
            else check_weight_vector("DomainWeights.create", "mixture", mixture, names)
        )
        q = (
            alpha.clone()
            if sampling is None
            else check_weight_vector("DomainWeights.create", "sampling", sampling, names)
        )
        starved = [n for n, a, s in zip(names, alpha.tolist(), q.tolist(), strict=True) if a > 0 and s == 0]
        if starved:
            raise param_error(
                "DomainWeights.create",
                "sampling",
                f"positive wherever the mixture is positive (zero for {starved}: their loss could "
                "never be estimated)",
                q.tolist(),
            )
        return cls(names, alpha, q)

    @classmethod
    def from_loss_weights(
        cls,
        names: Sequence[str],
        population: WeightsLike,
        loss_weights: WeightsLike,
        sampling: WeightsLike | None = None,
    ) -> DomainWeights:
        """Map population proportions π and loss weights w to the mixture α ∝ π ⊙ w.

        This is Salmani et al.'s objective Σ_i π_i w_i L̂_i normalised to a convex combination.
        """
        names = _check_names("DomainWeights.from_loss_weights", names)
        pi = check_weight_vector("DomainWeights.from_loss_weights", "population", population, names)
        w = check_weight_vector(
            "DomainWeights.from_loss_weights", "loss_weights", loss_weights, names, normalize=False
        )
        if float((pi * w).sum()) <= 0:
            raise param_error(
                "DomainWeights.from_loss_weights",
                "loss_weights",
                "positive on at least one domain with positive population",
                w.tolist(),
            )
        return cls.create(names, pi * w, sampling)

    @property
    def num_domains(self) -> int:
        """k, the number of domains."""
        return len(self.names)

    def loss_multipliers(self) -> Tensor:
        """α_i / q_i per domain, shape (k,); zero where α_i = 0 (such domains carry no loss)."""
        safe_q = torch.where(self.sampling > 0, self.sampling, torch.ones_like(self.sampling))
        return torch.where(self.mixture > 0, self.mixture / safe_q, torch.zeros_like(self.mixture))

    def as_dict(self) -> dict[str, Any]:
        """Plain-Python form: ``{"names": [...], "mixture": {name: α}, "sampling": {name: q}}``."""
        return {
            "names": list(self.names),
            "mixture": dict(zip(self.names, self.mixture.tolist(), strict=True)),
            "sampling": dict(zip(self.names, self.sampling.tolist(), strict=True)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DomainWeights:
        """Inverse of :meth:`as_dict` (validates again)."""
        return cls.create(list(data["names"]), data["mixture"], data["sampling"])


def _check_names(caller: str, names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise param_error(caller, "names", "a non-empty sequence of domain names", names)
    if not all(isinstance(n, str) and n for n in names):
        raise param_error(caller, "names", "non-empty strings", list(names))
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if list(names).count(n) > 1})
        raise param_error(caller, "names", f"unique (duplicated: {dupes})", list(names))
    return tuple(names)


STAT_NAMES: tuple[str, ...] = (
    "loss",
    "count",
    "loss_var",
    "ref_loss",
    "heldout_loss",
    "heldout_loss_var",
    "heldout_count",
    "grad_var",
    "grad_sq_norm",
    "grad_dot",
    "target_grad_dot",
    "excess_loss",
)


class DomainStats(NamedTuple):
    """Per-domain statistics of one update window, as strategies read them.

    Only ``step``, ``loss`` and ``count`` are always present; a strategy lists what else it needs in
    ``Strategy.requires`` and gets a clear error when a field is ``None``. Means are 0 (never NaN) for
    a domain with count 0; strategies must treat such a domain as absent.

    Attributes:
        step: training step at which the window closed.
        loss: (k,) mean training loss per domain over the window.
        count: (k,) examples (or tokens) seen per domain in the window.
        loss_var: (k,) unbiased variance of the per-example training loss.
        ref_loss: (k,) mean reference-model loss on the same examples (DoReMi).
        heldout_loss: (k,) mean loss on a held-out estimation split (FGLS, ERMA).
        heldout_loss_var: (k,) variance of the per-example held-out loss (ERMA).
        heldout_count: (k,) held-out examples (or tokens) per domain behind those two; 0 = no estimate.
        grad_var: (k,) within-domain gradient variance v_i² = tr Cov_i[∇ℓ] (variance-aware sampling).
        grad_sq_norm: (k,) squared norm of each domain's mean gradient.
        grad_dot: (k, k) inner products ⟨g_i, g_j⟩ of domain mean gradients (DoGE, DIDS).
        target_grad_dot: (k,) ⟨g_i, g_target⟩ against a target-domain gradient (DoGE out-of-domain).
        excess_loss: (k,) mean over the window's tokens of the clipped excess max(ℓ − ℓ_ref, 0) of the
            model's loss over a reference model's, clipped per token before averaging (DoReMi).
    """

    step: int
    loss: Tensor  # (k,)
    count: Tensor  # (k,)
    loss_var: Tensor | None = None  # (k,)
    ref_loss: Tensor | None = None  # (k,)
    heldout_loss: Tensor | None = None  # (k,)
    heldout_loss_var: Tensor | None = None  # (k,)
    heldout_count: Tensor | None = None  # (k,)
    grad_var: Tensor | None = None  # (k,)
    grad_sq_norm: Tensor | None = None  # (k,)
    grad_dot: Tensor | None = None  # (k, k)
    target_grad_dot: Tensor | None = None  # (k,)
    excess_loss: Tensor | None = None  # (k,)

    @property
    def num_domains(self) -> int:
        """k, the number of domains."""
        return int(self.loss.shape[0])

    @property
    def present(self) -> Tensor:
        """(k,) bool: domains with a positive count in this window."""
        return self.count > 0

    def is_finite(self) -> bool:
        """True when every provided statistic is free of NaN and inf."""
        return all(bool(torch.isfinite(v).all()) for v in self[1:] if isinstance(v, Tensor))
