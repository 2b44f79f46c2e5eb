"""Test helpers shared across the suite: resume equivalence and hand-built statistics."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from domainmix.stats import statistics
from domainmix.types import DomainStats


def torch_roundtrip(obj: Any, *, weights_only: bool = True) -> Any:
    """Serialise ``obj`` with ``torch.save`` to memory and load it back, as a checkpoint would be."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


def assert_same(actual: Any, expected: Any, path: str = "output") -> None:
    """Recursive exact equality: tensors bit for bit (dtype and shape too), floats by value (NaN == NaN)."""
    if isinstance(expected, DomainStats):
        assert isinstance(actual, DomainStats), f"{path}: expected DomainStats, got {type(actual).__name__}"
        actual, expected = actual.as_dict(), expected.as_dict()
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{path}: expected a tensor, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        shapes = f"{tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.shape == expected.shape, f"{path}: shape {shapes}"
        a, e = actual, expected
        if a.is_floating_point():
            assert torch.equal(a.isnan(), e.isnan()), f"{path}: NaNs at other places"
            a, e = a.nan_to_num(0.0), e.nan_to_num(0.0)
        assert torch.equal(a, e), f"{path}: {actual.tolist()} != {expected.tolist()}"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: expected a mapping, got {type(actual).__name__}"
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"{path}: expected a sequence, got {type(actual).__name__}"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        if hasattr(expected, "_fields"):
            kinds = f"{type(actual).__name__} != {type(expected).__name__}"
            assert type(actual) is type(expected), f"{path}: {kinds}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), f"{path}: {actual!r} != nan"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def assert_resume_equivalent(
    make: Callable[[], Any],
    drive: Callable[[Any, int], Any],
    *,
    midpoint: int,
    total: int,
    weights_only: bool = True,
    compare_final_state: bool = True,
) -> list[Any]:
    """Check that checkpointing at ``midpoint`` and resuming in a fresh object changes nothing.

    Args:
        make: builds a fresh object with ``state_dict()`` / ``load_state_dict()``.
        drive: ``drive(obj, t)`` performs step ``t`` (0-based) and returns what that step produced
            (weights, statistics, ... any nest of tensors, scalars, tuples, lists and dicts).
        midpoint: steps run before the checkpoint, ``0 <= midpoint <= total``.
        total: steps in the whole run.
        weights_only: passed to ``torch.load`` (True: the state must be plain containers and tensors).
        compare_final_state: also require identical ``state_dict()`` at the end.

    The uninterrupted run, the run that took a checkpoint and went on, and the fresh object resumed from
    the checkpoint must produce identical outputs (tensors bit for bit). Returns the reference outputs.
    """
    assert 0 <= midpoint <= total
    reference = make()
    expected = [drive(reference, t) for t in range(total)]

    first = make()
    head = [drive(first, t) for t in range(midpoint)]
    checkpoint = torch_roundtrip(first.state_dict(), weights_only=weights_only)
    # Taking a state_dict must not perturb the run, and the saved state must not alias live state.
    rest = [drive(first, t) for t in range(midpoint, total)]
    assert_same(head + rest, expected, "outputs of the run that saved a checkpoint")

    resumed = make()
    resumed.load_state_dict(checkpoint)
    tail = [drive(resumed, t) for t in range(midpoint, total)]
    assert_same(head + tail, expected, f"outputs resumed at step {midpoint}")
    if compare_final_state:
        assert_same(resumed.state_dict(), reference.state_dict(), "final state_dict")
    return expected


def make_stats(
    k: int,
    *,
    step: int = 0,
    loss: Sequence[float] | Tensor | None = None,
    count: Sequence[float] | Tensor | None = None,
    **fields: Sequence[float] | Sequence[Sequence[float]] | Tensor | None,
) -> DomainStats:
    """Hand-build a :class:`DomainStats` over ``k`` domains from lists (converted to float64 tensors).

    ``loss`` defaults to zeros and ``count`` to 10 per domain (every domain present); any other field of
    ``DomainStats`` (``ref_loss``, ``grad_dot`` ...) may be given by keyword.
    """
    unknown = set(fields) - set(statistics())
    assert not unknown, f"make_stats: unknown statistics {sorted(unknown)}"

    def as_tensor(value: Any) -> Tensor | None:
        return None if value is None else torch.as_tensor(value, dtype=torch.float64).clone()

    return DomainStats(
        step=step,
        loss=as_tensor(loss) if loss is not None else torch.zeros(k, dtype=torch.float64),
        count=as_tensor(count) if count is not None else torch.full((k,), 10.0, dtype=torch.float64),
        **{name: as_tensor(value) for name, value in fields.items()},
    )


TASKS = 3  # length of the task axis in full_stats


def full_stats(k: int, step: int, seed: int = 0) -> DomainStats:
    """Every declared statistic filled with deterministic, plausible values (all present).

    Derived from the statistics table: counts are positive integers, (k, k) statistics are Gram
    matrices of random gradients, a task axis has ``TASKS`` entries, everything else is positive; the
    built-in gradient products (and DIDS's Fisher products) then come from one gradient matrix.
    """
    g = torch.Generator().manual_seed(1000 * seed + step)
    values: dict[str, Tensor] = {}
    for name, row in statistics().items():
        if row.reduction == "count":
            values[name] = torch.randint(1, 50, (k,), generator=g).to(torch.float64)
        elif row.has_task_axis:  # TASKS target tasks on the task axis
            values[name] = (0.5 + torch.rand(row.dims(k, TASKS), generator=g, dtype=torch.float64)) * 2.0
        elif row.shape == ("k", "k"):
            grads = torch.randn(k, 4, generator=g, dtype=torch.float64)
            values[name] = grads @ grads.T
        else:
            values[name] = (0.5 + torch.rand(k, generator=g, dtype=torch.float64)) * 2.0
    # The gradient products of one set of gradients, so DoGE's inputs agree with one another.
    grads = torch.randn(k, 4, generator=g, dtype=torch.float64)
    values.update(
        grad_dot=grads @ grads.T,
        grad_sq_norm=(grads * grads).sum(1),
        target_grad_dot=grads @ torch.randn(4, generator=g, dtype=torch.float64),
    )
    # DIDS's Fisher products of one set of domain and task gradients under one diagonal Fisher.
    fisher = torch.rand(4, generator=g, dtype=torch.float64)
    tasks = torch.randn(TASKS, 4, generator=g, dtype=torch.float64)
    values.update(
        fisher_cross=(grads * fisher) @ tasks.T,
        fisher_domain_sq=(grads * fisher * grads).sum(1),
        fisher_task_sq=(tasks * fisher * tasks).sum(1),
    )
    return DomainStats(step=step, **values)  # type: ignore[arg-type]


def run_torchrun(
    script: Path, *args: str, nproc: int = 2, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``nproc`` local processes with torch.distributed.run (gloo on CPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_two_rank_run(out: Path, sizes: Sequence[int], per_rank: int, min_count: int = 1) -> None:
    """Check the ``rank{r}.json`` records of a two-process example run (``examples/*_train.py``).

    The weights moved and are bit-for-bit identical on both ranks after every step; every global batch
    (the union of the ranks' batches) has exactly the stratified allocation of the sampling weights in
    force for it (from the sampler's weight history, which a prefetching loader shifts), and no example
    twice.
    """
    import json
    from collections import Counter

    from domainmix.sampling import allocate_counts

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["mixture"] == ranks[1]["mixture"]
    assert ranks[0]["sampling"] == ranks[1]["sampling"]
    assert ranks[0]["mixture"][-1] != ranks[0]["mixture"][0]
    offsets = [sum(sizes[:d]) for d in range(len(sizes))]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert len(ranks[0]["history"]) > 1
    sampling = [max((h for h in ranks[0]["history"] if h[0] <= b), key=lambda h: h[0])[1]
                for b in range(len(ranks[0]["batches"]))]  # fmt: skip
    for step, (a, b) in enumerate(zip(ranks[0]["batches"], ranks[1]["batches"], strict=True)):
        assert len(a) == len(b) == per_rank
        union = a + b
        assert len(set(union)) == len(union)
        counts = Counter(max(d for d, o in enumerate(offsets) if i >= o) for i in union)
        q = torch.tensor(sampling[step], dtype=torch.float64)
        expected = allocate_counts(q, 2 * per_rank, min_count=min_count)
        assert [counts[d] for d in range(len(sizes))] == list(expected), f"step {step}"
