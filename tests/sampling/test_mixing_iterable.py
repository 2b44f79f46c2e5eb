from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
from _resume import EPOCH_END, assert_resume_equivalent
from torch.utils.data import DataLoader, IterableDataset

from domainmix.sampling import DomainMixingIterable, allocate_counts

# "carried": stratified with carry_remainder=True (see make), run through every mode-parametrised test
MODES = ["stratified", "carried", "low_discrepancy", "iid"]
STOPS = ["cycle_forever", "first_exhausted", "all_exhausted"]


class Source(IterableDataset):
    """A deterministic stream; optionally stateful (torchdata's Stateful protocol)."""

    def __init__(self, tag: str, n: int, stateful: bool = False) -> None:
        self.tag, self.n, self.stateful = tag, n, stateful
        self.pos = 0  # items of the current pass handed out
        self._resume = 0

    def __iter__(self):  # noqa: ANN204
        start, self._resume = self._resume, 0
        for i in range(start, self.n):
            self.pos = i + 1
            yield f"{self.tag}{i}"

    def __getattr__(self, name: str) -> Any:
        if name in ("state_dict", "load_state_dict") and self.__dict__.get("stateful"):
            return {"state_dict": lambda: {"pos": self.pos}, "load_state_dict": self._load}[name]
        raise AttributeError(name)

    def _load(self, state: dict) -> None:
        self._resume = state["pos"]


def sources(stateful: bool = False) -> dict[str, Source]:
    return {"a": Source("a", 30, stateful), "b": Source("b", 17), "c": Source("c", 45, stateful)}


def make(**kw: Any) -> DomainMixingIterable:
    args = {"weights": [0.5, 0.2, 0.3], "batch_size": 4, **kw}
    if args.get("mode") == "carried":
        args.update(mode="stratified", carry_remainder=True)
    stateful = args.pop("stateful", False)
    return DomainMixingIterable(sources(stateful), **args)


def test_items_are_tagged_and_stratified_batches_exact() -> None:
    items = [x for _, x in zip(range(40), make(mode="stratified"), strict=False)]
    assert all(name == item[0] for name, item in items)
    target = allocate_counts([0.5, 0.2, 0.3], 4).tolist()
    for b in range(10):
        counts = Counter(name for name, _ in items[4 * b : 4 * b + 4])
        assert [counts[n] for n in "abc"] == target


def test_low_discrepancy_deviation_and_zero_weight() -> None:
    q = np.array([0.6, 0.0, 0.4])
    items = [x for _, x in zip(range(300), make(weights=q, mode="low_discrepancy"), strict=False)]
    ids = ["abc".index(n) for n, _ in items]
    cum = np.cumsum(np.eye(3)[ids], axis=0)
    assert np.abs(cum - np.arange(1, 301)[:, None] * q).max() <= 1 and 1 not in ids


@pytest.mark.parametrize("mode", MODES)
def test_first_exhausted_stops_at_first_dry_source(mode: str) -> None:
    it = make(mode=mode, stop="first_exhausted")
    items = list(it)
    counts = Counter(n for n, _ in items)
    assert len(set(items)) == len(items)
    assert counts["b"] == 17 or counts["a"] == 30 or counts["c"] == 45


def test_all_exhausted_sees_everything_and_ignores_zero_weight() -> None:
    it = make(weights=[0.5, 0.0, 0.5], stop="all_exhausted")
    items = list(it)
    assert {x for n, x in items if n == "a"} == {f"a{i}" for i in range(30)}
    assert {x for n, x in items if n == "c"} == {f"c{i}" for i in range(45)}
    assert not any(n == "b" for n, _ in items)


def test_set_weights_from_next_batch() -> None:
    it = make(mode="stratified")
    stream = iter(it)
    first = [next(stream) for _ in range(6)]  # a batch and a half
    drawn = it.batch_sampling.tolist()
    it.set_weights({"a": 0.0, "b": 1.0, "c": 0.0})
    assert it.batch_sampling.tolist() == drawn  # the batch in progress keeps its weights
    rest = [next(stream) for _ in range(6)]
    counts = Counter(n for n, _ in first + rest[:2])  # the second batch keeps the weights it started with
    assert [counts[n] for n in "abc"] == (2 * allocate_counts([0.5, 0.2, 0.3], 4)).tolist()
    assert all(n == "b" for n, _ in rest[2:])
    assert it.weight_history[1][0] == 2
    assert it.batch_sampling.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("stateful", [False, True])
def test_resume_equivalent(mode: str, stop: str, stateful: bool) -> None:
    def factory() -> DomainMixingIterable:
        return make(mode=mode, stop=stop, stateful=stateful, seed=2)

    assert_resume_equivalent(factory, 0, 40)
    out = assert_resume_equivalent(factory, 37, 300, _switch(20, [0.2, 0.6, 0.2]))
    assert_resume_equivalent(factory, 137, 300, _switch(90, [0.0, 0.5, 0.5]))
    if stop != "cycle_forever":
        assert EPOCH_END in out


def test_a_weight_change_in_a_batch_cut_short_by_the_epoch_end_applies_to_the_next_batch() -> None:
    m = DomainMixingIterable(
        {"a": list(range(3)), "b": list(range(100))}, [0.5, 0.5], batch_size=4, stop="first_exhausted"
    )
    it = iter(m)
    [next(it) for _ in range(5)]  # batch 0 and one item of batch 1
    m.set_weights([0.0, 1.0])  # from the next batch on
    list(it)  # "a" runs dry inside batch 1: the epoch ends there
    assert m.weights.tolist() == [0.0, 1.0]
    following = iter(m)
    assert [next(following)[0] for _ in range(4)] == ["b"] * 4


@pytest.mark.parametrize("mode", MODES)
def test_weights_set_every_item_keep_the_history_bounded_and_the_resume_exact(mode: str) -> None:
    def mutate(obj: DomainMixingIterable, step: int) -> None:
        obj.set_weights(np.random.default_rng(step).dirichlet(np.ones(3)).tolist())
        # the entry in force for the current batch and the change for the next one (low-discrepancy: and
        # the one its counts ran with, from which the lags carry)
        assert len(obj.weight_history) <= (3 if mode == "low_discrepancy" else 2)

    assert_resume_equivalent(lambda: make(mode=mode, seed=3), 61, 200, mutate)


def _switch(step: int, w: list[float]) -> Any:
    def mutate(obj: DomainMixingIterable, s: int) -> None:
        if s == step:
            obj.set_weights(w)

    return mutate


def test_world_size_two_ranks_split_the_global_plan() -> None:
    r0 = make(mode="stratified", rank=0, world_size=2)
    r1 = make(mode="stratified", rank=1, world_size=2)
    s0 = [n for (n, _), _ in zip(r0, range(40), strict=False)]
    s1 = [n for (n, _), _ in zip(r1, range(40), strict=False)]
    target = allocate_counts([0.5, 0.2, 0.3], 8).tolist()
    for b in range(10):
        counts = Counter(s0[4 * b : 4 * b + 4] + s1[4 * b : 4 * b + 4])
        assert [counts[n] for n in "abc"] == target
    for rank in (0, 1):
        assert_resume_equivalent(
            lambda rank=rank: make(rank=rank, world_size=2, stop="first_exhausted"), 13, 90
        )


def test_all_exhausted_is_refused_when_the_plan_is_split() -> None:
    """A rank whose share never draws some domain would never see it run out: its epoch would not end
    (stratified, 2 ranks, weights .25/.75 over batches of 2: rank 1 draws only 'b')."""
    sources = {"a": list(range(4)), "b": list(range(100, 112))}
    with pytest.raises(
        ValueError, match="'stop' parameter of DomainMixingIterable must be 'first_exhausted' or"
    ):
        DomainMixingIterable(sources, [0.25, 0.75], mode="stratified", batch_size=2, stop="all_exhausted",
                             rank=1, world_size=2)  # fmt: skip
    loader = DataLoader(
        DomainMixingIterable({"a": Source("a", 4), "b": Source("b", 12)}, stop="all_exhausted"),
        batch_size=2, num_workers=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="'all_exhausted' under 2 DataLoader workers"):
        list(loader)


def test_a_generator_source_is_refused() -> None:
    with pytest.raises(ValueError, match="re-iterable sources, not iterators or generators \\(domain 'a'"):
        DomainMixingIterable({"a": (i for i in range(3)), "b": [1, 2]})


def test_dataloader_workers_split_the_plan() -> None:
    loader = DataLoader(make(mode="stratified", num_batches=3), batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3  # num_batches counts the rank's batches: 2 for worker 0, 1 for worker 1
    target = allocate_counts([0.5, 0.2, 0.3], 8).tolist()
    counts = Counter(batches[0][0] + batches[1][0])  # the first global batch: one planned batch per worker
    assert [counts[n] for n in "abc"] == target


def test_plain_iterables_are_refused_under_workers() -> None:
    mixer = DomainMixingIterable({"a": ["a0", "a1"], "b": Source("b", 3)}, batch_size=2, num_batches=2)
    with pytest.raises(ValueError, match="source 'a' is a list, which every one of the DataLoader's 2"):
        list(DataLoader(mixer, batch_size=2, num_workers=2))
    assert len(list(DataLoader(mixer, batch_size=2, num_workers=1))) == 2  # one worker reads each once


def test_workers_never_repeat_a_pass_from_the_main_copys_stale_state() -> None:
    # Workers iterate copies; the main process's object never advances. Non-persistent workers of a
    # second pass would start from it again and repeat the first pass's items: refused.
    mixer = DomainMixingIterable(sources(), batch_size=2, num_batches=3)
    first = [b[1] for b in DataLoader(mixer, batch_size=2, num_workers=1)]
    with pytest.raises(ValueError, match="worker 0 got a new copy of the iterable, made from the main"):
        list(DataLoader(mixer, batch_size=2, num_workers=1))
    mixer.load_state_dict(mixer.state_dict())  # an explicit restore may start workers again
    assert [b[1] for b in DataLoader(mixer, batch_size=2, num_workers=1)] == first
    persistent = DataLoader(make(num_batches=3), batch_size=4, num_workers=1, persistent_workers=True)
    passes = [[x for b in persistent for x in b[1]] for _ in range(2)]  # the same copy goes on
    assert len(passes[1]) == 12 and not set(passes[0]) & set(passes[1])


def test_a_weight_change_that_cannot_reach_the_workers_is_refused() -> None:
    mixer = make(stop="cycle_forever")
    mixer.set_weights([1.0, 1.0, 0.0])  # before the loader's iterator starts: the copies have it
    batches = iter(DataLoader(mixer, batch_size=4, num_workers=1, prefetch_factor=1))
    assert not any(x.startswith("c") for x in next(batches)[1])
    mixer.set_weights([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="set_weights was called in the main process while DataLoader"):
        for _ in range(3):  # the worker may have built one more batch before the change
            next(batches)


class EpochSource(Source):
    """Like a Hugging Face IterableDataset: a loaded state is re-applied on every iter() of its epoch."""

    def __init__(self, tag: str, n: int) -> None:
        super().__init__(tag, n, stateful=True)
        self.epoch, self.loaded = 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, state: dict) -> None:
        self.loaded = state

    def __iter__(self):  # noqa: ANN204
        if self.loaded is not None and self.loaded["epoch"] == self.epoch:
            self._resume = self.loaded["pos"]
        for item in super().__iter__():
            yield f"{item}@{self.epoch}"

    def __getattr__(self, name: str) -> Any:
        if name == "state_dict":
            return lambda: {"pos": self.pos, "epoch": self.epoch}
        return super().__getattr__(name)


@pytest.mark.parametrize("stop", STOPS)
def test_source_epochs_count_passes_and_restore_only_the_saved_pass(stop: str) -> None:
    def build() -> DomainMixingIterable:
        return DomainMixingIterable(
            {"a": EpochSource("a", 5), "b": EpochSource("b", 3)}, batch_size=2, stop=stop
        )

    def take(mixer: DomainMixingIterable, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:  # across epochs (exhaustion stop rules end them)
            out += [item for _, (_, item) in zip(range(n - len(out)), mixer, strict=False)]
        return out

    full = take(build(), 60)
    assert "a0@3" in full  # a pass counter that keeps rising across the run's epochs
    for cut in (4, 9, 17):
        first = build()
        assert take(first, cut) == full[:cut]
        resumed = build()
        resumed.load_state_dict(first.state_dict())
        assert take(resumed, 60 - cut) == full[cut:]


@pytest.mark.parametrize("stop", ["first_exhausted", "all_exhausted"])
def test_a_state_saved_at_an_epoch_end_starts_the_next_source_epoch(stop: str) -> None:
    """At an epoch end every pass is closed: a resume must open the next source epoch, not the saved one."""

    def build() -> DomainMixingIterable:
        return DomainMixingIterable(
            {"a": EpochSource("a", 5), "b": EpochSource("b", 3)}, batch_size=2, stop=stop
        )

    full = build()
    first = list(full)
    state = json.loads(json.dumps(full.state_dict()))
    second = list(full)
    resumed = build()
    resumed.load_state_dict(state)
    assert list(resumed) == second
    assert not set(first) & set(second)  # items are tagged with their source epoch: all new ones


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"weights": [0.5, -0.5, 1.0]}, "weights"),
        ({"weights": {"a": 1.0, "b": 1.0}}, "weights"),
        ({"mode": "bogus"}, "mode"),
        ({"stop": "bogus"}, "stop"),
        ({"batch_size": 0}, "batch_size"),
        ({"mode": "stratified", "batch_size": 2, "min_count": 1}, "min_count"),
        ({"world_size": 0}, "world_size"),
    ],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}' parameter of DomainMixingIterable"):
        make(**kwargs)


def test_batch_sampling_survives_a_resume_saved_after_a_weight_change() -> None:
    it = make(mode="stratified")
    stream = iter(it)
    for _ in range(8):  # two whole batches
        next(stream)
    drawn = it.batch_sampling.tolist()
    it.set_weights({"a": 0.0, "b": 1.0, "c": 0.0})
    resumed = make(mode="stratified")
    resumed.load_state_dict(json.loads(json.dumps(it.state_dict())))
    assert resumed.batch_sampling.tolist() == drawn
    assert resumed.weights.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("key", "value", "wanted"),
    [
        (DomainMixingIterable.EXHAUSTED_KEY, [False], "a list of 3 bools"),
        (DomainMixingIterable.EXHAUSTED_KEY, [0, 0, 1], "a list of 3 bools"),
        (DomainMixingIterable.EXHAUSTED_KEY, "no", "a list of 3 bools"),
        (DomainMixingIterable.SOURCE_STATES_KEY, [], "a list of 3 source states"),
        (DomainMixingIterable.CONSUMED_KEY, [1, -1, 0], "a list of 3 ints >= 0"),
        (DomainMixingIterable.PASS_KEY, [0, 0], "a list of 3 ints >= 0"),
        (DomainMixingIterable.OFFSET_KEY, 1.5, "an int >= 0"),
        (DomainMixingIterable.OFFSET_KEY, 4, "below batch_size 4"),
    ],
)
def test_a_corrupt_per_source_entry_fails_on_load_and_restores_nothing(
    key: str, value: Any, wanted: str
) -> None:
    """Not at some later batch (an IndexError deep in the iteration); the object keeps its own state."""
    trained = make(stop="all_exhausted")
    it = iter(trained)
    for _ in range(7):
        next(it)
    state = trained.state_dict()
    state[key] = value
    fresh = make(stop="all_exhausted")
    before = json.dumps(fresh.state_dict())
    with pytest.raises(
        ValueError, match=rf"DomainMixingIterable.load_state_dict: state\['{key}'\] must be {wanted}"
    ):
        fresh.load_state_dict(state)
    assert json.dumps(fresh.state_dict()) == before


def test_bad_state() -> None:
    state = make().state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 4, now 5"):
        make(batch_size=5).load_state_dict(state)
    del state[DomainMixingIterable.OFFSET_KEY]
    with pytest.raises(ValueError, match="missing"):
        make().load_state_dict(state)
    with pytest.raises(ValueError, match="'sources' parameter"):
        DomainMixingIterable({"a": 3})
