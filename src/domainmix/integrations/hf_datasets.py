"""Hugging Face ``datasets`` as domains: a column of a map-style ``Dataset``, or streaming sources.

Map-style: :func:`domains_from_column` turns a column that names each example's domain into the
``domains`` of a :class:`~domainmix.sampling.DomainBatchSampler` and adds an integer id column in the
sampler's domain order, for ``domain_losses``. Streaming: :func:`streaming_sources` shards each
``IterableDataset`` by rank for a :class:`~domainmix.sampling.DomainMixingIterable`, which shards no
source itself; inside ``DataLoader`` workers a Hugging Face ``IterableDataset`` shards itself by worker
(it needs at least as many shards as workers). The mixing iterable calls ``set_epoch`` with each pass
number, so every pass is reshuffled and a restored state applies only to the pass it was saved in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from datasets import ClassLabel, Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node

from domainmix._distributed import resolve_rank_world
from domainmix._validation import param_error

__all__ = ["ColumnDomains", "domains_from_column", "streaming_sources"]


class ColumnDomains(NamedTuple):
    """What :func:`domains_from_column` returns.

    Attributes:
        dataset: the dataset with the id column added.
        domains: domain name -> indices of its examples (ascending), in the order the ids count.
    """

    dataset: Dataset
    domains: dict[str, np.ndarray]


def domains_from_column(dataset: Dataset, column: str, *, id_column: str = "domain_id") -> ColumnDomains:
    """Group a map-style dataset's rows by the value of ``column``; add the integer domain id per row.

    Domains are named by the column's values: a ``ClassLabel`` column gives its label names in label
    order, any other column its distinct values (as ``str``) in sorted order. Domain ``j`` of the
    returned mapping has id ``j`` in ``id_column``, so ``domain_losses(per_example, batch[id_column], k)``
    matches a sampler built on ``domains``.

    Args:
        dataset: a ``datasets.Dataset`` (map-style).
        column: the column that names each example's domain.
        id_column: the name of the added int64 column (default ``"domain_id"``); must not exist yet.

    Raises:
        ValueError: for a missing ``column``, an existing ``id_column``, or an empty dataset.

    Examples:
        >>> ds = Dataset.from_dict({"text": ["a", "b", "c"], "source": ["web", "code", "web"]})
        >>> ds, domains = domains_from_column(ds, "source")
        >>> {name: ix.tolist() for name, ix in domains.items()}, list(ds["domain_id"])
        ({'code': [1], 'web': [0, 2]}, [1, 0, 1])
    """
    caller = "domains_from_column"
    if column not in dataset.column_names:
        raise param_error(caller, "column", f"one of the dataset's columns {dataset.column_names}", column)
    if id_column in dataset.column_names:
        raise param_error(caller, "id_column", "a name that is not a column yet", id_column)
    if len(dataset) == 0:
        raise param_error(caller, "dataset", "a dataset with at least one row", dataset)
    # Through the dataset's index mapping (shuffle, select, filter, sort, splits): dataset.data is the
    # underlying table in its stored order, with rows the dataset may not even hold.
    values = dataset.with_format("arrow")[column].to_numpy(zero_copy_only=False)
    feature = dataset.features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        ids = values.astype(np.int64)
    else:
        labels, ids = np.unique(values.astype(str), return_inverse=True)
        names = labels.tolist()
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(len(names) + 1))
    domains = {name: order[bounds[j] : bounds[j + 1]] for j, name in enumerate(names)}
    return ColumnDomains(dataset.add_column(id_column, ids.astype(np.int64)), domains)


def streaming_sources(
    sources: Mapping[str, IterableDataset], *, rank: int | None = None, world_size: int | None = None
) -> dict[str, IterableDataset]:
    """Each streaming source's shard for this rank (``datasets.distributed.split_dataset_by_node``).

    Args:
        sources: domain name -> ``datasets.IterableDataset``.
        rank: this process's rank; default from ``torch.distributed``, then ``RANK``, then 0.
        world_size: number of ranks; default from ``torch.distributed``, then ``WORLD_SIZE``, then 1.

    Raises:
        ValueError: when a source is not a ``datasets.IterableDataset``.
    """
    rank, world = resolve_rank_world("streaming_sources", rank, world_size)
    out: dict[str, Any] = {}
    for name, source in sources.items():
        if not isinstance(source, IterableDataset):
            raise param_error(
                "streaming_sources", "sources", f"datasets.IterableDataset values (domain {name!r})", source
            )
        out[name] = source if world == 1 else split_dataset_by_node(source, rank=rank, world_size=world)
    return out
