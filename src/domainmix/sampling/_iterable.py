"""DomainMixingIterable: mix several iterable sources with the sampler's weight semantics."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from domainmix._state import state_counts, state_list
from domainmix._validation import Interval, check_param, param_error
from domainmix.sampling._mixer import Counters, DomainMixer
from domainmix.sampling._plan import StopRule, check_mix_options, in_yield_order
from domainmix.sampling._weights import WeightsLike, check_names
from domainmix.sampling._wrapping import check_not_resharded

__all__ = ["DomainMixingIterable"]


# Workers whose copies are tracked (one flag each, shared memory); a later worker id goes unchecked.
_WORKER_SLOTS = 256


class _EpochEnd(Exception):
    """A positive-weight source ran dry under ``first_exhausted``."""


# Each rank (and worker) ends its epoch on its own shards: one whose share of the plan never holds some
# domain never finds that source exhausted, and its epoch would never end while the others' do.
_ALL_EXHAUSTED_ALONE = (
    "'first_exhausted' or 'cycle_forever' (with num_batches) when the plan is split among ranks or "
    "DataLoader workers: 'all_exhausted' waits for every source to run out on each one, and a share of "
    "the plan may never draw some domain, so that epoch would never end"
)


class _Rows(NamedTuple):
    """The planned domain ids of a block of batches, for one (rank, world) pair."""

    first: int  # the global batch of row 0
    ids: np.ndarray  # (nb, batch_size) domain ids in yield order
    ld_after: np.ndarray  # (nb, k) low-discrepancy counts after each row
    from_batch: int  # the weight-history entry the block was planned with
    where: tuple[int, int]  # (rank, world), with DataLoader workers counted as ranks
    lag: tuple[float, ...]  # the low-discrepancy lags carried into the schedule from from_batch


class DomainMixingIterable(DomainMixer, IterableDataset[tuple[str, Any]]):
    """Interleave iterable sources (e.g. streaming datasets) by domain weights; yield ``(name, item)``.

    Every item comes tagged with its domain name, so the per-domain loss can be computed downstream. The
    domain of each slot follows the same global plan as :class:`DomainBatchSampler` (modes, weight
    changes from the next planned batch of ``batch_size`` items, stop rules), but items come from the
    sources in their own order. Each rank, and each DataLoader worker, must be given its own shard of
    every source; this class splits the domain plan, not the sources. Sources with ``state_dict()`` /
    ``load_state_dict()`` are restored on resume, others are replayed from their start. The details
    (workers, stop rules on sources, resume) are in ``docs/design.md``, "The mixing iterable".
    DataLoader workers iterate copies: a ``set_weights`` on this object after they started, or a second
    pass of non-persistent workers from this object's (never advanced) state, raises in the worker.

    State keys (``state_dict``): ``EPOCH_KEY``, ``BATCH_KEY``, ``TOTAL_KEY``, ``OFFSET_KEY`` (items of the
    current batch already yielded), ``LD_COUNTS_KEY`` / ``LD_FROM_KEY`` / ``LD_LAG_KEY``, and per source
    ``PASS_KEY``,
    ``CONSUMED_KEY`` (items read in the current pass), ``EXHAUSTED_KEY``, ``SOURCE_EPOCHS_KEY`` (passes
    begun since construction), ``SOURCE_STATES_KEY``; then
    ``HISTORY_KEY`` and ``FINGERPRINT_KEY``. The state describes the object in the calling process:
    checkpoint with ``num_workers=0`` or a loader that collects worker states.

    Args:
        sources: domain name -> re-iterable source (an ``IterableDataset`` or a list, not a generator:
            cycling calls ``iter(source)`` again).
        weights: domain weights (mapping, sequence or tensor); ``None``: uniform.
        mode: ``"low_discrepancy"`` (default), ``"stratified"`` or ``"iid"``.
        batch_size: items per planned batch on each rank, an int >= 1 (default 1); set it to the
            DataLoader batch size for stratified mode.
        min_count: stratified only: minimum items per positive-weight domain per global batch.
        carry_remainder: stratified only: carry the rounding remainders across batches (see
            :class:`DomainBatchSampler`).
        stop: ``"cycle_forever"`` (default), ``"first_exhausted"`` or ``"all_exhausted"`` (one rank and at
            most one DataLoader worker only: see ``_ALL_EXHAUSTED_ALONE``).
        num_batches: planned batches per ``__iter__`` or ``None`` (default).
        seed: an int >= 0 (default 0).
        rank: default from ``torch.distributed``, then ``RANK``, then 0.
        world_size: default from ``torch.distributed``, then ``WORLD_SIZE``, then 1.

    Raises:
        ValueError: for any invalid argument, naming it.
    """

    OFFSET_KEY = "offset_in_batch"
    PASS_KEY = "source_passes"
    CONSUMED_KEY = "source_consumed"
    EXHAUSTED_KEY = "sources_exhausted"
    SOURCE_EPOCHS_KEY = "source_epochs"
    SOURCE_STATES_KEY = "source_states"
    _STATE_KEYS = (
        DomainMixer.EPOCH_KEY, DomainMixer.BATCH_KEY, DomainMixer.TOTAL_KEY, OFFSET_KEY,
        DomainMixer.LD_COUNTS_KEY, DomainMixer.LD_FROM_KEY, PASS_KEY, CONSUMED_KEY, EXHAUSTED_KEY,
        SOURCE_EPOCHS_KEY, SOURCE_STATES_KEY, DomainMixer.HISTORY_KEY, DomainMixer.FINGERPRINT_KEY,
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
        rank: int | None = None, world_size: int | None = None,  # None: from torch.distributed or env
        carry_remainder: bool = False,
    ) -> None:  # fmt: skip
        caller = "DomainMixingIterable"
        names = check_names(caller, "sources", sources)
        for name in names:
            if not isinstance(sources[name], Iterable):
                raise param_error(
                    caller, "sources", f"a mapping to iterables (domain {name!r})", sources[name]
                )
            if isinstance(sources[name], Iterator):  # a second pass would find it empty
                raise param_error(
                    caller, "sources",
                    f"re-iterable sources, not iterators or generators (domain {name!r}; wrap it in a list "
                    "or an IterableDataset)", type(sources[name]).__name__,
                )  # fmt: skip
        check_mix_options(caller, mode, batch_size, min_count, stop, num_batches, seed, carry_remainder)
        k = len(names)
        # Source lengths are unknown: size 1 each, so weights=None means uniform and no source is "empty".
        super().__init__(
            caller, names, [1] * k, weights, mode=mode, batch_size=batch_size, min_count=min_count,
            stop=stop, num_batches=num_batches, seed=seed, rank=rank, world_size=world_size,
            carry_remainder=carry_remainder,
        )  # fmt: skip
        if stop == "all_exhausted" and self._world > 1:
            raise param_error(
                caller, "stop", _ALL_EXHAUSTED_ALONE, f"'all_exhausted' with world_size={self._world}"
            )
        self._sources = [sources[n] for n in names]
        self._epoch = self._batch = self._total = self._offset = 0
        self._ld = np.zeros(k, dtype=np.int64)
        self._ld_from = 0
        self._ld_lag: tuple[float, ...] = (0.0,) * k
        self._passes = [0] * k
        self._consumed = [0] * k
        self._exhausted = [False] * k
        self._source_epochs = [0] * k  # passes begun per source since construction (its set_epoch value + 1)
        self._iters: list[Iterator[Any] | None] = [None] * k
        # ("restore", saved source state or None) waiting for the next iter(source); None: a plain new pass
        self._restore: list[tuple[str, Any] | None] = [None] * k
        self._plan: _Rows | None = None
        # DataLoader workers iterate copies of this object, made when the loader's iterator starts
        # (fork or spawn), and nothing they do comes back. This tensor is shared with those copies:
        # [0] counts set_weights calls on this object (a copy knows its own count, `_changes`), and
        # [1 + w] marks that worker w iterated a copy. See _check_worker_copy.
        self._shared = torch.zeros(1 + _WORKER_SLOTS, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        self._changes = 0
        self._own_state = False  # this copy has advanced (or been restored) inside a worker

    def _clock(self) -> int:
        return self._total + (1 if self._offset else 0)

    def _replan(self) -> None:
        self._plan = None

    def _oldest_state(self) -> int:
        return self._needs_from(self._clock(), self._ld_from)

    def _last_batch(self) -> int:
        return self._total if self._offset else max(self._total - 1, 0)

    def set_weights(self, weights: WeightsLike) -> None:
        """Use ``weights`` from the next batch on (:meth:`DomainMixer.set_weights`).

        Under DataLoader workers the change cannot reach the workers' copies: their next batch raises
        a ``ValueError`` instead of going on with the old weights (``docs/integrations.md``).
        """
        super().set_weights(weights)
        self._changes += 1
        self._shared[0] += 1

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch`` (a no-op for the current epoch, so a resume is kept)."""
        epoch = check_param("DomainMixingIterable.set_epoch", "epoch", epoch, Interval(int, 0, None))
        if epoch != self._epoch:
            self._start_epoch(epoch)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """Yield ``(domain_name, item)`` for the rest of the current epoch.

        Raises:
            ValueError: under Accelerate's batch dispatching (``DataLoaderDispatcher``, its default for an
                iterable dataset), which reads every rank's batches from rank 0's iterable alone.
        """
        check_not_resharded(sys._getframe(1), "DomainMixingIterable")
        rank, world, limit = self._rank, self._world, self._num_batches
        info = get_worker_info()
        if info is not None:
            if info.num_workers > 1:
                if self._stop == StopRule.ALL_EXHAUSTED:
                    raise param_error(
                        "DomainMixingIterable", "stop", _ALL_EXHAUSTED_ALONE,
                        f"'all_exhausted' under {info.num_workers} DataLoader workers",
                    )  # fmt: skip
                self._check_worker_sources(info.num_workers)
                rank, world = rank * info.num_workers + info.id, world * info.num_workers
                if limit is not None:  # num_batches counts the rank's batches: deal them to its workers
                    limit = limit // info.num_workers + (info.id < limit % info.num_workers)
            self._check_worker_copy(info.id)
        epoch = self._epoch
        while self._epoch == epoch:
            if info is not None and self._offset == 0:
                self._check_no_weight_change()
            if self._offset == 0 and self._epoch_over(limit):
                self._start_epoch(self._epoch + 1)
                return
            ids = self._batch_ids(rank, world)
            i = int(ids[self._offset])
            try:
                item = self._pull(i)
            except _EpochEnd:
                if self._offset:  # the partial batch took its place on the weight clock (set_weights
                    self._total += 1  # during it applies "from the next batch", the next epoch's first)
                self._start_epoch(self._epoch + 1)
                return
            self._offset += 1
            if self._offset == len(ids):
                self._finish_batch()
            yield self._names[i], item

    def _check_worker_copy(self, worker: int) -> None:
        # A worker starts from a copy of the main process's object, whose state never advances (the
        # workers consume the sources). A second copy for the same worker (non-persistent workers, a
        # new epoch) would repeat the first one's items: refuse it.
        slot = 1 + worker
        if not self._own_state and slot < len(self._shared):
            if int(self._shared[slot]):
                raise ValueError(
                    f"DomainMixingIterable: DataLoader worker {worker} got a new copy of the iterable, "
                    "made from the main process's state, which the workers' progress never reaches; it "
                    "would repeat the items of the earlier pass. Use persistent_workers=True, or "
                    "num_workers=0, or restore a saved state (load_state_dict) before iterating again."
                )
            self._shared[slot] = 1
        self._own_state = True

    def _check_no_weight_change(self) -> None:
        if int(self._shared[0]) != self._changes:
            raise ValueError(
                "DomainMixingIterable: set_weights was called in the main process while DataLoader "
                "workers iterate copies of the iterable; the new weights cannot reach them, and going on "
                "with the old ones would be silently wrong. To change weights during training, use "
                "num_workers=0 (the sources may prefetch on their own) or a map-style dataset with "
                "DomainBatchSampler, whose plan stays in the main process."
            )

    def _check_worker_sources(self, num_workers: int) -> None:
        # Every worker iterates its own copy of each source: a plain iterable would be read in full by
        # every worker (duplicates); an IterableDataset is expected to shard itself (get_worker_info()).
        for name, source in zip(self._names, self._sources, strict=True):
            if not isinstance(source, IterableDataset):
                raise ValueError(
                    f"DomainMixingIterable: source {name!r} is a {type(source).__name__}, which every one "
                    f"of the DataLoader's {num_workers} workers would read in full (duplicate items). Under "
                    "num_workers > 1 each source must be an IterableDataset that shards itself by worker "
                    "(torch.utils.data.get_worker_info(); Hugging Face streaming datasets do), or use "
                    "num_workers <= 1."
                )
            shards = getattr(source, "num_shards", None)
            if isinstance(shards, int) and shards < num_workers:
                raise ValueError(
                    f"DomainMixingIterable: source {name!r} has num_shards={shards}, fewer than the "
                    f"DataLoader's {num_workers} workers; a worker without a shard would read nothing. "
                    "Reshard the source or use fewer workers."
                )

    def _epoch_over(self, limit: int | None) -> bool:
        if limit is not None and self._batch >= limit:
            return True
        if self._stop != StopRule.ALL_EXHAUSTED:
            return False
        active = self._schedule.active(self._schedule.at(self._total)[1])
        return bool(np.asarray(self._exhausted)[active].all())

    def _counters(self) -> Counters:
        return Counters(self._epoch, self._batch, self._total, self._ld, self._ld_from, self._ld_lag)

    def _batch_ids(self, rank: int, world: int) -> np.ndarray:
        plan = self._plan
        if (
            plan is None
            or not plan.first <= self._total < plan.first + len(plan.ids)
            or plan.where != (rank, world)
        ):
            # The global batch grows with DataLoader workers, so the plan is per (rank, world).
            planned = self._plan_next(self._counters(), rank, world)
            assert planned is not None  # _epoch_over() was False when this batch began
            p = planned.plan
            ids = in_yield_order(p.ids, p.order)
            self._plan = plan = _Rows(
                self._total, ids, p.ld_after, planned.from_batch, (rank, world), planned.lag
            )
        row: np.ndarray = plan.ids[self._total - plan.first]
        return row

    def _finish_batch(self) -> None:
        plan = self._plan
        assert plan is not None  # set by _batch_ids for the batch being finished
        self._ld = np.asarray(plan.ld_after[self._total - plan.first]).copy()
        self._ld_from = plan.from_batch
        self._ld_lag = plan.lag
        self._total += 1
        self._batch += 1
        self._offset = 0

    def _pull(self, i: int) -> Any:
        it = self._iters[i]
        if it is None:
            it = self._open(i)
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
        resume = restore is not None and self._source_epochs[i] > 0  # the pass in progress at the save
        if not resume:
            self._source_epochs[i] += 1
        set_epoch = getattr(source, "set_epoch", None)
        if callable(set_epoch):
            # Each pass is a new source epoch, counted over the whole run: it reshuffles a shuffling
            # source, and a source that re-applies a loaded state on every iter() of the same epoch
            # (Hugging Face IterableDataset) applies it only to the pass it was saved in.
            set_epoch(self._source_epochs[i] - 1)
        if resume and restore is not None and restore[1] is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(restore[1])
            it = iter(source)
        else:
            it = iter(source)
            if resume:
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
            self._ld = np.zeros(k, dtype=np.int64)  # as the batch sampler: an epoch starts the sequence
            self._ld_lag = (0.0,) * k
        self._plan = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The state after the last yielded item (keys: see the class docstring)."""
        states = [
            s.state_dict()
            if hasattr(s, "state_dict") and self._iters[i] is not None
            else (self._restore[i] or (None, None))[1]
            for i, s in enumerate(self._sources)
        ]
        own = {
            self.OFFSET_KEY: self._offset,
            self.PASS_KEY: list(self._passes),
            self.CONSUMED_KEY: list(self._consumed),
            self.EXHAUSTED_KEY: list(self._exhausted),
            self.SOURCE_EPOCHS_KEY: list(self._source_epochs),
            self.SOURCE_STATES_KEY: states,
        }
        return self._state(self._counters(), own)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; sources are reopened lazily (restored or replayed).

        Raises:
            ValueError: for missing keys or a fingerprint that differs from this object's.
        """
        at = self._load(state_dict)  # checks every entry (with _check_own) before it restores anything
        self._epoch, self._batch, self._total = at.epoch, at.batch, at.total
        self._ld, self._ld_from, self._ld_lag = at.ld_counts, at.ld_from, at.ld_lag
        k, owner = len(self._names), self._caller
        self._offset = int(state_counts(owner, state_dict, self.OFFSET_KEY))
        self._passes = [int(x) for x in state_counts(owner, state_dict, self.PASS_KEY, k)]
        self._consumed = [int(x) for x in state_counts(owner, state_dict, self.CONSUMED_KEY, k)]
        self._exhausted = state_list(owner, state_dict, self.EXHAUSTED_KEY, k, "bools", _is_bool)
        self._source_epochs = [int(x) for x in state_counts(owner, state_dict, self.SOURCE_EPOCHS_KEY, k)]
        saved_states = state_list(owner, state_dict, self.SOURCE_STATES_KEY, k, "source states", _any)
        # A pass is open iff items were consumed from it (opening one draws at once, an epoch end closes
        # all); a closed one must start the next source epoch, not re-enter the saved one.
        self._restore = [("restore", saved_states[i]) if self._consumed[i] else None for i in range(k)]
        self._iters = [None] * k
        self._plan = None
        if get_worker_info() is None:
            self._shared[1:] = 0  # workers may start from this state again
        else:
            self._own_state = True  # a worker's own saved state (a loader that collects worker states)

    def _check_own(self, state_dict: Mapping[str, Any], *, ignore_fingerprint: bool) -> None:
        """The offset, passes, consumed counts, exhausted flags, source epochs and source states."""
        k, owner = len(self._names), self._caller
        if state_counts(owner, state_dict, self.OFFSET_KEY) >= self._batch_size:
            raise ValueError(
                f"{owner}.load_state_dict: state[{self.OFFSET_KEY!r}] must be below batch_size "
                f"{self._batch_size}. Got {state_dict[self.OFFSET_KEY]!r} instead."
            )
        for key in (self.PASS_KEY, self.CONSUMED_KEY, self.SOURCE_EPOCHS_KEY):
            state_counts(owner, state_dict, key, k)
        state_list(owner, state_dict, self.EXHAUSTED_KEY, k, "bools", _is_bool)
        state_list(owner, state_dict, self.SOURCE_STATES_KEY, k, "source states", _any)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _any(value: Any) -> bool:
    return True
