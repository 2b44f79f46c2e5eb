"""Strategy state (nested NamedTuples of tensors and scalars) to and from plain containers."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")
_ARGUMENT_FIELDS: dict[type, frozenset[str]] = {}


def from_arguments(cls: type[_T], *fields: str) -> type[_T]:
    """Mark ``fields`` of the NamedTuple state ``cls`` as resolved from its strategy's arguments.

    :func:`from_plain` keeps their freshly initialised values instead of the saved ones, so that a run
    resumed under other arguments (other fixed weights, another population) follows those arguments;
    what the strategy learned is restored.
    """
    unknown = set(fields) - set(getattr(cls, "_fields", ()))
    if unknown:
        raise ValueError(f"from_arguments: {cls.__name__} has no fields {sorted(unknown)}")
    _ARGUMENT_FIELDS[cls] = frozenset(fields)
    return cls


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def to_plain(state: Any) -> Any:
    """NamedTuple → dict by field, tuple → list, tensors cloned; scalars as they are."""
    if _is_namedtuple(state):
        return {field: to_plain(getattr(state, field)) for field in state._fields}
    if isinstance(state, (tuple, list)):
        return [to_plain(x) for x in state]
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"strategy state holds an unsupported {type(state).__name__}: {state!r}")


def from_plain(template: Any, plain: Any, path: str = "state") -> Any:
    """Rebuild a state shaped like ``template`` from ``plain``; raise naming the first mismatch."""
    if _is_namedtuple(template):
        if not isinstance(plain, dict) or set(plain) != set(template._fields):
            got = sorted(plain) if isinstance(plain, dict) else type(plain).__name__
            raise ValueError(
                f"{path}: expected fields {list(template._fields)} of {type(template).__name__}, got {got}"
            )
        fresh = _ARGUMENT_FIELDS.get(type(template), frozenset())  # kept from the template (from_arguments)
        fields = {
            f: getattr(template, f) if f in fresh else from_plain(value, plain[f], f"{path}.{f}")
            for f, value in zip(template._fields, template, strict=True)
        }
        return type(template)(**fields)
    if isinstance(template, (tuple, list)):
        if not isinstance(plain, (tuple, list)) or len(plain) != len(template):
            raise ValueError(f"{path}: expected a sequence of {len(template)} entries, got {plain!r}")
        items = [
            from_plain(t, p, f"{path}[{i}]") for i, (t, p) in enumerate(zip(template, plain, strict=True))
        ]
        return type(template)(items)
    if isinstance(template, torch.Tensor):
        try:  # on the template's device: a checkpoint loaded with map_location="cuda" resumes on the CPU
            value = torch.as_tensor(plain, dtype=template.dtype, device=template.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{path}: expected a tensor of numbers, got {type(plain).__name__}") from None
        if value.shape != template.shape:
            raise ValueError(f"{path}: expected shape {tuple(template.shape)}, got {tuple(value.shape)}")
        return value.clone()
    if template is None:
        return plain
    # Scalars are taken as they are, never converted: int(2.9) or bool("False") would load a corrupt
    # state silently. A state's ints are counters (steps, rounds, counts): never negative.
    if isinstance(template, bool):
        ok, wanted = isinstance(plain, bool), "a bool"
    elif isinstance(template, int):
        ok, wanted = (
            isinstance(plain, Integral) and not isinstance(plain, bool) and int(plain) >= 0,
            "an int >= 0",
        )
    elif isinstance(template, float):
        ok, wanted = isinstance(plain, Real) and not isinstance(plain, bool), "a real number"
    elif isinstance(template, str):
        ok, wanted = isinstance(plain, str), "a str"
    else:
        raise TypeError(f"{path}: unsupported template type {type(template).__name__}")
    if not ok:
        raise ValueError(f"{path}: expected {wanted}, got {plain!r}")
    return type(template)(plain)


def find(state: Any, kind: type) -> list[Any]:
    """All sub-states of type ``kind`` inside ``state``, depth first."""
    found = []
    if isinstance(state, kind):
        found.append(state)
    if isinstance(state, (tuple, list)):
        for x in state:
            found.extend(find(x, kind))
    return found


def restart(state: Any, weights: Any) -> Any:
    """``state`` with every sub-state that mirrors the weights restarted from ``weights``.

    Such a sub-state says so with a ``restarted(weights)`` method (the EMA of the weights, FGLS's and
    ERMA's loss weights w = α / π); containers are rebuilt around the restarted parts.
    """
    if _is_namedtuple(state) and hasattr(state, "restarted"):
        return state.restarted(weights)
    if _is_namedtuple(state):
        return type(state)(*(restart(x, weights) for x in state))
    if isinstance(state, (tuple, list)):
        return type(state)(restart(x, weights) for x in state)
    return state
