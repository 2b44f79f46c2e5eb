"""Resume equivalence: a run saved, restored and continued must match an uninterrupted run exactly."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

EPOCH_END = "<epoch end>"


def _stream(obj: Any) -> Iterator[Any]:
    # one __iter__ per epoch; the marker makes epoch boundaries part of the compared output
    while True:
        yield from obj
        yield EPOCH_END


def _run(obj: Any, start: int, stop: int, mutate: Callable[[Any, int], None] | None) -> list[Any]:
    out = []
    it = _stream(obj)
    for step in range(start, stop):
        if mutate is not None:
            mutate(obj, step)
        out.append(next(it))
    return out


def assert_resume_equivalent(
    make: Callable[[], Any],
    midpoint: int,
    total: int,
    mutate: Callable[[Any, int], None] | None = None,
) -> list[Any]:
    """Run ``total`` steps straight, and ``midpoint`` steps + save + fresh object + load + the rest.

    ``mutate(obj, step)`` runs before step ``step`` in both runs (e.g. a ``set_weights``). The saved state
    goes through JSON, so it must be plain data. Returns the uninterrupted outputs.
    """
    reference = _run(make(), 0, total, mutate)
    first = make()
    head = _run(first, 0, midpoint, mutate)
    state = json.loads(json.dumps(first.state_dict()))
    second = make()
    second.load_state_dict(state)
    tail = _run(second, midpoint, total, mutate)
    assert head + tail == reference, f"resumed run diverges from the uninterrupted one (midpoint {midpoint})"
    return reference
