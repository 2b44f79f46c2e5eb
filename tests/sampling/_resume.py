"""Resume equivalence for iterables (samplers, mixers): an adapter over the shared helper in ``_helpers``.

The object's outputs are read as one stream across epochs (``EPOCH_END`` marks each ``__iter__``'s end,
so epoch boundaries are compared too). The saved state also goes through JSON: sampler state must be
plain data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from _helpers import assert_resume_equivalent as _assert_resume_equivalent

EPOCH_END = "<epoch end>"


def _stream(obj: Any) -> Iterator[Any]:
    while True:
        yield from obj
        yield EPOCH_END


class _Stepper:
    """Wraps an iterable so that one ``drive`` call yields one output; state is the object's, via JSON."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.items: Iterator[Any] | None = None

    def state_dict(self) -> Any:
        return json.loads(json.dumps(self.obj.state_dict()))

    def load_state_dict(self, state: Any) -> None:
        self.obj.load_state_dict(state)


def assert_resume_equivalent(
    make: Callable[[], Any],
    midpoint: int,
    total: int,
    mutate: Callable[[Any, int], None] | None = None,
) -> list[Any]:
    """Run ``total`` outputs straight, and ``midpoint`` + save + fresh object + load + the rest.

    ``mutate(obj, step)`` runs before output ``step`` in every run (e.g. a ``set_weights``). Returns the
    uninterrupted outputs.
    """

    def drive(stepper: _Stepper, step: int) -> Any:
        if mutate is not None:
            mutate(stepper.obj, step)
        if stepper.items is None:
            stepper.items = _stream(stepper.obj)
        return next(stepper.items)

    return _assert_resume_equivalent(lambda: _Stepper(make()), drive, midpoint=midpoint, total=total)


def assert_prefetched_resume(make: Callable[[], Any], ahead: int = 5) -> Any:
    """A loop consuming ``ahead`` batches behind a prefetching reader (a DataLoader): a weight change at
    step 9 and ``state_dict(consumed=15)`` must resume exactly at the loop's batch 15, the change included.

    Returns the original sampler for further checks.
    """
    original = make()
    produced = iter(original)
    queue = [next(produced) for _ in range(ahead)]
    seen: list[Any] = []
    saved = None
    for step in range(40):
        seen.append(queue.pop(0))
        queue.append(next(produced))
        if step == 9:
            original.set_weights([0.0, 0.5, 0.0, 0.5])  # lands `ahead` batches later
        if step == 14:
            saved = json.loads(json.dumps(original.state_dict(consumed=step + 1)))
    assert original.weight_history[1][0] == 10 + ahead
    resumed = make()
    resumed.load_state_dict(saved)
    it = iter(resumed)
    assert [next(it) for _ in range(25)] == seen[15:]
    return original
