"""Find a sampler's states inside a framework's nested checkpoint and rebuild them at a consumed batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from domainmix.sampling import DomainBatchSampler


def sampler_states(state: Any, sampler: DomainBatchSampler) -> list[Mapping[str, Any]]:
    """The states of ``sampler`` nested anywhere in ``state``, found by their fingerprint."""
    found: list[Mapping[str, Any]] = []

    def keep(node: Mapping[str, Any]) -> Mapping[str, Any]:
        found.append(node)
        return node

    _replace_states(state, sampler, keep)
    return found


def with_sampler_states(
    state: Any, sampler: DomainBatchSampler, consumed: Callable[[Mapping[str, Any]], int]
) -> Any:
    """``state`` with each nested state of ``sampler`` replaced by ``sampler.state_dict(consumed=...)``.

    The sampler's states are found by their fingerprint rather than by a framework's private key names;
    ``consumed(found)`` gives the batch count to rebuild each at (the found state's own count, or the
    count the loop has really consumed when the framework saved a prefetched one).
    """
    return _replace_states(state, sampler, lambda node: sampler.state_dict(consumed=consumed(node)))


def _replace_states(
    state: Any, sampler: DomainBatchSampler, replace: Callable[[Mapping[str, Any]], Any]
) -> Any:
    """``state`` rebuilt with ``replace(node)`` in place of every nested state of ``sampler``."""
    fingerprint = sampler.state_dict()[sampler.FINGERPRINT_KEY]

    def rebuild(node: Any) -> Any:
        if isinstance(node, list):  # e.g. Lightning's combined loader: one state per loader
            return [rebuild(value) for value in node]
        if not isinstance(node, Mapping):
            return node
        if node.get(sampler.FINGERPRINT_KEY) == fingerprint and sampler.TOTAL_KEY in node:
            return replace(node)
        return {key: rebuild(value) for key, value in node.items()}

    return rebuild(state)
