"""torchdata's ``StatefulDataLoader`` with a :class:`~domainmix.sampling.DomainBatchSampler`.

``StatefulDataLoader`` already saves its batch sampler's ``state_dict()`` at the batch the loop has
consumed: with workers it takes the sampler's state when it sends each batch of indices and hands back
the one of the batch just received. What that snapshot cannot hold is a weight change made *after* it
was taken: ``set_weights`` acts from the next batch the sampler yields, which lies up to
``num_workers * prefetch_factor`` batches past the consumed one, so the change belongs to the
uninterrupted run's future but is missing from the saved state, and a resumed run would keep the old
weights until the controller's next update. :class:`StatefulDomainLoader` replaces each saved sampler
state by ``sampler.state_dict(consumed=n)`` for the same batch count ``n``, which carries the whole
weight history (``docs/design.md``, "Weight changes, prefetch and resume"), so a resume is exact and no
``consumed=`` bookkeeping is left to the loop.

A resume under another ``num_workers * prefetch_factor`` is refused: the depth decides which batch a
weight change lands on (``DomainBatchSampler.PREFETCH_KEY``). The loader refuses it in
``load_state_dict``, before any worker starts; the sampler itself would refuse it at the first batch.
"""

from __future__ import annotations

from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

from domainmix.integrations._sampler_states import sampler_states, with_sampler_states
from domainmix.sampling import DomainBatchSampler
from domainmix.sampling._wrapping import check_same_depth, loader_depth

__all__ = ["StatefulDomainLoader"]


class StatefulDomainLoader(StatefulDataLoader):  # type: ignore[misc]  # torchdata ships no type information
    """A ``StatefulDataLoader`` whose ``state_dict()`` resumes its ``DomainBatchSampler`` exactly.

    Build it as a ``StatefulDataLoader`` (``dataset``, ``batch_sampler=sampler``, ``num_workers``, ...);
    every argument is passed on. Save ``loader.state_dict()`` with the model and the controller, and call
    ``loader.load_state_dict(state)`` on a new loader built the same way before iterating it.

    Raises:
        ValueError: when ``batch_sampler`` is not a ``DomainBatchSampler``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, DomainBatchSampler):
            raise ValueError(
                "StatefulDomainLoader: the 'batch_sampler' parameter must be a DomainBatchSampler; got "
                f"{type(self.batch_sampler).__name__}. Use torchdata's StatefulDataLoader for other samplers."
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`, before iterating.

        Raises:
            ValueError: when the state was saved while the loader ran another number of batches ahead
                (``num_workers * prefetch_factor``) than this one does.
        """
        sampler: DomainBatchSampler = self.batch_sampler
        depth = loader_depth(self.num_workers, self.prefetch_factor)
        for saved in sampler_states(state_dict, sampler):
            ahead = saved.get(sampler.PREFETCH_KEY)  # absent from states saved before it was recorded
            check_same_depth(
                "StatefulDomainLoader.load_state_dict", None if ahead is None else int(ahead), depth,
                "Build the loader with the same num_workers and prefetch_factor.",
            )  # fmt: skip
        super().load_state_dict(state_dict)

    def state_dict(self) -> dict[str, Any]:
        """The loader's state, with every saved sampler state carrying the full weight history."""
        sampler: DomainBatchSampler = self.batch_sampler
        state: dict[str, Any] = with_sampler_states(
            super().state_dict(), sampler, lambda found: int(found[sampler.TOTAL_KEY])
        )
        return state
