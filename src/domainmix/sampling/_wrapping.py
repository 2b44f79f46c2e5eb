"""Refuse a framework wrapper that deals the sampler's batches out to ranks a second time.

Accelerate's ``prepare`` wraps a loader's batch sampler in ``BatchSamplerShard`` in a multi-process run:
every rank iterates the whole sampler and keeps every ``world``-th batch (or a slice of each). A
``DomainBatchSampler`` already yields this rank's share of one global plan, so the wrapper drops batches
and runs the sampler ahead of the loop, with no error of its own (accelerate issues #4199, #4075). The
wrapper is visible only as the caller of the sampler's iterator, so that is where it is looked for.
"""

from __future__ import annotations

from types import FrameType

__all__ = ["check_not_resharded"]

# (module prefix, class name) of wrappers that shard batches by process
_RESHARDERS = (("accelerate", "BatchSamplerShard"),)


def check_not_resharded(caller: FrameType | None, owner: str) -> None:
    """Raise if ``caller`` (the frame iterating the sampler) belongs to a known re-sharding wrapper.

    Raises:
        ValueError: naming the wrapper and the supported way.
    """
    wrapper = caller.f_locals.get("self") if caller is not None else None
    kind = type(wrapper)
    if any(kind.__module__.startswith(m) and kind.__name__ == n for m, n in _RESHARDERS):
        raise ValueError(
            f"{owner} is being iterated by {kind.__module__}.{kind.__name__}, which deals its batches out "
            "to the processes again; the sampler already yields this rank's share of one global plan, so "
            "every rank would drop batches. Keep the loader out of accelerator.prepare(): use "
            "domainmix.integrations.accelerate.prepare_loader(accelerator, loader), which places batches "
            "on the device without re-sharding."
        )
