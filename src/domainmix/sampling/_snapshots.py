"""The batch sampler's resume snapshots: its whole state after each recent batch, in a ring buffer.

A ``DataLoader`` runs the sampler ahead of the training loop, so the state worth saving is the one after
the batches the loop has *consumed*, not after the last one the sampler yielded (``docs/design.md``,
"Weight changes, prefetch and resume"). The state is a few integers per domain (:class:`Snap`), and a block of
planned batches holds the per-row values already (:class:`Block`), so the buffer stores a reference to
(block, row) per batch and builds the snapshot only when one is asked for.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np

__all__ = ["Block", "Snap", "SnapshotRing"]


class Snap(NamedTuple):
    """The whole mutable state of a sampler after ``total`` batches: a few ints per domain."""

    total: int  # global batches yielded since construction (the clock of the weight history)
    epoch: int
    batch: int  # batches yielded in the current epoch
    positions: np.ndarray  # (k,) draws from each domain's stream (see _streams)
    ld_counts: np.ndarray  # (k,) low-discrepancy counts since the weight change at ld_from
    ld_from: int
    ld_lag: tuple[float, ...]  # (k,) low-discrepancy lags carried into the schedule from ld_from


class Block(NamedTuple):
    """A block of planned batches for this rank and what the state is after each of them."""

    values: np.ndarray  # (nb, batch_size) dataset indices for this rank
    base: Snap  # state before the first row
    positions: np.ndarray  # (nb, k) stream positions after each row
    ld_after: np.ndarray  # (nb, k) low-discrepancy counts after each row
    ld_from: int
    ld_lag: tuple[float, ...]

    def snap(self, j: int) -> Snap:
        """State after row ``j``, built on demand (a snapshot per batch would cost more than the batch)."""
        b = self.base
        return Snap(
            b.total + j + 1,
            b.epoch,
            b.batch + j + 1,
            self.positions[j],
            self.ld_after[j],
            self.ld_from,
            self.ld_lag,
        )


Entry = Snap | tuple[Block, int]  # a ring-buffer entry: a snapshot, or row j of a block


def resolve(entry: Entry) -> Snap:
    """The snapshot an entry stands for."""
    return entry if isinstance(entry, Snap) else entry[0].snap(entry[1])


class SnapshotRing(deque[Entry]):
    """The states after the last ``history`` batches (plus the current one), newest last.

    A ``deque`` so that the per-batch ``append((block, row))`` in the sampler's loop stays the C method.

    Args:
        history: how many past states to keep, an int >= 1.
        first: the initial state.
    """

    def __init__(self, history: int, first: Snap) -> None:
        super().__init__(maxlen=history + 1)
        self.commit(first)

    @property
    def current(self) -> Snap:
        """The newest state."""
        return resolve(self[-1])

    def commit(self, snap: Snap, *, keep_previous: bool = False) -> None:
        """Make ``snap`` the newest state.

        A state at the same batch count supersedes the newest one (``set_epoch`` jumps), unless
        ``keep_previous``: an epoch that ends by itself keeps the state after its last batch, which is
        what a loop that has consumed that batch must save (it may still be in that epoch's bookkeeping).
        """
        if self and self.current.total == snap.total and not keep_previous:
            self.pop()
        self.append(snap)

    def reset(self, snap: Snap) -> None:
        """Forget every state and start from ``snap`` (after loading a saved state)."""
        self.clear()
        self.commit(snap)

    def find(self, total: int) -> Snap | None:
        """The state right after ``total`` batches, or ``None`` if it has left the buffer.

        Where an epoch ended by itself at ``total``, that is the state after the epoch's last batch (the
        next epoch's start follows it in the buffer).
        """
        for entry in self:
            snap = resolve(entry)
            if snap.total == total:
                return snap
        return None

    @property
    def oldest(self) -> Snap:
        """The oldest state in the buffer."""
        return resolve(self[0])
