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

from domainmix._statistics import statistics
from domainmix._validation import check_weight_vector, param_error

__all__ = ["DomainStats", "DomainWeights"]

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


class DomainStats:
    """Per-domain statistics of one update window, as strategies read them.

    The fields are the statistics declared in the table of ``domainmix/_statistics.py`` (see the README's
    table; :func:`domainmix.stats.register_statistic` adds one). ``step``, ``loss`` and ``count`` are
    always present; every other statistic is ``None`` unless the window observed it. A strategy lists
    what it reads in ``Strategy.requires`` and gets a clear error when one is missing; inside ``update``
    it reads ``stats["name"]`` (a tensor, never None). Means are 0 (never NaN) for a domain with count
    0; strategies must treat such a domain as absent.

    Statistics are read as attributes (``stats.heldout_loss``, ``None`` when absent) or by name
    (``stats["heldout_loss"]``, an error when absent); :meth:`replace` returns a copy with some changed.

    An estimate (a probe's statistic, such as ``fisher_domain_sq``) may leave entries unobserved: a
    domain absent from every draw of the window, and of every earlier one under a moving average. Such
    an entry reads 0 and :meth:`observed_entries` says so; a strategy must not read it as a measured 0.

    Args:
        step: training step at which the window closed.
        loss: (k,) mean training loss per domain over the window.
        count: (k,) examples (or tokens) seen per domain in the window.
        observed: optional bool masks, by statistic name, of the entries that were measured (shaped like
            the statistic); a statistic without one is observed everywhere.
        **values: any other declared statistic, by name (a tensor of its declared shape, or None).

    Raises:
        ValueError: for a name that is not a declared statistic.
    """

    __slots__ = ("step", "_values", "_observed")

    step: int
    _values: dict[str, Tensor | None]
    _observed: dict[str, Tensor]

    def __init__(
        self,
        step: int,
        loss: Tensor,
        count: Tensor,
        *,
        observed: Mapping[str, Tensor] | None = None,
        **values: Tensor | None,
    ) -> None:
        table = statistics()
        unknown = sorted((set(values) | set(observed or {})) - set(table))
        if unknown:
            raise ValueError(f"DomainStats: unknown statistics {unknown}; declared: {list(table)}.")
        object.__setattr__(self, "step", step)
        given = {"loss": loss, "count": count, **values}
        object.__setattr__(self, "_values", {name: given.get(name) for name in table})
        for name, mask in (observed or {}).items():
            value = given.get(name)
            if (
                not isinstance(mask, Tensor)
                or mask.dtype != torch.bool
                or not isinstance(value, Tensor)
                or mask.shape != value.shape
            ):
                shape = tuple(value.shape) if isinstance(value, Tensor) else "absent"
                raise param_error(
                    "DomainStats",
                    f"observed[{name!r}]",
                    f"a bool tensor shaped like {name!r} ({shape})",
                    mask,
                )
        object.__setattr__(self, "_observed", dict(observed or {}))

    def __getattr__(self, name: str) -> Tensor | None:
        # Only reached for names that are not slots: the declared statistics.
        values: dict[str, Tensor | None] = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"DomainStats has no statistic {name!r}; declared: {list(values)}.")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("DomainStats is immutable; use replace(...).")

    def __getitem__(self, name: str) -> Tensor:
        value = self._values.get(name)
        if value is None:
            raise ValueError(
                f"DomainStats at step {self.step} has no {name!r}"
                + ("" if name in self._values else f" (not a declared statistic: {list(self._values)})")
                + "."
            )
        return value

    @property
    def loss(self) -> Tensor:
        """(k,) mean training loss per domain over the window (0 where the count is 0)."""
        return self["loss"]

    @property
    def count(self) -> Tensor:
        """(k,) training examples (or tokens) per domain in the window."""
        return self["count"]

    @property
    def fields(self) -> tuple[str, ...]:
        """``step`` and every declared statistic's name, in table order."""
        return ("step", *self._values)

    def get(self, name: str) -> Tensor | None:
        """The statistic ``name``, or None when the window did not observe it."""
        return self._values.get(name)

    def as_dict(self) -> dict[str, Any]:
        """``{"step": step, name: tensor or None, ...}`` over every declared statistic."""
        return {"step": self.step, **self._values}

    def items(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) for every statistic present, in table order."""
        return [(name, value) for name, value in self._values.items() if value is not None]

    def observed_entries(self, name: str) -> Tensor:
        """Bool mask, shaped like ``stats[name]``, of the entries the window (or its average) measured.

        Raises:
            ValueError: when the statistic is absent, as ``stats[name]`` does.
        """
        value = self[name]
        mask = self._observed.get(name)
        return torch.ones_like(value, dtype=torch.bool) if mask is None else mask

    def replace(self, *, observed: Mapping[str, Tensor] | None = None, **changes: Any) -> DomainStats:
        """A copy with some fields (``step`` or statistics) replaced.

        A replaced statistic keeps its mask of observed entries when its shape is unchanged (an edit of
        some values), else it is observed everywhere; ``observed`` sets masks explicitly.
        """
        values: dict[str, Any] = {"step": self.step, **self._values, **changes}
        masks = {
            name: mask
            for name, mask in self._observed.items()
            if name not in changes
            or (isinstance(changes[name], Tensor) and changes[name].shape == mask.shape)
        }
        return DomainStats(observed={**masks, **(observed or {})}, **values)

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
        return all(bool(torch.isfinite(v).all()) for _, v in self.items())

    def __reduce__(self) -> tuple[Any, tuple[int, dict[str, Tensor | None], dict[str, Tensor]]]:
        # Slots and a blocked __setattr__: pickle and copy rebuild through the constructor.
        return _restore_stats, (self.step, dict(self._values), dict(self._observed))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value.tolist()}" for name, value in self.items())
        return f"DomainStats(step={self.step}, {shown})"


def _restore_stats(
    step: int, values: dict[str, Tensor | None], observed: dict[str, Tensor] | None = None
) -> DomainStats:
    # observed: absent from pickles made before the masks existed
    return DomainStats(step, observed=observed, **values)  # type: ignore[arg-type]  # loss, count in values
