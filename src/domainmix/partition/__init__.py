"""Regrouping domains before training: DIDS's gradient-clustered partition of each source domain.

:func:`repartition` splits every domain into k-means clusters of its examples' gradient features
(:func:`~domainmix.stats.gradient_sketch`) and returns a :class:`Partition` (names ``"<source>/<cluster>"``,
each group's parent, a digest), cached to disk. ``Partition.domains()`` feeds a ``DomainBatchSampler``;
``Partition.carry_weights`` moves sampling weights from the sources to the groups; ``dids(partition=...)``
ties the strategy's state to the partition.
"""

from domainmix.partition._repartition import Partition as Partition
from domainmix.partition._repartition import load_partition as load_partition
from domainmix.partition._repartition import repartition as repartition

__all__ = ["Partition", "load_partition", "repartition"]
assert sorted(__all__) == __all__
