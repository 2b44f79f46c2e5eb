"""The global domain plan: which domain fills each slot of each global batch, and which slots a rank owns.

Every rank computes the same plan from the same state, so no communication is needed and the global
batch (``batch_size * world_size`` slots) has the target composition exactly. Plans are made for up to
:data:`BLOCK` consecutive batches. The stratified and low-discrepancy plans are functions of the
counters alone; the iid mode's randomness comes from a generator keyed by ``(seed, epoch_key, block
number)`` with blocks aligned to absolute batch numbers (its plans never cross one), so batch ``b`` is
the same whether it is drawn in one run or after a resume at any point.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import accumulate, pairwise
from typing import NamedTuple

import numpy as np

from domainmix._apportion import Periodic, carried_counts, distribution, edf_plan
from domainmix._validation import Interval, Options, check_param, param_error

__all__ = [
    "BLOCK", "PLAN_ROWS", "Mode", "SlotPlan", "StopRule", "block_rng", "plan_block", "rows_before_stop",
    "in_yield_order", "stable_order",
]  # fmt: skip

BLOCK = 256  # batches per block: the alignment of the per-block random generators
# The shortest plan (``DomainMixer._plan_length``). A weight change discards the rest of a plan, so short
# plans waste little when weights change often, and long ones spread the fixed cost of planning (most
# of it on domains past the materialisation limit).
PLAN_ROWS = 32

_TAG_BLOCK = 2  # distinguishes block generators from the per-pass permutation generators (tag 1)


class Mode:
    """How the domain of each slot is chosen.

    Attributes:
        STRATIFIED: every global batch holds exactly ``allocate_counts(q, batch_size * world_size,
            min_count)`` examples per domain, each domain's slots spread evenly over the batch.
        LOW_DISCREPANCY: a deterministic domain sequence (earliest-deadline-first) whose counts stay within
            one example of ``q_i t + lag_i`` for every prefix of ``t`` examples since the last weight
            change, ``lag_i`` being the lag carried in at the change (0 before any), so the counts follow
            the running sum of q across changes (docs/design.md, "Modes").
        IID: each slot's domain is drawn independently from ``q``.
    """

    STRATIFIED = "stratified"
    LOW_DISCREPANCY = "low_discrepancy"
    IID = "iid"
    ALL = (STRATIFIED, LOW_DISCREPANCY, IID)


class StopRule:
    """When an epoch (one ``__iter__``) ends.

    Attributes:
        CYCLE_FOREVER: never, unless ``num_batches`` is set; an exhausted domain starts a new pass
            (a fresh permutation) and the streams continue across ``__iter__`` calls.
        FIRST_EXHAUSTED: before the first global batch that would make a positive-weight domain begin a
            second pass; only complete batches are yielded.
        ALL_EXHAUSTED: after the global batch in which the last positive-weight domain completes its
            first pass; domains that finished earlier are recycled with a new pass meanwhile.

    Zero-weight domains (and, in stratified mode, domains whose allocation rounds to 0) never block or
    delay stopping.
    """

    CYCLE_FOREVER = "cycle_forever"
    FIRST_EXHAUSTED = "first_exhausted"
    ALL_EXHAUSTED = "all_exhausted"
    ALL = (CYCLE_FOREVER, FIRST_EXHAUSTED, ALL_EXHAUSTED)


def check_mix_options(
    caller: str,
    mode: str,
    batch_size: int,
    min_count: int,
    stop: str,
    num_batches: int | None,
    seed: int,
    carry_remainder: bool = False,
) -> None:
    """Validate the options both samplers share, in one place and one message shape."""
    check_param(caller, "batch_size", batch_size, Interval(int, 1, None))
    check_param(caller, "mode", mode, Options(Mode.ALL))
    check_param(caller, "min_count", min_count, Interval(int, 0, None))
    if mode != Mode.STRATIFIED and min_count:
        raise param_error(caller, "min_count", "0 unless mode='stratified'", min_count)
    check_param(caller, "carry_remainder", carry_remainder, Options((False, True)))
    if carry_remainder and mode != Mode.STRATIFIED:
        raise param_error(caller, "carry_remainder", "False unless mode='stratified'", carry_remainder)
    if carry_remainder and min_count:
        raise param_error(
            caller, "carry_remainder", f"False with min_count={min_count} (the minimum would break the "
            "carried shares; use one or the other)", carry_remainder,
        )  # fmt: skip
    check_param(caller, "stop", stop, Options(StopRule.ALL))
    check_param(caller, "num_batches", num_batches, Interval(int, 1, None), None)
    check_param(caller, "seed", seed, Interval(int, 0, None))


class SlotPlan(NamedTuple):
    """One block of planned batches, as seen by one rank.

    Slots are listed grouped by domain (``ids`` is sorted within each row in stratified mode); ``order``
    is the yield order: row j of the rank's batch is ``row[order[j]]``. Which draw of its domain a slot
    gets: in stratified plans (``spans`` given), slot j of row r is draw ``r * counts[0, d] + within[j]``
    of its domain d; else ``occ`` where given (low-discrepancy plans that repeat a period, on several
    ranks; on one rank, ``periodic`` places the draws itself), else the slot's rank among its domain's
    slots of ``global_ids`` in row-major order (every rank's slots included), which is what ``occ``
    holds too.
    """

    ids: np.ndarray  # (nb, batch_size) domain id of each of this rank's slots
    occ: np.ndarray | None  # (nb, batch_size) the slot's draw number within its domain, or None
    global_ids: np.ndarray | None  # other modes: (nb, batch_size * world_size), rank r has columns r::W
    # yield order (stratified interleave): (batch_size,) for every row, or (nb, batch_size) per row
    # (carried remainders: the rows differ); None: as listed
    order: np.ndarray | None
    counts: np.ndarray  # (nb, k) global examples per domain in each batch
    ld_after: np.ndarray  # (nb, k) counts since the weight change after each batch (low-discrepancy, carry)
    # stratified (every row alike): (domain, first column, end column) of each domain's columns in ``ids``
    spans: tuple[tuple[int, int, int], ...] = ()
    # stratified: (batch_size,) each slot's draw number within its domain in one global batch
    within: np.ndarray | None = None
    # low-discrepancy on one rank, when the plan repeats a period: the plan's slots, for Periodic.take
    periodic: Periodic | None = None


def in_yield_order(ids: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """Rows of ``ids`` (or of values laid out like them, maybe fewer rows) reordered by a plan's ``order``."""
    if order is None:
        return ids
    # np.take with an axis gathers faster than the equivalent fancy index ids[:, order]
    if order.ndim == 1:
        return np.take(ids, order, axis=1)
    return np.take_along_axis(ids, order[: len(ids)], axis=1)


def block_rng(seed: int, epoch_key: int, block: int) -> np.random.Generator:
    """The generator for one aligned block of batches."""
    return np.random.default_rng([seed, _TAG_BLOCK, epoch_key, block, 0])


def plan_block(
    mode: str,
    q: np.ndarray,
    alloc: np.ndarray,
    ld_counts: np.ndarray,
    *,
    seed: int,
    epoch_key: int,
    batch_key: int,
    nb: int,
    batch_size: int,
    world_size: int,
    rank: int,
    carry: tuple[np.ndarray, np.ndarray] | None = None,
    lag: tuple[float, ...] | None = None,
) -> SlotPlan:
    """Plan ``nb`` batches starting at absolute batch ``batch_key`` (iid: must not cross a BLOCK boundary).

    Stratified: the global batch is laid out grouped by domain and position p goes to rank p % W, so each
    rank holds within one of its share of every domain; each rank's batch is then interleaved so that every
    domain's slots are spread evenly (any prefix of a batch, e.g. a micro-batch, is balanced too; which
    examples fill the slots is random through the per-pass permutations). Other modes:
    rank r owns global slots r, r + W, r + 2W, ...

    ``lag``: low-discrepancy, the lags carried from before the weight change (``carried_lag``).
    ``carry``: stratified with the remainders carried across batches, ``(base, frac)`` from
    ``carried_allocation``; the counts of each batch come from ``carried_counts`` (``ld_counts`` are the
    counts since the weight change), laid out and split between ranks as above, row by row.
    """
    k = len(q)
    g = batch_size * world_size
    block, off = divmod(batch_key, BLOCK)
    if mode == Mode.STRATIFIED and carry is not None:
        counts = carried_counts(carry[0], carry[1], ld_counts, nb)
        layout = np.repeat(np.tile(np.arange(k), nb), counts.ravel()).reshape(nb, g)  # grouped rows
        ids = layout[:, rank::world_size]
        ld_after = ld_counts + np.cumsum(counts, axis=0)
        return SlotPlan(ids, None, layout, _row_orders(ids), counts, ld_after)
    if mode == Mode.STRATIFIED:
        ids_r, within_r, order, spans = _stratified_row(tuple(alloc.tolist()), world_size, rank)
        return SlotPlan(
            repeat_row(ids_r, nb), None, None, order, repeat_row(alloc, nb), repeat_row(ld_counts, nb),
            spans, within_r,
        )  # fmt: skip
    gids: np.ndarray  # (nb, g) domain id of every global slot
    occ = None
    if mode == Mode.IID:
        u = _block_uniforms(seed, epoch_key, block, g)[off : off + nb]
        gids = np.searchsorted(np.cumsum(q), u, side="right")
        # round-off can leave u above the last cumulative sum: give it to the last positive-weight domain
        np.minimum(gids, int(np.flatnonzero(q > 0)[-1]), out=gids)
        seq: Periodic | np.ndarray = gids
    else:
        seq = edf_plan(distribution(tuple(q.tolist())), ld_counts, nb * g, lag)
        gids = (seq if isinstance(seq, np.ndarray) else seq.ids()).reshape(nb, g)
    periodic = None
    if isinstance(seq, Periodic):  # counts and draw numbers from the period's prefix counts: no scan
        counts = np.diff(seq.prefix(seq.start + np.arange(nb + 1) * g), axis=0)
        if world_size == 1:
            periodic = seq
        else:
            occ = seq.draws().reshape(nb, g)[:, rank::world_size]
    else:
        rows = np.arange(nb, dtype=np.int64)[:, None]
        counts = np.bincount((rows * k + gids).ravel(), minlength=nb * k).reshape(nb, k)
    if mode == Mode.LOW_DISCREPANCY:
        ld_after = ld_counts + np.cumsum(counts, axis=0)
    else:
        ld_after = repeat_row(ld_counts, nb)
    return SlotPlan(gids[:, rank::world_size], occ, gids, None, counts, ld_after, periodic=periodic)


def repeat_row(row: np.ndarray, nb: int) -> np.ndarray:
    """``np.broadcast_to(row, (nb, len(row)))``, read-only, for a contiguous 1-D ``row``.

    A view with a zero row stride, built directly: ``broadcast_to`` costs microseconds of Python per call,
    and a plan of one batch (weights changed every batch) makes a few of them.
    """
    view = np.ndarray((nb, row.size), row.dtype, np.ascontiguousarray(row), strides=(0, row.itemsize))
    view.flags.writeable = False
    return view


def rows_before_stop(
    stop: str, sizes: np.ndarray, start: np.ndarray, after: np.ndarray, active: np.ndarray, nb: int
) -> int:
    """How many of ``nb`` planned batches the stop rule lets through (0: the epoch is over).

    Args:
        stop: the :class:`StopRule`.
        sizes: (k,) domain sizes.
        start: (k,) stream positions before the first planned batch.
        after: (nb, k) stream positions after each planned batch.
        active: (k,) bool, the domains that are drawn (the only ones that can end an epoch).
        nb: the number of planned batches.
    """
    if stop == StopRule.CYCLE_FOREVER:
        return nb
    sizes = sizes[active]
    if stop == StopRule.FIRST_EXHAUSTED:
        fits = (after[:, active] <= sizes).all(axis=1)
        return nb if fits.all() else int(np.argmin(fits))
    if (start[active] >= sizes).all():
        return 0
    done = (after[:, active] >= sizes).all(axis=1)
    return int(np.argmax(done)) + 1 if done.any() else nb


@lru_cache(maxsize=64)
def _stratified_row(
    alloc: tuple[int, ...], world_size: int, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[tuple[int, int, int], ...]]:
    """Rank ``rank``'s row of a stratified global batch with counts ``alloc``, read-only and cached.

    Its domain ids, each slot's draw number within its domain in the global batch, the yield order, and
    the ``(domain, first column, end column)`` span of each domain's columns: the same for every batch of
    a weight vector, and a vector often comes back.
    """
    counts = np.asarray(alloc, dtype=np.int64)
    grouped = np.repeat(np.arange(len(counts)), counts)  # the global batch's domain ids, grouped by domain
    firsts = list(accumulate(alloc, initial=0))  # each domain's first global position
    within = np.arange(len(grouped)) - np.repeat(firsts[:-1], alloc)
    ids = np.ascontiguousarray(grouped[rank::world_size])
    # this rank's slots of domain d: the global positions p = rank (mod W) in [firsts[d], firsts[d + 1])
    per_domain = [len(range(lo + (rank - lo) % world_size, hi, world_size)) for lo, hi in pairwise(firsts)]
    row = (ids, np.ascontiguousarray(within[rank::world_size]), _interleave(per_domain))
    for array in row:
        array.flags.writeable = False
    ends = list(accumulate(per_domain))
    spans = tuple((d, e - c, e) for d, (c, e) in enumerate(zip(per_domain, ends, strict=True)) if c)
    return (*row, spans)


def _row_orders(ids: np.ndarray) -> np.ndarray:
    """:func:`_interleave` of every row (rows with the same composition share one computation)."""
    orders = np.empty(ids.shape, dtype=np.int64)
    seen: dict[bytes, np.ndarray] = {}
    for r, row in enumerate(ids):
        key = row.tobytes()
        order = seen.get(key)
        if order is None:
            order = seen[key] = _interleave(np.bincount(row).tolist())
        orders[r] = order
    return orders


def _interleave(counts: list[int]) -> np.ndarray:
    """Order of domain-grouped slots that spreads each domain evenly over the batch.

    The slots are grouped by domain, domain d's ``counts[d]`` of them in domain order. Slot j of a domain
    with c slots is placed by the rank of (j + 0.5) / c, ties to the lower domain (a stable sort of the
    grouped slots): a fixed order, computed once per block rather than a random shuffle per batch.
    """
    c = np.asarray(counts, dtype=np.int64)
    j = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
    return np.argsort((j + 0.5) / np.repeat(c, c), kind="stable")


@lru_cache(maxsize=2)
def _block_uniforms(seed: int, epoch_key: int, block: int, g: int) -> np.ndarray:
    """The iid mode's uniform draws for one aligned block, (BLOCK, g), read-only.

    Cached: a weight change replans from the middle of a block, and the block's draws stay the same.
    """
    u = block_rng(seed, epoch_key, block).random((BLOCK, g))
    u.flags.writeable = False
    return u


def stable_order(ids: np.ndarray, k: int) -> np.ndarray:
    """``np.argsort(ids, kind="stable")`` for ids in ``[0, k)``, as a radix sort when ``k`` is small.

    numpy's stable sort is a radix sort for integers of 16 bits or fewer, about 10x faster than its
    merge sort of int64 on the 65536 slots of a block.
    """
    small = np.uint8 if k <= 1 << 8 else np.uint16 if k <= 1 << 16 else None
    return np.argsort(ids if small is None else ids.astype(small), kind="stable")
