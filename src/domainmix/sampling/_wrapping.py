"""Who iterates the sampler: a wrapper that re-shards its batches (refused), and a loader's prefetch depth.

Accelerate's ``prepare`` wraps a loader's batch sampler in ``BatchSamplerShard`` in a multi-process run:
every rank iterates the whole sampler and keeps every ``world``-th batch (or a slice of each). A
``DomainBatchSampler`` already yields this rank's share of one global plan, so the wrapper drops batches
and runs the sampler ahead of the loop, with no error of its own (accelerate issues #4199, #4075). The
wrapper is visible only as the caller of the sampler's iterator, so that is where it is looked for.

The same caller tells how far a ``DataLoader`` runs ahead of the loop (``num_workers *
prefetch_factor``), which decides the batch a weight change lands on; the sampler records it so that a
resume under another depth is refused instead of silently following another schedule.
"""

from __future__ import annotations

from types import FrameType

from torch.utils.data.dataloader import _BaseDataLoaderIter

__all__ = ["check_not_resharded", "check_same_depth", "loader_depth", "prefetch_depth"]

# (module prefix, class name) of wrappers that deal batches out to the processes: Accelerate's
# BatchSamplerShard (each rank iterates the whole sampler and keeps every world-th batch) and its
# DataLoaderDispatcher (rank 0 alone iterates and splits each batch among the ranks: dispatch_batches,
# Accelerate's default for an IterableDataset).
_RESHARDERS = (("accelerate", "BatchSamplerShard"), ("accelerate", "DataLoaderDispatcher"))
_FRAMES_SEARCHED = 12  # the dispatcher sits a few frames above the DataLoader iterator that calls next()
_NEXT_INDEX = _BaseDataLoaderIter._next_index.__code__  # where every DataLoader iterator asks for a batch


def check_not_resharded(caller: FrameType | None, owner: str) -> None:
    """Raise if ``caller`` (the frame iterating the sampler) or a frame above it is a re-sharding wrapper.

    Raises:
        ValueError: naming the wrapper and the supported way.
    """
    frame = caller
    for _ in range(_FRAMES_SEARCHED):
        if frame is None:
            return
        # The running code's class and module, not frame.f_locals: before Python 3.13 reading f_locals
        # copies the locals into a dict that the frame keeps, so a training loop's frame would hold what
        # its locals were then (a loader iterator, a checkpoint it later deletes) until it returns.
        module, cls = frame.f_globals.get("__name__", ""), frame.f_code.co_qualname.split(".")[0]
        if any(module.startswith(m) and cls == n for m, n in _RESHARDERS):
            raise ValueError(
                f"{owner} is being iterated under {module}.{cls}, which deals its batches "
                "out to the processes again; the sampler already yields this rank's share of one global "
                "plan, so the ranks would drop or skip batches. Keep the loader out of accelerator.prepare() "
                "(and out of dispatch_batches): use domainmix.integrations.accelerate.prepare_loader("
                "accelerator, loader), which places batches on the device without re-sharding."
            )
        frame = frame.f_back


def prefetch_depth(caller: FrameType | None) -> int:
    """Batches a ``DataLoader`` iterating the sampler from ``caller`` runs ahead; 0 for any other caller."""
    if caller is None or caller.f_code is not _NEXT_INDEX:
        return 0  # not a DataLoader iterator: its locals are left alone (see check_not_resharded)
    owner = caller.f_locals.get("self")  # a frame that returns right after it asked for the batch
    if not isinstance(owner, _BaseDataLoaderIter):
        return 0
    return loader_depth(owner._num_workers, getattr(owner, "_prefetch_factor", None))


def loader_depth(num_workers: int, prefetch_factor: int | None) -> int:
    """Batches a ``DataLoader`` so configured runs ahead of the loop: ``num_workers * prefetch_factor``."""
    return int(num_workers) * int(prefetch_factor or 0) if num_workers else 0


def check_same_depth(owner: str, saved: int | None, depth: int, remedy: str) -> None:
    """Refuse to resume a state saved ``saved`` batches ahead (``None``: not recorded) under ``depth``.

    Raises:
        ValueError: naming both depths, why they matter, and ``remedy``.
    """
    if saved is not None and saved != depth:
        raise ValueError(
            f"{owner}: the state was saved while the loader ran {saved} batches ahead (num_workers * "
            f"prefetch_factor); the loader now runs {depth} ahead. A weight change lands on the batch after "
            f"the prefetched ones, so this run would follow another schedule than the saved one. {remedy}"
        )
