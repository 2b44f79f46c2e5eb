"""What the batch sampler and the mixing iterable share: options, weights, common state keys, planning.

Both follow the same global plan of domains per slot (``_plan``) under the same weight history
(``_weights``); they differ in where the examples come from (index streams or iterable sources) and in
what else their state holds. :class:`DomainMixer` is their common base: it owns the options, the weight
schedule, the counters every state holds (epoch, batch, total, low-discrepancy counts), the fingerprint
check on load, and the choice of the next block of batches to plan.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from domainmix._apportion import carried_lag, distribution
from domainmix._distributed import resolve_rank_world
from domainmix._state import check_fingerprint, check_state_keys, state_counts, state_list
from domainmix._validation import Interval, Options, check_param, param_error
from domainmix.sampling._plan import BLOCK, PLAN_ROWS, Mode, SlotPlan, StopRule, plan_block
from domainmix.sampling._weights import WeightSchedule, WeightsLike

__all__ = ["Counters", "DomainMixer", "Planned"]


class Counters(NamedTuple):
    """The counters every sampler state holds."""

    epoch: int
    batch: int  # batches in the current epoch
    total: int  # batches since construction: the clock of the weight history
    ld_counts: np.ndarray  # (k,) low-discrepancy counts since the weight change at ld_from
    ld_from: int
    ld_lag: tuple[float, ...]  # (k,) low-discrepancy lags carried into the schedule starting at ld_from


class Planned(NamedTuple):
    """A planned block of batches and the weights it was planned with."""

    from_batch: int  # the weight-history entry in force (its first batch)
    q: tuple[float, ...]
    epoch_key: int  # 0 while cycling forever (streams run on across epochs), else the epoch
    plan: SlotPlan
    lag: tuple[float, ...]  # the lags carried into the schedule starting at from_batch


class DomainMixer(ABC):
    """Base of :class:`DomainBatchSampler` and :class:`DomainMixingIterable` (the shared half).

    Subclasses validate their own arguments (with ``check_mix_options``) before calling ``__init__``, and
    implement :meth:`_clock` and :meth:`_replan`.

    Args:
        caller: the class name, for messages.
        names: domain names.
        sizes: domain sizes (``weights=None`` means proportional to them).
        weights: the initial weights, or ``None``.
        mode, batch_size, min_count, stop, num_batches, seed: validated options.
        rank, world_size: ``None`` to read them from ``torch.distributed`` or the environment.
    """

    EPOCH_KEY = "epoch"
    BATCH_KEY = "batches_in_epoch"
    TOTAL_KEY = "total_batches"
    LD_COUNTS_KEY = "low_discrepancy_counts"
    LD_FROM_KEY = "low_discrepancy_from"
    LD_LAG_KEY = "low_discrepancy_lag"  # optional: absent from states saved before lags were carried
    HISTORY_KEY = "weight_history"
    FINGERPRINT_KEY = "fingerprint"
    _COUNTER_KEYS = (EPOCH_KEY, BATCH_KEY, TOTAL_KEY, LD_FROM_KEY)  # the scalar counters of every state
    _STATE_KEYS: ClassVar[tuple[str, ...]]  # every key a subclass's state holds
    # Fingerprint values for keys that states saved by older versions lack.
    _FINGERPRINT_DEFAULTS: ClassVar[Mapping[str, Any]] = {"carry_remainder": False}  # saved before it existed
    _FINGERPRINT_HINT: ClassVar[str] = ""  # how to accept a deliberate change, if the subclass can

    def __init__(
        self,
        caller: str,
        names: tuple[str, ...],
        sizes: Sequence[int],
        weights: WeightsLike | None,
        *,
        mode: str,
        batch_size: int,
        min_count: int,
        stop: str,
        num_batches: int | None,
        seed: int,
        rank: int | None,
        world_size: int | None,
        carry_remainder: bool = False,
    ) -> None:
        self._caller = caller
        self._rank, self._world = resolve_rank_world(caller, rank, world_size)
        self._names = names
        # int(): numpy integers pass the checks, and the state must hold JSON types only
        self._mode, self._stop, self._batch_size = mode, stop, int(batch_size)
        self._min_count, self._seed = int(min_count), int(seed)
        self._num_batches = None if num_batches is None else int(num_batches)
        self._carry = carry_remainder
        self._schedule = WeightSchedule(
            names, sizes, mode, self._batch_size * self._world, self._min_count, carry_remainder
        )
        self._schedule.set(0, self._schedule.check(caller, "weights", weights))

    @abstractmethod
    def _clock(self) -> int:
        """The global batch that the next yielded item belongs to."""

    @abstractmethod
    def _replan(self) -> None:
        """Drop planned batches (the weights or the epoch changed)."""

    @abstractmethod
    def _oldest_state(self) -> int:
        """The earliest global batch whose state can still be saved (older weight entries are dropped)."""

    @abstractmethod
    def _last_batch(self) -> int:
        """The global batch of the last index or item yielded (0 before any)."""

    # ------------------------------------------------------------------ weights

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain names, in the order of every per-domain vector."""
        return self._names

    @property
    def batch_size(self) -> int:
        """Examples (or items) per batch on each rank."""
        return self._batch_size

    @property
    def rank(self) -> int:
        """This process's rank in the global plan."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of ranks sharing each global batch."""
        return self._world

    @property
    def weights(self) -> Tensor:
        """(k,) float64: the sampling distribution q for the next batch."""
        return torch.tensor(self._schedule.at(self._clock())[1], dtype=torch.float64)

    @property
    def batch_sampling(self) -> Tensor:
        """(k,) float64: the realised shares of the batch last yielded (see ``effective_sampling``).

        The q that batch was drawn with: a ``set_weights`` after it (a controller's update on the step
        that trains on it) does not change it. When the loop consumes batches as they are yielded (no
        DataLoader workers), this is the batch in hand, so ``alpha / batch_sampling`` weights its loss
        without bias (``WeightingController.loss_multipliers`` uses it). Before the first batch: the
        shares of the first one.
        """
        q = self._schedule.at(self._last_batch())[1]
        return torch.from_numpy(self._schedule.shares(q).astype(np.float64))

    def sampling_of(self, batch: int) -> Tensor:
        """(k,) float64: the realised shares of global batch ``batch`` (0-based, counted since construction).

        ``batch_sampling`` is that of the batch last yielded; a loop behind a loader that prefetches
        (DataLoader workers, Accelerate's ``DataLoaderShard``, which pulls one batch ahead) knows which
        batch it holds, and its loss multipliers must divide by that batch's shares
        (``WeightingController.loss_multipliers(sampling=...)``).

        Raises:
            ValueError: for a batch whose weights have left the bounded history (``weight_history``).
        """
        caller = f"{self._caller}.sampling_of"
        batch = check_param(caller, "batch", batch, Interval(int, 0, None))
        first = self._schedule.entries[0][0]
        if batch < first:
            raise param_error(
                caller, "batch", f"a batch from {first} on (older weights have left the history)", batch
            )
        q = self._schedule.at(batch)[1]
        return torch.from_numpy(self._schedule.shares(q).astype(np.float64))

    @property
    def weight_history(self) -> list[tuple[int, list[float]]]:
        """``[(from_batch, q)]``: q is used from global batch ``from_batch`` (counted since construction).

        The entries a saved state can still need: from the one in force at the batch before the earliest
        batch whose state can be saved (:class:`DomainBatchSampler`: ``snapshot_history`` batches back;
        the mixing iterable: the current batch), or, in ``low_discrepancy`` mode, from the one its counts
        started under if older, to the latest change. Older changes are dropped, so that weights set
        every batch keep the memory and the state bounded; for a full record, log them where they are
        set (the ``log`` of ``WeightingController``).
        """
        return [(b, list(q)) for b, q in self._schedule.entries]

    def set_weights(self, weights: WeightsLike) -> None:
        """Use ``weights`` from the next batch on.

        A ``DataLoader`` with workers runs ahead of the training loop, so the loop sees the change that
        many batches later; :attr:`weight_history` records the exact batch (``docs/design.md``, "The
        domain batch sampler").

        Raises:
            ValueError: for negative, NaN, inf, all-zero, unknown or missing weights, or a positive weight
                on an empty domain.
        """
        q = self._schedule.check(f"{self._caller}.set_weights", "weights", weights)
        self._schedule.set(self._clock(), q)
        self._schedule.prune(self._oldest_state())
        self._replan()

    # ------------------------------------------------------------------ planning

    def _plan_next(self, at: Counters, rank: int, world: int) -> Planned | None:
        """Plan the batches from ``at`` up to the next weight change or epoch end (iid: block boundary).

        At most :meth:`_plan_length` batches: plans are a function of the counters alone, so their
        length changes the cost, never the batches.

        ``None`` when ``num_batches`` ends the epoch at ``at``. Stratified counts are for the global batch
        of ``batch_size * world`` slots, which may exceed the configured one (DataLoader workers).
        """
        from_batch, q = self._schedule.at(at.total)
        if at.ld_from == from_batch:
            ld_counts, lag = at.ld_counts, at.ld_lag
        else:  # q changed since: the counts restart, the low-discrepancy lags carry over
            ld_counts, lag = np.zeros_like(at.ld_counts), self._lag_at_change(at, q)
        # Cycling streams never restart, so batches are keyed by the absolute count; otherwise per epoch.
        cycling = self._stop == StopRule.CYCLE_FOREVER
        epoch_key, batch_key = (0, at.total) if cycling else (at.epoch, at.batch)
        nb = self._plan_length(at.total)
        if self._mode == Mode.IID:  # its slots' draws come from a generator per aligned block
            nb = min(nb, BLOCK - batch_key % BLOCK)
        change = self._schedule.next_change(at.total)
        if change is not None:
            nb = min(nb, change - at.total)
        if self._num_batches is not None:
            nb = min(nb, self._num_batches - at.batch)
        if nb <= 0:
            return None
        alloc = np.zeros(len(q), np.int64)
        carry = None
        if self._mode == Mode.STRATIFIED and self._carry:
            carry = self._schedule.carried(q, self._batch_size * world)
        elif self._mode == Mode.STRATIFIED:
            alloc = self._schedule.alloc(q, self._batch_size * world)
        plan = plan_block(
            self._mode, np.asarray(q), alloc, ld_counts, seed=self._seed, epoch_key=epoch_key,
            batch_key=batch_key, nb=nb, batch_size=self._batch_size, world_size=world, rank=rank,
            carry=carry, lag=lag,
        )  # fmt: skip
        return Planned(from_batch, q, epoch_key, plan, lag)

    def _needs_from(self, total: int, ld_from: int) -> int:
        """The first batch whose weights a state after ``total`` batches (counts from ``ld_from``) needs.

        The batch before it: ``batch_sampling`` reports its q until the next batch, and a controller
        divides by it right after a resume. In low-discrepancy mode also ``ld_from``: the lags carried
        at the next change start from the q its counts ran with.
        """
        last = max(total - 1, 0)
        return min(last, ld_from) if self._mode == Mode.LOW_DISCREPANCY else last

    def _lag_at_change(self, at: Counters, q: tuple[float, ...]) -> tuple[float, ...]:
        """The low-discrepancy lags carried into a schedule that starts after ``at`` (zeros otherwise).

        Restarting the sequence at every change would give the same first slots to the same domains
        every time: with weights changed every batch, a systematic error in the realised shares.
        """
        if self._mode != Mode.LOW_DISCREPANCY:
            return at.ld_lag
        previous = self._schedule.at(at.ld_from)[1]
        return carried_lag(np.asarray(at.ld_lag), distribution(previous), at.ld_counts, distribution(q))

    def _plan_length(self, total: int) -> int:
        """How many batches to plan from batch ``total``: up to the next expected weight change, ≤ BLOCK.

        At most :data:`BLOCK`, so that a plan's memory and its first batch's wait stay bounded. A weight
        change discards the rest of the plan. Changes often come at a fixed interval (a
        controller's ``update_every``), so the plan ends where the last interval, repeated, puts the next
        change; past that point, or before a second change, it grows with the batches since the last
        change, from ``PLAN_ROWS`` to a block (long plans spread the fixed cost of planning).
        """
        since, interval = total - self._schedule.entries[-1][0], self._schedule.interval
        if interval is not None and since < interval:
            return min(interval - since, BLOCK)  # a long interval must not make one huge plan
        return min(BLOCK, max(PLAN_ROWS, since))

    # ------------------------------------------------------------------ state

    def _fingerprint(self) -> dict[str, Any]:
        """The settings a resume must not change (a subclass may add more)."""
        return {
            "domains": list(self._names),
            "mode": self._mode,
            "stop": self._stop,
            "batch_size": self._batch_size,
            "world_size": self._world,
            "seed": self._seed,
            "carry_remainder": self._carry,
        }

    def _state(self, at: Counters, own: Mapping[str, Any]) -> dict[str, Any]:
        """A state dict: the common counters, the subclass's own entries, the weight history, fingerprint."""
        return {
            self.EPOCH_KEY: at.epoch,
            self.BATCH_KEY: at.batch,
            self.TOTAL_KEY: at.total,
            self.LD_COUNTS_KEY: np.asarray(at.ld_counts).tolist(),
            self.LD_FROM_KEY: at.ld_from,
            self.LD_LAG_KEY: list(at.ld_lag),
            **own,
            self.HISTORY_KEY: self._schedule.as_state(self._needs_from(at.total, at.ld_from)),
            self.FINGERPRINT_KEY: self._fingerprint(),
        }

    def _load(self, state_dict: Mapping[str, Any], *, ignore_fingerprint: bool = False) -> Counters:
        """Check a saved state, restore the weight history and return the saved counters.

        With ``ignore_fingerprint`` only the domain names must match: every per-domain entry is matched by
        position.
        """
        check_param(
            f"{self._caller}.load_state_dict",
            "ignore_fingerprint",
            ignore_fingerprint,
            Options((False, True)),
        )
        check_state_keys(self._caller, state_dict, self._STATE_KEYS)
        current, hint = self._fingerprint(), self._FINGERPRINT_HINT
        if ignore_fingerprint:
            current, hint = {"domains": current["domains"]}, ""
        check_fingerprint(
            self._caller, state_dict[self.FINGERPRINT_KEY], current, self._FINGERPRINT_DEFAULTS, hint=hint
        )
        k, owner = len(self._names), self._caller
        counters = [state_counts(owner, state_dict, key) for key in self._COUNTER_KEYS]
        ld_counts = state_counts(owner, state_dict, self.LD_COUNTS_KEY, k)
        lag = (0.0,) * k  # a state saved before lags were carried: the old restart, until the next change
        if self.LD_LAG_KEY in state_dict:
            lag = tuple(state_list(owner, state_dict, self.LD_LAG_KEY, k, "finite floats", _finite_float))
        saved = state_dict[self.FINGERPRINT_KEY]
        for key in ("batch_size", "world_size"):  # read below even when the fingerprint is ignored
            size = saved.get(key, 0)
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(
                    f"{owner}.load_state_dict: the fingerprint's {key!r} must be an int >= 0. Got {size!r}."
                )
        self._check_own(state_dict, ignore_fingerprint=ignore_fingerprint)
        # everything is checked: from here on the state is restored
        self._schedule.load(f"{owner}.load_state_dict", "state_dict", state_dict[self.HISTORY_KEY])
        epoch, batch, total, ld_from = (int(c) for c in counters)
        ld = np.asarray(ld_counts, dtype=np.int64).reshape(k)
        if (
            self._carry
            and saved.get("batch_size", 0) * saved.get("world_size", 0) != self._batch_size * self._world
        ):
            # The carried counts were per batch of another size (an elastic resume): restart the carry
            # here, as a weight change would. Low-discrepancy counts are per slot and carry over as they are.
            ld = np.zeros_like(ld)
        return Counters(epoch, batch, total, ld, ld_from, lag)

    def _check_own(  # noqa: B027  # a hook: a subclass without entries to check keeps this default
        self, state_dict: Mapping[str, Any], *, ignore_fingerprint: bool
    ) -> None:
        """Check a subclass's own entries of a state whose keys and fingerprint :meth:`_load` checked.

        Runs before anything is restored, so that a refused state leaves the mixer as it was.
        """


def _finite_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
