"""Bad arguments fail where they are given, with the library's one message shape.

Every case asserts the error type and that the message names the parameter (and the caller, and the
offending value where the shape allows): "The 'x' parameter of Caller must be ... Got ... instead."
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import domainmix.strategies as S
from _helpers import make_stats
from domainmix import DomainWeights, StatsCollector, WeightingController, domain_losses, weighted_loss
from domainmix.losses import DomainLosses
from domainmix.sampling import DomainBatchSampler, allocate_counts, split_heldout

NAMES = ["a", "b"]
NAN, INF = float("nan"), float("inf")


def dw() -> DomainWeights:
    return DomainWeights.create(NAMES)


def red(k: int) -> DomainLosses:
    return domain_losses(torch.ones(k), torch.arange(k), k)


class NoSetWeights:
    domains = ("a", "b")


class OtherDomains:
    domains = ("b", "a")

    def set_weights(self, weights: dict[str, float]) -> None:
        pass


def param(fn, error, *fragments, id):  # mirrors pytest.param
    return pytest.param(fn, error, fragments, id=id)


def shape(name: str, caller: str) -> str:
    return f"The '{name}' parameter of {caller} must be "


CASES = [
    # --- DomainWeights.create / from_loss_weights -------------------------------------------------
    param(
        lambda: DomainWeights.create(NAMES, [0.5, -0.5]),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "non-negative",
        "Got [0.5, -0.5] instead.",
        id="negative",
    ),
    param(
        lambda: DomainWeights.create(NAMES, [0.5, NAN]),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "finite",
        "Got [0.5, nan] instead.",
        id="nan",
    ),
    param(
        lambda: DomainWeights.create(NAMES, None, [INF, 1.0]),
        ValueError,
        shape("sampling", "DomainWeights.create"),
        "finite",
        "[inf, 1.0]",
        id="inf-sampling",
    ),
    param(  # an int beyond the float range used to escape as an OverflowError
        lambda: DomainWeights.create(NAMES, [10**400, 1]),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "finite",
        "Got [1000",
        id="int-overflows-float",
    ),
    param(  # beyond 2**53 the float targets lose whole slots and the counts no longer sum to total
        lambda: allocate_counts([1.0, 1.0], 2**53 + 1),
        ValueError,
        shape("total", "allocate_counts"),
        "an int in the range [0, 9007199254740992]",
        "Got 9007199254740993 instead.",
        id="allocate-total-too-large",
    ),
    param(  # each weight is finite but their sum is not: normalising would give all zeros
        lambda: DomainWeights.create(NAMES, [1e308, 1e308]),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "finite sum",
        "Got [1e+308, 1e+308] instead.",
        id="sum-overflows",
    ),
    param(
        lambda: DomainWeights.create(NAMES, [0.0, 0.0]),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "positive sum",
        "Got [0.0, 0.0] instead.",
        id="all-zero",
    ),
    param(
        lambda: DomainWeights.create(NAMES, {"a": 1.0, "z": 1.0}),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "unknown: ['z']",
        "missing: ['b']",
        "{'a': 1.0, 'z': 1.0}",
        id="unknown-name",
    ),
    param(
        lambda: DomainWeights.create(NAMES, {"a": 1.0}),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "unknown: []",
        "missing: ['b']",
        id="missing-name",
    ),
    param(
        lambda: DomainWeights.create(["a", "a"]),
        ValueError,
        shape("names", "DomainWeights.create"),
        "duplicated: ['a']",
        "Got ['a', 'a'] instead.",
        id="dup-names",
    ),
    param(
        lambda: DomainWeights.create([]),
        ValueError,
        shape("names", "DomainWeights.create"),
        "non-empty",
        "Got [] instead.",
        id="no-names",
    ),
    param(
        lambda: DomainWeights.create(["a", ""]),
        ValueError,
        shape("names", "DomainWeights.create"),
        "non-empty strings",
        "Got ['a', ''] instead.",
        id="empty-name",
    ),
    param(
        lambda: DomainWeights.create("ab"),
        ValueError,
        shape("names", "DomainWeights.create"),
        "Got 'ab' instead.",
        id="names-str",
    ),
    param(
        lambda: DomainWeights.create(["a", 1]),
        ValueError,
        shape("names", "DomainWeights.create"),
        "Got ['a', 1] instead.",
        id="names-non-str",
    ),
    param(
        lambda: DomainWeights.create(NAMES, [0.2, 0.3, 0.5]),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "shape (2,)",
        "Got 'shape (3,)' instead.",
        id="k-mismatch",
    ),
    param(
        lambda: DomainWeights.create(NAMES, torch.tensor([True, False])),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "real-valued",
        id="bool-tensor",
    ),
    param(
        lambda: DomainWeights.create(NAMES, [True, False]),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "real numbers",
        "Got [True, False] instead.",
        id="bool-list",
    ),
    param(
        lambda: DomainWeights.create(NAMES, torch.ones(1, 2)),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "shape (2,)",
        "Got 'shape (1, 2)' instead.",
        id="2d-weights",
    ),
    param(
        lambda: DomainWeights.create(NAMES, "0.5"),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "Got '0.5' instead.",
        id="weights-str",
    ),
    param(
        lambda: DomainWeights.create(NAMES, [0.5, 0.5], [1.0, 0.0]),
        ValueError,
        shape("sampling", "DomainWeights.create"),
        "zero for ['b']",
        "Got [1.0, 0.0] instead.",
        id="starved",
    ),
    param(
        lambda: DomainWeights.from_loss_weights(NAMES, [0.5, 0.5], [1.0, -1.0]),
        ValueError,
        shape("loss_weights", "DomainWeights.from_loss_weights"),
        "non-negative",
        "[1.0, -1.0]",
        id="negative-loss-weight",
    ),
    param(
        lambda: DomainWeights.from_loss_weights(NAMES, [1.0, 0.0], [0.0, 1.0]),
        ValueError,
        shape("loss_weights", "DomainWeights.from_loss_weights"),
        "positive on at least one domain",
        "Got [0.0, 1.0] instead.",
        id="loss-weights-off-population",
    ),
    param(
        lambda: DomainWeights.from_loss_weights(NAMES, [NAN, 1.0], [1.0, 1.0]),
        ValueError,
        shape("population", "DomainWeights.from_loss_weights"),
        "nan",
        id="nan-population",
    ),
    # --- strategy factories -------------------------------------------------------------------------
    param(
        lambda: S.mix_uniform(1.5),
        ValueError,
        "The 'smoothing' parameter of mix_uniform must be a float in the range [0, 1]. Got 1.5 instead.",
        id="smoothing-high",
    ),
    param(
        lambda: S.mix_uniform(NAN),
        ValueError,
        shape("smoothing", "mix_uniform"),
        "Got nan instead.",
        id="smoothing-nan",
    ),
    param(
        lambda: S.mix_uniform(0.1, target="alpha"),
        ValueError,
        shape("target", "mix_uniform"),
        "'mixture', 'sampling', 'both'",
        "Got 'alpha' instead.",
        id="target",
    ),
    param(
        lambda: S.exponentiated_gradient(lambda s, w: s.loss, 0.0),
        ValueError,
        "The 'step_size' parameter of exponentiated_gradient must be a float in the range (0, inf). "
        "Got 0.0 instead.",
        id="step-size-zero",
    ),
    param(
        lambda: S.exponentiated_gradient(lambda s, w: s.loss, INF),
        ValueError,
        shape("step_size", "exponentiated_gradient"),
        "Got inf instead.",
        id="step-size-inf",
    ),
    param(
        lambda: S.exponentiated_gradient(lambda s, w: s.loss, 1.0, target="both"),
        ValueError,
        shape("target", "exponentiated_gradient"),
        "Got 'both' instead.",
        id="eg-target",
    ),
    param(
        lambda: S.exponentiated_gradient(lambda s, w: s.loss, 1.0, requires={"loss", "bogus"}),
        ValueError,
        "requires unknown statistics ['bogus']",
        "'ref_loss'",
        id="unknown-requires",
    ),
    param(
        lambda: S.temperature([10, 20], 0.0),
        ValueError,
        "The 'temperature' parameter of temperature must be a float in the range (0, inf). Got 0.0 instead.",
        id="temperature-zero",
    ),
    param(
        lambda: S.temperature([10, 20], -1),
        ValueError,
        shape("temperature", "temperature"),
        "Got -1 instead.",
        id="temperature-negative",
    ),
    param(
        lambda: S.temperature([-1, 20]),
        ValueError,
        shape("domain_sizes", "temperature"),
        "non-negative ints",
        "Got [-1, 20] instead.",
        id="sizes-negative",
    ),
    param(
        lambda: S.temperature([1.5, 2]),
        ValueError,
        shape("domain_sizes", "temperature"),
        "Got [1.5, 2] instead.",
        id="sizes-float",
    ),
    param(
        lambda: S.proportional([0, 0]),
        ValueError,
        shape("domain_sizes", "proportional"),
        "positive total",
        id="sizes-zero",
    ),
    param(
        lambda: S.temperature({"a": 1, "z": 2}).init(dw()),
        ValueError,
        shape("domain_sizes", "temperature"),
        "unknown: ['z']",
        "missing: ['b']",
        id="sizes-unknown-name",
    ),
    param(
        lambda: S.ema(1.0),
        ValueError,
        "The 'decay' parameter of ema must be a float in the range [0, 1). Got 1.0 instead.",
        id="decay",
    ),
    param(
        lambda: S.floor(1.0),
        ValueError,
        shape("min_weight", "floor"),
        "[0, 1)",
        "Got 1.0 instead.",
        id="floor",
    ),
    param(
        lambda: S.fixed([0.5, NAN]), ValueError, shape("mixture", "fixed"), "finite", "nan", id="fixed-nan"
    ),
    param(
        lambda: S.fixed(torch.ones(2, 2)), ValueError, shape("mixture", "fixed"), "1-D tensor", id="fixed-2d"
    ),
    param(
        lambda: S.fixed([1.0, 1.0], [0.0, 0.0]),
        ValueError,
        shape("sampling", "fixed"),
        "positive sum",
        id="fixed-zero-sampling",
    ),
    param(
        lambda: S.fixed({"a": 1.0, "z": 1.0}).init(dw()),
        ValueError,
        shape("mixture", "DomainWeights.create"),
        "unknown: ['z']",
        id="fixed-unknown-name",
    ),
    param(
        lambda: S.schedule([(5, [1.0, 1.0]), (2, [1.0, 2.0])]),
        ValueError,
        shape("stages", "schedule"),
        "strictly increasing",
        "Got [5, 2] instead.",
        id="schedule-unsorted",
    ),
    param(
        lambda: S.schedule([(0, [1.0, 1.0]), (0, [1.0, 2.0])]),
        ValueError,
        shape("stages", "schedule"),
        "strictly increasing",
        "Got [0, 0] instead.",
        id="schedule-duplicate",
    ),
    param(
        lambda: S.schedule([(-1, [1.0, 1.0])]),
        ValueError,
        shape("start_step", "schedule"),
        "Got -1 instead.",
        id="schedule-negative",
    ),
    param(
        lambda: S.schedule([]),
        ValueError,
        shape("stages", "schedule"),
        "Got [] instead.",
        id="schedule-empty",
    ),
    param(
        lambda: S.schedule([(0, [1.0, -1.0])]),
        ValueError,
        shape("weights", "schedule"),
        "non-negative",
        id="schedule-negative-weights",
    ),
    param(lambda: S.chain(), ValueError, shape("strategies", "chain"), id="chain-empty"),
    param(
        lambda: S.chain(S.uniform(), "x"),
        ValueError,
        shape("strategies", "chain"),
        "Got str instead.",
        id="chain-non-strategy",
    ),
    param(
        lambda: S.combine(loss="x", sampling=S.uniform()),
        ValueError,
        shape("loss", "combine"),
        "Got str instead.",
        id="combine-loss",
    ),
    # --- domain_losses / weighted_loss ---------------------------------------------------------------
    param(
        lambda: domain_losses(torch.ones(3), torch.tensor([0.0, 1.0, 1.0]), 2),
        ValueError,
        shape("domain_ids", "domain_losses"),
        "integer tensor",
        id="float-ids",
    ),
    param(
        lambda: domain_losses(torch.ones(3), torch.tensor([True, False, True]), 2),
        ValueError,
        shape("domain_ids", "domain_losses"),
        "integer tensor",
        id="bool-ids",
    ),
    param(
        lambda: domain_losses(torch.ones(3), torch.tensor([0, 1, 3]), 2),
        ValueError,
        shape("domain_ids", "domain_losses"),
        "[0, 1]",
        "Got 'ids from 0 to 3' instead.",
        id="ids-high",
    ),
    param(
        lambda: domain_losses(torch.ones(3), torch.tensor([-1, 1, 1]), 2),
        ValueError,
        shape("domain_ids", "domain_losses"),
        "Got 'ids from -1 to 1' instead.",
        id="ids-negative",
    ),
    param(
        lambda: domain_losses(torch.ones(3, dtype=torch.int64), torch.tensor([0, 1, 1]), 2),
        ValueError,
        shape("losses", "domain_losses"),
        "floating-point",
        id="int-losses",
    ),
    param(
        lambda: domain_losses(torch.ones(2, 2, 2), torch.tensor([0, 1]), 2),
        ValueError,
        shape("losses", "domain_losses"),
        "Got 'shape (2, 2, 2)' instead.",
        id="3d-losses",
    ),
    param(
        lambda: domain_losses(torch.ones(3), torch.tensor([0, 1]), 2),
        ValueError,
        shape("domain_ids", "domain_losses"),
        "(3,)",
        "Got 'shape (2,)' instead.",
        id="ids-length",
    ),
    param(
        lambda: domain_losses(torch.ones(2, 4), torch.tensor([0, 1]), 2, mask=torch.ones(2, 3)),
        ValueError,
        shape("mask", "domain_losses"),
        "(2, 4)",
        "Got 'shape (2, 3)' instead.",
        id="mask-shape",
    ),
    param(
        lambda: domain_losses(torch.ones(2), torch.tensor([0, 0]), 0),
        ValueError,
        shape("num_domains", "domain_losses"),
        "Got 0 instead.",
        id="num-domains-zero",
    ),
    param(
        lambda: weighted_loss(torch.ones(2), torch.tensor([0, 1]), dw(), normalize="mean"),
        ValueError,
        shape("normalize", "weighted_loss"),
        "Got 'mean' instead.",
        id="normalize",
    ),
    param(
        lambda: weighted_loss(torch.ones(2), torch.tensor([0, 1]), torch.ones(2), normalize="per_domain"),
        ValueError,
        shape("weights", "weighted_loss"),
        "DomainWeights",
        id="multipliers-per-domain",
    ),
    param(
        lambda: weighted_loss(torch.ones(2), torch.tensor([0, 1]), torch.ones(2, 2)),
        ValueError,
        shape("weights", "weighted_loss"),
        "1-D float tensor",
        id="multipliers-2d",
    ),
    param(
        lambda: weighted_loss(torch.ones(2), torch.tensor([0, 1]), torch.tensor([1.0, NAN])),
        ValueError,
        shape("weights", "weighted_loss"),
        "finite and non-negative",
        "Got [1.0, nan] instead.",
        id="multipliers-nan",
    ),
    param(
        lambda: weighted_loss(torch.ones(2), torch.tensor([0, 1]), torch.tensor([1.0, -2.0])),
        ValueError,
        shape("weights", "weighted_loss"),
        "finite and non-negative",
        "Got [1.0, -2.0] instead.",
        id="multipliers-negative",
    ),
    param(
        lambda: DomainBatchSampler({"a": range(0, 10), "b": range(5, 20)}, 4),
        ValueError,
        shape("domains", "DomainBatchSampler"),
        "domains 'a' and 'b' both hold index 5",
        id="sampler-overlapping-ranges",
    ),
    param(
        lambda: DomainBatchSampler({"a": [0, 1, 2], "b": range(10, 20), "c": [3, 12]}, 4),
        ValueError,
        shape("domains", "DomainBatchSampler"),
        "domains 'b' and 'c' both hold index 12",
        id="sampler-overlapping-array-and-range",
    ),
    param(
        lambda: DomainBatchSampler({"a": [0, 1, 7], "b": np.array([9, 7])}, 4),
        ValueError,
        shape("domains", "DomainBatchSampler"),
        "domains 'a' and 'b' both hold index 7",
        id="sampler-overlapping-arrays",
    ),
    param(
        lambda: split_heldout({"a": [0, 1, 2, 3], "b": [3, 4, 5]}, 0.25),
        ValueError,
        shape("domains", "split_heldout"),
        "domains 'a' and 'b' both hold index 3",
        id="heldout-overlapping",
    ),
    param(
        lambda: weighted_loss(torch.ones(2), torch.tensor([0, 1]), dw(), denominator=0),
        ValueError,
        shape("denominator", "weighted_loss"),
        "Got 0 instead.",
        id="denominator-zero",
    ),
    param(
        lambda: weighted_loss(torch.ones(2), torch.tensor([0, 1]), dw(), denominator=NAN),
        ValueError,
        shape("denominator", "weighted_loss"),
        "Got nan instead.",
        id="denominator-nan",
    ),
    param(
        lambda: weighted_loss(torch.ones(2), torch.tensor([0, 2]), dw()),
        ValueError,
        shape("domain_ids", "weighted_loss"),
        "[0, 1]",
        "ids from 0 to 2",
        id="weighted-ids-high",
    ),
    # --- StatsCollector ----------------------------------------------------------------------------------
    param(
        lambda: StatsCollector(0),
        ValueError,
        "The 'num_domains' parameter of StatsCollector must be an int in the range [1, inf). Got 0 instead.",
        id="collector-k",
    ),
    param(
        lambda: StatsCollector(2.0),
        ValueError,
        shape("num_domains", "StatsCollector"),
        "Got 2.0 instead.",
        id="collector-k-float",
    ),
    param(
        lambda: StatsCollector(2, ema=1.0),
        ValueError,
        shape("ema", "StatsCollector"),
        "or None",
        "Got 1.0 instead.",
        id="collector-ema",
    ),
    param(
        lambda: StatsCollector(3).observe(red(2)),
        ValueError,
        shape("losses", "StatsCollector.observe"),
        "over 3 domains",
        id="collector-wrong-k",
    ),
    param(
        lambda: StatsCollector(2).observe(red(2), source="test"),
        ValueError,
        shape("source", "StatsCollector.observe"),
        "Got 'test' instead.",
        id="collector-source",
    ),
    param(
        lambda: StatsCollector(2).observe_stat("loss", torch.ones(2)),
        ValueError,
        shape("name", "StatsCollector.observe_stat"),
        "'grad_var'",
        "Got 'loss' instead.",
        id="stat-name",
    ),
    param(
        lambda: StatsCollector(3).observe_stat("grad_dot", torch.ones(3)),
        ValueError,
        shape("value", "StatsCollector.observe_stat"),
        "(3, 3)",
        id="stat-shape",
    ),
    # --- WeightingController ---------------------------------------------------------------------------
    param(
        lambda: WeightingController(S.uniform(), NAMES).step(None, torch.zeros(4, dtype=torch.long)),
        ValueError,
        shape("losses", "WeightingController.step"),
        "a tensor when the other of losses / domain_ids is given",
        id="step-ids-without-losses",
    ),
    param(
        lambda: WeightingController(S.uniform(), NAMES).step(
            torch.zeros(4), torch.zeros(3, dtype=torch.long)
        ),
        ValueError,
        shape("domain_ids", "WeightingController.step"),
        "of shape (4,), one id per row of losses",
        "Got 'shape (3,)' instead.",
        id="step-ids-shape",
    ),
    param(
        lambda: WeightingController(S.uniform(), NAMES).override([0.5, 0.5], hold="no"),
        ValueError,
        shape("hold", "WeightingController.override"),
        "one of {False, True}",
        id="override-hold",
    ),
    param(
        lambda: WeightingController(S.uniform(), NAMES, update_every=0),
        ValueError,
        "The 'update_every' parameter of WeightingController must be an int in the range [1, inf). "
        "Got 0 instead.",
        id="update-every-zero",
    ),
    param(
        lambda: WeightingController(S.uniform(), NAMES, update_every=2.0),
        ValueError,
        shape("update_every", "WeightingController"),
        "Got 2.0 instead.",
        id="update-every-float",
    ),
    param(
        lambda: WeightingController(S.uniform(), NAMES, warmup_steps=-1),
        ValueError,
        shape("warmup_steps", "WeightingController"),
        "[0, inf)",
        "Got -1 instead.",
        id="warmup-negative",
    ),
    param(
        lambda: WeightingController(S.uniform(), NAMES, collector=StatsCollector(3)),
        ValueError,
        shape("collector", "WeightingController"),
        "over 2 domains",
        id="collector-of-wrong-k",
    ),
    param(
        lambda: WeightingController("uniform", NAMES),
        ValueError,
        shape("strategy", "WeightingController"),
        "Got 'uniform' instead.",
        id="strategy-str",
    ),
    param(
        lambda: WeightingController(S.uniform(), NAMES, sampler=NoSetWeights()),
        ValueError,
        shape("sampler", "WeightingController"),
        "set_weights",
        id="sampler-no-set-weights",
    ),
    param(
        lambda: WeightingController(S.uniform(), NAMES, sampler=OtherDomains()),
        ValueError,
        shape("sampler", "WeightingController"),
        "['a', 'b']",
        "a sampler over ['b', 'a']",
        id="sampler-other-order",
    ),
    param(
        lambda: WeightingController(S.uniform(), NAMES, log=123),
        ValueError,
        shape("log", "WeightingController"),
        "Got 123 instead.",
        id="log",
    ),
    param(
        lambda: WeightingController(S.uniform(), ["a", "a"]),
        ValueError,
        shape("names", "DomainWeights.create"),
        "duplicated",
        id="controller-dup-names",
    ),
    param(
        lambda: WeightingController(S.mix_uniform(0.1), NAMES).update("stats"),
        ValueError,
        shape("stats", "WeightingController.update"),
        "Got 'stats' instead.",
        id="update-not-stats",
    ),
    param(
        lambda: WeightingController(S.exponentiated_gradient(lambda s, w: s.loss, 1.0), NAMES).update(
            make_stats(3)
        ),
        ValueError,
        "stats cover (3,) domains but the weights have 2",
        id="update-wrong-k",
    ),
]


@pytest.mark.parametrize(("fn", "error", "fragments"), CASES)
def test_bad_input_raises_naming_parameter(fn, error, fragments) -> None:
    with pytest.raises(error) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_enough_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize(
    "weights",
    [[1e299, 3e299], [1e300, 3e300], [1e307, 3e307], [0.0, 2.5e-320]],
    ids=["below-the-overflow-guard", "past-it", "near-the-float-limit", "subnormal"],
)
def test_large_or_tiny_finite_weights_are_normalised(weights: list[float]) -> None:
    """Weights are summed without numpy's error state while they cannot overflow (a sampler's weight
    change costs microseconds): on either side of that guard, finite weights are accepted and normalised."""
    sampler = DomainBatchSampler({"a": range(4), "b": range(4, 8)}, 2, weights)
    expected = np.asarray(weights) / np.sum(weights)
    np.testing.assert_array_equal(sampler.weights.numpy(), expected)
    sampler.set_weights(weights[::-1])
    np.testing.assert_array_equal(sampler.weights.numpy(), expected[::-1])
