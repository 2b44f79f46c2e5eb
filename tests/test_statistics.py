"""The statistics table: declarations, what derives from them, and adding a statistic end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import domainmix._statistics as table
from _helpers import TASKS, full_stats, make_stats
from domainmix import (
    DomainStats,
    DomainWeights,
    StatsCollector,
    WeightingController,
    domain_losses,
    strategies,
)
from domainmix.stats import Probe, Statistic, StepLosses, register_statistic, statistics

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def scratch_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations inside a test vanish with it (the table is process-wide)."""
    monkeypatch.setattr(table, "_REGISTRY", dict(table._REGISTRY))


def test_readme_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")
    assert table.markdown_table() in text, (
        "README's table of statistics differs from _statistics.markdown_table()"
    )


def test_builtin_rows_cover_every_field_and_shape() -> None:
    rows = statistics()
    assert list(rows)[:2] == ["loss", "count"] and rows["loss"].always and rows["count"].always
    assert rows["grad_dot"].dims(3) == (3, 3) and rows["heldout_loss"].dims(3) == (3,)
    stats = full_stats(3, step=1)
    assert stats.fields == ("step", *rows)
    assert all(stats[name].shape == rows[name].dims(3, TASKS) for name in rows)


def test_collector_layout_derives_from_the_table() -> None:
    c = StatsCollector(2)
    assert c.sources == ("train", "reference", "heldout", "excess")
    assert set(c.estimates) == {
        "grad_var", "grad_sq_norm", "grad_dot", "target_grad_dot",
        "fisher_cross", "fisher_domain_sq", "fisher_task_sq", "task_loss",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (dict(name="step", shape=("k",), source="x", reduction="mean", doc=""), "'name'"),
        (dict(name="a b", shape=("k",), source="x", reduction="mean", doc=""), "'name'"),
        (dict(name="s", shape=("k", "k", "k"), source="x", reduction="estimate", doc=""), "'shape'"),
        (dict(name="s", shape=("k",), source="x", reduction="median", doc=""), "'reduction'"),
        (dict(name="s", shape=("k", "k"), source="x", reduction="mean", doc=""), "shape"),
    ],
)
def test_bad_declarations_name_the_field(row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Statistic(**row)


def test_reserved_names_are_exactly_domain_stats_members() -> None:
    members = {name for name in dir(DomainStats) if not name.startswith("_")} | {"step", "observed"}
    assert members - {"loss", "count"} == table.RESERVED  # loss and count are statistics themselves
    with pytest.raises(ValueError, match="'name'"):
        Statistic("present", ("k",), "toy", "estimate", "would shadow DomainStats.present")


def test_an_always_present_matrix_statistic_is_a_zero_matrix(scratch_table: None) -> None:
    register_statistic(Statistic("pair", ("k", "k"), "toy", "estimate", "a matrix", always=True))
    assert StatsCollector(3).summarize(1)["pair"].tolist() == [[0.0] * 3] * 3


def test_redeclaring_a_name_differently_is_refused(scratch_table: None) -> None:
    with pytest.raises(ValueError, match="already declared"):
        register_statistic(Statistic("loss", ("k",), "train", "variance", "not the loss"))
    assert register_statistic(statistics()["loss"]) == statistics()["loss"]  # identical: idempotent


def test_domain_stats_reads_by_name_and_refuses_unknown_fields() -> None:
    s = make_stats(2, heldout_loss=[1.0, 2.0])
    assert s.heldout_loss.tolist() == [1.0, 2.0] and s["heldout_loss"] is s.heldout_loss
    assert s.grad_var is None and s.get("grad_var") is None
    with pytest.raises(ValueError, match="no 'grad_var'"):
        s["grad_var"]
    with pytest.raises(AttributeError, match="no statistic 'nope'"):
        s.nope  # noqa: B018
    with pytest.raises(ValueError, match="unknown statistics"):
        DomainStats(step=0, loss=torch.zeros(2), count=torch.zeros(2), nope=torch.zeros(2))
    with pytest.raises(AttributeError, match="immutable"):
        s.step = 3
    moved = s.replace(step=4, grad_var=torch.ones(2))
    assert (moved.step, moved.grad_var.tolist(), s.step, s.grad_var) == (4, [1.0, 1.0], 0, None)


def test_domain_stats_pickles_and_copies() -> None:
    import copy
    import pickle

    s = full_stats(3, step=5)
    s = s.replace(observed={"grad_var": torch.tensor([True, False, True])})
    for clone in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert clone.step == 5 and all(torch.equal(clone[n], v) for n, v in s.items())
        assert clone.observed_entries("grad_var").tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"observed\['grad_var'\]"):
        s.replace(grad_var=[1.0, 2.0, 3.0], observed={"grad_var": torch.ones(3, dtype=torch.bool)})


# --------------------------------------------------------------------------------------------------
# Adding a statistic touches three places: its row, the probe that observes it, the strategy that reads it.


class SpreadProbe(Probe):
    """Observes the toy statistic: each domain's largest per-example loss of the step, averaged."""

    sources = ("toy_probe",)

    def observe_step(self, collector: StatsCollector, step: StepLosses) -> None:
        k = collector.num_domains
        top = torch.zeros(k, dtype=torch.float64)
        losses = step.losses.detach().to(torch.float64)
        top.scatter_reduce_(0, step.domains, losses, reduce="amax", include_self=True)
        collector.observe_stat("loss_max", top)


def spread_strategy() -> strategies.Strategy:
    """α ∝ the toy statistic."""
    return strategies.stateless(
        "by_loss_max", lambda w, s: w._replace(mixture=s["loss_max"] / s["loss_max"].sum()), {"loss_max"}
    )


def test_a_new_statistic_is_one_row_one_probe_one_strategy(scratch_table: None) -> None:
    """Three places are touched: this row, SpreadProbe and spread_strategy; everything else follows."""
    register_statistic(Statistic("loss_max", ("k",), "toy_probe", "estimate", "largest loss per domain"))
    # Everything that derives from the table knows the new statistic without being edited:
    assert "loss_max" in table.markdown_table()
    assert "loss_max" in StatsCollector(2).estimates
    assert "loss_max" in make_stats(2).fields and make_stats(2).loss_max is None
    assert SpreadProbe().provides == {"loss_max"}
    strategy = spread_strategy()
    w = DomainWeights.create(["a", "b"])
    with pytest.raises(ValueError, match="'loss_max' must have shape"):
        strategy.update(w, strategy.init(w), make_stats(2, loss_max=[1.0, 2.0, 3.0]))

    names = ("a", "b")
    controller = WeightingController(
        strategies.combine(loss=spread_strategy(), sampling=strategies.uniform()),
        names,
        update_every=2,
        probes=[SpreadProbe()],
    )
    ids = torch.tensor([0, 0, 1])
    controller.step(torch.tensor([1.0, 3.0, 1.0]), ids)
    assert controller.step(torch.tensor([1.0, 1.0, 2.0]), ids)  # window: maxima (3, 1) then (1, 2)
    assert controller.weights.mixture.tolist() == pytest.approx([2.0 / 3.5, 1.5 / 3.5])
    assert controller.collector.summarize(3).get("loss_max") is None  # the window was reset


def test_a_missing_probe_is_named_at_construction(scratch_table: None) -> None:
    register_statistic(Statistic("loss_max", ("k",), "toy_probe", "estimate", "largest loss per domain"))
    with pytest.raises(ValueError, match=r"'loss_max': 'toy_probe'"):
        WeightingController(spread_strategy(), DomainWeights.create(["a", "b"]), probes=[])


@pytest.mark.parametrize("name", [n for n, row in table.statistics().items() if not row.always])
def test_a_missing_statistic_says_how_to_collect_it(name: str) -> None:
    """The hint is derived from the row (source, reduction), and the call it names really provides it."""
    row = table.statistic(name)
    needs = strategies.stateless("needs", lambda w, s: w, {name})
    with pytest.raises(ValueError, match=f"requires the statistic '{name}'") as caught:
        needs.update(DomainWeights.create(["a", "b"]), (), make_stats(2).replace(**{name: None}))
    message = str(caught.value)
    collector = StatsCollector(2)
    if row.reduction == "estimate":
        assert f"observe_stat('{name}', value)" in message and "source=" not in message
        value = torch.ones(row.dims(2, TASKS))
        collector.observe_stat(name, value)
    else:
        assert f"source='{row.source}'" in message and "observe_stat" not in message
        collector.observe(domain_losses(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1]), 2),
                          source=row.source)  # fmt: skip
    assert collector.summarize(1).get(name) is not None
    for probe in (p for p in _probe_classes() if row.source in p.sources):
        assert probe.__name__ in message


def _probe_classes() -> list[type[Probe]]:
    found, todo = [], list(Probe.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    # The library's probes only: a pipeline's private subclass (lm_dids._TimedProbe) is not one to name,
    # and whether it is imported depends on which tests ran before in this process.
    return [cls for cls in found if cls.__module__.startswith("domainmix.stats")]
