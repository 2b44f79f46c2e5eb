"""Apportionment: turning a distribution q over domains into integer counts and domain sequences.

A neutral module (it depends only on ``_validation``), shared by the samplers and the strategies. Two pure
building blocks, both deterministic (no randomness at all):

* :func:`allocate_counts` rounds ``total * q`` to integers that sum to ``total`` (largest remainder,
  Hamilton's method) with an optional per-domain minimum. The stratified sampler uses it once per weight
  change for the composition of every global batch; ``variance_aware`` uses it for its batch allocation.
* :func:`low_discrepancy_sequence` emits a domain id per slot such that every prefix of the sequence
  (counted from the last weight change) has ``|count_i(t) - q_i t| < 1`` for every domain.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

import numpy as np
from torch import Tensor

from domainmix._validation import Interval, check_param, check_weight_vector, param_error

__all__ = ["allocate_counts", "as_distribution", "distribution", "edf_sequence", "low_discrepancy_sequence"]

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
        total: number of slots, an int >= 0.
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
    total = check_param(caller, "total", total, Interval(int, 0, None))
    min_count = check_param(caller, "min_count", min_count, Interval(int, 0, None))
    raw = as_distribution(caller, "q", q, normalize=False)
    p = raw / raw.sum()
    positive = raw > 0  # not p > 0: a subnormal weight may underflow when normalised
    if min_count * int(positive.sum()) > total:
        raise param_error(
            caller,
            "min_count",
            f"at most total // (number of positive-weight domains) = {total} // {int(positive.sum())}",
            min_count,
        )
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
    loop runs per slot (about 1.5 us).

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


def edf_sequence(p: tuple[float, ...], counts: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    """:func:`low_discrepancy_sequence` without the argument checks, for ``p`` from :func:`distribution`.

    The samplers' weights are validated once, when they are set, and planned many times.
    """
    c = np.asarray(counts, dtype=np.int64)
    t = int(c.sum())
    period = _rational_period(p)
    if period is not None:
        seq, prefix = period
        d = len(seq)
        expected = (t // d) * prefix[-1] + prefix[t % d]
        if np.array_equal(expected, c):
            # the sequence from slot t: one rotation of the period, repeated (a copy, not a gather)
            return np.resize(np.roll(seq, -(t % d)), n)
        # counts off the periodic path (not produced by this function): fall through to the exact loop
    return _edf(p, c.tolist(), n)


@lru_cache(maxsize=64)
def distribution(q: tuple[float, ...]) -> tuple[float, ...]:
    """``as_distribution(q)`` as a tuple, cached.

    The normalisation :func:`low_discrepancy_sequence` applies, so that a sampler planning with
    :func:`edf_sequence` emits the same sequence.
    """
    return tuple(as_distribution("low_discrepancy_sequence", "q", q).tolist())


@lru_cache(maxsize=64)
def _rational_period(p: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    fracs = [Fraction(x).limit_denominator(_MAX_PERIOD) for x in p]
    if any(abs(float(f) - x) > 1e-15 for f, x in zip(fracs, p, strict=True)) or sum(fracs) != 1:
        return None
    d = math.lcm(*(f.denominator for f in fracs))
    if d > _MAX_PERIOD:
        return None
    # Exact rational rates make the period exact: at t = D every lag is 0 and EDF starts over.
    seq = _edf(tuple(fracs), [0] * len(p), d)
    onehot = np.zeros((d + 1, len(p)), dtype=np.int64)
    onehot[np.arange(1, d + 1), seq] = 1
    return seq, np.cumsum(onehot, axis=0)


def _edf(p: tuple[float | Fraction, ...], counts: list[int], n: int) -> np.ndarray:
    t = sum(counts)
    ready: list[tuple[float | Fraction, int, int]] = []  # (deadline, release, id) of released items
    waiting: list[tuple[int, float | Fraction, int]] = []  # (release, deadline, id) of items not yet released

    def push(i: int, now: int) -> None:
        release = math.floor(counts[i] / p[i])
        deadline = (counts[i] + 1) / p[i]
        if release <= now:
            heapq.heappush(ready, (deadline, release, i))
        else:
            heapq.heappush(waiting, (release, deadline, i))

    for i, w in enumerate(p):
        if w > 0:
            push(i, t)
    out = np.empty(n, dtype=np.int64)
    for s in range(t, t + n):
        while waiting and waiting[0][0] <= s:
            release, deadline, i = heapq.heappop(waiting)
            heapq.heappush(ready, (deadline, release, i))
        _, _, i = heapq.heappop(ready)
        out[s - t] = i
        counts[i] += 1
        push(i, s + 1)
    return out
