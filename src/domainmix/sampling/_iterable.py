"""DomainMixingIterable: mix several iterable sources with the sampler's weight semantics."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from domainmix._distributed import resolve_rank_world
from domainmix._validation import Interval, check_param, param_error
from domainmix.sampling._allocation import allocate_counts
from domainmix.sampling._plan import BLOCK, Mode, StopRule, check_mix_options, plan_block
from domainmix.sampling._weights import WeightSchedule, WeightsLike, check_names

__all__ = ["DomainMixingIterable"]


class _EpochEnd(Exception):
    """A positive-weight source ran dry under ``first_exhausted``."""


class DomainMixingIterable(IterableDataset):
    """Interleave iterable sources (e.g. streaming datasets) by domain weights; yield ``(name, item)``.

    Every item comes tagged with its domain as a ``(domain_name, item)`` tuple, so the per-domain loss can
    be computed downstream. The domain of each slot follows the same global plan as
    :class:`DomainBatchSampler`: ``"stratified"`` makes every consecutive group of ``batch_size`` items
    (per rank) one share of an exactly composed global batch of ``batch_size * world_size`` items,
    ``"low_discrepancy"`` keeps each domain's count within one item of ``q_i t``, ``"iid"`` draws domains
    independently.

    Distribution: each rank (and each DataLoader worker, see below) must be given its OWN shard of every
    source, as streaming datasets usually are (``split_dataset_by_node``, a source that shards itself with
    ``get_worker_info``); this class does not split sources. It splits the global domain plan: rank r of W
    takes global slots r, r + W, ... (dealt by domain in stratified mode), so all ranks together follow
    the target mix exactly. Inside a DataLoader with ``num_workers = m``, worker w of rank r acts as rank
    ``r * m + w`` of ``W * m``; the DataLoader's ``batch_size`` should equal ``batch_size`` so a collated
    batch is one planned batch.

    Weights: :meth:`set_weights` takes effect from the next planned batch of ``batch_size`` items.
    ``weights=None`` means uniform (source lengths are unknown).

    Stop rules (:class:`StopRule`): ``cycle_forever`` re-iterates a finished source (``iter(source)``
    again) and never ends unless ``num_batches`` is set; ``first_exhausted`` ends the epoch as soon as a
    positive-weight source runs out (the last batch may be partial); ``all_exhausted`` re-iterates
    finished sources and ends after the batch in which the last positive-weight source is found
    exhausted. Zero-weight sources are never pulled, so they never block. In the exhaustion modes every
    epoch starts every source afresh.

    State (``state_dict``): this object's counters, the weight history, and per source the pass number,
    the items consumed in that pass, the exhausted flag and, when the source has ``state_dict()``, its
    state. On resume a source with ``load_state_dict`` gets its state back before ``iter(source)``;
    any other source is re-iterated from the start and the consumed items are skipped (replayed), which
    is exact for deterministic sources and costs the time to read them. The state describes the object
    in the calling process, so checkpoint with ``num_workers=0`` or a loader that collects worker
    states (torchdata ``StatefulDataLoader``).

    Args:
        sources: domain name -> iterable (an ``IterableDataset``, a generator factory's product is NOT
            enough for cycling: it must be re-iterable).
        weights: domain weights (mapping, sequence or tensor); ``None``: uniform.
        mode: ``"low_discrepancy"`` (default), ``"stratified"`` or ``"iid"``.
        batch_size: items per planned batch on each rank, an int >= 1 (default 1); set it to the
            DataLoader batch size for stratified mode.
        min_count: stratified only: minimum items per positive-weight domain per global batch.
        stop: ``"cycle_forever"`` (default), ``"first_exhausted"`` or ``"all_exhausted"``.
        num_batches: planned batches per ``__iter__`` or ``None`` (default).
        seed: an int >= 0 (default 0).
        rank: default from ``torch.distributed``, then ``RANK``, then 0.
        world_size: default from ``torch.distributed``, then ``WORLD_SIZE``, then 1.

    Raises:
        ValueError: for any invalid argument, naming it.
    """

    EPOCH_KEY = "epoch"
    BATCH_KEY = "batches_in_epoch"
    TOTAL_KEY = "total_batches"
    OFFSET_KEY = "offset_in_batch"
    LD_COUNTS_KEY = "low_discrepancy_counts"
    LD_FROM_KEY = "low_discrepancy_from"
    PASS_KEY = "source_passes"
    CONSUMED_KEY = "source_consumed"
    EXHAUSTED_KEY = "sources_exhausted"
    SOURCE_STATES_KEY = "source_states"
    HISTORY_KEY = "weight_history"
    FINGERPRINT_KEY = "fingerprint"
    _STATE_KEYS = (
        EPOCH_KEY, BATCH_KEY, TOTAL_KEY, OFFSET_KEY, LD_COUNTS_KEY, LD_FROM_KEY, PASS_KEY, CONSUMED_KEY,
        EXHAUSTED_KEY, SOURCE_STATES_KEY, HISTORY_KEY, FINGERPRINT_KEY,
    )  # fmt: skip

    def __init__(
        self,
        sources: Mapping[str, Iterable[Any]],
        weights: WeightsLike | None = None,
        *,
        mode: Literal["stratified", "low_discrepancy", "iid"] = "low_discrepancy",
        batch_size: int = 1,
        min_count: int = 0,
        stop: Literal["cycle_forever", "first_exhausted", "all_exhausted"] = "cycle_forever",
        num_batches: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        caller = "DomainMixingIterable"
        self._names = check_names(caller, "sources", sources)
        for name in self._names:
            if not isinstance(sources[name], Iterable):
                raise param_error(
                    caller, "sources", f"a mapping to iterables (domain {name!r})", sources[name]
                )
        check_mix_options(caller, mode, batch_size, min_count, stop, num_batches, seed)
        self._rank, self._world = resolve_rank_world(caller, rank, world_size)
        self._sources = [sources[n] for n in self._names]
        self._mode, self._batch_size, self._stop = mode, batch_size, stop
        self._num_batches, self._seed, self._min_count = num_batches, seed, min_count
        k = len(self._names)
        # Sources have unknown sizes: give them size 1 so the schedule only checks weights.
        self._schedule = WeightSchedule(self._names, [1] * k, mode, batch_size * self._world, min_count)
        q = (1.0 / k,) * k if weights is None else self._schedule.check(caller, "weights", weights)
        self._schedule.set(0, q)
        self._epoch = self._batch = self._total = self._offset = 0
        self._ld = np.zeros(k, dtype=np.int64)
        self._ld_from = 0
        self._passes = [0] * k
        self._consumed = [0] * k
        self._exhausted = [False] * k
        self._iters: list[Iterator[Any] | None] = [None] * k
        # ("restore", saved source state or None) waiting for the next iter(source); None: a plain new pass
        self._restore: list[tuple[str, Any] | None] = [None] * k
        self._plan: tuple[Any, ...] | None = None  # (first batch, ids, ld_after, from_batch, (rank, world))

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain names."""
        return self._names

    @property
    def weights(self) -> Tensor:
        """(k,) float64 tensor: q for the next planned batch."""
        return torch.tensor(self._schedule.at(self._next_batch_clock())[1], dtype=torch.float64)

    @property
    def weight_history(self) -> list[tuple[int, list[float]]]:
        """``[(from_batch, q)]`` with ``from_batch`` counted in planned batches since construction."""
        return [(b, list(q)) for b, q in self._schedule.entries]

    def _next_batch_clock(self) -> int:
        return self._total + (1 if self._offset else 0)

    def set_weights(self, weights: WeightsLike) -> None:
        """Use ``weights`` from the next planned batch on."""
        q = self._schedule.check("DomainMixingIterable.set_weights", "weights", weights)
        self._schedule.set(self._next_batch_clock(), q)
        self._plan = None

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch`` (a no-op for the current epoch, so a resume is kept)."""
        epoch = check_param("DomainMixingIterable.set_epoch", "epoch", epoch, Interval(int, 0, None))
        if epoch != self._epoch:
            self._start_epoch(epoch)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """Yield ``(domain_name, item)`` for the rest of the current epoch."""
        rank, world = self._rank, self._world
        info = get_worker_info()
        if info is not None:
            rank, world = rank * info.num_workers + info.id, world * info.num_workers
        epoch = self._epoch
        while self._epoch == epoch:
            if self._offset == 0 and self._epoch_over():
                self._start_epoch(self._epoch + 1)
                return
            ids = self._batch_ids(rank, world)
            i = int(ids[self._offset])
            try:
                item = self._pull(i)
            except _EpochEnd:
                self._start_epoch(self._epoch + 1)
                return
            self._offset += 1
            if self._offset == len(ids):
                self._finish_batch()
            yield self._names[i], item

    def _epoch_over(self) -> bool:
        if self._num_batches is not None and self._batch >= self._num_batches:
            return True
        if self._stop != StopRule.ALL_EXHAUSTED:
            return False
        active = self._schedule.active(self._schedule.at(self._total)[1])
        return bool(np.asarray(self._exhausted)[active].all())

    def _batch_ids(self, rank: int, world: int) -> np.ndarray:
        plan = self._plan
        if plan is None or not plan[0] <= self._total < plan[0] + len(plan[1]) or plan[4] != (rank, world):
            from_batch, q = self._schedule.at(self._total)
            ld = self._ld if self._ld_from == from_batch else np.zeros_like(self._ld)
            cycling = self._stop == StopRule.CYCLE_FOREVER
            epoch_key, key = (0, self._total) if cycling else (self._epoch, self._batch)
            nb = BLOCK - key % BLOCK
            change = self._schedule.next_change(self._total)
            if change is not None:
                nb = min(nb, change - self._total)
            alloc = np.zeros(len(q), np.int64)
            if self._mode == Mode.STRATIFIED:  # per block; the global batch grows with DataLoader workers
                alloc = allocate_counts(np.asarray(q), self._batch_size * world, self._min_count)
            p = plan_block(
                self._mode, np.asarray(q), alloc, ld, seed=self._seed, epoch_key=epoch_key, batch_key=key,
                nb=nb, batch_size=self._batch_size, world_size=world, rank=rank,
            )  # fmt: skip
            ids = p.ids if p.order is None else p.ids[:, p.order]
            self._plan = plan = (self._total, ids, p.ld_after, from_batch, (rank, world))
        row = self._total - plan[0]
        return plan[1][row]

    def _finish_batch(self) -> None:
        plan = self._plan
        assert plan is not None  # set by _batch_ids for the batch being finished
        self._ld = np.asarray(plan[2][self._total - plan[0]]).copy()
        self._ld_from = plan[3]
        self._total += 1
        self._batch += 1
        self._offset = 0

    def _pull(self, i: int) -> Any:
        it = self._iters[i] if self._iters[i] is not None else self._open(i)
        try:
            item = next(it)
        except StopIteration:
            self._exhausted[i] = True
            if self._stop == StopRule.FIRST_EXHAUSTED:
                raise _EpochEnd from None
            self._passes[i] += 1
            self._consumed[i] = 0
            it = self._open(i)
            try:
                item = next(it)
            except StopIteration:
                raise RuntimeError(
                    f"DomainMixingIterable: source {self._names[i]!r} yielded nothing on a new pass; a "
                    "source with positive weight must be re-iterable and non-empty."
                ) from None
        self._consumed[i] += 1
        return item

    def _open(self, i: int) -> Iterator[Any]:
        source, restore = self._sources[i], self._restore[i]
        self._restore[i] = None
        if restore is not None and restore[1] is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(restore[1])
            it = iter(source)
        else:
            it = iter(source)
            if restore is not None:
                # replay: a deterministic source gives back exactly the items consumed before the save
                for _ in itertools.islice(it, self._consumed[i]):
                    pass
        self._iters[i] = it
        return it

    def _start_epoch(self, epoch: int) -> None:
        self._epoch, self._batch, self._offset = epoch, 0, 0
        if self._stop != StopRule.CYCLE_FOREVER:
            k = len(self._names)
            self._passes, self._consumed, self._exhausted = [0] * k, [0] * k, [False] * k
            self._iters, self._restore = [None] * k, [None] * k
        self._plan = None

    # ------------------------------------------------------------------ state

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "domains": list(self._names),
            "mode": self._mode,
            "stop": self._stop,
            "batch_size": self._batch_size,
            "world_size": self._world,
            "seed": self._seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """The state after the last yielded item (see the class docstring)."""
        states = [
            s.state_dict()
            if hasattr(s, "state_dict") and self._iters[i] is not None
            else (self._restore[i] or (None, None))[1]
            for i, s in enumerate(self._sources)
        ]
        return {
            self.EPOCH_KEY: self._epoch,
            self.BATCH_KEY: self._batch,
            self.TOTAL_KEY: self._total,
            self.OFFSET_KEY: self._offset,
            self.LD_COUNTS_KEY: self._ld.tolist(),
            self.LD_FROM_KEY: self._ld_from,
            self.PASS_KEY: list(self._passes),
            self.CONSUMED_KEY: list(self._consumed),
            self.EXHAUSTED_KEY: list(self._exhausted),
            self.SOURCE_STATES_KEY: states,
            self.HISTORY_KEY: self._schedule.as_state(),
            self.FINGERPRINT_KEY: self._fingerprint(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; sources are reopened lazily (restored or replayed).

        Raises:
            ValueError: for missing keys or a fingerprint that differs from this object's.
        """
        caller = "DomainMixingIterable.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise param_error(caller, "state_dict", "a mapping from state_dict()", state_dict)
        missing = [key for key in self._STATE_KEYS if key not in state_dict]
        if missing:
            raise param_error(
                caller,
                "state_dict",
                f"a mapping with every state key (missing: {missing})",
                sorted(state_dict),
            )
        mine, saved = self._fingerprint(), state_dict[self.FINGERPRINT_KEY]
        diff = [
            f"{key}: saved {saved.get(key)!r}, now {v!r}" for key, v in mine.items() if saved.get(key) != v
        ]
        if diff:
            raise param_error(
                caller, "state_dict", f"saved with the same fingerprint; differs in {'; '.join(diff)}",
                "a mismatching state",
            )  # fmt: skip
        self._schedule.load(caller, "state_dict", state_dict[self.HISTORY_KEY])
        self._epoch = int(state_dict[self.EPOCH_KEY])
        self._batch = int(state_dict[self.BATCH_KEY])
        self._total = int(state_dict[self.TOTAL_KEY])
        self._offset = int(state_dict[self.OFFSET_KEY])
        self._ld = np.asarray(state_dict[self.LD_COUNTS_KEY], dtype=np.int64)
        self._ld_from = int(state_dict[self.LD_FROM_KEY])
        self._passes = [int(x) for x in state_dict[self.PASS_KEY]]
        self._consumed = [int(x) for x in state_dict[self.CONSUMED_KEY]]
        self._exhausted = [bool(x) for x in state_dict[self.EXHAUSTED_KEY]]
        k = len(self._names)
        saved_states = list(state_dict[self.SOURCE_STATES_KEY])
        self._restore = [("restore", saved_states[i]) for i in range(k)]
        self._iters = [None] * k
        self._plan = None
