"""StatsCollector: window sums, exact variance, EMA semantics, NaN hygiene, reset and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import assert_resume_equivalent
from domainmix import StatsCollector, domain_losses

NAN = float("nan")


def red(values, ids, k=3):
    return domain_losses(torch.tensor(values, dtype=torch.float64), torch.tensor(ids), k)


def test_window_sums_across_micro_batches_and_exact_variance() -> None:
    c = StatsCollector(3)
    c.observe(red([1.0, 2.0], [0, 1]))
    c.observe(red([3.0, 5.0, 4.0], [0, 0, 1]))
    s = c.summarize(step=7)
    assert s.step == 7
    assert s.count.tolist() == [3.0, 2.0, 0.0]
    assert s.loss.tolist() == [3.0, 3.0, 0.0]
    assert s.loss_var.tolist() == [np.var([1, 3, 5], ddof=1), np.var([2, 4], ddof=1), 0.0]
    assert s.ref_loss is None and s.heldout_loss is None and s.grad_var is None and s.grad_dot is None


def test_variance_matches_numpy_over_many_micro_batches() -> None:
    g = torch.Generator().manual_seed(3)
    c = StatsCollector(2)
    all_values = {0: [], 1: []}
    for _ in range(7):
        values = torch.rand(5, generator=g, dtype=torch.float64) * 10 + 100  # offset: cancellation-prone
        ids = torch.randint(0, 2, (5,), generator=g)
        c.observe(domain_losses(values, ids, 2))
        for v, d in zip(values.tolist(), ids.tolist(), strict=True):
            all_values[d].append(v)
    s = c.summarize(1)
    for d in (0, 1):
        assert s.loss[d].item() == pytest.approx(np.mean(all_values[d]), rel=1e-13)
        assert s.loss_var[d].item() == pytest.approx(np.var(all_values[d], ddof=1), rel=1e-7)


def test_sources_map_to_fields() -> None:
    c = StatsCollector(2)
    c.observe(red([1.0, 3.0], [0, 1], 2))
    c.observe(red([2.0, 4.0, 6.0], [0, 1, 1], 2), source="heldout")
    c.observe(red([0.5], [1], 2), source="reference")
    s = c.summarize(1)
    assert s.loss.tolist() == [1.0, 3.0]
    assert s.heldout_loss.tolist() == [2.0, 5.0] and s.heldout_loss_var.tolist() == [0.0, 2.0]
    assert s.ref_loss.tolist() == [0.0, 0.5]
    assert s.count.tolist() == [1.0, 1.0]  # count is the training count only


def test_empty_window_gives_zero_loss_and_count() -> None:
    s = StatsCollector(2).summarize(3)
    assert s.loss.tolist() == [0.0, 0.0] and s.count.tolist() == [0.0, 0.0] and s.loss_var is None
    assert s.is_finite()


def test_ema_semantics() -> None:
    c = StatsCollector(3, ema=0.5)
    c.observe(red([2.0, 2.0], [0, 0]))
    s1 = c.summarize(1)
    assert s1.loss.tolist() == [2.0, 0.0, 0.0]  # first sighting initialises (no bias toward zero)
    assert s1.loss_var.tolist() == [0.0, 0.0, 0.0]
    c.observe(red([4.0, 6.0], [0, 1]))
    s2 = c.summarize(2)
    assert s2.loss.tolist() == [3.0, 6.0, 0.0]  # a: 0.5·2 + 0.5·4; b: first sighting → 6
    assert s2.count.tolist() == [1.0, 1.0, 0.0]  # counts are the window's, never averaged
    c.observe(red([8.0, 10.0, 1.0], [1, 1, 2]))
    s3 = c.summarize(3)
    assert s3.loss.tolist() == [3.0, 7.5, 1.0]  # a absent: keeps 3; b: 0.5·6 + 0.5·9
    # variance needs count ≥ 2: a's first var observation was window 1 (var 0); b's is window 3 (var 2)
    assert s3.loss_var.tolist() == [0.0, 2.0, 0.0]
    c.observe(red([1.0, 3.0], [2, 2]))
    s4 = c.summarize(4)
    assert s4.loss_var.tolist() == [0.0, 2.0, 2.0]  # c: first window with count ≥ 2 initialises


def test_ema_of_gradient_estimates() -> None:
    c = StatsCollector(2, ema=0.75)
    c.observe_stat("grad_dot", torch.tensor([[4.0, 0.0], [0.0, 8.0]]))
    assert c.summarize(1).grad_dot.tolist() == [[4.0, 0.0], [0.0, 8.0]]
    c.observe_stat("grad_dot", torch.tensor([[0.0, 4.0], [4.0, 0.0]]))
    assert c.summarize(2).grad_dot.tolist() == [[3.0, 1.0], [1.0, 6.0]]
    s = c.summarize(3)  # no estimate this window: the field is absent, the average is kept
    assert s.grad_dot is None
    c.observe_stat("grad_dot", torch.zeros(2, 2))
    assert c.summarize(4).grad_dot.tolist() == [[2.25, 0.75], [0.75, 4.5]]


@pytest.mark.parametrize("where", ["loss", "grad_var"])
def test_a_nan_entry_is_returned_as_is_and_never_folded_into_its_ema(where) -> None:
    c = StatsCollector(2, ema=0.5)
    c.observe(red([1.0, 2.0], [0, 1], 2))
    c.observe_stat("grad_var", torch.tensor([1.0, 1.0]))
    c.summarize(1)
    if where == "loss":
        c.observe(red([NAN, 4.0], [0, 1], 2))
        c.observe_stat("grad_var", torch.tensor([3.0, 3.0]))
    else:
        c.observe(red([3.0, 4.0], [0, 1], 2))
        c.observe_stat("grad_var", torch.tensor([NAN, 3.0]))
    bad = c.summarize(2)
    assert not bad.is_finite()  # the NaN comes back as it is, so the controller can skip the window
    c.observe(red([1.0, 2.0], [0, 1], 2))
    c.observe_stat("grad_var", torch.tensor([1.0, 1.0]))
    s = c.summarize(3)
    # The NaN entry's average is window 1's; every finite entry of window 2 was folded (β = 0.5).
    if where == "loss":
        assert s.loss.tolist() == [1.0, 2.5] and s.grad_var.tolist() == [1.5, 1.5]
    else:
        assert s.loss.tolist() == [1.5, 2.5] and s.grad_var.tolist() == [1.0, 1.5]


def test_ema_keeps_working_while_a_never_drawn_domain_reports_nan() -> None:
    """A domain at α = q = 0 has an undefined variance every window; the others' EMA must go on."""
    c = StatsCollector(3, ema=0.9)
    for window, v in enumerate([100.0, 1.0], start=1):
        c.observe_stat("grad_var", torch.tensor([v, 1.0, NAN]))
        s = c.summarize(window)
    assert s.grad_var[:2].tolist() == pytest.approx([0.9 * 100 + 0.1 * 1, 1.0]) and s.grad_var[2].isnan()


def test_a_per_step_estimate_is_averaged_over_the_steps_that_covered_each_domain() -> None:
    c = StatsCollector(2)
    both, first = torch.tensor([True, True]), torch.tensor([True, False])
    c.observe_stat("grad_sq_norm", torch.tensor([2.0, 4.0]), present=both)
    c.observe_stat("grad_sq_norm", torch.tensor([4.0, 0.0]), present=first)  # domain 1 absent: not a 0
    c.observe_stat("grad_dot", torch.tensor([[2.0, 1.0], [1.0, 4.0]]), present=both)
    c.observe_stat("grad_dot", torch.tensor([[4.0, NAN], [NAN, NAN]]), present=first)
    s = c.summarize(2)
    assert s.grad_sq_norm.tolist() == [3.0, 4.0]
    assert s.grad_dot.tolist() == [[3.0, 1.0], [1.0, 4.0]]
    assert s.observed_entries("grad_sq_norm").tolist() == [True, True]
    assert s.observed_entries("grad_dot").tolist() == [[True, True], [True, True]]
    c.observe_stat("grad_sq_norm", torch.tensor([5.0, 0.0]), present=first)
    s = c.summarize(3)
    assert s.grad_sq_norm.tolist() == [5.0, 0.0]  # never covered: 0, as an absent domain's product
    assert s.observed_entries("grad_sq_norm").tolist() == [True, False]  # ... and marked unobserved
    assert s.observed_entries("loss").all()  # a loss stream's absent domain shows as a count of 0
    with pytest.raises(ValueError, match="'present' parameter of StatsCollector.observe_stat"):
        c.observe_stat("grad_sq_norm", torch.tensor([5.0, 0.0]), present=torch.tensor([True]))


def test_the_number_of_tasks_cannot_change_under_ema() -> None:
    c = StatsCollector(2, ema=0.5)
    c.observe_stat("task_loss", torch.tensor([1.0, 2.0]))
    c.summarize(1)
    with pytest.raises(
        ValueError, match=r"'value' parameter of StatsCollector.observe_stat must be of the shape \(2,\)"
    ):
        c.observe_stat("task_loss", torch.tensor([1.0, 2.0, 3.0, 4.0]))
    c.observe_stat("task_loss", torch.tensor([3.0, 2.0]))  # the window was left as it was
    assert c.summarize(2).task_loss.tolist() == [2.0, 2.0]


def test_an_old_state_with_one_estimate_count_loads() -> None:
    c = StatsCollector(2)
    c.observe_stat("grad_var", torch.tensor([1.0, 3.0]))
    state = c.state_dict()
    state["window"]["grad_var.n"] = torch.ones(1, dtype=torch.float64)  # the former layout
    fresh = StatsCollector(2)
    fresh.load_state_dict(state)
    assert fresh.summarize(1).grad_var.tolist() == [1.0, 3.0]


def test_observe_stat_averages_estimates_of_the_window() -> None:
    c = StatsCollector(2)
    c.observe_stat("grad_var", torch.tensor([1.0, 2.0]))
    c.observe_stat("grad_var", torch.tensor([3.0, 6.0]))
    c.observe_stat("target_grad_dot", torch.tensor([-1.0, 1.0]))
    s = c.summarize(1)
    assert s.grad_var.tolist() == [2.0, 4.0]
    assert s.target_grad_dot.tolist() == [-1.0, 1.0]
    assert s.grad_sq_norm is None
    assert c.summarize(2).grad_var is None  # the window was reset


def test_reset_discards_window_but_keeps_averages() -> None:
    c = StatsCollector(2, ema=0.5)
    c.observe(red([2.0, 4.0], [0, 1], 2))
    c.summarize(1)
    c.observe(red([100.0, 100.0], [0, 1], 2))
    c.observe_stat("grad_var", torch.ones(2))
    c.reset()
    s = c.summarize(2)
    assert s.count.tolist() == [0.0, 0.0] and s.grad_var is None
    c.observe(red([4.0, 8.0], [0, 1], 2))
    assert c.summarize(3).loss.tolist() == [3.0, 6.0]  # averages from window 1 survived the reset


def test_observe_does_not_alias_its_input() -> None:
    c = StatsCollector(2)
    r = red([1.0, 2.0], [0, 1], 2)
    c.observe(r)
    r.sum.add_(100.0)
    assert c.summarize(1).loss.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("ema", [None, 0.8])
@pytest.mark.parametrize("midpoint", [3, 5, 8])
def test_resume_equivalence(ema, midpoint) -> None:
    def drive(c: StatsCollector, t: int):
        g = torch.Generator().manual_seed(t)
        n = 2 + t % 3
        ids = torch.randint(0, 3, (n,), generator=g)
        c.observe(domain_losses(torch.rand(n, generator=g), ids, 3))
        c.observe(domain_losses(torch.rand(2, generator=g), torch.tensor([t % 3, 2]), 3), source="heldout")
        if t % 2:
            c.observe_stat("grad_dot", torch.rand(3, 3, generator=g, dtype=torch.float64))
        if t % 3 == 2:  # a window closes every third step; the checkpoint may fall inside one
            return c.summarize(t)
        return None

    outputs = assert_resume_equivalent(lambda: StatsCollector(3, ema=ema), drive, midpoint=midpoint, total=12)
    assert sum(o is not None for o in outputs) == 4


def test_load_state_dict_errors() -> None:
    state = StatsCollector(3, ema=0.5).state_dict()
    with pytest.raises(ValueError, match="num_domains=3, ema=0.5; this collector has num_domains=2"):
        StatsCollector(2, ema=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="ema=None"):
        StatsCollector(3).load_state_dict(state)
    del state["window"]
    with pytest.raises(ValueError, match=r"missing keys \['window'\]"):
        StatsCollector(3, ema=0.5).load_state_dict(state)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda s: s["averages"].update(loss="corrupt"), r"state\['averages'\]\['loss'\] must be a tensor"),
        (lambda s: s["averages"].update(nope=torch.zeros(2, 3)), r"\['nope'\] must be a statistic's name"),
        (lambda s: s["averages"].update(loss=torch.zeros(3)), r"\['loss'\] must be a \(2, ...\) tensor"),
        (
            lambda s: s["window"].update({"train.sum": torch.zeros(5)}),
            r"\['train.sum'\] must be of shape \(3,\)",
        ),
        (lambda s: s["window"].update(nope=torch.zeros(3)), r"this version's window entries"),
    ],
)
def test_a_corrupt_state_is_refused_by_key_and_leaves_the_collector_as_it_was(corrupt, match: str) -> None:
    source = StatsCollector(3, ema=0.5)
    for _ in range(2):
        source.observe(domain_losses(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]), 3))
        source.summarize(1)
    state = source.state_dict()
    corrupt(state)
    target = StatsCollector(3, ema=0.5)
    target.observe(domain_losses(torch.tensor([9.0, 9.0, 9.0]), torch.tensor([0, 1, 2]), 3))
    before = target.state_dict()
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    after = target.state_dict()
    assert all(torch.equal(after["window"][k], v) for k, v in before["window"].items())
    assert after["averages"].keys() == before["averages"].keys()


def test_state_saved_before_the_excess_source_still_loads() -> None:
    old = StatsCollector(2)
    old.observe(domain_losses(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]), 2))
    state = old.state_dict()
    state[StatsCollector.WINDOW_KEY] = {
        k: v for k, v in state[StatsCollector.WINDOW_KEY].items() if not k.startswith("excess.")
    }
    new = StatsCollector(2)
    new.load_state_dict(state)
    assert new.summarize(step=1).loss.tolist() == [1.0, 3.0]


def test_under_ema_an_entry_seen_in_an_earlier_window_stays_observed() -> None:
    c = StatsCollector(2, ema=0.5)
    c.observe_stat("grad_sq_norm", torch.tensor([2.0, 0.0]), present=torch.tensor([True, False]))
    s = c.summarize(1)
    assert s.observed_entries("grad_sq_norm").tolist() == [True, False]
    c.observe_stat("grad_sq_norm", torch.tensor([0.0, 4.0]), present=torch.tensor([False, True]))
    s = c.summarize(2)
    assert s.grad_sq_norm.tolist() == [2.0, 4.0] and s.observed_entries("grad_sq_norm").all()


def test_observed_masks_through_replace_and_bad_masks() -> None:
    c = StatsCollector(2)
    c.observe_stat("grad_sq_norm", torch.tensor([2.0, 0.0]), present=torch.tensor([True, False]))
    s = c.summarize(1)
    # an edit of the values keeps the mask; another shape, or an explicit mask, replaces it
    assert s.replace(grad_sq_norm=torch.ones(2)).observed_entries("grad_sq_norm").tolist() == [True, False]
    relabelled = s.replace(observed={"grad_sq_norm": torch.tensor([True, True])})
    assert relabelled.observed_entries("grad_sq_norm").all()
    bad = [
        ({"nope": torch.ones(2)}, "unknown statistics"),
        (
            {"loss": torch.ones(3, dtype=torch.bool)},
            r"observed\['loss'\].*a bool tensor shaped like 'loss' \(\(2,\)\)",
        ),
        ({"grad_var": torch.ones(2, dtype=torch.bool)}, r"observed\['grad_var'\].*\(absent\)"),
    ]
    for observed, message in bad:
        with pytest.raises(ValueError, match=message):
            type(s)(step=0, loss=torch.zeros(2), count=torch.zeros(2), observed=observed)
