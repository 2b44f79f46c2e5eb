"""Apportionment: turning a distribution q over domains into integer counts and domain sequences.

A neutral module (it depends only on ``_validation``), shared by the samplers and the strategies. Two pure
building blocks, both deterministic (no randomness at all):

* :func:`allocate_counts` rounds ``total * q`` to integers that sum to ``total`` (largest remainder,
  Hamilton's method) with an optional per-domain minimum. The stratified sampler uses it once per weight
  change for the composition of every global batch; ``variance_aware`` uses it for its batch allocation.
* :func:`low_discrepancy_sequence` emits a domain id per slot such that every prefix of the sequence
  (counted from the last weight change) has ``|count_i(t) - q_i t| < 1`` for every domain;
  :func:`carried_lag` carries each domain's lag across a weight change, after which the bound is on
  ``count_i(t) - q_i t - lag_i``.
* :func:`carried_counts` gives each batch ``floor(B q_i)`` or ``ceil(B q_i)`` examples of domain i, so
  that the counts summed over the batches since the last weight change stay within one of ``b B q_i``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from torch import Tensor

from domainmix._validation import Interval, check_param, check_weight_vector, param_error

__all__ = [
    "CARRY_DENOMINATOR", "MAX_TOTAL", "allocate_counts", "apportion", "as_distribution", "carried_allocation",
    "carried_counts", "carried_lag", "distribution", "edf_plan", "edf_sequence", "low_discrepancy_sequence",
    "Periodic",
]  # fmt: skip

MAX_TOTAL = 1 << 53  # the largest total allocate_counts splits (float64 holds every integer up to it)

# Longest period (in slots) of a rational q for which the low-discrepancy sequence is cached and tiled.
_MAX_PERIOD = 1 << 16


def as_distribution(
    caller: str, name: str, q: Tensor | np.ndarray | Sequence[float], normalize: bool = True
) -> np.ndarray:
    """Validate a weight vector of any length and return it (normalised) as float64 numpy."""
    values: Tensor | Sequence[float]
    if isinstance(q, np.ndarray):
        if q.dtype.kind not in "fiu":
            raise param_error(caller, name, "a real-valued array", q)
        values = q.astype(np.float64).tolist() if q.ndim == 1 else q.tolist()
    else:
        values = q
    size = values.numel() if isinstance(values, Tensor) else len(values)
    names = [str(i) for i in range(size)]
    return check_weight_vector(caller, name, values, names, normalize=normalize).numpy().astype(np.float64)


def allocate_counts(q: Tensor | np.ndarray | Sequence[float], total: int, min_count: int = 0) -> np.ndarray:
    """Split ``total`` slots among domains in proportion to ``q`` (largest-remainder rounding).

    Every domain first gets ``floor(total * q_i)``; the slots left over go to the largest fractional parts,
    ties to the lower index. Then every domain with ``q_i > 0`` is raised to ``min_count``, taking each
    extra slot from the domain whose count most exceeds its target ``total * q_i`` (ties: lower index)
    among those still above ``min_count``. Domains with ``q_i = 0`` always get 0.

    With ``min_count = 0`` the result satisfies ``|b_i - total * q_i| < 1`` and minimises the largest
    deviation; it is permutation-equivariant (up to ties) and invariant to rescaling ``q``.

    Args:
        q: (k,) non-negative weights with a positive sum (normalised internally).
        total: number of slots, an int in [0, 2**53] (``MAX_TOTAL``).
        min_count: minimum count for every domain with positive weight, an int >= 0 (default 0).

    Returns:
        (k,) int64 counts summing exactly to ``total``.

    Raises:
        ValueError: for bad weights, a negative ``total``, or ``min_count`` times the number of
            positive-weight domains exceeding ``total``.

    Examples:
        >>> allocate_counts([0.5, 0.3, 0.2], 8).tolist()
        [4, 2, 2]
        >>> allocate_counts([0.9, 0.1, 0.0], 8, min_count=2).tolist()
        [6, 2, 0]
    """
    caller = "allocate_counts"
    # up to 2**53 the float targets total * p_i are exact enough that the rounding fix-up below holds
    total = check_param(caller, "total", total, Interval(int, 0, MAX_TOTAL))
    min_count = check_param(caller, "min_count", min_count, Interval(int, 0, None))
    raw = as_distribution(caller, "q", q, normalize=False)
    positive = int((raw > 0).sum())
    if min_count * positive > total:
        raise param_error(
            caller,
            "min_count",
            f"at most total // (number of positive-weight domains) = {total} // {positive}",
            min_count,
        )
    return apportion(raw, total, min_count)


def apportion(raw: np.ndarray, total: int, min_count: int = 0) -> np.ndarray:
    """:func:`allocate_counts` of weights already validated (float64, non-negative, positive sum, and
    ``min_count`` feasible): the sampler's path, which validated them when they were set."""
    p = raw / raw.sum()
    positive = raw > 0  # not p > 0: a subnormal weight may underflow when normalised
    target = total * p
    counts: np.ndarray = np.floor(target).astype(np.int64)
    frac = target - counts
    left = total - int(counts.sum())
    if left > 0:
        # Stable sort on -frac: equal remainders go to the lower index first.
        order = np.argsort(-frac, kind="stable")
        order = order[positive[order]]
        counts[order[:left]] += 1
    elif left < 0:  # float round-off pushed a floor above the true value; undo on the smallest fractions
        order = np.argsort(frac, kind="stable")
        order = order[counts[order] > 0]
        counts[order[:-left]] -= 1
    if min_count > 0:
        _raise_to_minimum(counts, target, positive, min_count)
    return counts


def _raise_to_minimum(counts: np.ndarray, target: np.ndarray, positive: np.ndarray, m: int) -> None:
    short = positive & (counts < m)
    excess = int((m - counts[short]).sum())
    counts[short] = m
    for _ in range(excess):  # at most m * k iterations, once per weight change
        surplus = np.where(positive & (counts > m), counts - target, -np.inf)
        counts[int(np.argmax(surplus))] -= 1  # argmax returns the lowest index among ties


def low_discrepancy_sequence(
    q: Tensor | np.ndarray | Sequence[float], counts: np.ndarray | Sequence[int], n: int
) -> np.ndarray:
    """The next ``n`` domain ids of the earliest-deadline-first (Pfair) sequence for ``q``.

    Time ``t`` counts slots since the last weight change and ``counts`` are the ids emitted so far (so
    ``t = sum(counts)``). The j-th item (j = 1, 2, ...) of domain i is released at slot
    ``floor((j - 1) / q_i)`` and due by ``j / q_i``; each slot takes the released item with the earliest
    deadline (ties: earlier release, then lower id). Uniprocessor EDF meets every deadline when the rates
    sum to 1 (Baruah et al., 1996), which is exactly ``|count_i(t) - q_i t| < 1`` for every domain and
    every prefix. The sequence is a function of ``(q, counts)`` only, so a resume continues it exactly.

    Static orders (sorting all items by deadline, Megatron's largest-deficit rule) cannot guarantee this:
    they are divisor methods, which Balinski & Young showed violate quota. EDF is sequential, so when
    ``q`` is rational with a period ``D <= 65536`` (q_i D integral, e.g. weights with two decimals) the
    sequence repeats every D slots: one period is computed once and tiled with numpy. Otherwise a heap
    loop runs per slot (about 1 us).

    Args:
        q: (k,) weights, normalised internally; zero-weight domains are never emitted.
        counts: (k,) non-negative ints, ids emitted since the last weight change.
        n: how many ids to emit.

    Returns:
        (n,) int64 domain ids.
    """
    p = as_distribution("low_discrepancy_sequence", "q", q)
    n = check_param("low_discrepancy_sequence", "n", n, Interval(int, 0, None))
    return edf_sequence(tuple(p.tolist()), counts, n)


def edf_sequence(
    p: tuple[float, ...], counts: np.ndarray | Sequence[int], n: int, lag: tuple[float, ...] | None = None
) -> np.ndarray:
    """:func:`low_discrepancy_sequence` without the argument checks, for ``p`` from :func:`distribution`.

    The samplers' weights are validated once, when they are set, and planned many times.

    ``lag``: each domain's lag (its target minus its count) carried from before the weight change
    (:func:`carried_lag`); the sequence then treats domain i as if it had ``-lag_i`` items at slot 0:
    item j is released at ``floor((j - 1 - lag_i) / q_i)`` and due at ``(j - lag_i) / q_i``. With a
    rational q of period D the EDF order returns to its state once a period realises exactly ``q D``
    (within the first two periods in every case tried): for a plan longer than two periods that period
    is found once and repeated, a shorter one is looped; both in exact arithmetic, so they agree.
    """
    seq = edf_plan(p, counts, n, lag)
    return seq if isinstance(seq, np.ndarray) else seq.ids()


def edf_plan(
    p: tuple[float, ...], counts: np.ndarray | Sequence[int], n: int, lag: tuple[float, ...] | None = None
) -> Periodic | np.ndarray:
    """:func:`edf_sequence` as a :class:`Periodic` where it repeats a period, else as its ids."""
    c = np.asarray(counts, dtype=np.int64)
    t = int(c.sum())
    if lag is not None and not any(lag):
        lag = None
    exact: tuple[Fraction, ...] | None = None  # q as fractions, for the loop with a lag
    if lag is None:
        period = _rational_period(p)
    else:
        found = _period_of(p)
        if found is None:  # no short period: the loop, in floats
            return _edf(p, c.tolist(), n, lag)
        exact = found[0]
        # A short plan (weights that change every few batches) is cheaper to loop than to search a period.
        period = None if n <= _LAGGED_PERIODS * found[1] else _lagged_period(p, lag)
    if period is not None:
        seq = Periodic(*period, t, n)
        if np.array_equal(seq.count_at(t), c):
            return seq
        # counts off the periodic path (not produced by this function): fall through to the exact loop
    if exact is None or lag is None:
        return _edf(p, c.tolist(), n)
    # Exact arithmetic, so that the loop from any counts and the tiled period are one sequence.
    return _edf(exact, c.tolist(), n, tuple(Fraction(x) for x in lag))


class _Run(NamedTuple):
    """A stretch of a low-discrepancy sequence: its ids, the (len + 1, k) counts after each prefix, and the
    column of each position when the positions are laid out grouped by domain (in order within one)."""

    ids: np.ndarray
    prefix: np.ndarray
    column: np.ndarray


class Periodic(NamedTuple):
    """Slots ``[start, start + n)`` of a sequence that emits ``head`` and then repeats ``cycle``.

    Absolute slot ``a`` holds ``head.ids[a]`` below ``h = len(head.ids)``, else ``cycle.ids[(a - h) % d]``.
    Counts and draw numbers follow from the two runs' prefix counts, in O(k) per slot boundary asked and
    O(1) per slot, without scanning or sorting the slots (the low-discrepancy sampler's plans).
    """

    head: _Run
    cycle: _Run
    start: int
    n: int

    def ids(self) -> np.ndarray:
        """(n,) the domain ids of the slots."""
        h, d = len(self.head.ids), len(self.cycle.ids)
        lead = self.head.ids[self.start : self.start + self.n]
        # the repeats start at cycle position 0 after the head, else where ``start`` falls in the cycle
        tail = _repeat(self.cycle.ids, self.n - len(lead), max(self.start - h, 0) % d)
        return np.concatenate([lead, tail]) if len(lead) else tail

    def prefix(self, a: np.ndarray) -> np.ndarray:
        """(len(a), k) ids of each domain in absolute slots ``[0, a)``, for an int64 array ``a``."""
        h, d = len(self.head.ids), len(self.cycle.ids)
        repeats, within = np.divmod(np.maximum(a - h, 0), d)
        counts: np.ndarray = self.head.prefix[np.minimum(a, h)] + self.cycle.prefix[within]
        counts += repeats[:, None] * self.cycle.prefix[d]
        return counts

    def count_at(self, a: int) -> np.ndarray:
        """(k,) ids of each domain in absolute slots ``[0, a)``: :meth:`prefix` of one slot boundary."""
        h = len(self.head.ids)
        counts: np.ndarray = self.head.prefix[min(a, h)]
        if a > h:
            repeats, within = divmod(a - h, len(self.cycle.ids))
            counts = counts + self.cycle.prefix[within] + repeats * self.cycle.prefix[-1]
        return counts

    def draws(self) -> np.ndarray:
        """(n,) each slot's draw number within its domain: its domain's ids in ``[start, slot)``."""
        h, d = len(self.head.ids), len(self.cycle.ids)
        before = self.count_at(self.start)  # (k,) counted before the plan starts
        at = np.arange(self.start, min(h, self.start + self.n))
        lead = self.head.prefix[at, self.head.ids[at]] - before[self.head.ids[at]]
        # Slot h + m d + j (domain i = cycle[j]) has draw number first[j] + m per[j]: the count of i
        # after the head and j cycle slots, plus m whole cycles of it.
        cycle = self.cycle.ids
        first = self.head.prefix[h, cycle] + self.cycle.prefix[np.arange(d), cycle] - before[cycle]
        per = self.cycle.prefix[d, cycle]
        n, (m0, j0) = self.n - len(lead), divmod(max(self.start - h, 0), d)
        repeats = np.arange(m0, m0 - (-(j0 + n) // d))[:, None]  # the cycles the tail touches
        tail = (first + repeats * per).ravel()[j0 : j0 + n]
        return np.concatenate([lead, tail]) if len(lead) else tail

    def take(self, runs: Sequence[np.ndarray]) -> np.ndarray:
        """(n,) each slot's value ``runs[i][m]``, i its domain and m its draw number.

        ``runs[i]`` holds domain i's values for the plan, in draw order (as many as it has slots). The
        repeats are filled as a grid of whole cycles: each domain's columns of the grid, sorted by domain,
        take one contiguous slice of its run, and one gather puts the columns in cycle order. So the
        cost per slot is a few copies, with no per-slot index (:meth:`draws`) unless the cycle is longer
        than the plan.
        """
        h, d = len(self.head.ids), len(self.cycle.ids)
        lead_n = max(min(h, self.start + self.n) - self.start, 0)
        tail_n = self.n - lead_n
        if tail_n < d:  # a grid of whole cycles would be mostly outside the plan
            return self._gather(runs)
        # the head (at most _LAGGED_PERIODS cycles): a gather of its slots' draws
        used = np.zeros(len(runs), dtype=np.int64)  # each run's values that the head takes
        head = None
        if lead_n:
            lead = self._replace(n=lead_n)
            used = np.diff(lead.prefix(np.array([self.start, self.start + lead_n])), axis=0)[0]
            head = lead._gather([run[:c] for run, c in zip(runs, used.tolist(), strict=True)])
        # the repeats: rows of whole cycles from the one the tail starts in, then cut to the tail's slots
        j0 = max(self.start - h, 0) % d
        rows = -(-(j0 + tail_n) // d)
        per_cycle, skipped = self.cycle.prefix[d], self.cycle.prefix[j0]  # skipped: before j0 in row 0
        grid = np.empty((rows, d), dtype=np.result_type(*runs))
        first = 0
        for i, per in enumerate(per_cycle.tolist()):
            if per:
                block = np.empty(rows * per, dtype=grid.dtype)
                drawn = runs[i][used[i] :]
                block[skipped[i] : skipped[i] + len(drawn)] = drawn
                grid[:, first : first + per] = block.reshape(rows, per)
                first += per
        tail = np.take(grid, self.cycle.column, axis=1).ravel()[j0 : j0 + tail_n]
        return tail if head is None else np.concatenate([head, tail])

    def _gather(self, runs: Sequence[np.ndarray]) -> np.ndarray:
        """:meth:`take` slot by slot: the runs end to end, gathered at each slot's run offset plus draw."""
        lengths = np.array([len(r) for r in runs], dtype=np.int64)
        gathered: np.ndarray = np.concatenate(runs)[(np.cumsum(lengths) - lengths)[self.ids()] + self.draws()]
        return gathered


def _repeat(cycle: np.ndarray, n: int, skip: int = 0) -> np.ndarray:
    """Elements ``skip`` to ``skip + n`` of ``cycle`` repeated (``np.resize`` of ``np.roll``, faster)."""
    return np.tile(cycle, -(-(skip + n) // len(cycle)))[skip : skip + n]


def carried_lag(
    lag: np.ndarray, q: tuple[float, ...], counts: np.ndarray, new_q: tuple[float, ...]
) -> tuple[float, ...]:
    """Each domain's lag (target minus count, in slots) when q changes to ``new_q``.

    ``lag`` was carried into the schedule that ran with ``q`` and emitted ``counts``; its lag is now
    ``lag + q t - counts`` (t = sum(counts)). A domain that ``new_q`` leaves out (weight 0) cannot be
    drawn to catch up: its lag is dropped and the others are shifted to sum to 0, as every lag of an
    EDF schedule does (the slots are all given out).
    """
    t = int(counts.sum())
    now = np.asarray(lag, dtype=np.float64) + np.asarray(q) * t - counts
    active = np.asarray(new_q) > 0
    now[~active] = 0.0
    now[active] -= now[active].sum() / active.sum()
    # on a grid of 2**-20 slots: exact, small fractions for the exact-arithmetic sequence of a rational q
    return tuple((np.round(now * _LAG_GRID) / _LAG_GRID).tolist())


@lru_cache(maxsize=64)
def distribution(q: tuple[float, ...]) -> tuple[float, ...]:
    """``as_distribution(q)`` as a tuple, cached.

    The normalisation :func:`low_discrepancy_sequence` applies, so that a sampler planning with
    :func:`edf_sequence` emits the same sequence.
    """
    return tuple(as_distribution("low_discrepancy_sequence", "q", q).tolist())


# The per-batch targets B q_i are rounded to multiples of 1 / CARRY_DENOMINATOR, so that the carried
# remainders are exact integers (no drift, and a resume recomputes the same schedule).
CARRY_DENOMINATOR = 1 << 32


def carried_allocation(q: np.ndarray | Sequence[float], total: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-batch target ``total * q`` as whole examples plus exact fractions: ``(base, frac)``.

    ``allocate_counts(q, total * CARRY_DENOMINATOR)`` split into ``base = A // D`` and
    ``frac = A % D`` (D = ``CARRY_DENOMINATOR``): the batch target of domain i is ``base_i + frac_i / D``,
    within ``1 / D`` of ``total * q_i``, and ``sum(frac) / D`` is a whole number of extra slots.
    """
    scaled = allocate_counts(q, total * CARRY_DENOMINATOR)
    base, frac = np.divmod(scaled, CARRY_DENOMINATOR)
    return base, frac


def carried_counts(base: np.ndarray, frac: np.ndarray, since: np.ndarray, nb: int) -> np.ndarray:
    """Per-domain counts of the next ``nb`` batches, the rounding remainders carried across batches.

    Batch b (counted from the last weight change, whose batches ``since`` counts per domain) holds
    ``base_i + e_i(b)`` examples of domain i, with ``e_i(b)`` in {0, 1} and ``sum_i e_i(b) = m =
    sum(frac) / D``. Choosing the m domains of each batch is Pfair scheduling of m processors by tasks
    of weights ``w_i = frac_i / D`` (Baruah et al. 1996, "Proportionate progress"; the batches are the
    time slots): the PD² rule (Anderson & Srinivasan 2004, "Mixed Pfair/ERfair scheduling of
    asynchronous periodic tasks", Section 2) runs, at each batch, the m eligible subtasks with the
    earliest pseudo-deadline ``d(T_j) = ceil(j / w)``, ties to the larger b-bit ``ceil(j / w) - floor(j /
    w)``, then to the later group deadline ``ceil(ceil(d (1 - w)) / (1 - w))`` (heavy tasks, w >= 1/2;
    light tasks 0), then to the lower index; subtask j is eligible from batch ``floor((j - 1) / w)``.
    PD² is optimal when the weights sum to m, so every lag stays in (-1, 1)::

        |sum_{batches c < b} count_i(c) - b (base_i + w_i)| < 1    for every b and i,

    and each batch holds ``floor`` or ``ceil`` of its target. All arithmetic is on integers.

    Args:
        base: (k,) int64 whole examples per batch (:func:`carried_allocation`).
        frac: (k,) int64 numerators of the fractional parts over ``CARRY_DENOMINATOR``.
        since: (k,) examples per domain in the batches since the weight change (a whole number of them).
        nb: how many batches to plan.

    Returns:
        (nb, k) int64 counts; every row sums to ``sum(base) + m``.
    """
    d_ = CARRY_DENOMINATOR
    size = int(base.sum()) + int(frac.sum()) // d_
    t = int(since.sum()) // size  # batches since the change
    extras = [int(x) for x in since - t * base]  # e_i summed so far: subtask j = extras + 1 is next
    out = np.tile(base, (nb, 1))
    weights = {i: int(w) for i, w in enumerate(frac.tolist()) if w > 0}
    m = sum(weights.values()) // d_
    # each task's next subtask: (release, PD² priority key); recomputed only when the task runs
    nxt = {i: _subtask(i, extras[i] + 1, w) for i, w in weights.items()}
    for row in range(nb):
        b = t + row
        ready = sorted(key for release, key in nxt.values() if release <= b)
        if len(ready) < m:  # cannot happen with weights summing to m (PD² is optimal); never a short batch
            raise RuntimeError(f"carried_counts: {len(ready)} eligible domains for {m} extra slots")
        for *_, i in ready[:m]:
            out[row, i] += 1
            extras[i] += 1
            nxt[i] = _subtask(i, extras[i] + 1, weights[i])
    return out


def _subtask(i: int, j: int, w: int) -> tuple[int, tuple[int, int, int, int]]:
    """Subtask j of task i, of weight ``w / CARRY_DENOMINATOR``: its release and its PD² priority key.

    The key sorts by deadline, then the larger b-bit, then the later group deadline, then the lower index.
    """
    d_ = CARRY_DENOMINATOR
    release = ((j - 1) * d_) // w
    deadline = _ceil_div(j * d_, w)
    b_bit = deadline - (j * d_) // w
    group = _ceil_div(_ceil_div(deadline * (d_ - w), d_) * d_, d_ - w) if 2 * w >= d_ else 0
    return release, (deadline, -b_bit, -group, i)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _run(ids: np.ndarray, k: int) -> _Run:
    onehot = np.zeros((len(ids) + 1, k), dtype=np.int64)
    onehot[np.arange(1, len(ids) + 1), ids] = 1
    run = _Run(ids, np.cumsum(onehot, axis=0), np.argsort(np.argsort(ids, kind="stable")))
    for array in run:  # periods are cached (lru_cache): views of them are handed out, never to be written
        array.flags.writeable = False
    return run


@lru_cache(maxsize=64)
def _period_of(p: tuple[float, ...]) -> tuple[tuple[Fraction, ...], int] | None:
    """q as exact fractions and its period D (q_i D integral), if D is at most ``_MAX_PERIOD``."""
    fracs = tuple(Fraction(x).limit_denominator(_MAX_PERIOD) for x in p)
    if any(abs(float(f) - x) > 1e-15 for f, x in zip(fracs, p, strict=True)) or sum(fracs) != 1:
        return None
    d = math.lcm(*(f.denominator for f in fracs))
    return None if d > _MAX_PERIOD else (fracs, d)


@lru_cache(maxsize=64)
def _rational_period(p: tuple[float, ...]) -> tuple[_Run, _Run] | None:
    """(empty head, one period) of the sequence from slot 0 without a lag, for a q with a short period."""
    found = _period_of(p)
    if found is None:
        return None
    fracs, d = found
    # Exact rational rates make the period exact: at t = D every lag is 0 and EDF starts over.
    return _run(np.zeros(0, dtype=np.int64), len(p)), _run(_edf(fracs, [0] * len(p), d), len(p))


_LAGGED_PERIODS = 2  # periods searched for the one that realises q D exactly
_LAG_GRID = 1 << 20  # carried lags are multiples of 1 / _LAG_GRID


@lru_cache(maxsize=16)
def _lagged_period(p: tuple[float, ...], lag: tuple[float, ...]) -> tuple[_Run, _Run] | None:
    """(head, period) of the sequence from slot 0 with a carried lag: the head runs until the first
    period that realises exactly q D; from there the EDF state (the lags) repeats every D slots."""
    found = _period_of(p)
    if found is None:
        return None
    fracs, d = found
    target = np.array([int(f * d) for f in fracs], dtype=np.int64)
    seq = _edf(fracs, [0] * len(p), _LAGGED_PERIODS * d, tuple(Fraction(x) for x in lag))
    for j in range(_LAGGED_PERIODS):
        cycle = seq[j * d : (j + 1) * d]
        if np.array_equal(np.bincount(cycle, minlength=len(p)), target):
            return _run(seq[: j * d], len(p)), _run(cycle, len(p))
    return None


def _edf(
    p: tuple[float | Fraction, ...],
    counts: list[int],
    n: int,
    lag: tuple[float | Fraction, ...] | None = None,
) -> np.ndarray:
    # The per-slot loop of every low-discrepancy plan without a short period: kept flat (local names,
    # one list append per slot) because it runs in Python, ~1 us a slot.
    # A lag l_i shifts domain i's items: v = count - l_i items are "done" (item v + 1 released at
    # floor(v / w), due at (v + 1) / w). Without a lag, v is the count itself.
    t = sum(counts)
    shift = [0] * len(p) if lag is None else lag
    ready: list[tuple[float | Fraction, int, int]] = []  # (deadline, release, id) of released items
    waiting: list[tuple[int, float | Fraction, int]] = []  # (release, deadline, id) of items not yet released
    push, pop, floor = heapq.heappush, heapq.heappop, math.floor
    for i, w in enumerate(p):
        if w > 0:
            v = counts[i] - shift[i]
            release = floor(v / w)
            if release <= t:
                push(ready, ((v + 1) / w, release, i))
            else:
                push(waiting, (release, (v + 1) / w, i))
    out: list[int] = []
    emit = out.append
    for s in range(t, t + n):
        while waiting and waiting[0][0] <= s:
            release, deadline, i = pop(waiting)
            push(ready, (deadline, release, i))
        i = pop(ready)[2]
        emit(i)
        counts[i] += 1
        w = p[i]
        v = counts[i] - shift[i]
        release = floor(v / w)  # item v + 1 of domain i: released at floor(v / w), due at (v + 1) / w
        if release <= s + 1:
            push(ready, ((v + 1) / w, release, i))
        else:
            push(waiting, (release, (v + 1) / w, i))
    return np.array(out, dtype=np.int64)
