"""Find a sampler's states inside a framework's nested checkpoint and rebuild them at a consumed batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from domainmix.sampling import DomainBatchSampler


def sampler_states(state: Any, sampler: DomainBatchSampler) -> list[Mapping[str, Any]]:
    """The states of ``sampler`` nested anywhere in ``state``, found by their fingerprint."""
    fingerprint = sampler.state_dict()[sampler.FINGERPRINT_KEY]
    found: list[Mapping[str, Any]] = []

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for value in node:
                visit(value)
        elif isinstance(node, Mapping):
            if node.get(sampler.FINGERPRINT_KEY) == fingerprint and sampler.TOTAL_KEY in node:
                found.append(node)
            else:
                for value in node.values():
                    visit(value)

    visit(state)
    return found


def with_sampler_states(
    state: Any, sampler: DomainBatchSampler, consumed: Callable[[Mapping[str, Any]], int]
) -> Any:
    """``state`` with each nested state of ``sampler`` replaced by ``sampler.state_dict(consumed=...)``.

    The sampler's states are found by their fingerprint rather than by a framework's private key names;
    ``consumed(found)`` gives the batch count to rebuild each at (the found state's own count, or the
    count the loop has really consumed when the framework saved a prefetched one).
    """
    fingerprint = sampler.state_dict()[sampler.FINGERPRINT_KEY]

    def rebuild(node: Any) -> Any:
        if isinstance(node, list):  # e.g. Lightning's combined loader: one state per loader
            return [rebuild(value) for value in node]
        if not isinstance(node, Mapping):
            return node
        if node.get(sampler.FINGERPRINT_KEY) == fingerprint and sampler.TOTAL_KEY in node:
            return sampler.state_dict(consumed=consumed(node))
        return {key: rebuild(value) for key, value in node.items()}

    return rebuild(state)
