"""StatefulDomainLoader: exact resume under prefetching workers, with weight changes mid-run."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torchdata")

from domainmix.integrations.torchdata import StatefulDomainLoader  # noqa: E402
from domainmix.sampling import DomainBatchSampler  # noqa: E402

DOMAINS = {"web": range(0, 300), "code": range(300, 420), "books": range(420, 500)}
STEPS = 40


def schedule(step: int) -> dict[str, float] | None:
    """What a controller would push after `step`: a new q every 6 steps."""
    if step % 6 != 5:
        return None
    a = 1 + (step // 6) % 3
    return {"web": a, "code": 1.0, "books": 4 - a}


def make(num_workers: int, mode: str = "stratified", **kwargs: Any) -> StatefulDomainLoader:
    sampler = DomainBatchSampler(DOMAINS, 8, mode=mode, seed=3)
    return StatefulDomainLoader(list(range(500)), batch_sampler=sampler, num_workers=num_workers, **kwargs)


def train(loader: StatefulDomainLoader, start: int, stop: int, save_at: int | None = None) -> tuple:
    seen, saved = [], None
    sampler = loader.batch_sampler
    for step, batch in zip(range(start, stop), loader, strict=False):
        seen.append(batch.tolist())
        q = schedule(step)
        if q is not None:
            sampler.set_weights(q)
        if step + 1 == save_at:
            saved = loader.state_dict()
    return seen, saved


@pytest.mark.parametrize(
    ("num_workers", "mode"), [(0, "stratified"), (2, "stratified"), (2, "low_discrepancy"), (2, "iid")]
)
def test_resume_equals_uninterrupted_with_weight_changes(num_workers: int, mode: str) -> None:
    full, saved = train(make(num_workers, mode), 0, STEPS, save_at=17)
    uninterrupted, _ = train(make(num_workers, mode), 0, STEPS)  # a run that never saved
    assert full == uninterrupted
    resumed = make(num_workers, mode)
    resumed.load_state_dict(saved)
    rest, _ = train(resumed, 17, STEPS)
    assert rest == uninterrupted[17:]


def test_plain_stateful_loader_misses_a_change_made_after_its_snapshot() -> None:
    # Why the subclass exists: with prefetching workers, StatefulDataLoader's own snapshot predates the
    # set_weights calls of the steps in flight, so its resume follows another schedule.
    from torchdata.stateful_dataloader import StatefulDataLoader

    def plain() -> Any:
        return StatefulDataLoader(
            list(range(500)), batch_sampler=DomainBatchSampler(DOMAINS, 8, seed=3), num_workers=2
        )

    full, saved = train(plain(), 0, STEPS, save_at=12)
    resumed = plain()
    resumed.load_state_dict(saved)
    rest, _ = train(resumed, 12, STEPS)
    assert rest != full[12:]


def test_another_prefetch_depth_is_refused_at_load() -> None:
    """Refused before any worker starts (the sampler's own refusal at the first batch came from inside a
    half-built multiprocessing iterator, whose workers took a minute to be reaped); torchdata itself
    refuses another num_workers with a bare AssertionError."""
    _, saved = train(make(2), 0, 10, save_at=5)
    for workers, factor, depth in ((2, 1, 2), (1, 2, 2), (0, None, 0)):
        resumed = make(workers, prefetch_factor=factor)
        refused = f"loader ran 4 batches ahead .* the loader now runs {depth} ahead"
        with pytest.raises(ValueError, match=refused):
            resumed.load_state_dict(saved)


def test_needs_a_domain_batch_sampler() -> None:
    from torch.utils.data import BatchSampler, SequentialSampler

    with pytest.raises(ValueError, match="'batch_sampler' parameter must be a DomainBatchSampler"):
        StatefulDomainLoader(
            list(range(4)), batch_sampler=BatchSampler(SequentialSampler(range(4)), 2, False)
        )


@pytest.mark.parametrize("workers", [0, 1])
def test_the_mixing_iterable_resumes_through_the_stateful_loader(workers: int) -> None:
    """``DomainMixingIterable`` says: checkpoint with num_workers=0 or a loader that collects worker
    states. torchdata's StatefulDataLoader does; its resume continues the uninterrupted run, across the
    smaller source's second pass."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from domainmix.sampling import DomainMixingIterable

    def loader() -> Any:
        mixer = DomainMixingIterable(
            {"a": list(range(30)), "b": list(range(100, 160))}, [0.5, 0.5], batch_size=4, seed=1
        )
        return StatefulDataLoader(mixer, batch_size=4, num_workers=workers)

    def run(it: Any, n: int) -> list[list[int]]:
        return [batch[1].tolist() for _, batch in zip(range(n), it, strict=False)]

    uninterrupted = run(loader(), 30)
    first = loader()
    it = iter(first)
    head = run(it, 12)
    saved = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(saved)
    assert head + run(resumed, 18) == uninterrupted
