"""Checks shared by every ``load_state_dict`` in the package, so that all of them fail the same way.

A state dict is plain data saved by ``state_dict()``. Two things can be wrong with it before any value is
read: keys can be missing (a state from another class, or from a version that did not write them yet),
and it can have been saved by an object configured differently (another seed, batch size, domain set...),
which the object records as a *fingerprint*: a small mapping of the settings that a resume must not
change. Every message starts with ``"<Owner>.load_state_dict: "`` so a failed resume names the object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral
from types import MappingProxyType
from typing import Any

__all__ = ["check_fingerprint", "check_state_keys", "state_counts", "state_list"]

_NO_DEFAULTS: Mapping[str, Any] = MappingProxyType({})


def check_state_keys(owner: str, state_dict: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Raise unless ``state_dict`` is a mapping holding every key in ``keys``.

    Args:
        owner: the class whose ``load_state_dict`` is checking, e.g. ``"DomainBatchSampler"``.
        state_dict: the state handed to ``load_state_dict``.
        keys: the keys a valid state must hold.

    Raises:
        ValueError: ``"<owner>.load_state_dict: state is missing keys [...]"`` listing the missing keys in
            the order of ``keys``, or a message saying the state is not a mapping.
    """
    # The annotation says Mapping, but a checkpoint is user data: a list or None must not pass silently.
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{owner}.load_state_dict: state must be a mapping from {owner}.state_dict(); "
            f"got a {type(state_dict).__name__}."
        )
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(f"{owner}.load_state_dict: state is missing keys {missing}.")


def check_fingerprint(
    owner: str,
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    defaults: Mapping[str, Any] = _NO_DEFAULTS,
    *,
    hint: str = "",
) -> None:
    """Raise unless the saved fingerprint equals the current one on every key of ``current``.

    Args:
        owner: the class whose ``load_state_dict`` is checking.
        saved: the fingerprint stored in the state.
        current: this object's fingerprint; only its keys are compared (pass a subset to relax the check).
        defaults: values for keys that ``saved`` lacks because the state predates them (e.g.
            ``{"replacement": False}``); a key in neither compares as ``None``.
        hint: appended to the message, e.g. how to accept a deliberate change.

    Raises:
        ValueError: ``"<owner>.load_state_dict: state was saved with another configuration; differs in
            key: saved <value>, now <value>; ..."`` naming every differing key, or a message saying the
            fingerprint is not a mapping.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(
            f"{owner}.load_state_dict: the state's fingerprint must be a mapping; "
            f"got a {type(saved).__name__}."
        )
    differs = []
    for key, now in current.items():
        was = saved.get(key, defaults.get(key))
        if was != now:
            differs.append(f"{key}: saved {was!r}, now {now!r}")
    if differs:
        raise ValueError(
            f"{owner}.load_state_dict: state was saved with another configuration; differs in "
            f"{'; '.join(differs)}{hint}."
        )


def state_counts(owner: str, state_dict: Mapping[str, Any], key: str, length: int | None = None) -> Any:
    """``state_dict[key]`` if it is a count (an int >= 0), or with ``length`` a list of that many counts
    (``length=-1``: a list of any length).

    A corrupt or hand-edited checkpoint must fail on load, naming the key, rather than at some later batch
    (a negative cursor) or never (a float clock that silently shifts every weight change).

    Raises:
        ValueError: ``"<owner>.load_state_dict: state[key] must be ..."`` with the value found.
    """
    if length is not None and length >= 0:
        return state_list(owner, state_dict, key, length, "ints >= 0", _count)
    value = state_dict[key]
    if length is None:
        ok, wanted = _count(value), "an int >= 0"
    else:
        listed = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        ok, wanted = listed and all(_count(v) for v in value), "a list of ints >= 0"
    if not ok:
        raise ValueError(f"{owner}.load_state_dict: state[{key!r}] must be {wanted}. Got {value!r} instead.")
    return value


def _count(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= 0


def state_list(
    owner: str,
    state_dict: Mapping[str, Any],
    key: str,
    length: int,
    wanted: str,
    accepts: Callable[[Any], bool],
) -> list[Any]:
    """``state_dict[key]`` as a list if it holds ``length`` entries that ``accepts`` (one per domain).

    Raises:
        ValueError: ``"<owner>.load_state_dict: state[key] must be a list of <length> <wanted> (one per
            domain)"`` with the value found.
    """
    value = state_dict[key]
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != length
        or not all(accepts(v) for v in value)
    ):
        raise ValueError(
            f"{owner}.load_state_dict: state[{key!r}] must be a list of {length} {wanted} (one per domain). "
            f"Got {value!r} instead."
        )
    return list(value)
