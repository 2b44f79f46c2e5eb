"""DomainBatchSampler: batches of dataset indices with a controllable, exactly resumable domain mix."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from domainmix._state import state_counts
from domainmix._validation import Interval, Options, check_param, param_error
from domainmix.sampling._mixer import Counters, DomainMixer
from domainmix.sampling._plan import Mode, StopRule, check_mix_options, rows_before_stop
from domainmix.sampling._snapshots import Block, Snap, SnapshotRing
from domainmix.sampling._streams import IndexStream, as_domain_index, check_disjoint, take_planned
from domainmix.sampling._weights import WeightsLike, check_names
from domainmix.sampling._wrapping import check_not_resharded, check_same_depth, prefetch_depth

__all__ = ["DomainBatchSampler"]

_PERMUTATION_TAG = 1  # seeds of per-pass permutations: (seed, 1, domain, epoch_key, pass)
# tag 2: the block generators of _plan
_REPLACEMENT_TAG = 3  # seeds of with-replacement draws: (seed, 3, domain, epoch_key, position // DRAW_BLOCK)


class DomainBatchSampler(DomainMixer, Sampler[list[int]]):
    """Yield per-rank batches of dataset indices whose global composition follows domain weights ``q``.

    ``domains`` maps each domain name to its indices in ONE map-style dataset; use it as
    ``DataLoader(dataset, batch_sampler=sampler)``. Every rank computes the same plan for each global
    batch of ``batch_size * world_size`` slots and takes its share, so the global batch has the target
    composition exactly, with no communication. Within a domain, examples come from seeded random
    permutation passes (or uniform draws with ``replacement=True``); the state is a few integers per
    domain, so a resume reproduces the uninterrupted run batch for batch. Weights change with
    :meth:`set_weights` from the next batch; with a prefetching ``DataLoader``, checkpoint with
    ``state_dict(consumed=step)``. The design (streams, modes, stop rules, replacement, prefetch lag,
    resume, distributed use, fingerprint) is explained in ``docs/design.md``, "The domain batch sampler".

    State keys (``state_dict``, JSON-able, the same on every rank): ``EPOCH_KEY``, ``BATCH_KEY`` (batches
    in this epoch), ``TOTAL_KEY`` (batches since construction), ``PASS_KEY`` / ``CURSOR_KEY`` /
    ``EXHAUSTED_KEY`` (per domain), ``LD_COUNTS_KEY`` / ``LD_FROM_KEY`` (examples per domain since the
    weight change at batch ``LD_FROM``: low-discrepancy and carried-remainder plans continue from them),
    ``LD_LAG_KEY`` (the low-discrepancy lags carried in at that change), ``WEIGHTS_KEY``,
    ``PREFETCH_KEY`` (how many batches the iterating DataLoader ran ahead; a resume under another depth
    is refused at its first batch),
    ``EPOCH_ENDS_KEY`` (the totals after the saved batch at which the run had already ended an epoch),
    ``HISTORY_KEY``, ``CONFIG_KEY``, ``FINGERPRINT_KEY``.

    Args:
        domains: domain name -> indices (``range``, sequence, numpy array or tensor of non-negative ints).
            A ``range`` is kept as a range; anything else is copied into one int64 array (editing the
            caller's array afterwards changes nothing). A domain may be empty only while its weight is 0.
        batch_size: examples per batch on each rank, an int >= 1; the global batch is
            ``batch_size * world_size``.
        weights: domain weights ``q`` (mapping by name, sequence or tensor); ``None`` (default): in
            proportion to domain sizes. Zero weights are allowed; they are normalised to sum to 1.
        mode: ``"stratified"`` (default), ``"low_discrepancy"`` or ``"iid"`` (see :class:`Mode`).
        min_count: stratified only: at least this many examples of every positive-weight domain per global
            batch (default 0).
        stop: ``"cycle_forever"`` (default), ``"first_exhausted"`` or ``"all_exhausted"``
            (see :class:`StopRule`).
        num_batches: batches per ``__iter__`` (an int >= 1) or ``None`` (default): unbounded in
            ``cycle_forever``, otherwise only the stop rule ends an epoch.
        seed: an int >= 0 (default 0).
        rank: this process's rank; default from ``torch.distributed``, then ``RANK``, then 0.
        world_size: number of ranks; default from ``torch.distributed``, then ``WORLD_SIZE``, then 1.
        snapshot_history: how many past batch states to keep for ``state_dict(consumed=...)``
            (default 1024; must exceed the prefetch depth).
        replacement: ``False`` (default): each domain is read in random permutation passes (without
            replacement); ``True``: each slot draws its example uniformly and independently from its
            domain (only with ``stop="cycle_forever"``).
        carry_remainder: stratified only, with ``min_count=0``. ``False`` (default): every global batch
            has the same counts, ``allocate_counts(q, B)``, whose shares differ from q by up to 1/(2B)
            per domain for the whole run (see ``effective_sampling``). ``True``: batch b holds
            ``floor(B q_i)`` or ``ceil(B q_i)`` examples of domain i, with the rounding remainders
            carried across batches, so the counts since the last weight change stay within one example
            of ``b B q_i`` and the long-run shares are q (``_apportion.carried_counts``). A weight
            change restarts the carry: for weights that change every batch use ``False``
            (``docs/design.md``, "Weights that change every batch").
        as_numpy: ``False`` (default): each batch is a list of ints, as torch's samplers yield.
            ``True``: a 1-D int64 numpy array (a view into the planned block; the sampler never reads it
            again). A ``DataLoader`` hands it to the dataset's ``__getitems__`` (one vectorised lookup for
            array- or tensor-backed data) or indexes the dataset with each element, and sends it to
            workers as one buffer; no Python int is created per index.

    Raises:
        ValueError: for any invalid argument, naming it.

    Examples:
        >>> sampler = DomainBatchSampler({"web": range(0, 100), "code": range(100, 150)}, 4,
        ...                              {"web": 0.5, "code": 0.5}, num_batches=2)
        >>> [sum(i >= 100 for i in batch) for batch in sampler]
        [2, 2]
    """

    PASS_KEY = "domain_passes"
    CURSOR_KEY = "domain_cursors"
    EXHAUSTED_KEY = "domains_exhausted"
    WEIGHTS_KEY = "weights"
    CONFIG_KEY = "config"
    PREFETCH_KEY = "prefetch_depth"
    EPOCH_ENDS_KEY = "epoch_ends"  # optional: absent from states saved before it was recorded
    _STATE_KEYS = (
        DomainMixer.EPOCH_KEY, DomainMixer.BATCH_KEY, DomainMixer.TOTAL_KEY, PASS_KEY, CURSOR_KEY,
        EXHAUSTED_KEY, DomainMixer.LD_COUNTS_KEY, DomainMixer.LD_FROM_KEY, WEIGHTS_KEY,
        DomainMixer.HISTORY_KEY, CONFIG_KEY, DomainMixer.FINGERPRINT_KEY,
    )  # fmt: skip
    _FINGERPRINT_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        **DomainMixer._FINGERPRINT_DEFAULTS,
        "replacement": False,  # saved before it existed
    }
    _FINGERPRINT_HINT: ClassVar[str] = " (pass ignore_fingerprint=True to accept it)"

    def __init__(
        self,
        domains: Mapping[str, Sequence[int] | range | np.ndarray | Tensor],
        batch_size: int,
        weights: WeightsLike | None = None,
        *,
        mode: Literal["stratified", "low_discrepancy", "iid"] = "stratified",
        min_count: int = 0,
        stop: Literal["cycle_forever", "first_exhausted", "all_exhausted"] = "cycle_forever",
        num_batches: int | None = None,
        seed: int = 0,
        rank: int | None = None, world_size: int | None = None,  # None: from torch.distributed or env
        snapshot_history: int = 1024,
        replacement: bool = False,
        carry_remainder: bool = False,
        as_numpy: bool = False,
    ) -> None:  # fmt: skip
        caller = "DomainBatchSampler"
        names = check_names(caller, "domains", domains)
        index = [as_domain_index(caller, n, domains[n]) for n in names]
        check_disjoint(caller, names, index)
        self._validate(
            caller, batch_size, mode, min_count, stop, num_batches, seed, snapshot_history, replacement,
            carry_remainder, as_numpy,
        )  # fmt: skip
        if all(len(ix) == 0 for ix in index):
            raise param_error(
                caller, "domains", "a mapping with at least one non-empty domain", dict(domains)
            )
        self._sizes = np.array([len(ix) for ix in index], dtype=np.int64)
        super().__init__(
            caller, names, self._sizes.tolist(), weights, mode=mode, batch_size=batch_size,
            min_count=min_count, stop=stop, num_batches=num_batches, seed=seed, rank=rank,
            world_size=world_size, carry_remainder=carry_remainder,
        )  # fmt: skip
        self._replacement = replacement
        self._as_numpy = as_numpy
        tag = _REPLACEMENT_TAG if replacement else _PERMUTATION_TAG
        self._streams = [
            IndexStream(ix, (seed, tag, i), replacement=replacement) for i, ix in enumerate(index)
        ]
        zeros = np.zeros(len(names), dtype=np.int64)
        self._snaps = SnapshotRing(snapshot_history, Snap(0, 0, 0, zeros, zeros, 0, (0.0,) * len(index)))
        self._block: Block | None = None
        self._row = 0
        self._depth = 0  # how far the loader iterating this sampler runs ahead (see _wrapping)
        self._expected_depth: int | None = None  # the saved depth, checked at the first batch after a load
        # Totals at which epochs end that the saved run had already decided (see _pending_ends).
        self._epoch_ends: list[int] = []

    @staticmethod
    def _validate(
        caller: str, batch_size: int, mode: str, min_count: int, stop: str, num_batches: int | None,
        seed: int, snapshot_history: int, replacement: bool, carry_remainder: bool, as_numpy: bool,
    ) -> None:  # fmt: skip
        check_mix_options(caller, mode, batch_size, min_count, stop, num_batches, seed, carry_remainder)
        check_param(caller, "snapshot_history", snapshot_history, Interval(int, 1, None))
        check_param(caller, "replacement", replacement, Options((False, True)))
        check_param(caller, "as_numpy", as_numpy, Options((False, True)))
        if replacement and stop != StopRule.CYCLE_FOREVER:
            raise param_error(
                caller, "replacement", f"False with stop={stop!r} (with replacement no domain is ever "
                "exhausted; use stop='cycle_forever', with num_batches for epochs)", replacement,
            )  # fmt: skip

    # ------------------------------------------------------------------ properties

    @property
    def batch_counts(self) -> Tensor:
        """(k,) examples per domain per global batch.

        Exact (int64) if stratified without ``carry_remainder``, else the expected counts (float64).
        """
        q = self._schedule.at(self._snap.total)[1]
        if self._mode == Mode.STRATIFIED and not self._carry:
            return torch.from_numpy(self._schedule.alloc(q).copy())
        return self.effective_sampling * (self._batch_size * self._world)

    @property
    def effective_sampling(self) -> Tensor:
        """(k,) float64: the long-run share of each domain that this sampler really delivers.

        Stratified rounding makes it ``batch_counts / global_batch``, not ``q`` (a weight of 0.001 in a
        batch of 256 may get 0 or 1 slots every batch); with ``carry_remainder`` it is q rounded to
        multiples of 2**-32 / global_batch. Loss multipliers ``alpha / q`` must divide by this vector, or
        the weighted loss is biased by the rounding.
        """
        q = self._schedule.at(self._snap.total)[1]
        return torch.from_numpy(self._schedule.shares(q).astype(np.float64))

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._snap.epoch

    @property
    def _snap(self) -> Snap:
        return self._snaps.current

    def _clock(self) -> int:
        return self._snap.total

    def _replan(self) -> None:
        self._block = None  # planned batches used the old weights or epoch; replan from the committed state

    def _oldest_state(self) -> int:
        oldest = self._snaps.oldest
        return self._needs_from(oldest.total, oldest.ld_from)

    def _last_batch(self) -> int:
        return max(self._snap.total - 1, 0)

    # ------------------------------------------------------------------ control

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``; a no-op when it is the current epoch (so a resume is kept).

        With ``first_exhausted`` / ``all_exhausted`` the epoch's batches are a function of ``(seed, epoch,
        weights)``. With ``cycle_forever`` the streams continue; only the epoch counter (and the
        ``num_batches`` count) restarts.
        """
        epoch = check_param("DomainBatchSampler.set_epoch", "epoch", epoch, Interval(int, 0, None))
        if epoch != self._snap.epoch:
            self._epoch_ends = []  # a jump leaves the epochs a loaded state had already ended
            self._start_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch when known: ``num_batches``, or stratified ``first_exhausted`` arithmetic.

        Raises:
            TypeError: when the epoch length depends on random draws or is unbounded.
        """
        if self._stop == StopRule.FIRST_EXHAUSTED and self._mode == Mode.STRATIFIED and not self._carry:
            alloc = self._schedule.alloc(self._schedule.at(self._snap.total)[1])
            used = alloc > 0
            full = int((self._sizes[used] // alloc[used]).min())
            return full if self._num_batches is None else min(full, self._num_batches)
        if self._num_batches is not None and self._stop == StopRule.CYCLE_FOREVER:
            return self._num_batches
        raise TypeError(
            f"len(DomainBatchSampler) is undefined for mode={self._mode!r}, stop={self._stop!r}, "
            f"num_batches={self._num_batches!r}: set num_batches with stop='cycle_forever', or use "
            "mode='stratified' with stop='first_exhausted'."
        )

    # ------------------------------------------------------------------ iteration

    # Sampler[list[int]] is what DataLoader's batch_sampler is typed to take; as_numpy batches are arrays
    def __iter__(self) -> Iterator[list[int] | np.ndarray]:  # type: ignore[override]
        """Yield the rest of the current epoch (forever for ``cycle_forever`` without ``num_batches``).

        Raises:
            ValueError: when a framework wrapper re-shards the batches by process (Accelerate's
                ``BatchSamplerShard``; see ``domainmix.integrations.accelerate``), or, at the first batch
                after ``load_state_dict``, when the iterating DataLoader prefetches to another depth than
                the one the state was saved under.
        """
        caller = sys._getframe(1)  # the frame that called next(): a DataLoader's iterator, a wrapper, a loop
        check_not_resharded(caller, "DomainBatchSampler")
        self._check_depth(prefetch_depth(caller))
        # Not kept: this generator would hold the loader iterator's frame, so the iterator would live in a
        # reference cycle, and a loader dropped mid-epoch would reap its workers only in the cyclic
        # collector, after a join timeout per worker (10 s for 2 workers, measured).
        del caller
        epoch = self._snap.epoch
        while self._snap.epoch == epoch:
            block = self._block
            if block is None or self._row >= len(block.values):
                block, self._row = self._make_block(), 0
                self._block = block
                if block is None:
                    self._start_epoch(epoch + 1, ended=True)
                    return
            rows: Any = block.values[self._row :]
            if not self._as_numpy:
                rows = rows.tolist()  # one call per block, not per batch
            append = self._snaps.append
            for j, row in enumerate(rows, self._row):
                self._row = j + 1
                append((block, j))  # commit before yielding: state_dict() after a batch includes it
                yield row
                if self._block is not block:  # set_weights / set_epoch / load_state_dict replanned
                    break

    def _check_depth(self, depth: int) -> None:
        expected, self._expected_depth, self._depth = self._expected_depth, None, depth
        check_same_depth(
            "DomainBatchSampler", expected, depth, "Resume with the same num_workers and prefetch_factor (or "
            "load the state with ignore_fingerprint=True to accept it).",
        )  # fmt: skip

    def _start_epoch(self, epoch: int, *, ended: bool = False) -> None:
        """Start ``epoch``: after the previous one ``ended`` by itself, or by a ``set_epoch`` jump."""
        s = self._snap
        # Only the exhaustion stop rules restart the streams, and the low-discrepancy / carried counts with
        # them, so that an epoch is a function of (seed, epoch, weights); cycle_forever's run on.
        if self._stop == StopRule.CYCLE_FOREVER:
            start = s._replace(epoch=epoch, batch=0)
        else:
            zeros = np.zeros_like(s.positions)
            start = s._replace(
                epoch=epoch, batch=0, positions=zeros, ld_counts=zeros, ld_lag=(0.0,) * len(zeros)
            )
        self._snaps.commit(start, keep_previous=ended)
        self._block = None

    def _make_block(self) -> Block | None:
        s = self._snap
        at = Counters(s.epoch, s.batch, s.total, s.ld_counts, s.ld_from, s.ld_lag)
        planned = self._plan_next(at, self._rank, self._world)
        if planned is None:
            # num_batches reached: an end recorded here is this one (it must not end the next epoch)
            self._drop_reached_end(s.total)
            return None
        plan = planned.plan
        after = s.positions + np.cumsum(plan.counts, axis=0)  # (nb, k)
        active = self._schedule.active(planned.q)
        nb = rows_before_stop(self._stop, self._sizes, s.positions, after, active, len(plan.counts))
        if self._epoch_ends:
            nb = min(nb, self._epoch_ends[0] - s.total)
        if nb <= 0:
            self._drop_reached_end(s.total)
            return None
        values = take_planned(self._streams, plan, nb, planned.epoch_key, s.positions, self._rank)
        return Block(values, s, after[:nb], plan.ld_after[:nb], planned.from_batch, planned.lag)

    def _drop_reached_end(self, total: int) -> None:
        """Forget the recorded epoch end that the epoch ending at ``total`` batches is."""
        if self._epoch_ends and self._epoch_ends[0] <= total:
            del self._epoch_ends[0]

    # ------------------------------------------------------------------ state

    def _fingerprint(self) -> dict[str, Any]:
        common = super()._fingerprint()
        return {
            "domains": common.pop("domains"),
            "sizes": self._sizes.tolist(),
            **common,
            "replacement": self._replacement,
        }

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The state after the last yielded batch, or after ``consumed`` batches (counted since construction).

        Args:
            consumed: the number of global batches the training loop has consumed; must be within the last
                ``snapshot_history`` batches the sampler has yielded. ``None``: the sampler's own position.

        Raises:
            ValueError: if ``consumed`` is outside the snapshot ring buffer.
        """
        snap = self._snap if consumed is None else self._find(consumed)
        n = np.maximum(self._sizes, 1)
        own = {
            self.PASS_KEY: (snap.positions // n).tolist(),
            self.CURSOR_KEY: (snap.positions % n).tolist(),
            self.EXHAUSTED_KEY: ((snap.positions >= self._sizes) & (self._sizes > 0)).tolist(),
            self.WEIGHTS_KEY: list(self._schedule.at(snap.total)[1]),
            self.PREFETCH_KEY: self._depth,
            self.EPOCH_ENDS_KEY: self._pending_ends(snap),
            self.CONFIG_KEY: {
                "mode": self._mode,
                "stop": self._stop,
                "min_count": self._min_count,
                "num_batches": self._num_batches,
                "batch_size": self._batch_size,
                "world_size": self._world,
                "seed": self._seed,
                "replacement": self._replacement,
                "carry_remainder": self._carry,
            },
        }
        at = Counters(snap.epoch, snap.batch, snap.total, snap.ld_counts, snap.ld_from, snap.ld_lag)
        return self._state(at, own)

    def _pending_ends(self, snap: Snap) -> list[int]:
        """The totals after ``snap`` at which this run has already ended an epoch.

        The sampler decides an epoch's end when it plans past the last batch, which a prefetching loader
        does batches before the loop consumes them. A ``set_weights`` made meanwhile lands on the first
        batch after that end, so a resume from an earlier ``consumed`` state would re-apply the stop rule
        under the new weights and could run the epoch on: the state records the decision instead.
        """
        ends = {e for e in self._epoch_ends if e >= snap.total}
        for entry in self._snaps:  # epoch starts are stored as snapshots, batches as (block, row)
            # >=: an epoch that ended right at the saved batch is recorded too (the state is the one
            # after its last batch), so the resumed sampler ends it there whatever the weights are then.
            if isinstance(entry, Snap) and entry.total >= snap.total and entry.epoch > snap.epoch:
                ends.add(entry.total)
        return sorted(ends)

    def _find(self, consumed: int) -> Snap:
        check_param("DomainBatchSampler.state_dict", "consumed", consumed, Interval(int, 0, None), None)
        snap = self._snaps.find(consumed)
        if snap is None:
            lo, hi = self._snaps.oldest.total, self._snap.total
            raise param_error(
                "DomainBatchSampler.state_dict", "consumed",
                f"a batch count in the snapshot buffer [{lo}, {hi}]", consumed,
            )  # fmt: skip
        return snap

    def load_state_dict(self, state_dict: Mapping[str, Any], *, ignore_fingerprint: bool = False) -> None:
        """Restore a state saved by :meth:`state_dict` (from any rank: the state is global).

        Args:
            state_dict: the saved state.
            ignore_fingerprint: accept a state saved with different domain sizes, mode, stop rule, batch
                size, world size, seed or ``replacement`` (e.g. an elastic resume on more ranks), and
                another loader prefetch depth. Domain names must still match, since every per-domain
                entry is matched by position.

        Raises:
            ValueError: for missing keys or a fingerprint that differs from this sampler's.
        """
        at = self._load(state_dict, ignore_fingerprint=ignore_fingerprint)
        k = len(self._names)
        passes = np.asarray(state_counts(self._caller, state_dict, self.PASS_KEY, k), dtype=np.int64)
        cursors = np.asarray(state_counts(self._caller, state_dict, self.CURSOR_KEY, k), dtype=np.int64)
        # an elastic resume (ignore_fingerprint) onto smaller domains starts their next pass
        positions = passes * self._sizes + np.minimum(cursors, self._sizes)
        self._snaps.reset(Snap(at.total, at.epoch, at.batch, positions, at.ld_counts, at.ld_from, at.ld_lag))
        self._block = None
        saved_depth = state_dict.get(self.PREFETCH_KEY)  # absent from states saved before it was recorded
        self._expected_depth = None if ignore_fingerprint or saved_depth is None else int(saved_depth)
        self._depth = 0 if saved_depth is None else int(saved_depth)  # kept by a save before the next batch
        ends = []  # states saved before the key existed had no pending ends to record
        if self.EPOCH_ENDS_KEY in state_dict:
            ends = state_counts(self._caller, state_dict, self.EPOCH_ENDS_KEY, -1)
        self._epoch_ends = sorted(int(e) for e in ends)

    def _check_own(self, state_dict: Mapping[str, Any], *, ignore_fingerprint: bool) -> None:
        """Passes, cursors, epoch ends, prefetch depth; a cursor is a position in its pass, below its size.

        An elastic resume (``ignore_fingerprint``) onto smaller domains may hold larger cursors: those
        domains start their next pass.
        """
        k = len(self._names)
        state_counts(self._caller, state_dict, self.PASS_KEY, k)
        cursors = np.asarray(state_counts(self._caller, state_dict, self.CURSOR_KEY, k), dtype=np.int64)
        if not ignore_fingerprint and (cursors >= np.maximum(self._sizes, 1)).any():
            raise ValueError(
                f"{self._caller}.load_state_dict: state[{self.CURSOR_KEY!r}] must be below each domain's "
                f"size {self._sizes.tolist()}. Got {cursors.tolist()} instead."
            )
        if self.EPOCH_ENDS_KEY in state_dict:
            state_counts(self._caller, state_dict, self.EPOCH_ENDS_KEY, -1)
        if state_dict.get(self.PREFETCH_KEY) is not None:
            state_counts(self._caller, state_dict, self.PREFETCH_KEY)

    def __repr__(self) -> str:
        q = ", ".join(f"{n}={w:.4g}" for n, w in zip(self._names, self.weights.tolist(), strict=True))
        return (
            f"DomainBatchSampler({q}; batch_size={self._batch_size}, world_size={self._world}, "
            f"mode={self._mode!r}, stop={self._stop!r}, "
            f"{'replacement=True, ' if self._replacement else ''}epoch={self._snap.epoch}, "
            f"total_batches={self._snap.total})"
        )
