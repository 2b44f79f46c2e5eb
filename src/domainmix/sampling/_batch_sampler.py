"""DomainBatchSampler: batches of dataset indices with a controllable, exactly resumable domain mix."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from domainmix._distributed import resolve_rank_world
from domainmix._validation import Interval, check_param, param_error
from domainmix.sampling._plan import BLOCK, Mode, SlotPlan, StopRule, check_mix_options, plan_block
from domainmix.sampling._streams import IndexStream, as_domain_index
from domainmix.sampling._weights import WeightSchedule, WeightsLike, check_names

__all__ = ["DomainBatchSampler"]

_PERMUTATION_TAG = 1  # seeds of per-pass permutations: (seed, 1, domain, epoch_key, pass)


class _Snap(NamedTuple):
    """The whole mutable state after ``total`` batches: a few ints per domain."""

    total: int  # global batches yielded since construction (the clock of the weight history)
    epoch: int
    batch: int  # batches yielded in the current epoch
    positions: np.ndarray  # (k,) draws from each domain's stream (see DomainBatchSampler, "Streams")
    ld_counts: np.ndarray  # (k,) low-discrepancy counts since the weight change at ld_from
    ld_from: int


class _Block(NamedTuple):
    values: np.ndarray  # (nb, batch_size) dataset indices for this rank
    base: _Snap  # state before the first row
    positions: np.ndarray  # (nb, k) stream positions after each row
    ld_after: np.ndarray  # (nb, k) low-discrepancy counts after each row
    ld_from: int

    def snap(self, j: int) -> _Snap:
        """State after row ``j``, built on demand (a snapshot per batch would cost more than the batch)."""
        b = self.base
        return _Snap(
            b.total + j + 1, b.epoch, b.batch + j + 1, self.positions[j], self.ld_after[j], self.ld_from
        )


_Entry = _Snap | tuple[_Block, int]  # a ring-buffer entry: a snapshot, or row j of a block


class DomainBatchSampler(Sampler[list[int]]):
    """Yield per-rank batches of dataset indices whose global composition follows domain weights ``q``.

    ``domains`` maps each domain name to its indices in ONE map-style dataset; use it as
    ``DataLoader(dataset, batch_sampler=sampler)``. Every rank computes the same global plan for each global
    batch of ``batch_size * world_size`` slots (no communication) and takes its share, so the global batch
    has the target composition exactly (pytorch#77154).

    Modes (see :class:`Mode`): ``"stratified"`` puts exactly ``allocate_counts(q, batch_size * world_size,
    min_count)`` examples of each domain in every global batch, dealt round-robin so each rank holds
    within one of its share, then interleaved so each domain's slots are spread evenly over the rank's
    batch (every prefix, e.g. a micro-batch, is balanced too; the examples in the slots are random).
    ``"low_discrepancy"`` follows a
    deterministic domain sequence whose per-domain counts never drift one example from ``q_i t`` (t
    counted since the last weight change); rank r takes global slots r, r + W, .... ``"iid"`` draws each
    slot's domain independently.

    Streams: within a domain, examples come from a fresh pseudo-random permutation per pass, seeded by
    ``(seed, domain, epoch_key, pass)``, so the state of a domain is one integer, its position in the
    stream. In ``cycle_forever`` the streams run on across ``__iter__`` calls and epochs (epoch_key 0);
    with ``first_exhausted`` / ``all_exhausted`` every epoch restarts every stream (epoch_key = epoch).
    Batch randomness (the stratified shuffle, the iid draws) comes from generators keyed by
    ``(seed, epoch_key, batch number // 256)``, never from global RNG.

    Weights change with :meth:`set_weights`, effective from the next batch the sampler yields.
    **Prefetch lag:** a ``DataLoader`` with workers runs the sampler up to ``num_workers *
    prefetch_factor`` batches ahead of the training loop, so a weight change reaches the loop that many
    batches later. :attr:`weight_history` records the exact batch. To checkpoint, pass the number of
    batches the loop has consumed, ``state_dict(consumed=step)``: the state is rebuilt from a ring buffer
    of per-batch snapshots and includes the weight changes already applied beyond ``step``, so the resumed
    run sees exactly the batches the original loop saw.

    State keys (``state_dict``): ``EPOCH_KEY``, ``BATCH_KEY`` (batches in this epoch), ``TOTAL_KEY``
    (batches since construction), ``PASS_KEY`` / ``CURSOR_KEY`` / ``EXHAUSTED_KEY`` (per domain),
    ``LD_COUNTS_KEY`` / ``LD_FROM_KEY`` (low-discrepancy counts since the change at batch LD_FROM),
    ``WEIGHTS_KEY``, ``HISTORY_KEY``, ``CONFIG_KEY``, ``FINGERPRINT_KEY``. The state is the same on every
    rank and holds only ints, floats, bools, strings and lists (JSON-able).

    Args:
        domains: domain name -> indices (``range``, sequence, numpy array or tensor of non-negative ints).
            A ``range`` is kept as a range; anything else becomes one int64 array. A domain may be empty
            only while its weight is 0.
        batch_size: examples per batch on each rank, an int >= 1; the global batch is
            ``batch_size * world_size``.
        weights: domain weights ``q`` (mapping by name, sequence or tensor); ``None`` (default): in
            proportion to domain sizes. Zero weights are allowed; they are normalised to sum to 1.
        mode: ``"stratified"`` (default), ``"low_discrepancy"`` or ``"iid"``.
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

    Raises:
        ValueError: for any invalid argument, naming it.

    Examples:
        >>> sampler = DomainBatchSampler({"web": range(0, 100), "code": range(100, 150)}, 4,
        ...                              {"web": 0.5, "code": 0.5}, num_batches=2)
        >>> [sum(i >= 100 for i in batch) for batch in sampler]
        [2, 2]
    """

    EPOCH_KEY = "epoch"
    BATCH_KEY = "batches_in_epoch"
    TOTAL_KEY = "total_batches"
    PASS_KEY = "domain_passes"
    CURSOR_KEY = "domain_cursors"
    EXHAUSTED_KEY = "domains_exhausted"
    LD_COUNTS_KEY = "low_discrepancy_counts"
    LD_FROM_KEY = "low_discrepancy_from"
    WEIGHTS_KEY = "weights"
    HISTORY_KEY = "weight_history"
    CONFIG_KEY = "config"
    FINGERPRINT_KEY = "fingerprint"
    _STATE_KEYS = (
        EPOCH_KEY, BATCH_KEY, TOTAL_KEY, PASS_KEY, CURSOR_KEY, EXHAUSTED_KEY, LD_COUNTS_KEY, LD_FROM_KEY,
        WEIGHTS_KEY, HISTORY_KEY, CONFIG_KEY, FINGERPRINT_KEY,
    )  # fmt: skip

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
        rank: int | None = None,
        world_size: int | None = None,
        snapshot_history: int = 1024,
    ) -> None:
        caller = "DomainBatchSampler"
        names = check_names(caller, "domains", domains)
        index = [as_domain_index(caller, n, domains[n]) for n in names]
        self._validate(caller, batch_size, mode, min_count, stop, num_batches, seed, snapshot_history)
        if all(len(ix) == 0 for ix in index):
            raise param_error(
                caller, "domains", "a mapping with at least one non-empty domain", dict(domains)
            )
        self._rank, self._world = resolve_rank_world(caller, rank, world_size)
        self._names = names
        self._sizes = np.array([len(ix) for ix in index], dtype=np.int64)
        self._batch_size, self._mode, self._stop = batch_size, mode, stop
        self._min_count, self._num_batches, self._seed = min_count, num_batches, seed
        self._streams = [IndexStream(ix, (seed, _PERMUTATION_TAG, i)) for i, ix in enumerate(index)]
        self._schedule = WeightSchedule(names, self._sizes, mode, batch_size * self._world, min_count)
        self._schedule.set(0, self._schedule.check(caller, "weights", weights))
        k = len(names)
        zeros = np.zeros(k, dtype=np.int64)
        self._snaps: deque[_Entry] = deque(maxlen=snapshot_history + 1)
        self._commit(_Snap(0, 0, 0, zeros, zeros, 0))
        self._block: _Block | None = None
        self._row = 0

    @staticmethod
    def _validate(
        caller: str, batch_size: int, mode: str, min_count: int, stop: str, num_batches: int | None,
        seed: int, snapshot_history: int,
    ) -> None:  # fmt: skip
        check_mix_options(caller, mode, batch_size, min_count, stop, num_batches, seed)
        check_param(caller, "snapshot_history", snapshot_history, Interval(int, 1, None))

    # ------------------------------------------------------------------ properties

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain names, in the order of every per-domain vector."""
        return self._names

    @property
    def weights(self) -> Tensor:
        """(k,) float64: the sampling distribution q for the next batch."""
        return torch.tensor(self._schedule.at(self._snap.total)[1], dtype=torch.float64)

    @property
    def batch_counts(self) -> Tensor:
        """(k,) examples per domain per global batch: exact (int64) if stratified, else expected (float64)."""
        q = self._schedule.at(self._snap.total)[1]
        if self._mode == Mode.STRATIFIED:
            return torch.from_numpy(self._schedule.alloc(q).copy())
        return torch.tensor(q, dtype=torch.float64) * (self._batch_size * self._world)

    @property
    def effective_sampling(self) -> Tensor:
        """(k,) float64: the long-run share of each domain that this sampler really delivers.

        Stratified rounding makes it ``batch_counts / global_batch``, not ``q`` (a weight of 0.001 in a
        batch of 256 may get 0 or 1 slots every batch). Loss multipliers ``alpha / q`` must divide by this
        vector, or the weighted loss is biased by the rounding.
        """
        if self._mode == Mode.STRATIFIED:
            return self.batch_counts.to(torch.float64) / (self._batch_size * self._world)
        return self.weights

    @property
    def weight_history(self) -> list[tuple[int, list[float]]]:
        """``[(from_batch, q)]``: q was used from global batch ``from_batch`` (counted since construction)."""
        return [(b, list(q)) for b, q in self._schedule.entries]

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._snap.epoch

    @property
    def _snap(self) -> _Snap:
        return _resolve(self._snaps[-1])

    # ------------------------------------------------------------------ control

    def set_weights(self, weights: WeightsLike) -> None:
        """Use ``weights`` from the next batch the sampler yields (see the prefetch note above).

        Raises:
            ValueError: for negative, NaN, inf, all-zero, unknown or missing weights, or a positive weight
                on an empty domain.
        """
        q = self._schedule.check("DomainBatchSampler.set_weights", "weights", weights)
        self._schedule.set(self._snap.total, q)
        self._block = None  # planned batches used the old weights; replan from the committed state

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``; a no-op when it is the current epoch (so a resume is kept).

        With ``first_exhausted`` / ``all_exhausted`` the epoch's batches are a function of ``(seed, epoch,
        weights)``. With ``cycle_forever`` the streams continue; only the epoch counter (and the
        ``num_batches`` count) restarts.
        """
        epoch = check_param("DomainBatchSampler.set_epoch", "epoch", epoch, Interval(int, 0, None))
        s = self._snap
        if epoch != s.epoch:
            positions = s.positions if self._stop == StopRule.CYCLE_FOREVER else np.zeros_like(s.positions)
            self._commit(s._replace(epoch=epoch, batch=0, positions=positions))
            self._block = None

    def __len__(self) -> int:
        """Batches per epoch when known: ``num_batches``, or stratified ``first_exhausted`` arithmetic.

        Raises:
            TypeError: when the epoch length depends on random draws or is unbounded.
        """
        if self._stop == StopRule.FIRST_EXHAUSTED and self._mode == Mode.STRATIFIED:
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

    def __iter__(self) -> Iterator[list[int]]:
        """Yield the rest of the current epoch (forever for ``cycle_forever`` without ``num_batches``)."""
        epoch = self._snap.epoch
        while self._snap.epoch == epoch:
            block = self._block
            if block is None or self._row >= len(block.values):
                block, self._row = self._make_block(), 0
                self._block = block
                if block is None:
                    self._end_epoch()
                    return
            values, append = block.values, self._snaps.append
            for j in range(self._row, len(values)):
                self._row = j + 1
                append((block, j))  # commit before yielding: state_dict() after a batch includes it
                yield values[j].tolist()
                if self._block is not block:  # set_weights / set_epoch / load_state_dict replanned
                    break

    def _end_epoch(self) -> None:
        s = self._snap
        positions = s.positions if self._stop == StopRule.CYCLE_FOREVER else np.zeros_like(s.positions)
        self._commit(s._replace(epoch=s.epoch + 1, batch=0, positions=positions))
        self._block = None

    def _commit(self, snap: _Snap) -> None:
        if self._snaps and self._snap.total == snap.total:
            # an epoch change at the same batch count supersedes the earlier snapshot
            self._snaps.pop()
        self._snaps.append(snap)

    def _make_block(self) -> _Block | None:
        s = self._snap
        from_batch, q = self._schedule.at(s.total)
        ld_counts = s.ld_counts if s.ld_from == from_batch else np.zeros_like(s.ld_counts)
        cycling = self._stop == StopRule.CYCLE_FOREVER
        epoch_key, batch_key = (0, s.total) if cycling else (s.epoch, s.batch)
        nb = BLOCK - batch_key % BLOCK
        change = self._schedule.next_change(s.total)
        if change is not None:
            nb = min(nb, change - s.total)
        if self._num_batches is not None:
            nb = min(nb, self._num_batches - s.batch)
        if nb <= 0:
            return None
        qa = np.asarray(q)
        alloc = self._schedule.alloc(q) if self._mode == Mode.STRATIFIED else np.zeros(len(q), np.int64)
        plan = plan_block(
            self._mode, qa, alloc, ld_counts, seed=self._seed, epoch_key=epoch_key, batch_key=batch_key,
            nb=nb, batch_size=self._batch_size, world_size=self._world, rank=self._rank,
        )  # fmt: skip
        after = s.positions + np.cumsum(plan.counts, axis=0)  # (nb, k)
        nb = self._rows_before_stop(s.positions, after, self._schedule.active(q), nb)
        if nb == 0:
            return None
        values = self._gather(plan, nb, epoch_key, s.positions)
        return _Block(values, s, after[:nb], plan.ld_after[:nb], from_batch)

    def _gather(self, plan: SlotPlan, nb: int, epoch_key: int, positions: np.ndarray) -> np.ndarray:
        ids, occ = plan.ids[:nb], plan.occ[:nb]
        if plan.order is not None:
            # stratified: every row lists the same domains in the same sorted columns
            values = np.empty(occ.shape, dtype=np.int64)
            bounds = np.flatnonzero(np.diff(ids[0], prepend=-1, append=-1))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                i = int(ids[0, a])
                values[:, a:b] = self._streams[i].take(epoch_key, int(positions[i]), occ[:, a:b])
            return values[:, plan.order]
        flat_ids, flat_occ = ids.ravel(), occ.ravel()
        order = np.argsort(flat_ids, kind="stable")
        counts = np.bincount(flat_ids, minlength=len(self._streams))
        ends = np.cumsum(counts)
        values = np.empty(flat_ids.size, dtype=np.int64)
        for i in np.flatnonzero(counts):
            sel = order[ends[i] - counts[i] : ends[i]]
            values[sel] = self._streams[i].take(epoch_key, int(positions[i]), flat_occ[sel])
        return values.reshape(ids.shape)

    def _rows_before_stop(self, start: np.ndarray, after: np.ndarray, active: np.ndarray, nb: int) -> int:
        if self._stop == StopRule.CYCLE_FOREVER:
            return nb
        sizes = self._sizes[active]
        if self._stop == StopRule.FIRST_EXHAUSTED:
            fits = (after[:, active] <= sizes).all(axis=1)
            return nb if fits.all() else int(np.argmin(fits))
        if (start[active] >= sizes).all():
            return 0
        done = (after[:, active] >= sizes).all(axis=1)
        return int(np.argmax(done)) + 1 if done.any() else nb

    # ------------------------------------------------------------------ state

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "domains": list(self._names),
            "sizes": self._sizes.tolist(),
            "mode": self._mode,
            "stop": self._stop,
            "batch_size": self._batch_size,
            "world_size": self._world,
            "seed": self._seed,
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
        return {
            self.EPOCH_KEY: snap.epoch,
            self.BATCH_KEY: snap.batch,
            self.TOTAL_KEY: snap.total,
            self.PASS_KEY: (snap.positions // n).tolist(),
            self.CURSOR_KEY: (snap.positions % n).tolist(),
            self.EXHAUSTED_KEY: ((snap.positions >= self._sizes) & (self._sizes > 0)).tolist(),
            self.LD_COUNTS_KEY: np.asarray(snap.ld_counts).tolist(),
            self.LD_FROM_KEY: snap.ld_from,
            self.WEIGHTS_KEY: list(self._schedule.at(snap.total)[1]),
            self.HISTORY_KEY: self._schedule.as_state(),
            self.CONFIG_KEY: {
                "mode": self._mode,
                "stop": self._stop,
                "min_count": self._min_count,
                "num_batches": self._num_batches,
                "batch_size": self._batch_size,
                "world_size": self._world,
                "seed": self._seed,
            },  # fmt: skip
            self.FINGERPRINT_KEY: self._fingerprint(),
        }

    def _find(self, consumed: int) -> _Snap:
        check_param("DomainBatchSampler.state_dict", "consumed", consumed, Interval(int, 0, None), None)
        for entry in reversed(self._snaps):
            snap = _resolve(entry)
            if snap.total == consumed:
                return snap
        lo, hi = _resolve(self._snaps[0]).total, self._snap.total
        raise param_error(
            "DomainBatchSampler.state_dict", "consumed", f"a batch count in the snapshot buffer [{lo}, {hi}]",
            consumed,
        )  # fmt: skip

    def load_state_dict(self, state_dict: Mapping[str, Any], *, ignore_fingerprint: bool = False) -> None:
        """Restore a state saved by :meth:`state_dict` (from any rank: the state is global).

        Args:
            state_dict: the saved state.
            ignore_fingerprint: accept a state saved with different domain sizes, mode, stop rule, batch
                size, world size or seed (e.g. an elastic resume on more ranks). Domain names must still
                match, since every per-domain entry is matched by position.

        Raises:
            ValueError: for missing keys or a fingerprint that differs from this sampler's.
        """
        caller = "DomainBatchSampler.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise param_error(
                caller, "state_dict", "a mapping from DomainBatchSampler.state_dict()", state_dict
            )
        missing = [key for key in self._STATE_KEYS if key not in state_dict]
        if missing:
            raise param_error(
                caller,
                "state_dict",
                f"a mapping with every state key (missing: {missing})",
                sorted(state_dict),
            )
        self._check_fingerprint(caller, state_dict[self.FINGERPRINT_KEY], ignore_fingerprint)
        self._schedule.load(caller, "state_dict", state_dict[self.HISTORY_KEY])
        k = len(self._names)
        passes = np.asarray(state_dict[self.PASS_KEY], dtype=np.int64).reshape(k)
        cursors = np.asarray(state_dict[self.CURSOR_KEY], dtype=np.int64).reshape(k)
        ld = np.asarray(state_dict[self.LD_COUNTS_KEY], dtype=np.int64).reshape(k)
        snap = _Snap(
            int(state_dict[self.TOTAL_KEY]), int(state_dict[self.EPOCH_KEY]), int(state_dict[self.BATCH_KEY]),
            passes * self._sizes + np.minimum(cursors, self._sizes), ld, int(state_dict[self.LD_FROM_KEY]),
        )  # fmt: skip
        self._snaps.clear()
        self._commit(snap)
        self._block = None

    def _check_fingerprint(self, caller: str, saved: Any, ignore: bool) -> None:
        mine = self._fingerprint()
        if not isinstance(saved, Mapping):
            raise param_error(caller, "state_dict", "a state with a fingerprint mapping", saved)
        keys = ["domains"] if ignore else list(mine)
        diff = {key: (saved.get(key), mine[key]) for key in keys if saved.get(key) != mine[key]}
        if diff:
            detail = "; ".join(f"{key}: saved {a!r}, now {b!r}" for key, (a, b) in diff.items())
            hint = "" if ignore or "domains" in diff else " (pass ignore_fingerprint=True to accept it)"
            raise param_error(
                caller, "state_dict", f"from a sampler with the same fingerprint{hint}; differs in {detail}",
                "a mismatching state",
            )  # fmt: skip

    def __repr__(self) -> str:
        q = ", ".join(f"{n}={w:.4g}" for n, w in zip(self._names, self.weights.tolist(), strict=True))
        return (
            f"DomainBatchSampler({q}; batch_size={self._batch_size}, world_size={self._world}, "
            f"mode={self._mode!r}, stop={self._stop!r}, epoch={self._snap.epoch}, "
            f"total_batches={self._snap.total})"
        )


def _resolve(entry: _Entry) -> _Snap:
    return entry if isinstance(entry, _Snap) else entry[0].snap(entry[1])
