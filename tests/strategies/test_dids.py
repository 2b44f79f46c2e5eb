"""DIDS: the three impact forms by hand, the potential's fit, one full update, the damped dynamics,
bad inputs, the partition guard and resume across a round boundary."""

from __future__ import annotations

import math

import pytest
import torch

import domainmix.strategies as S
from _helpers import assert_resume_equivalent, make_stats
from domainmix.controller import WeightingController
from domainmix.strategies._dids import impact, potential
from domainmix.types import DomainWeights

# A two-parameter model: F = diag(1, 1), one task h = (1, 0), four groups that the forms rank differently.
F = torch.tensor([1.0, 1.0], dtype=torch.float64)
G = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
H = torch.tensor([[1.0, 0.0]], dtype=torch.float64)


def products(g: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "fisher_cross": (g * f) @ h.T,
        "fisher_domain_sq": (g * f * g).sum(1),
        "fisher_task_sq": (h * f * h).sum(1),
    }


def impacts(form: str, f: torch.Tensor = F) -> list[float]:
    p = products(G, H, f)
    return impact(p["fisher_cross"], p["fisher_domain_sq"], p["fisher_task_sq"], form)[:, 0].tolist()


def test_three_impact_forms_by_hand_disagree() -> None:
    # KL: D = ½‖g − h‖² = (0, 2, 1, 2); max 2 → scores (2, 0, 1, 0) / 3: the group equal to the task wins.
    assert impacts("kl") == pytest.approx([2 / 3, 0.0, 1 / 3, 0.0])
    # Kernel: K = ½ gᵀh = (½, 3/2, 0, −½), clipped → (½, 3/2, 0, 0) / 2: the largest aligned gradient wins.
    assert impacts("kernel") == pytest.approx([1 / 4, 3 / 4, 0.0, 0.0])
    # Inverted (reference code): max K − K = (1, 0, 3/2, 2) / 4.5: the anti-aligned group wins (D1).
    assert impacts("inverted") == pytest.approx([2 / 9, 0.0, 1 / 3, 4 / 9])
    winners = {form: max(range(4), key=impacts(form).__getitem__) for form in ("kl", "kernel", "inverted")}
    assert winners == {"kl": 0, "kernel": 1, "inverted": 3}


@pytest.mark.parametrize("form", ["kl", "kernel", "inverted"])
def test_impact_invariant_to_scaling_the_fisher(form: str) -> None:
    f = torch.tensor([2.0, 0.5], dtype=torch.float64)
    assert impacts(form, 37.0 * f) == pytest.approx(impacts(form, f), rel=1e-12)


def test_equal_groups_share_the_impact() -> None:
    same = torch.ones(3, 1, dtype=torch.float64)
    out = impact(same, torch.ones(3, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert out[:, 0].tolist() == pytest.approx([1 / 3] * 3)


def test_potential_of_a_planted_exponential() -> None:
    losses = torch.tensor([2.0 * math.exp(-0.3 * x) + 1.0 for x in range(8)], dtype=torch.float64)
    expected = 2.0 * (math.exp(-0.3 * 7) - math.exp(-0.3 * 12))  # L(7) − L(7 + 5)
    assert potential(losses, horizon=5) == pytest.approx(expected, rel=1e-6)
    six_ahead = 2.0 * (math.exp(-0.3 * 7) - math.exp(-0.3 * 13))  # the reference code's len + 5 (D11)
    assert abs(potential(losses, horizon=5) - six_ahead) > 1e-3
    assert potential(losses[:4], horizon=5, min_points=5) == 0.0  # too short: 0, not the reference's 1.0


def test_one_full_update_by_hand() -> None:
    # One parameter, F = 1: group a's gradient equals task 1's (h = 1), group b's is 0; task 2 has h = −1.
    # D = [[0, 2], [½, ½]]; per task: max − D = [[½, 0], [0, 3/2]] → I = [[1, 0], [0, 1]].
    g = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    h = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    prods = products(g, h, torch.ones(1, dtype=torch.float64))
    strategy = S.dids(2, decay=0.5)
    weights = DomainWeights.create(["a", "b"])
    state = strategy.init(weights)
    # Round 1: no drop yet, every task counts 1: U = ½ (1, 1) / ½ = (1, 1) → p stays (½, ½).
    weights, state = strategy.update(weights, state, make_stats(2, task_loss=[2.0, 3.0], **prods))
    assert weights.sampling.tolist() == pytest.approx([0.5, 0.5])
    # Round 2: drops (0.5, 0.1), no potential yet: U = ½ (0.5, 0.1) / ½ → w / Σw = (5/6, 1/6);
    # p = ½ (½, ½) + ½ (5/6, 1/6) = (2/3, 1/3); the mixture follows the sampling ratios.
    weights, state = strategy.update(weights, state, make_stats(2, task_loss=[1.5, 2.9], **prods))
    assert weights.sampling.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert torch.equal(weights.mixture, weights.sampling)
    assert state.rounds == 2 and state.task_losses[-2:].tolist() == [[2.0, 3.0], [1.5, 2.9]]


def test_negative_utility_is_floored() -> None:
    g = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    h = torch.tensor([[1.0]], dtype=torch.float64)
    strategy = S.dids(1, decay=0.0, utility_floor=1e-3)
    weights = DomainWeights.create(["a", "b"])
    prods = products(g, h, torch.ones(1, dtype=torch.float64))
    weights, state = strategy.update(weights, strategy.init(weights), make_stats(2, task_loss=[1.0], **prods))
    # The loss rose: ΔL < 0, U = (I_a ΔL, 0) / p ≤ 0 → both at the floor → uniform.
    weights, _ = strategy.update(weights, state, make_stats(2, task_loss=[1.2], **prods))
    assert weights.sampling.tolist() == pytest.approx([0.5, 0.5])


def run_rounds(decay: float, rounds: int, drops: torch.Tensor) -> list[torch.Tensor]:
    """Constant impact and constant loss drops; the fit never starts (min_history > rounds)."""
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    prods = products(g, h, torch.ones(2, dtype=torch.float64))
    strategy = S.dids(2, decay=decay, min_history=rounds + 1, history=rounds + 1)
    weights = DomainWeights.create(["a", "b", "c"], [0.6, 0.3, 0.1])
    state = strategy.init(weights)
    out = []
    for r in range(rounds):
        stats = make_stats(3, task_loss=(10.0 - r * drops).tolist(), **prods)
        weights, state = strategy.update(weights, state, stats)
        out.append(weights.sampling)
    return out


def test_damped_dynamics_reach_their_fixed_point() -> None:
    drops = torch.tensor([0.2, 0.05], dtype=torch.float64)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    prods = products(g, h, torch.ones(2, dtype=torch.float64))
    s = impact(prods["fisher_cross"], prods["fisher_domain_sq"], prods["fisher_task_sq"]) @ drops
    fixed = s.sqrt() / s.sqrt().sum()  # p ∝ s / p  ⇔  p ∝ √s
    default = run_rounds(0.5, 12, drops)
    torch.testing.assert_close(default[-1], fixed, rtol=0, atol=1e-10)
    # β = 0.2 (reference code): the error changes sign every round (factor ≈ 2β − 1 = −0.6).
    reference = run_rounds(0.2, 12, drops)
    errors = [float((p - fixed)[0]) for p in reference[1:]]
    assert all(a * b < 0 for a, b in zip(errors, errors[1:], strict=False))
    assert abs(errors[-1] / errors[-2]) == pytest.approx(0.6, abs=0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.0}, r"'decay' parameter of dids must be a float in the range \[0, 1\)"),
        ({"decay": -0.1}, "'decay' parameter of dids"),
        ({"num_tasks": 0}, r"'num_tasks' parameter of dids must be an int in the range \[1, inf\)"),
        ({"impact_form": "similarity"}, "'impact_form' parameter of dids must be one of"),
        ({"utility_floor": 0.0}, "'utility_floor' parameter of dids"),
        ({"min_history": 2}, "'min_history' parameter of dids"),
        (
            {"history": 3, "min_history": 5},
            r"'history' parameter of dids must be an int in the range \[5, inf\)",
        ),
        ({"partition": 3}, "'partition' parameter of dids"),
    ],
)
def test_bad_arguments_rejected(kwargs: dict, match: str) -> None:
    args = {"num_tasks": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        S.dids(**args)


def test_mismatched_task_count_rejected() -> None:
    strategy = S.dids(3)
    weights = DomainWeights.create(["a", "b"])
    prods = products(G[:2], H, F)  # one task, the strategy expects three
    with pytest.raises(ValueError, match=r"'task_loss' must have shape \(3,\) \(num_tasks=3\)"):
        strategy.update(weights, strategy.init(weights), make_stats(2, task_loss=[1.0], **prods))


def test_state_of_another_partition_rejected() -> None:
    weights = DomainWeights.create(["a/0", "a/1"])
    saved = S.dids(1, partition="0" * 64).init(weights)
    other = S.dids(1, partition="1" * 64)
    stats = make_stats(2, task_loss=[1.0], **products(G[:2], H, F))
    with pytest.raises(ValueError, match="the state belongs to another partition"):
        other.update(weights, saved, stats)
    # The controller refuses it even earlier: the strategy's name carries the digest.
    first = WeightingController(S.dids(1, partition="0" * 64), weights)
    second = WeightingController(other, weights)
    with pytest.raises(ValueError, match="saved for strategy"):
        second.load_state_dict(first.state_dict())


def test_min_weight_floor_and_its_bound() -> None:
    with pytest.raises(ValueError, match="'min_weight' parameter of dids must be at most 1/k"):
        S.dids(1, min_weight=0.6).init(DomainWeights.create(["a", "b"]))
    strategy = S.dids(1, min_weight=0.2, decay=0.0)
    weights = DomainWeights.create(["a", "b"])
    one = torch.ones(1, dtype=torch.float64)
    prods = products(torch.tensor([[1.0], [-1.0]], dtype=torch.float64), one[None, :], one)
    out, _ = strategy.update(weights, strategy.init(weights), make_stats(2, task_loss=[1.0], **prods))
    assert float(out.sampling.min()) >= 0.2 / 1.2 - 1e-12  # lifted to 0.2, then renormalised


def round_stats(step: int):
    gen = torch.Generator().manual_seed(step)
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    h = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    f = torch.rand(4, generator=gen, dtype=torch.float64)
    losses = (3.0 * torch.exp(torch.tensor([-0.3, -0.1], dtype=torch.float64) * step) + 1.0).tolist()
    return make_stats(3, step=step, task_loss=losses, **products(g, h, f))


def test_resume_across_a_round_boundary() -> None:
    def make() -> WeightingController:
        return WeightingController(S.dids(2, min_history=3, history=5), ["a", "b", "c"])

    def drive(controller: WeightingController, t: int):
        controller.update(round_stats(t + 1))
        return controller.weights.sampling.clone()

    # Rounds 1-4 before the checkpoint, 5-9 after it: the fit starts at round 3, the history wraps at 5.
    outputs = assert_resume_equivalent(make, drive, midpoint=4, total=9)
    assert len({tuple(o.tolist()) for o in outputs}) == 9  # the weights move every round


def test_weights_must_be_over_the_partitions_groups() -> None:
    from domainmix.partition import Partition

    part = Partition.create(["a/0", "a/1"], ["a", "a"], [[0, 1], [2]])
    strategy = S.dids(1, partition=part)
    assert part.digest[:12] in strategy.name
    assert strategy.init(DomainWeights.create(["a/0", "a/1"])).partition == part.digest
    with pytest.raises(ValueError, match=r"'weights' parameter of dids must be weights over the partition"):
        strategy.init(DomainWeights.create(["a", "b"]))


def test_parent_floor_by_hand() -> None:
    from domainmix.partition import Partition
    from domainmix.strategies._dids import lift_parents

    two = torch.tensor([0, 0, 1])
    # a's total 0.04 → 0.1, its groups alike (0.05 each); b gives up the rest: 0.96 → 0.9.
    lifted = lift_parents(torch.tensor([0.02, 0.02, 0.96], dtype=torch.float64), two, 0.1)
    assert lifted.tolist() == pytest.approx([0.05, 0.05, 0.9])
    # A cascade: floor 0.3 over totals (0.05, 0.31, 0.64). a → 0.3, b and c scaled by 0.7/0.95 (b ≈ 0.228
    # < 0.3); then b → 0.3 and c gets the remaining 0.4.
    three = torch.tensor([0, 1, 2])
    lifted = lift_parents(torch.tensor([0.05, 0.31, 0.64], dtype=torch.float64), three, 0.3)
    assert lifted.tolist() == pytest.approx([0.3, 0.3, 0.4])
    # Through the strategy: decay 0, group b/0 fully aligned with the task, a's groups anti-aligned.
    part = Partition.create(["a/0", "a/1", "b/0"], ["a", "a", "b"], [[0], [1], [2]])
    g = torch.tensor([[-1.0], [-1.0], [1.0]], dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    prods = products(g, one[None, :], one)
    weights = DomainWeights.create(part.names)
    free = S.dids(1, decay=0.0, partition=part)
    floored = S.dids(1, decay=0.0, partition=part, parent_floor=0.25)
    stats = make_stats(3, task_loss=[1.0], **prods)
    # D = (2, 2, 0) → I = (0, 0, 1): a's groups fall to the utility floor, b takes ~all the mass.
    out, _ = free.update(weights, free.init(weights), stats)
    assert float(out.sampling[:2].sum()) < 1e-6
    out, _ = floored.update(weights, floored.init(weights), stats)
    assert out.sampling.tolist() == pytest.approx([0.125, 0.125, 0.75])
    assert torch.equal(out.mixture, out.sampling)
    with pytest.raises(ValueError, match="'partition' parameter of dids must be a Partition"):
        S.dids(1, parent_floor=0.1, partition="0" * 64)
    with pytest.raises(ValueError, match="'parent_floor' parameter of dids must be at most 1/2"):
        S.dids(1, parent_floor=0.6, partition=part)


def test_a_group_the_fisher_draw_missed_keeps_its_share() -> None:
    """Its products read 0 (unobserved, not measured): it takes no part in the impact and keeps its share;
    the drawn groups share the rest by utility."""
    from domainmix.types import DomainStats

    # Groups a, b: g = (1, 0) and (3, 0); c's row is unobserved (the values there are the collector's 0s).
    g = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    prods = products(g, H, F)
    weights = DomainWeights.create(["a", "b", "c"], [0.5, 0.3, 0.2])
    strategy = S.dids(1, decay=0.0)

    def stats(drawn: list[bool]) -> DomainStats:
        seen = torch.tensor(drawn)
        return DomainStats(
            step=1, loss=torch.zeros(3), count=torch.full((3,), 10.0), task_loss=torch.tensor([1.0]),
            observed={"fisher_domain_sq": seen, "fisher_cross": seen[:, None]}, **prods,
        )  # fmt: skip

    moved, _ = strategy.update(weights, strategy.init(weights), stats([True, True, False]))
    # Round 1 (every task counts 1): U_i = I_i / p_i over a and b alone; c keeps .2, a and b share .8.
    two = products(g[:2], H, F)
    influence = impact(two["fisher_cross"], two["fisher_domain_sq"], two["fisher_task_sq"], "kl")[:, 0]
    u = influence / torch.tensor([0.5, 0.3], dtype=torch.float64)
    # (b, the farther from the task, has impact 0 and sits at the utility floor: abs tolerance)
    assert moved.sampling.tolist() == pytest.approx([*(0.8 * u / u.sum()).tolist(), 0.2], abs=1e-6)
    # Read as measured zeros, c's row would change a's and b's impacts and c would move too.
    everywhere, _ = strategy.update(weights, strategy.init(weights), stats([True, True, True]))
    assert everywhere.sampling.tolist() != pytest.approx(moved.sampling.tolist())
    # No group drawn: nothing moves.
    still, _ = strategy.update(weights, strategy.init(weights), stats([False, False, False]))
    assert still.sampling.tolist() == pytest.approx([0.5, 0.3, 0.2])
