"""Samplers that draw batches with a controllable, exactly resumable mix of domains."""

from domainmix._apportion import allocate_counts
from domainmix.sampling._batch_sampler import DomainBatchSampler
from domainmix.sampling._heldout import HeldoutSplit, split_heldout
from domainmix.sampling._iterable import DomainMixingIterable
from domainmix.sampling._plan import Mode, StopRule

__all__ = [
    "DomainBatchSampler",
    "DomainMixingIterable",
    "HeldoutSplit",
    "Mode",
    "StopRule",
    "allocate_counts",
    "split_heldout",
]

assert sorted(__all__) == __all__
