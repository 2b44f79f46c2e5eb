"""WeightingController: schedule of updates, failure handling, sampler pushes, logs and resume."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
import torch

import domainmix.strategies as S
from _helpers import assert_resume_equivalent, assert_same, make_stats
from domainmix import (
    DomainStats,
    DomainWeights,
    StatsCollector,
    WeightingController,
    domain_losses,
    weighted_loss,
)
from domainmix.sampling import DomainBatchSampler
from domainmix.stats import ReferenceLossProbe

NAMES = ["a", "b", "c"]
NAN_ = float("nan")
NAN = float("nan")


class FakeSampler:
    """What the controller talks to: set_weights by name, and the realised q of a batch of size B."""

    def __init__(self, domains=NAMES, batch_size: int = 8) -> None:
        self.domains = tuple(domains)
        self.batch_size = batch_size
        self.weights = torch.full((len(self.domains),), 0.25, dtype=torch.float64)
        self.calls: list[dict[str, float]] = []

    def set_weights(self, weights: Mapping[str, float]) -> None:
        assert set(weights) == set(self.domains)
        self.calls.append(dict(weights))
        self.weights = torch.tensor([weights[n] for n in self.domains], dtype=torch.float64)

    @property
    def effective_sampling(self) -> torch.Tensor:
        counts = torch.floor(self.weights * self.batch_size)
        counts[int(torch.argmax(self.weights))] += self.batch_size - counts.sum()
        return counts / self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "calls": list(self.calls)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weights = state["weights"].clone()
        self.calls = list(state["calls"])


def recording(log: list[DomainStats], requires=frozenset({"loss", "count"})) -> S.Strategy:
    """A statistics-reading strategy that records what it was given and leaves the weights alone."""

    def fn(weights: DomainWeights, stats: DomainStats) -> DomainWeights:
        log.append(stats)
        return weights

    return S.stateless("recording", fn, requires)


def feed(controller: WeightingController, value: float, domain: int = 0, n: int = 1) -> None:
    losses = torch.full((n,), float(value))
    controller.collector.observe(domain_losses(losses, torch.full((n,), domain), len(NAMES)))


def eg(step_size: float = 0.5) -> S.Strategy:
    return S.exponentiated_gradient(lambda s, w: s.loss, step_size)


# --- when updates happen -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("warmup", "every", "first_update", "window_steps"),
    [(4, 2, 4, [3, 4]), (5, 2, 6, [5, 6]), (3, 2, 4, [3, 4]), (0, 3, 3, [1, 2, 3]), (6, 3, 6, [4, 5, 6])],
)
def test_warmup_windows_are_discarded(warmup, every, first_update, window_steps) -> None:
    seen: list[DomainStats] = []
    c = WeightingController(recording(seen), NAMES, update_every=every, warmup_steps=warmup)
    results = []
    for t in range(1, first_update + 1):
        feed(c, value=t)  # step t contributes loss t to domain a
        results.append(c.step())
    assert results == [False] * (first_update - 1) + [True]
    assert len(seen) == 1 and seen[0].step == first_update
    # only the steps of the closing window reach the strategy; earlier (warm-up) windows were dropped
    assert seen[0].count.tolist() == [len(window_steps), 0.0, 0.0]
    assert seen[0].loss[0].item() == pytest.approx(sum(window_steps) / len(window_steps))
    fresh = WeightingController(recording([]), NAMES, update_every=every, warmup_steps=warmup)
    for t in range(1, 20):  # closes_window announces the step t that will update
        announced = fresh.closes_window
        assert announced == (t % every == 0 and t >= warmup)
        assert fresh.step() == announced


def test_update_period() -> None:
    seen: list[DomainStats] = []
    c = WeightingController(recording(seen), NAMES, update_every=3)
    updated = []
    for t in range(1, 10):
        feed(c, t, domain=t % 3)
        updated.append(c.step())
    assert updated == [False, False, True] * 3
    assert [s.step for s in seen] == [3, 6, 9]
    assert [s.count.tolist() for s in seen] == [[1.0, 1.0, 1.0]] * 3
    assert c.step_count == 9 and c.state_dict()["num_updates"] == 3


def test_stat_free_strategy_runs_at_construction_and_every_step() -> None:
    stages = [(0, [1.0, 0.0, 0.0]), (3, [0.0, 1.0, 1.0]), (5, [1.0, 1.0, 2.0])]
    sampler = FakeSampler()
    c = WeightingController(S.schedule(stages), NAMES, sampler=sampler, update_every=100)
    assert c.stat_free
    assert c.weights.mixture.tolist() == [1.0, 0.0, 0.0]  # stage 0 applies before the first step
    history = []
    for _ in range(6):
        c.step()
        history.append(c.weights.mixture.tolist())
    assert history == [
        [1.0, 0.0, 0.0],  # after step 1
        [1.0, 0.0, 0.0],
        [0.0, 0.5, 0.5],  # step 3: the stage starting at 3
        [0.0, 0.5, 0.5],
        [0.25, 0.25, 0.5],  # step 5
        [0.25, 0.25, 0.5],
    ]
    # The sampler got the construction weights and one push per change, nothing else.
    assert [list(call.values()) for call in sampler.calls] == [
        [1.0, 0.0, 0.0],
        [0.0, 0.5, 0.5],
        [0.25, 0.25, 0.5],
    ]


def test_schedule_before_first_stage_keeps_initial_weights() -> None:
    initial = DomainWeights.create(NAMES, [0.2, 0.3, 0.5])
    c = WeightingController(S.schedule([(2, [1.0, 1.0, 0.0])]), initial)
    assert c.weights.mixture.tolist() == pytest.approx([0.2, 0.3, 0.5])
    c.step()
    assert c.weights.mixture.tolist() == pytest.approx([0.2, 0.3, 0.5])
    c.step()
    assert c.weights.mixture.tolist() == [0.5, 0.5, 0.0]


def test_sampler_synced_at_construction_even_when_weights_do_not_change() -> None:
    # The sampler starts with other weights (0.25 each); uniform() leaves the controller's weights as they
    # were, but the sampler must still be told (regression: it was not).
    sampler = FakeSampler()
    WeightingController(S.uniform(), NAMES, sampler=sampler)
    assert sampler.calls == [dict.fromkeys(NAMES, 1 / 3)]
    sampler = FakeSampler()
    WeightingController(eg(), DomainWeights.create(NAMES, [0.5, 0.25, 0.25]), sampler=sampler)
    assert sampler.calls == [{"a": 0.5, "b": 0.25, "c": 0.25}]


# --- failure handling ------------------------------------------------------------------------------
def test_nan_window_is_skipped_with_warning(tmp_path) -> None:
    log_path = tmp_path / "log.jsonl"
    sampler = FakeSampler()
    c = WeightingController(eg(), NAMES, sampler=sampler, log=log_path)
    feed(c, 1.0)
    assert c.step()
    before = c.weights
    state_before = c.strategy_state
    feed(c, NAN, domain=1)
    with pytest.warns(RuntimeWarning, match=r"step 2: non-finite statistics \{'loss': \['b'\]\}"):
        assert c.step() is False
    assert c.weights is before and c.strategy_state is state_before
    assert len(sampler.calls) == 1  # the first update only (construction keeps the sampler's own q)
    sd = c.state_dict()
    assert sd["num_skipped"] == 1 and sd["num_updates"] == 1 and sd["step"] == 2

    def strict(token: str) -> Any:
        raise ValueError(f"invalid JSON constant {token}")

    records = [json.loads(line, parse_constant=strict) for line in log_path.read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True]
    assert records[1]["step"] == 2 and records[1]["stats"]["loss"][1] == "nan"
    assert records[1]["mixture"] == before.mixture.tolist()
    # the next clean window updates again
    feed(c, 2.0, domain=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.step()


def bad_output(kind: str) -> S.Strategy:
    def fn(weights: DomainWeights, stats: DomainStats) -> DomainWeights:
        del stats
        if kind == "not-normalised":
            return weights._replace(mixture=torch.tensor([0.7, 0.7, 0.7], dtype=torch.float64))
        if kind == "negative":
            return weights._replace(sampling=torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64))
        if kind == "nan":
            return weights._replace(mixture=torch.tensor([NAN, 0.5, 0.5], dtype=torch.float64))
        if kind == "shape":
            return weights._replace(mixture=torch.tensor([0.5, 0.5], dtype=torch.float64))
        if kind == "names":
            return weights._replace(names=("x", "y", "z"))
        return "not weights"  # type: ignore[return-value]

    return S.stateless("bad", fn, {"loss", "count"})


@pytest.mark.parametrize("kind", ["not-normalised", "negative", "nan", "shape", "names", "type"])
def test_invalid_strategy_output_raises_and_changes_nothing(kind) -> None:
    sampler = FakeSampler()
    c = WeightingController(bad_output(kind), NAMES, sampler=sampler)
    before = c.weights
    with pytest.raises(RuntimeError, match="Strategy 'bad' returned"):
        c.update(make_stats(3, step=1))
    assert c.weights is before
    assert c.state_dict()["num_updates"] == 0 and sampler.calls == []  # the sampler's q is kept


def test_zero_sampling_where_mixture_positive_raises() -> None:
    starve = S.stateless(
        "starve",
        lambda w, s: w._replace(sampling=torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)),
        {"loss"},
    )
    c = WeightingController(starve, NAMES)
    before = c.weights
    with pytest.raises(RuntimeError, match=r"q = 0 for domains with α > 0 \(\['c'\]\)"):
        c.update(make_stats(3, step=1))
    assert c.weights is before


# --- sampler, multipliers, logs, averages ---------------------------------------------------------------
@pytest.mark.parametrize("call", ["step", "observe"])
def test_a_probe_failing_on_a_step_that_closes_no_window_leaves_the_window_as_it_was(call: str) -> None:
    """The training losses are observed before the probes: a probe that raises must not leave them in."""
    calls = {"n": 0}

    def reference(seen: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("cache miss")
        return seen.losses.detach() * 0

    c = WeightingController(S.doremi(), ["a", "b"], update_every=4, probes=[ReferenceLossProbe(reference)])
    before = c.collector.state_dict()
    losses, ids = torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    with pytest.raises(KeyError, match="cache miss"):
        getattr(c, call)(losses, ids)
    assert c.step_count == 0
    assert_same(c.collector.state_dict(), before)
    getattr(c, call)(losses, ids)  # the retry is observed once, in every stream
    window = c.collector.state_dict()["window"]
    assert window["train.count"].tolist() == window["excess.count"].tolist() == [1.0, 1.0]


def test_accumulated_micro_batches_observed_then_one_step_equal_one_big_step() -> None:
    """Gradient accumulation: every micro-batch is observed, the optimizer step ends the step. The
    weights follow those of one step over the concatenated micro-batches, and α holds within a step."""
    g = torch.Generator().manual_seed(0)
    accumulated = WeightingController(eg(), NAMES, update_every=2, warmup_steps=2)
    whole = WeightingController(eg(), NAMES, update_every=2, warmup_steps=2)
    for _ in range(8):
        micro = [(torch.rand(6, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(4)]
        alphas = set()
        for losses, ids in micro:
            accumulated.observe(losses, ids)
            alphas.add(tuple(accumulated.loss_multipliers().tolist()))
        assert len(alphas) == 1  # one α for every micro-batch of an optimizer step
        assert accumulated.step() == whole.step(
            torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
        )
        assert accumulated.weights.mixture.tolist() == whole.weights.mixture.tolist()
    assert accumulated.step_count == 8
    assert accumulated.weights.mixture.tolist() != [1 / 3] * 3  # the windows did move α


def test_observe_leaves_a_warm_up_window_unobserved_and_checks_its_arguments() -> None:
    c = WeightingController(eg(), NAMES, update_every=2, warmup_steps=4)
    before = c.collector.state_dict()
    c.observe(torch.ones(3), torch.tensor([0, 1, 2]))  # step 1's window closes before the warm-up ends
    assert_same(c.collector.state_dict(), before)
    with pytest.raises(ValueError, match="'domain_ids' parameter of WeightingController.observe"):
        c.observe(torch.ones(3), torch.tensor([0, 1]))


def test_multipliers_of_an_update_step_use_the_q_its_batch_was_drawn_with() -> None:
    """The step that trains on a batch may move q; the batch was drawn with the old q, and α/q must
    divide by that, or the weighted loss is biased on every update step (every step with update_every=1)."""
    sampler = DomainBatchSampler({"a": range(100), "b": range(100, 200)}, 8, [0.5, 0.5])
    c = WeightingController(
        S.variance_aware(8, min_count=1), DomainWeights.create(["a", "b"], [0.5, 0.5]), sampler=sampler
    )
    batches = iter(sampler)
    for step in range(4):
        ids = (torch.tensor(next(batches)) >= 100).long()
        losses = torch.where(ids == 0, 1.0, 3.0).double()  # mean loss 1 on a, 3 on b
        c.collector.observe_stat("grad_var", torch.tensor([1.0, 36.0 * (step + 1)]))
        before = c.weights.mixture.clone()
        assert c.step()  # the window closes: q moves, and the sampler draws the next batch with it
        if step == 0:  # q moved from .5/.5; the batch in hand keeps the shares it was drawn with
            assert sampler.batch_sampling.tolist() == [0.5, 0.5] != c.weights.sampling.tolist()
        alpha = c.weights.mixture  # α may move too: the proxy trains on the new α (docs/design.md)
        torch.testing.assert_close(
            weighted_loss(losses, ids, c.loss_multipliers()), alpha[0] * 1.0 + alpha[1] * 3.0
        )
        assert torch.equal(before, alpha)  # variance_aware sets q only


def test_loss_multipliers_of_the_batch_in_hand_behind_a_prefetching_loader() -> None:
    sampler = FakeSampler()
    c = WeightingController(S.fixed([0.5, 0.25, 0.25], [0.5, 0.25, 0.25]), NAMES, sampler=sampler)
    held = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)  # the shares the loop's batch was drawn with
    assert c.loss_multipliers(held).tolist() == [2.0, 1.0, 0.5]
    c.set_batch_sampling(held)
    assert c.loss_multipliers().tolist() == [2.0, 1.0, 0.5]
    c.set_batch_sampling(None)  # back to the sampler's shares
    assert c.loss_multipliers().tolist() == [1.0, 1.0, 1.0]


def test_a_never_drawn_domain_with_undefined_statistics_does_not_block_updates() -> None:
    """α = q = 0 excludes a domain: it is never drawn, so its gradient variance is NaN by design."""
    c = WeightingController(
        S.variance_aware(16), DomainWeights.create(NAMES, [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]), update_every=1
    )
    c.collector.observe_stat("grad_var", torch.tensor([1.0, 36.0, float("nan")]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping the weight update" warning
        assert c.step()
    assert c.weights.sampling.tolist() == pytest.approx([1 / 7, 6 / 7, 0.0], abs=1 / 16)
    assert c.weights.sampling[2] == 0
    # a NaN on a domain that is drawn still skips the window
    c.collector.observe_stat("grad_var", torch.tensor([float("nan"), 36.0, 1.0]))
    with pytest.warns(RuntimeWarning, match="skipping the weight update"):
        assert not c.step()


def test_pushes_q_and_uses_effective_sampling_for_multipliers() -> None:
    sampler = FakeSampler(batch_size=4)
    initial = DomainWeights.create(NAMES, [0.5, 0.3, 0.2], [0.6, 0.3, 0.1])
    c = WeightingController(eg(1.0), initial, sampler=sampler)
    assert sampler.calls[-1] == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1})
    # realised q with B = 4: floor(4q) = (2, 1, 0), remainder to the largest → (3, 1, 0) / 4
    assert sampler.effective_sampling.tolist() == [0.75, 0.25, 0.0]
    with pytest.warns(RuntimeWarning, match=r"domains \['c'\] have a positive loss weight but the sampler"):
        multipliers = c.loss_multipliers()  # c is weighted in the loss but never drawn: said, once
    torch.testing.assert_close(multipliers, torch.tensor([0.5 / 0.75, 0.3 / 0.25, 0.2], dtype=torch.float64))
    # without a sampler: α/q of the controller's own weights
    alone = WeightingController(eg(1.0), initial)
    torch.testing.assert_close(
        alone.loss_multipliers(), torch.tensor([0.5 / 0.6, 1.0, 2.0], dtype=torch.float64)
    )

    c.update(make_stats(3, step=1, loss=[0.0, 0.0, 1.0]))
    # EG on α: α ∝ α·exp(s) → (0.5, 0.3, 0.2e) / Z; q unchanged, pushed only if something changed
    e = torch.exp(torch.tensor(1.0, dtype=torch.float64))
    z = 0.8 + 0.2 * e
    torch.testing.assert_close(c.weights.mixture, torch.stack([0.5 / z, 0.3 / z, 0.2 * e / z]))
    assert len(sampler.calls) == 2 and sampler.calls[-1] == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1})


def test_json_log_lines(tmp_path) -> None:
    path = tmp_path / "w.jsonl"
    c = WeightingController(eg(), NAMES, log=path, update_every=2)
    assert c.achieved is None  # no window has closed
    for t in range(1, 5):
        feed(c, t, domain=t % 3)
        c.step()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    last = records[-1]
    assert last["names"] == NAMES
    assert last["mixture"] == c.weights.mixture.tolist() and last["sampling"] == c.weights.sampling.tolist()
    assert last["loss_multipliers"] == c.loss_multipliers().tolist()
    assert last["stats"]["count"] == [1.0, 1.0, 0.0] and last["stats"]["loss"] == [3.0, 4.0, 0.0]
    assert last["achieved"] == [0.5, 0.5, 0.0] == c.achieved.tolist()  # the window's real composition
    assert last["schedule"] == c.schedule_fingerprint != records[0]["schedule"]
    assert last["skipped"] is False


def test_schedule_fingerprint_chains_every_change() -> None:
    def run(domains: list[int]) -> list[str]:
        c = WeightingController(eg(), NAMES, update_every=1)
        seen = [c.schedule_fingerprint]
        for t, d in enumerate(domains, start=1):
            feed(c, t, domain=d)
            c.step()
            seen.append(c.schedule_fingerprint)
        return seen

    a, b = run([0, 1, 2, 0]), run([0, 1, 2, 1])
    assert a == run([0, 1, 2, 0])  # deterministic
    assert len(set(a)) == 5 and a[:4] == b[:4] and a[4] != b[4]  # one different update: another hash
    assert all(len(f) == 16 for f in a)


def test_log_callable_receives_records() -> None:
    got: list[dict] = []
    c = WeightingController(S.uniform(), NAMES, log=got.append)
    assert got == []  # the construction's record waits for the first step (see below)
    c.step()
    assert len(got) == 1 and got[0]["step"] == 0 and got[0]["mixture"] == [1 / 3] * 3


def test_a_resumed_statistic_free_run_logs_what_the_uninterrupted_one_did() -> None:
    """A controller built to load a saved state must not log its own, stale, step 0."""

    def run(log: list[dict], steps: int, state: dict | None = None) -> WeightingController:
        c = WeightingController(
            S.schedule([(0, [0.5, 0.5, 0.0]), (3, [0.9, 0.1, 0.0])]), NAMES, log=log.append
        )
        if state is not None:
            c.load_state_dict(state)
        for _ in range(steps):
            c.step()
        return c

    full: list[dict] = []
    run(full, 6)
    head: list[dict] = []
    tail: list[dict] = []
    run(tail, 2, run(head, 4).state_dict())
    assert [(r["step"], r["mixture"]) for r in head + tail] == [(r["step"], r["mixture"]) for r in full]


def test_averaged_weights_with_track_average() -> None:
    c = WeightingController(S.chain(eg(1.0), S.track_average()), NAMES)
    assert c.averaged_weights() is None
    mixtures = []
    for t, loss in enumerate(([1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5]), start=1):
        c.update(make_stats(3, step=t, loss=loss))
        mixtures.append(c.weights.mixture)
    avg = c.averaged_weights()
    torch.testing.assert_close(avg.mixture, torch.stack(mixtures).mean(0))
    torch.testing.assert_close(avg.sampling, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert WeightingController(eg(), NAMES).averaged_weights() is None


# --- resume --------------------------------------------------------------------------------------------
class Run:
    """Controller + its sampler, checkpointed together as a training script would."""

    def __init__(self, strategy_factory, *, ema=None, update_every=3, warmup=2) -> None:
        self.sampler = FakeSampler(batch_size=16)
        self.controller = WeightingController(
            strategy_factory(),
            NAMES,
            sampler=self.sampler,
            update_every=update_every,
            warmup_steps=warmup,
            ema=ema,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.sampler.load_state_dict(state["sampler"])


def drive(run: Run, t: int):
    g = torch.Generator().manual_seed(t)
    losses = torch.rand(6, generator=g) * (1 + torch.arange(6) % 3)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])[: 3 + t % 4]  # unequal counts; all domains seen
    run.controller.collector.observe(domain_losses(losses[: len(ids)], ids, 3))
    if t % 5 == 0:
        run.controller.collector.observe_stat("grad_var", torch.rand(3, generator=g, dtype=torch.float64))
    updated = run.controller.step()
    w = run.controller.weights
    return updated, w.mixture, w.sampling, run.controller.loss_multipliers(), run.sampler.weights


def eg_chain() -> S.Strategy:
    return S.combine(
        loss=S.chain(eg(2.0), S.mix_uniform(0.05), S.ema(0.5), S.track_average()),
        sampling=S.chain(S.follow_mixture(), S.floor(0.2)),
    )


@pytest.mark.parametrize("ema", [None, 0.7])
# Run: warm-up 2, windows of 3 closing at steps 3, 6, 9, 12: before any step, in warm-up, right after an
# update (3, 6), mid-window (4, 7, 13)
@pytest.mark.parametrize("midpoint", [0, 1, 3, 4, 6, 7, 13])
def test_resume_equivalence_with_sampler_pushes(ema, midpoint) -> None:
    outputs = assert_resume_equivalent(lambda: Run(eg_chain, ema=ema), drive, midpoint=midpoint, total=16)
    pushes = [o for o in outputs if o[0]]
    assert len(pushes) >= 4  # the run really updated (and pushed to the sampler) before and after midpoint
    assert not torch.equal(outputs[0][2], outputs[-1][2])


def test_resume_equivalence_stat_free_schedule() -> None:
    def factory() -> S.Strategy:
        return S.chain(
            S.schedule([(0, [1.0, 1.0, 1.0]), (5, [3.0, 1.0, 1.0]), (9, [1.0, 1.0, 3.0])]), S.track_average()
        )

    outputs = assert_resume_equivalent(lambda: Run(factory), drive, midpoint=6, total=12)
    assert outputs[3][1].tolist() == pytest.approx([1 / 3] * 3) and outputs[-1][1].tolist() == [0.2, 0.2, 0.6]


def test_a_resume_under_other_static_arguments_follows_them() -> None:
    """The saved state of a static strategy is its resolved arguments: loading it used to bring back the
    old fixed weights, stages or population over the ones the resumed run was constructed with."""
    cases = [
        (S.fixed([0.6, 0.2, 0.2]), S.fixed([0.2, 0.2, 0.6]), [0.2, 0.2, 0.6]),
        (
            S.schedule([(0, [1.0, 1.0, 1.0]), (2, [1.0, 0.0, 0.0])]),
            S.schedule([(0, [0.0, 0.0, 1.0])]),
            [0, 0, 1],
        ),
    ]
    for saved_under, resumed_under, expected in cases:
        old = WeightingController(saved_under, NAMES)
        for _ in range(3):
            old.step()
        new = WeightingController(resumed_under, NAMES)
        new.load_state_dict(old.state_dict())
        new.step()
        assert new.weights.mixture.tolist() == pytest.approx(expected)
    fgls = WeightingController(S.combine(loss=S.fgls(), sampling=S.uniform()), NAMES)
    resumed = WeightingController(S.combine(loss=S.fgls(population=[8, 1, 1]), sampling=S.uniform()), NAMES)
    resumed.load_state_dict(fgls.state_dict())
    assert resumed.state_dict()["strategy_state"]["loss"]["population"].tolist() == pytest.approx(
        [0.8, 0.1, 0.1]
    )


def test_a_statistic_the_strategy_does_not_read_never_skips_its_update() -> None:
    """Losses near 1e160 overflow their variance to inf; DoReMi-like strategies (reading the loss only)
    skipped every window for it. Only the statistics a strategy reads (and the counts) are checked."""
    c = WeightingController(eg(), NAMES)
    stats = make_stats(3, step=1, loss=[1.0, 2.0, 3.0], loss_var=[1.0, math.inf, math.nan])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.update(stats)
    with pytest.warns(RuntimeWarning, match=r"non-finite statistics \{'loss': \['c'\]\}"):
        assert not c.update(make_stats(3, step=2, loss=[1.0, 2.0, math.inf], loss_var=[1.0, math.inf, 1.0]))


def test_resume_restores_nan_skip_counter() -> None:
    c = WeightingController(eg(), NAMES)
    feed(c, NAN)
    with pytest.warns(RuntimeWarning):
        c.step()
    fresh = WeightingController(eg(), NAMES)
    fresh.load_state_dict(c.state_dict())
    assert fresh.state_dict()["num_skipped"] == 1 and fresh.step_count == 1


# --- load_state_dict errors ----------------------------------------------------------------------------
def test_load_state_dict_missing_keys() -> None:
    c = WeightingController(eg(), NAMES)
    state = c.state_dict()
    del state["strategy_state"], state["num_skipped"]
    with pytest.raises(ValueError, match=r"missing keys \['strategy_state', 'num_skipped'\]"):
        WeightingController(eg(), NAMES).load_state_dict(state)


def test_load_state_dict_other_names() -> None:
    state = WeightingController(eg(), NAMES).state_dict()
    with pytest.raises(
        ValueError, match=r"saved for domains \['a', 'b', 'c'\], this controller has \['x', 'y', 'z'\]"
    ):
        WeightingController(eg(), ["x", "y", "z"]).load_state_dict(state)


def test_load_state_dict_other_strategy() -> None:
    state = WeightingController(eg(), NAMES).state_dict()
    target = WeightingController(S.chain(eg(), S.track_average()), NAMES)
    before = target.weights
    with pytest.raises(ValueError, match="saved for strategy 'exponentiated_gradient'"):
        target.load_state_dict(state)
    assert target.weights is before


def test_load_state_dict_other_collector_settings() -> None:
    state = WeightingController(eg(), NAMES, ema=0.5).state_dict()
    with pytest.raises(ValueError, match="ema=0.5"):
        WeightingController(eg(), NAMES).load_state_dict(state)


def test_load_state_dict_invalid_weights() -> None:
    state = WeightingController(eg(), NAMES).state_dict()
    state["weights"]["mixture"] = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="'mixture' parameter"):
        WeightingController(eg(), NAMES).load_state_dict(state)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("weights", {"mixture": [2.0, 2.0, 2.0], "sampling": [1 / 3] * 3}, "must sum to 1"),
        ("num_updates", "many", r"state\['num_updates'\] must be an int >= 0"),
        ("step", -5, r"state\['step'\] must be an int >= 0"),
        ("held", "yes", r"state\['held'\] must be a bool"),
    ],
)
def test_a_corrupt_state_is_refused_before_anything_is_loaded(key: str, value: Any, match: str) -> None:
    """Weights summing to 6 passed (validated normalised, kept raw: every loss multiplier x6); a bad
    counter failed with a bare int() error after the weights and the collector were already loaded."""
    source = WeightingController(eg(), NAMES)
    source.step()
    state = source.state_dict()
    state[key] = value
    target = WeightingController(eg(), NAMES)
    before = (target.weights, target.step_count, target.state_dict()["collector"])
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert target.weights is before[0] and target.step_count == before[1]
    assert_same(target.state_dict()["collector"], before[2])


def test_collector_given_is_used() -> None:
    col = StatsCollector(3, ema=0.9)
    c = WeightingController(eg(), NAMES, collector=col, ema=0.1)
    assert c.collector is col


def test_a_failed_update_does_not_advance_the_controller() -> None:
    """A score of the wrong shape once raised inside torch and still advanced step_count."""
    calls = []

    def score(s, w):
        calls.append(s.step)
        return torch.ones(2) if len(calls) == 1 else s.loss

    c = WeightingController(S.exponentiated_gradient(score, 1.0), NAMES, update_every=2)
    c.step(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]))
    before = c.state_dict()
    with pytest.raises(ValueError, match="'score' parameter"):
        c.step(torch.tensor([4.0, 5.0, 6.0]), torch.tensor([0, 1, 2]))
    after = c.state_dict()
    assert c.step_count == 1 and c.weights.mixture.tolist() == [1 / 3] * 3
    assert_same(after, before)  # the window still holds step 1 only
    assert c.step(torch.tensor([4.0, 5.0, 6.0]), torch.tensor([0, 1, 2])) and c.step_count == 2
    assert calls == [2, 2]


def test_domain_names_keep_the_samplers_own_weights() -> None:
    """The controller once replaced the sampler's q ∝ sizes by uniform, silently."""
    from domainmix.sampling import DomainBatchSampler

    def sampler() -> DomainBatchSampler:
        return DomainBatchSampler({"a": range(10), "b": range(10, 40)}, 4)

    s = sampler()
    c = WeightingController(eg(), ["a", "b"], update_every=5, sampler=s)
    assert c.weights.mixture.tolist() == [0.5, 0.5] and c.weights.sampling.tolist() == [0.25, 0.75]
    assert s.weights.tolist() == [0.25, 0.75] and len(s.weight_history) == 1
    torch.testing.assert_close(c.loss_multipliers(), torch.tensor([2.0, 2 / 3], dtype=torch.float64))
    s = sampler()  # a strategy that sets q at construction, or explicit weights, still win
    WeightingController(S.uniform(), ["a", "b"], sampler=s)
    assert s.weights.tolist() == [0.5, 0.5]
    s = sampler()
    WeightingController(eg(), DomainWeights.create(["a", "b"], [0.4, 0.6]), sampler=s)
    assert s.weights.tolist() == [0.4, 0.6]
    with pytest.raises(ValueError, match=r"'sampler' parameter of WeightingController.*zero for \['a'\]"):
        WeightingController(eg(), ["a", "b"], sampler=DomainBatchSampler({"a": [], "b": range(4)}, 2))


# --- hand-set weights ------------------------------------------------------------------------------------
def test_override_sets_weights_pushes_q_and_logs_it() -> None:
    records: list[dict] = []
    sampler = FakeSampler()
    c = WeightingController(eg(), NAMES, sampler=sampler, log=records.append)
    before = c.schedule_fingerprint
    c.override(sampling={"a": 2.0, "b": 1.0, "c": 1.0})
    assert c.weights.sampling.tolist() == [0.5, 0.25, 0.25] and c.weights.mixture.tolist() == [1 / 3] * 3
    assert sampler.weights.tolist() == [0.5, 0.25, 0.25]
    torch.testing.assert_close(c.loss_multipliers(), c.weights.mixture / sampler.effective_sampling)
    assert records[-1]["override"] is True and records[-1]["sampling"] == [0.5, 0.25, 0.25]
    assert c.schedule_fingerprint != before == _fresh_fingerprint()
    # the strategy's next update starts from the hand-set weights: as if the run had begun with them
    twin = WeightingController(
        eg(), DomainWeights.create(NAMES, None, [0.5, 0.25, 0.25]), sampler=FakeSampler()
    )
    for run in (c, twin):
        feed(run, 2.0, domain=1)
        run.step()
    assert torch.equal(c.weights.mixture, twin.weights.mixture) and c.weights.mixture[1] > 1 / 3


def test_override_restarts_a_smoothing_state_from_the_hand_set_weights() -> None:
    """An ema() in the chain mirrors the weights; after an override it must not drag them back."""
    noop = S.stateless("noop", lambda w, s: w, {"loss", "count"})
    c = WeightingController(S.chain(noop, S.ema(0.9)), NAMES)
    c.override(mixture=[0.8, 0.1, 0.1])
    twin = WeightingController(S.chain(noop, S.ema(0.9)), DomainWeights.create(NAMES, [0.8, 0.1, 0.1]))
    for run in (c, twin):
        feed(run, 1.0)
        run.step()
    torch.testing.assert_close(c.weights.mixture, twin.weights.mixture)


def test_override_restarts_the_loss_weights_of_fgls_and_erma() -> None:
    """FGLS and ERMA move their own w; after an override they start from w = α / π, not the old w."""
    heldout = make_stats(
        3, heldout_loss=[1.0, 1.0, 2.0], heldout_loss_var=[1.0, 3.0, 2.0], heldout_count=[50.0, 50.0, 50.0]
    )
    for strategy in (S.fgls(smoothing=0.1), S.erma(step_size=0.3)):
        c = WeightingController(strategy, NAMES)
        c.update(heldout)
        c.override(mixture=[0.6, 0.3, 0.1])
        c.update(heldout)
        restarted = strategy.init(DomainWeights.create(NAMES))._replace(
            loss_weights=torch.tensor([1.8, 0.9, 0.3], dtype=torch.float64)  # α / π, Σ π w = 1
        )
        expected, _ = strategy.update(DomainWeights.create(NAMES, [0.6, 0.3, 0.1]), restarted, heldout)
        torch.testing.assert_close(c.weights.mixture, expected.mixture)
    outside = WeightingController(S.fgls(population=[1.0, 1.0, 0.0]), NAMES)
    with pytest.raises(ValueError, match="'mixture' parameter of WeightingController.override"):
        outside.override(mixture=[0.0, 0.0, 1.0])  # all of α where π = 0: no w can hold it
    assert outside.weights.mixture.tolist() == [1 / 3] * 3 and not outside.held


def _fresh_fingerprint() -> str:
    return WeightingController(eg(), NAMES, sampler=FakeSampler()).schedule_fingerprint


def test_override_hold_freezes_updates_until_release() -> None:
    c = WeightingController(eg(), NAMES, update_every=1)
    c.override(mixture=[0.2, 0.3, 0.5], hold=True)
    for t in range(1, 4):
        feed(c, 5.0 * t, domain=t % 3)
        assert c.step() is False
    assert c.held and c.weights.mixture.tolist() == pytest.approx([0.2, 0.3, 0.5])
    c.release()
    feed(c, 5.0, domain=0)
    assert c.step() is True and c.weights.mixture[0] > 0.2


def test_override_hold_also_stops_a_statistic_free_strategy() -> None:
    c = WeightingController(S.schedule([(0, [1.0, 1.0, 1.0]), (2, [1.0, 1.0, 8.0])]), NAMES)
    c.override(mixture=[0.5, 0.25, 0.25], hold=True)
    for _ in range(4):
        c.step()
    assert c.weights.mixture.tolist() == [0.5, 0.25, 0.25]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"mixture": [1.0, -1.0, 1.0]}, "mixture"), ({"sampling": [1.0, 0.0, 1.0]}, "sampling")],
)
def test_override_refuses_bad_weights(kwargs: dict, name: str) -> None:
    c = WeightingController(eg(), NAMES)
    with pytest.raises(ValueError, match=f"'{name}' parameter of DomainWeights.create"):
        c.override(**kwargs)
    assert c.weights.mixture.tolist() == [1 / 3] * 3


def test_resume_equivalence_with_a_held_override() -> None:
    def drive_with_override(run: Run, t: int):
        if t == 3:
            run.controller.override(sampling=[0.6, 0.2, 0.2], hold=True)
        if t == 9:
            run.controller.release()
        return (*drive(run, t), run.controller.held, run.controller.schedule_fingerprint)

    outputs = assert_resume_equivalent(lambda: Run(eg_chain), drive_with_override, midpoint=6, total=14)
    assert [o[5] for o in outputs[3:9]] == [True] * 6 and outputs[-1][5] is False


def test_a_scalar_loss_is_refused_showing_its_shape() -> None:
    c = WeightingController(eg(), NAMES)
    with pytest.raises(
        ValueError,
        match=r"'losses' parameter of WeightingController.step .* Got 'shape \(\)' instead",
    ):
        c.step(torch.tensor(1.0), torch.tensor([0]))


@pytest.mark.parametrize(
    ("shares", "match"),
    [
        ([NAN_, 0.5, 0.5], "finite"),
        ([-0.5, 1.0, 0.5], "non-negative"),
        ([3.0, 3.0, 2.0], "shares that sum to 1"),  # counts b instead of b / B
        ([0.5, 0.5], r"shape \(3,\)"),
    ],
)
def test_realised_shares_are_refused_unless_they_are_shares(shares: list[float], match: str) -> None:
    c = WeightingController(S.uniform(), NAMES)
    with pytest.raises(
        ValueError, match=rf"'sampling' parameter of WeightingController.loss_multipliers .*{match}"
    ):
        c.loss_multipliers(sampling=torch.tensor(shares))
    with pytest.raises(
        ValueError, match=rf"'shares' parameter of WeightingController.set_batch_sampling .*{match}"
    ):
        c.set_batch_sampling(torch.tensor(shares))
    assert c.loss_multipliers(sampling=torch.tensor([0.5, 0.25, 0.25])).tolist() == pytest.approx(
        [2 / 3, 4 / 3, 4 / 3]
    )


def test_a_custom_samplers_mapping_weights_are_read_by_name() -> None:
    class Sink:
        weights = {"c": 0.5, "a": 0.25, "b": 0.25}

        def set_weights(self, weights: Any) -> None:
            self.weights = weights

    c = WeightingController(eg(), NAMES, sampler=Sink())  # eg moves α only: q stays the sampler's
    assert c.weights.sampling.tolist() == [0.25, 0.25, 0.5]
    Sink.weights = {"a": 1.0}  # type: ignore[assignment]
    with pytest.raises(
        ValueError, match="'sampler' parameter of WeightingController .* missing: \\['b', 'c'\\]"
    ):
        WeightingController(S.uniform(), NAMES, sampler=Sink())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda s: s["strategy_state"]["states"][1].update(count=2.9),
            r"count: expected an int >= 0, got 2.9",
        ),
        (lambda s: s["strategy_state"]["states"][1].update(count=-5), r"count: expected an int >= 0, got -5"),
        (lambda s: s.update(weights=[1, 2]), r"state\['weights'\] must be a mapping with 'mixture'"),
        (
            lambda s: s["weights"].update(mixture=[NAN_, 1.0, 1.0]),
            r"state\['weights'\]: The 'mixture' parameter",
        ),
    ],
)
def test_a_corrupt_strategy_state_or_weights_is_refused_naming_the_key(edit, match: str) -> None:
    def make() -> WeightingController:
        strategy = S.chain(S.exponentiated_gradient(lambda s, w: s.loss, step_size=0.3), S.track_average())
        return WeightingController(strategy, NAMES, update_every=2)

    source = make()
    for _ in range(4):
        source.step(torch.rand(3), torch.tensor([0, 1, 2]))
    state = source.state_dict()
    edit(state)
    target = make()
    with pytest.raises(ValueError, match=rf"WeightingController.load_state_dict: .*{match}"):
        target.load_state_dict(state)
    assert target.step_count == 0
