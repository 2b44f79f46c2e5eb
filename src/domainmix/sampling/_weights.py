"""Weight bookkeeping shared by the sampler and the mixing iterable: validation, history, allocation."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from domainmix._apportion import CARRY_DENOMINATOR, apportion, carried_allocation
from domainmix._validation import param_error, weight_array
from domainmix.sampling._plan import Mode

__all__ = ["WeightSchedule", "check_names"]

WeightsLike = Mapping[str, float] | Sequence[float] | Tensor


def check_names(caller: str, name: str, mapping: Any) -> tuple[str, ...]:
    """Domain names from a non-empty mapping keyed by non-empty strings."""
    if not isinstance(mapping, Mapping) or len(mapping) == 0:
        raise param_error(caller, name, "a non-empty mapping from domain name to its data", mapping)
    names = tuple(mapping)
    if not all(isinstance(n, str) and n for n in names):
        raise param_error(caller, name, "a mapping keyed by non-empty strings", list(names))
    return names


class WeightSchedule:
    """The weight history ``[(from_batch, q)]`` and the allocation that goes with each entry.

    Entries are sorted by ``from_batch``; the weights for global batch ``b`` are those of the last entry
    with ``from_batch <= b``. Entries after the current batch exist only after loading a state saved
    ``consumed`` batches ago: they replay ``set_weights`` calls that the prefetching sampler had already
    applied. The owner drops the entries no state can need any more (:meth:`prune`), so an online method
    that changes the weights every batch costs O(1) per change and a bounded state, however long it runs.
    """

    def __init__(
        self,
        names: Sequence[str],
        sizes: Sequence[int],
        mode: str,
        global_batch: int,
        min_count: int,
        carry: bool = False,
    ):
        self.names = tuple(names)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._empty = np.flatnonzero(self.sizes == 0)  # domains whose weight must be 0
        self.mode = mode
        self.global_batch = global_batch
        self.min_count = min_count
        self.carry = carry  # stratified with the rounding remainders carried across batches
        self.entries: list[tuple[int, tuple[float, ...]]] = []
        self._starts: list[int] = []  # the entries' from_batch, for bisection
        self.interval: int | None = None  # batches between the last two changes (kept through pruning)
        self._alloc: dict[tuple[tuple[float, ...], int], np.ndarray] = {}
        self._carried: dict[tuple[tuple[float, ...], int], tuple[np.ndarray, np.ndarray]] = {}

    def check(self, caller: str, name: str, weights: WeightsLike | None) -> tuple[float, ...]:
        """Validate user weights (``None``: proportional to domain size) and return them normalised."""
        if weights is None:
            q = self.sizes / self.sizes.sum()
        else:
            if isinstance(weights, np.ndarray) and weights.dtype.kind in "fiu":
                weights = torch.from_numpy(weights.astype(np.float64))
            q = weight_array(caller, name, weights, self.names)
        if self._empty.size and (q[self._empty] > 0).any():
            starved = [n for n, w, s in zip(self.names, q, self.sizes, strict=True) if w > 0 and s == 0]
            raise param_error(caller, name, f"zero for every empty domain (empty: {starved})", q.tolist())
        positive = int(np.count_nonzero(q)) if self.min_count else 0
        if self.mode == Mode.STRATIFIED and self.min_count * positive > self.global_batch:
            raise param_error(
                caller,
                "min_count",
                f"at most global batch // positive-weight domains = {self.global_batch} // {positive}",
                self.min_count,
            )
        return tuple(q.tolist())

    def set(self, from_batch: int, q: tuple[float, ...]) -> None:
        """Record ``q`` from ``from_batch`` on; it replaces any entry at or after that batch."""
        cut = bisect_left(self._starts, from_batch)
        del self.entries[cut:], self._starts[cut:]
        if self._starts:
            self.interval = from_batch - self._starts[-1]
        self.entries.append((from_batch, q))
        self._starts.append(from_batch)

    def at(self, batch: int) -> tuple[int, tuple[float, ...]]:
        """The entry in force for global batch ``batch``."""
        return self.entries[max(bisect_right(self._starts, batch) - 1, 0)]

    def next_change(self, batch: int) -> int | None:
        """The first ``from_batch`` after ``batch``, if any."""
        i = bisect_right(self._starts, batch)
        return self._starts[i] if i < len(self._starts) else None

    def prune(self, batch: int) -> None:
        """Forget the entries that no batch from ``batch`` on uses (the one in force at ``batch`` stays)."""
        cut = bisect_right(self._starts, batch) - 1
        if cut > 0:
            del self.entries[:cut], self._starts[:cut]

    def alloc(self, q: tuple[float, ...], global_batch: int | None = None) -> np.ndarray:
        """Per-global-batch counts for ``q`` (stratified mode), cached per weight vector.

        ``global_batch`` defaults to the one given at construction; the mixing iterable passes a larger
        one inside a DataLoader with workers, where every worker acts as a rank.
        """
        size = self.global_batch if global_batch is None else global_batch
        counts = self._alloc.get((q, size))
        if counts is None:
            counts = _cache(self._alloc, (q, size), apportion(np.asarray(q), size, self.min_count))
        return counts

    def carried(self, q: tuple[float, ...], global_batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``carried_allocation(q, global batch)``: whole examples and fractions per batch, cached."""
        size = self.global_batch if global_batch is None else global_batch
        split = self._carried.get((q, size))
        if split is None:
            split = _cache(self._carried, (q, size), carried_allocation(np.asarray(q), size))
        return split

    def shares(self, q: tuple[float, ...]) -> np.ndarray:
        """(k,) float64: the long-run share of each domain in the batches (what the sampler realises)."""
        if self.mode != Mode.STRATIFIED:
            return np.asarray(q, dtype=np.float64)
        if self.carry:
            base, frac = self.carried(q)
            return (base + frac / CARRY_DENOMINATOR) / self.global_batch
        return self.alloc(q) / self.global_batch

    def active(self, q: tuple[float, ...]) -> np.ndarray:
        """(k,) bool: domains that are actually drawn, so that they count for the stop rules."""
        return self.shares(q) > 0

    def as_state(self, batch: int) -> list[list[Any]]:
        """JSON-able history from the entry in force at ``batch`` on (a resume at ``batch`` needs no more)."""
        first = max(bisect_right(self._starts, batch) - 1, 0)
        return [[b, list(q)] for b, q in self.entries[first:]]

    def load(self, caller: str, name: str, history: Any) -> None:
        """Replace the history with a saved one (validated)."""
        if not isinstance(history, Sequence) or len(history) == 0:
            raise param_error(caller, name, "a non-empty list of [from_batch, weights] pairs", history)
        entries = []
        for item in history:
            if (
                not isinstance(item, Sequence)
                or len(item) != 2
                or isinstance(item[0], bool)
                or not isinstance(item[0], int)
                or item[0] < 0
            ):
                raise param_error(caller, name, "a list of [from_batch >= 0, weights] pairs", history)
            q = self.check(caller, name, list(item[1]))
            saved = tuple(float(x) for x in item[1])
            # Keep the saved floats bit for bit when already normalised: renormalising can move the last
            # bit, and iid / low-discrepancy draws must be exactly those of the uninterrupted run.
            entries.append((int(item[0]), saved if abs(sum(saved) - 1.0) < 1e-12 else q))
        entries.sort(key=lambda e: e[0])
        starts = [b for b, _ in entries]
        if len(set(starts)) < len(starts):  # checked before anything is assigned
            raise param_error(caller, name, "weight history entries with distinct from_batch", history)
        self.entries, self._starts = entries, starts
        self.interval = starts[-1] - starts[-2] if len(starts) > 1 else None


_CACHED = 16  # weight vectors whose allocation is kept: online methods set a new vector every update


def _cache(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    """Store ``value`` under ``key``, dropping the oldest entry of a full cache (dicts keep insert order)."""
    if len(cache) >= _CACHED:
        del cache[next(iter(cache))]
    cache[key] = value
    return value
