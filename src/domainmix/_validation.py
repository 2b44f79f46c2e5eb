"""Argument validation with one message shape for the whole library.

Every error reads: ``The 'name' parameter of caller must be <constraint>. Got <value> instead.``
(after scikit-learn's ``validate_parameter_constraints``), so a user sees which argument, which value and
what would have been accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ConfigError",
    "Interval",
    "Options",
    "check_param",
    "check_weight_vector",
    "param_error",
    "weight_array",
]

_NO_OVERFLOW = 1e300  # k weights of at most this / k cannot overflow their float64 sum


class ConfigError(ValueError):
    """Several configuration errors, collected and raised once."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(f"- {e}" for e in self.errors))


@dataclass(frozen=True)
class Interval:
    """A numeric range constraint, e.g. ``Interval(float, 0, 1, closed="left")`` for [0, 1)."""

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"  # "both" | "left" | "right" | "neither"

    def __str__(self) -> str:
        name = "an int" if self.kind is int else "a float"
        lo = "-inf" if self.low is None else _fmt(self.low)
        hi = "inf" if self.high is None else _fmt(self.high)
        left = "[" if self.closed in ("both", "left") and self.low is not None else "("
        right = "]" if self.closed in ("both", "right") and self.high is not None else ")"
        return f"{name} in the range {left}{lo}, {hi}{right}"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int:
            if not isinstance(value, Integral):
                return False
        elif not isinstance(value, Real) or not math.isfinite(float(value)):
            return False
        v = int(value) if self.kind is int else float(value)  # ints compare exactly, however large
        if self.low is not None:
            if v < self.low or (v == self.low and self.closed not in ("both", "left")):
                return False
        if self.high is not None:
            if v > self.high or (v == self.high and self.closed not in ("both", "right")):
                return False
        return True


@dataclass(frozen=True)
class Options:
    """A choice among fixed values, e.g. ``Options(("stratified", "iid"))``."""

    values: tuple[Any, ...]

    def __str__(self) -> str:
        return "one of {" + ", ".join(repr(v) for v in self.values) + "}"

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def param_error(caller: str, name: str, expected: str, value: Any) -> ValueError:
    """Build the library's single error shape for a bad argument."""
    return ValueError(
        f"The {name!r} parameter of {caller} must be {expected}. Got {_short_repr(value)} instead."
    )


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def check_param(caller: str, name: str, value: Any, *constraints: Interval | Options | None) -> Any:
    """Return ``value`` if it satisfies any of ``constraints`` (``None`` admits ``None``), else raise.

    Raises:
        ValueError: in the shape "The 'name' parameter of caller must be ... Got ... instead."
    """
    for c in constraints:
        if c is None:
            if value is None:
                return value
        elif c.accepts(value):
            return int(value) if isinstance(c, Interval) and c.kind is int else value
    parts = [str(c) if c is not None else "None" for c in constraints]
    raise param_error(caller, name, " or ".join(parts), value)


def check_weight_vector(
    caller: str,
    name: str,
    weights: Mapping[str, float] | Sequence[float] | Tensor,
    names: Sequence[str],
    *,
    normalize: bool = True,
) -> Tensor:
    """Turn user weights into a float64 tensor of shape (k,) ordered like ``names``.

    Accepts a name -> weight mapping (every name exactly once), a sequence or a 1-D tensor of length k.
    Weights must be finite and non-negative with a positive sum; they are normalised to sum to one
    unless ``normalize`` is false.

    Raises:
        ValueError: naming the parameter, the offending value and what is allowed.
    """
    return torch.from_numpy(weight_array(caller, name, weights, names, normalize=normalize))


def weight_array(
    caller: str,
    name: str,
    weights: Mapping[str, float] | Sequence[float] | Tensor,
    names: Sequence[str],
    *,
    normalize: bool = True,
) -> np.ndarray:
    """:func:`check_weight_vector` as a float64 numpy array (the samplers' hot path: no tensor)."""
    k = len(names)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names), key=str)
        missing = [n for n in names if n not in weights]
        if unknown or missing:
            raise param_error(
                caller,
                name,
                f"a mapping with exactly the domain names {list(names)} (unknown: {unknown}, "
                f"missing: {missing})",
                dict(weights),
            )
        values: Any = [weights[n] for n in names]
    else:
        values = weights
    # numpy, not torch, for the checks: a weight change in the sampler's hot path costs a few microseconds
    if isinstance(values, Tensor):
        if values.dtype == torch.bool or values.is_complex():
            raise param_error(caller, name, "a real-valued tensor", values)
        array = values.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
    else:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise param_error(
                caller, name, f"a mapping, sequence or tensor of {k} non-negative numbers", values
            )
        # floats (what strategies and .tolist() produce) skip the slower abstract-class check
        if not all(type(v) is float for v in values) and not all(
            isinstance(v, Real) and not isinstance(v, bool) for v in values
        ):
            raise param_error(caller, name, f"a sequence of {k} real numbers", values)
        try:
            array = np.array([float(v) for v in values], dtype=np.float64)
        except OverflowError:  # an int beyond the float range
            raise param_error(caller, name, "finite (no NaN or inf)", values) from None
    if array.ndim != 1 or array.size != k:
        raise param_error(caller, name, f"one weight per domain, shape ({k},)", f"shape {array.shape}")
    if k == 0:
        raise param_error(caller, name, "at least one weight", array.tolist())
    low, high = float(array.min()), float(array.max())
    if 0 <= low and high <= _NO_OVERFLOW / k:  # also False for a NaN
        total = float(array.sum())
    else:  # NaN, inf, negative, or large enough that the sum may overflow (np.errstate costs ~5 us)
        with np.errstate(over="ignore"):
            total = float(array.sum())  # NaN or inf when any weight is (or the sum overflows)
    if not math.isfinite(total) or low < 0:
        if not np.isfinite(array).all():
            raise param_error(caller, name, "finite (no NaN or inf)", array.tolist())
        if (array < 0).any():
            raise param_error(caller, name, "non-negative", array.tolist())
        raise param_error(caller, name, "weights with a finite sum", array.tolist())
    if total <= 0:
        raise param_error(caller, name, "weights with a positive sum (not all zero)", array.tolist())
    return array / total if normalize else array
