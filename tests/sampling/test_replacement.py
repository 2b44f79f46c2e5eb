"""DomainBatchSampler(replacement=True): uniform independent draws within each domain, same domain plan."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from _resume import assert_prefetched_resume, assert_resume_equivalent

from domainmix.sampling import DomainBatchSampler, _streams

SIZES = {"a": 40, "b": 25, "c": 70, "d": 13}
MODES = ["stratified", "low_discrepancy", "iid"]
Q = [0.4, 0.3, 0.2, 0.1]


def domains() -> dict[str, Any]:
    out, start = {}, 0
    for i, (name, n) in enumerate(SIZES.items()):
        idx = range(start, start + n)
        out[name] = [idx, np.arange(start, start + n), list(idx), torch.arange(start, start + n)][i % 4]
        start += n
    return out


WHO = {j: name for name, ix in domains().items() for j in (ix.tolist() if hasattr(ix, "tolist") else ix)}


def make(batch_size: int = 8, weights: Any = Q, **kw: Any) -> DomainBatchSampler:
    return DomainBatchSampler(domains(), batch_size, list(weights), **kw)


def take(sampler: DomainBatchSampler, n: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.fixture
def small_draw_block(monkeypatch: pytest.MonkeyPatch) -> int:
    """Make the with-replacement generator blocks tiny, so that every run crosses many block boundaries."""
    monkeypatch.setattr(_streams, "DRAW_BLOCK", 16)
    return 16


# ---------------------------------------------------------------- resume


def _mutate(step: int, weights: list[float]) -> Any:
    def mutate(obj: DomainBatchSampler, s: int) -> None:
        if s == step:
            obj.set_weights(weights)

    return mutate


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [1, 2])
def test_replacement_resume_equivalent(
    mode: str, world: int, block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if block is not None:
        monkeypatch.setattr(_streams, "DRAW_BLOCK", block)
    for rank in range(world):

        def factory(rank: int = rank) -> DomainBatchSampler:
            return make(batch_size=7, mode=mode, seed=5, rank=rank, world_size=world, replacement=True)

        assert_resume_equivalent(factory, 0, 30)
        assert_resume_equivalent(factory, 23, 60, _mutate(11, [0.1, 0.1, 0.7, 0.1]))
        assert_resume_equivalent(factory, 23, 60, _mutate(40, [0.0, 0.5, 0.5, 0.0]))

        def bounded(rank: int = rank) -> DomainBatchSampler:  # epochs from num_batches
            return make(batch_size=7, mode=mode, rank=rank, world_size=world, replacement=True, num_batches=9)

        assert_resume_equivalent(bounded, 13, 40, _mutate(20, [0.25, 0.25, 0.25, 0.25]))


@pytest.mark.parametrize("mode", ["stratified", "iid"])
def test_replacement_draws_do_not_depend_on_planning(mode: str, small_draw_block: int) -> None:
    """Replanning every batch (set_weights with the same weights) must not change any draw."""
    reference = take(make(batch_size=9, mode=mode, replacement=True), 40)
    replanned = make(batch_size=9, mode=mode, replacement=True)
    it = iter(replanned)
    out = []
    for _ in range(40):
        replanned.set_weights(Q)
        out.append(next(it))
    assert out == reference


def test_replacement_state_as_of_consumed(small_draw_block: int) -> None:
    assert_prefetched_resume(lambda: make(batch_size=6, replacement=True))


# ---------------------------------------------------------------- composition and draws


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [1, 2])
def test_replacement_keeps_the_domain_plan(mode: str, world: int) -> None:
    """Slot by slot, the domain of every yielded index is the same with and without replacement."""
    for rank in range(world):
        kw = {"batch_size": 10, "mode": mode, "seed": 2, "rank": rank, "world_size": world}
        plain, drawn = take(make(**kw), 80), take(make(replacement=True, **kw), 80)
        assert [[WHO[i] for i in b] for b in drawn] == [[WHO[i] for i in b] for b in plain]
        assert drawn != plain  # the examples themselves differ
        counts = [Counter(WHO[i] for i in b) for b in drawn]
        assert counts == [Counter(WHO[i] for i in b) for b in plain]


def test_replacement_draws_are_uniform_and_repeat_within_a_pass() -> None:
    n, batches = 7, 3000
    drawn = take(DomainBatchSampler({"s": range(n)}, n, replacement=True, seed=1), batches)
    counts = np.bincount(np.concatenate(drawn), minlength=n)
    expected = batches  # n * batches draws over n examples
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 6 degrees of freedom: P(chi2 > 36) < 1e-5 for uniform draws; a sampler skewed by 5% on one example
    # (150 draws) already gives chi2 ~ 7.5 + the others' share, and a missing example gives 3000.
    assert counts.min() > 0 and chi2 < 36, (counts.tolist(), chi2)
    # a batch of 7 draws from 7 examples is a permutation with probability 7!/7**7 ~ 0.6% with replacement
    repeats = sum(len(set(b)) < n for b in drawn)
    assert repeats > 0.95 * batches
    # without replacement each batch here is exactly one pass: never a repeat
    plain = take(DomainBatchSampler({"s": range(n)}, n, seed=1), batches)
    assert all(sorted(b) == list(range(n)) for b in plain)


@pytest.mark.parametrize("mode", MODES)
def test_replacement_small_domain_uniform_within_a_mix(mode: str) -> None:
    mix = {"small": np.array([3, 11, 19, 27, 35, 43, 51]), "big": range(1000, 1500)}
    s = DomainBatchSampler(mix, 16, [0.5, 0.5], mode=mode, replacement=True, seed=4)
    flat = np.concatenate(take(s, 1500))
    small = flat[flat < 1000]
    assert set(small.tolist()) == set(mix["small"].tolist())
    counts = np.array([np.count_nonzero(small == v) for v in mix["small"]])
    expected = small.size / 7
    assert float(((counts - expected) ** 2 / expected).sum()) < 36  # 6 dof, p < 1e-5
    big = flat[flat >= 1000]
    assert big.max() < 1500 and len(set(big.tolist())) > 450  # ~12000 draws over 500: all but a few seen


def test_replacement_huge_domain_needs_no_permutation() -> None:
    s = DomainBatchSampler(
        {"huge": range(10**9), "arr": np.arange(10**9, 10**9 + 5 * 10**6, 5)},
        256,
        [0.9, 0.1],
        replacement=True,
    )
    flat = np.concatenate(take(s, 50))
    huge, arr = flat[flat < 10**9], flat[flat >= 10**9]
    assert huge.max() > 9 * 10**8 and huge.min() < 10**8  # spread over the whole range
    assert np.all((arr - 10**9) % 5 == 0) and arr.max() < 10**9 + 5 * 10**6
    cached = [a for stream in s._streams for a in stream._cache.values()]  # a few draw blocks, no permutation
    assert 0 < len(cached) <= 4 and all(a.nbytes <= 8 * _streams.DRAW_BLOCK for a in cached)


@pytest.mark.parametrize("mode", MODES)
def test_replacement_ranks_split_the_one_process_global_batch(mode: str, small_draw_block: int) -> None:
    b, world = 6, 2
    ranks = [
        make(batch_size=b, mode=mode, seed=7, rank=r, world_size=world, replacement=True)
        for r in range(world)
    ]
    single = make(batch_size=b * world, mode=mode, seed=7, rank=0, world_size=1, replacement=True)
    per_rank = [take(s, 50) for s in ranks]
    whole = take(single, 50)
    for step in range(50):
        union = [i for r in range(world) for i in per_rank[r][step]]
        assert Counter(union) == Counter(whole[step])  # the same global draws, split between the ranks
        if mode != "stratified":  # rank r owns global slots r, r + W, ...
            assert all(per_rank[r][step] == whole[step][r::world] for r in range(world))
    assert ranks[0].state_dict() == ranks[1].state_dict()


# ---------------------------------------------------------------- state and arguments


def test_replacement_is_in_the_fingerprint() -> None:
    plain, drawn = make().state_dict(), make(replacement=True).state_dict()
    assert plain[DomainBatchSampler.CONFIG_KEY]["replacement"] is False
    assert drawn[DomainBatchSampler.CONFIG_KEY]["replacement"] is True
    with pytest.raises(ValueError, match="replacement: saved False, now True"):
        make(replacement=True).load_state_dict(plain)
    with pytest.raises(ValueError, match="replacement: saved True, now False"):
        make().load_state_dict(drawn)
    escape = make(replacement=True)
    escape.load_state_dict(plain, ignore_fingerprint=True)
    assert len(take(escape, 2)) == 2
    # a state saved before the option existed has no "replacement" key: it was without replacement
    old = json.loads(json.dumps(plain))
    del old[DomainBatchSampler.FINGERPRINT_KEY]["replacement"]
    make().load_state_dict(old)
    with pytest.raises(ValueError, match="replacement: saved False, now True"):
        make(replacement=True).load_state_dict(old)


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, np.bool_(True)])
def test_bad_replacement_names_the_parameter(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"The 'replacement' parameter of DomainBatchSampler must be .* Got"):
        make(replacement=bad)


@pytest.mark.parametrize("stop", ["first_exhausted", "all_exhausted"])
def test_replacement_rejects_exhaustion_stop_rules(stop: str) -> None:
    with pytest.raises(ValueError, match=rf"'replacement' parameter .* False with stop='{stop}'.* Got True"):
        make(replacement=True, stop=stop)
    assert make(replacement=False, stop=stop).state_dict()[DomainBatchSampler.CONFIG_KEY]["stop"] == stop


def test_replacement_len_and_repr() -> None:
    s = make(replacement=True, num_batches=5)
    assert len(s) == 5 and len(list(s)) == 5
    assert "replacement=True" in repr(s) and "replacement" not in repr(make())
