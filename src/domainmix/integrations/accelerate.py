"""Hugging Face Accelerate with a :class:`~domainmix.sampling.DomainBatchSampler`.

``accelerator.prepare(loader)`` must not see the loader: in a multi-process run it wraps the batch
sampler in its own ``BatchSamplerShard``, which deals whole batches round-robin to the processes, while
the domain sampler already yields each rank's share of one global plan (so each rank would drop half its
batches; the sampler refuses that wrapper with a ``ValueError``). :func:`prepare_loader` is the supported
way: the same device placement, no re-sharding. Prepare the model and optimizer with
``accelerator.prepare`` as usual, and checkpoint the sampler with ``state_dict(consumed=step)``
(``docs/design.md``, "Weight changes, prefetch and resume").
"""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from domainmix._validation import param_error
from domainmix.sampling import DomainBatchSampler

__all__ = ["prepare_loader"]


def prepare_loader(accelerator: Accelerator, loader: DataLoader[Any]) -> Any:
    """Accelerate's device placement for a loader on a ``DomainBatchSampler``, without re-sharding.

    Args:
        accelerator: the run's ``Accelerator``; its process count and index must be the sampler's world
            size and rank (build the sampler after the ``Accelerator``, which starts the process group).
        loader: a ``DataLoader`` built with ``batch_sampler=DomainBatchSampler(...)``.

    Returns:
        Accelerate's ``DataLoaderShard`` over the same batch sampler: batches on ``accelerator.device``.

    Raises:
        ValueError: when the loader has no ``DomainBatchSampler``, its rank or world size disagree with
            the accelerator's, or the accelerator splits batches (``split_batches=True``): the sampler's
            batches are already each rank's own, so a split would not happen and the batch size would
            silently be per rank, not global.
    """
    sampler = loader.batch_sampler
    if not isinstance(sampler, DomainBatchSampler):
        raise param_error(
            "prepare_loader", "loader", "a DataLoader with batch_sampler=DomainBatchSampler(...)", loader
        )
    if getattr(accelerator, "split_batches", False):
        raise param_error(
            "prepare_loader", "accelerator",
            "an Accelerator without split_batches (the sampler's batch_size is per rank; for a global batch "
            "of G on W processes give it batch_size=G // W)", "split_batches=True",
        )  # fmt: skip
    rank, world = sampler.rank, sampler.world_size
    if (rank, world) != (accelerator.process_index, accelerator.num_processes):
        raise param_error(
            "prepare_loader", "loader",
            f"a sampler of rank {accelerator.process_index} in a world of {accelerator.num_processes} "
            f"(the accelerator's; this sampler is rank {rank} of {world}: build it after the Accelerator)",
            loader,
        )  # fmt: skip
    # num_processes=1: Accelerate leaves the batch sampler as it is and only moves batches to the device.
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=1,
        process_index=0,
        put_on_device=True,
        dispatch_batches=False,
        even_batches=False,
        non_blocking=accelerator.non_blocking,
    )
