"""domain_losses reductions and weighted_loss, including acceptance checks A.1-A.2 (docs/reproduction.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from domainmix import DomainWeights, domain_losses, weighted_loss
from domainmix.losses import DomainLosses

NAN = float("nan")


# --- domain_losses ------------------------------------------------------------------------------------
def test_sums_counts_and_squares_by_hand() -> None:
    r = domain_losses(torch.tensor([1.0, 2.0, 4.0, 3.0]), torch.tensor([0, 0, 2, 0]), 3)
    assert r.sum.tolist() == [6.0, 0.0, 4.0]
    assert r.count.tolist() == [3.0, 0.0, 1.0]
    assert r.sum_sq.tolist() == [14.0, 0.0, 16.0]
    assert r.mean.tolist() == [2.0, 0.0, 4.0]  # absent domain: 0, not NaN
    assert r.var.tolist() == [1.0, 0.0, 0.0]  # var of (1, 2, 3) with ddof=1; count < 2 gives 0
    assert all(t.dtype == torch.float64 for t in r)


def test_detached_float64_from_float32_with_grad() -> None:
    x = torch.tensor([0.5, 1.5], dtype=torch.float32, requires_grad=True)
    r = domain_losses(x * 2, torch.tensor([1, 1]), 2)
    assert not r.sum.requires_grad and r.sum.dtype == torch.float64
    assert r.sum.tolist() == [0.0, 4.0]


def test_token_losses_with_mask() -> None:
    losses = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    r = domain_losses(losses, torch.tensor([0, 1, 0]), 2, mask=mask)
    assert r.sum.tolist() == [3.0, 12.0]
    assert r.count.tolist() == [2.0, 3.0]
    assert r.sum_sq.tolist() == [5.0, 50.0]


def test_nan_and_inf_on_masked_positions_do_not_leak() -> None:
    losses = torch.tensor([[1.0, NAN], [float("inf"), 2.0]])
    mask = torch.tensor([[True, False], [False, True]])
    r = domain_losses(losses, torch.tensor([0, 1]), 2, mask=mask)
    assert r.sum.tolist() == [1.0, 2.0] and r.sum_sq.tolist() == [1.0, 4.0] and r.count.tolist() == [1.0, 1.0]
    w = DomainWeights.create(["a", "b"])
    for normalize in ("importance", "per_domain"):
        loss_leaf = losses.clone().requires_grad_(True)
        total = weighted_loss(loss_leaf, torch.tensor([0, 1]), w, mask=mask, normalize=normalize)
        assert total.item() == pytest.approx(1.5)
        total.backward()
        assert torch.isfinite(loss_leaf.grad).all()
        assert loss_leaf.grad[0, 1] == 0 and loss_leaf.grad[1, 0] == 0


def test_mean_and_var_match_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(200, generator=g, dtype=torch.float64) * 5
    ids = torch.randint(0, 4, (200,), generator=g)
    r = domain_losses(losses, ids, 5)
    for d in range(5):
        values = losses[ids == d].numpy()
        if len(values) == 0:
            assert r.mean[d] == 0 and r.var[d] == 0 and r.count[d] == 0
            continue
        assert r.mean[d].item() == pytest.approx(values.mean(), rel=1e-12)
        assert r.var[d].item() == pytest.approx(values.var(ddof=1), rel=1e-9)


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(finite, st.integers(0, 2)), max_size=12),
    st.lists(st.tuples(finite, st.integers(0, 2)), max_size=12),
)
def test_merged_equals_reduction_of_concatenation(a, b) -> None:
    def reduce(rows) -> DomainLosses:
        losses = torch.tensor([x for x, _ in rows], dtype=torch.float64)
        return domain_losses(losses, torch.tensor([d for _, d in rows], dtype=torch.int64), 3)

    merged = reduce(a).merged(reduce(b))
    whole = reduce(a + b)
    for m, w in zip(merged, whole, strict=True):
        torch.testing.assert_close(m, w, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-9)


# --- weighted_loss ---------------------------------------------------------------------------------
ALPHA_Q = DomainWeights.create(["a", "b", "c"], [0.5, 0.3, 0.2], [0.25, 0.25, 0.5])


def test_importance_form_by_hand() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ids = torch.tensor([0, 1, 2, 2])
    # multipliers α/q = (2, 1.2, 0.4): (2·1 + 1.2·2 + 0.4·3 + 0.4·4) / 4
    expected = (2 * 1 + 1.2 * 2 + 0.4 * 3 + 0.4 * 4) / 4
    assert weighted_loss(losses, ids, ALPHA_Q).item() == pytest.approx(expected, rel=1e-6)
    # the same with a tensor of multipliers
    mult = torch.tensor([2.0, 1.2, 0.4])
    assert weighted_loss(losses, ids, mult).item() == pytest.approx(expected, rel=1e-6)
    # denominator replaces the element count
    assert weighted_loss(losses, ids, ALPHA_Q, denominator=10).item() == pytest.approx(
        expected * 4 / 10, rel=1e-6
    )


def test_importance_token_form_counts_unmasked_tokens() -> None:
    losses = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    ids = torch.tensor([0, 2])
    expected = (2 * 1 + 0.4 * (3 + 5)) / 3
    assert weighted_loss(losses, ids, ALPHA_Q, mask=mask).item() == pytest.approx(expected, rel=1e-6)


def test_micro_batches_with_shared_denominator_sum_to_full_batch() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    ids = torch.tensor([0, 1, 2, 2, 0])
    full = weighted_loss(losses, ids, ALPHA_Q)
    parts = weighted_loss(losses[:2], ids[:2], ALPHA_Q, denominator=5) + weighted_loss(
        losses[2:], ids[2:], ALPHA_Q, denominator=5
    )
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_per_domain_form_by_hand() -> None:
    losses = torch.tensor([1.0, 3.0, 2.0, 10.0])
    ids = torch.tensor([0, 0, 1, 1])
    # domain c absent: renormalise α over {a, b}: (0.5·2 + 0.3·6) / 0.8
    got = weighted_loss(losses, ids, ALPHA_Q, normalize="per_domain")
    assert got.item() == pytest.approx((0.5 * 2 + 0.3 * 6) / 0.8, rel=1e-6)


def test_gradient_flows_with_multipliers() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    weighted_loss(losses, torch.tensor([0, 1, 2]), ALPHA_Q).backward()
    torch.testing.assert_close(losses.grad, torch.tensor([2.0, 1.2, 0.4]) / 3)


def test_zero_mixture_domain_gets_zero_weight() -> None:
    w = DomainWeights.create(["a", "b"], [1.0, 0.0], [0.5, 0.5])
    assert w.loss_multipliers().tolist() == [2.0, 0.0]
    assert weighted_loss(torch.tensor([1.0, 100.0]), torch.tensor([0, 1]), w).item() == pytest.approx(1.0)


def test_output_dtype_follows_losses() -> None:
    out = weighted_loss(torch.ones(3, dtype=torch.float16), torch.tensor([0, 1, 2]), ALPHA_Q)
    assert out.dtype == torch.float16 and out.ndim == 0


# --- checks A.1-A.2 of docs/reproduction.md: unbiasedness and the variance formula -----------------
def _linear_problem(sizes=(6, 9, 5), d=3, seed=0):
    """Fixed per-domain data of a linear model with squared loss, and a parameter point θ0."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) * (i + 1) for i, n in enumerate(sizes)]
    ys = [torch.randn(n, generator=g, dtype=torch.float64) * (2 - i / 2) for i, n in enumerate(sizes)]
    theta0 = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.cat(xs)
    y = torch.cat(ys)
    dom = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    per_example_grad = (x @ theta0 - y)[:, None] * x  # ∇ ½(θᵀx − y)²
    return x, y, dom, theta0, per_example_grad


def _draw_gradients(x, y, dom, theta0, idx, weights):
    """Per-draw gradients of weighted_loss, in one autograd pass: draw r uses its own copy Θ[r] of θ0."""
    draws, batch = idx.shape
    theta = theta0.expand(draws, -1).clone().requires_grad_(True)
    xb = x[idx]  # (R, B, d)
    losses = 0.5 * ((xb * theta[:, None, :]).sum(-1) - y[idx]) ** 2  # (R, B)
    # weighted_loss on the concatenation with denominator B equals Σ_r weighted_loss(batch r): each
    # Θ[r] only enters its own batch, so ∂/∂Θ[r] is the gradient of draw r.
    total = weighted_loss(losses.reshape(-1), dom[idx].reshape(-1), weights, denominator=batch)
    (grad,) = torch.autograd.grad(total, theta)
    return grad  # (R, d)


def _target(per_example_grad, dom, alpha):
    k = len(alpha)
    means = torch.stack([per_example_grad[dom == i].mean(0) for i in range(k)])
    return (torch.as_tensor(alpha, dtype=torch.float64)[:, None] * means).sum(0)


def test_importance_weighted_gradient_is_unbiased_under_iid_sampling() -> None:
    x, y, dom, theta0, peg = _linear_problem()
    alpha, q = [0.6, 0.3, 0.1], [0.15, 0.25, 0.6]
    names = ["a", "b", "c"]
    weights = DomainWeights.create(names, alpha, q)
    draws, batch = 20_000, 8
    g = torch.Generator().manual_seed(1)
    domains = torch.multinomial(torch.tensor(q), draws * batch, replacement=True, generator=g)
    members = [torch.nonzero(dom == i).flatten() for i in range(3)]
    pick = torch.empty_like(domains)
    for i, m in enumerate(members):
        where = domains == i
        pick[where] = m[torch.randint(0, len(m), (int(where.sum()),), generator=g)]
    idx = pick.reshape(draws, batch)

    grads = _draw_gradients(x, y, dom, theta0, idx, weights)
    target = _target(peg, dom, alpha)
    se = grads.std(0) / draws**0.5
    assert ((grads.mean(0) - target).abs() <= 3 * se).all(), (grads.mean(0), target, se)

    # Power: without the α/q correction (plain mean of the drawn losses) the estimate is clearly biased.
    plain = _draw_gradients(x, y, dom, theta0, idx, DomainWeights.create(names, q, q))
    assert ((plain.mean(0) - target).abs() > 6 * se).any()


@pytest.mark.parametrize("counts", [(8, 5, 3), (2, 2, 12)])
def test_stratified_gradient_variance_matches_formula(counts) -> None:
    x, y, dom, theta0, peg = _linear_problem()
    alpha = [0.5, 0.2, 0.3]
    batch = sum(counts)
    weights = DomainWeights.create(["a", "b", "c"], alpha, [b / batch for b in counts])
    draws = 20_000
    g = torch.Generator().manual_seed(2)
    members = [torch.nonzero(dom == i).flatten() for i in range(3)]
    idx = torch.cat(
        [m[torch.randint(0, len(m), (draws, b), generator=g)] for m, b in zip(members, counts, strict=True)],
        dim=1,
    )  # with replacement, exactly b_i examples of domain i per batch
    grads = _draw_gradients(x, y, dom, theta0, idx, weights)

    # v_i² = tr Cov_{z ~ Unif(S_i)} ∇ℓ(z) (population covariance: sampling with replacement)
    v2 = [((peg[dom == i] - peg[dom == i].mean(0)) ** 2).sum(1).mean().item() for i in range(3)]
    predicted = sum(a * a * v / b for a, v, b in zip(alpha, v2, counts, strict=True))
    empirical = grads.var(0, unbiased=True).sum().item()
    assert empirical == pytest.approx(predicted, rel=0.05)
    # and unbiased as well
    target = _target(peg, dom, alpha)
    assert ((grads.mean(0) - target).abs() <= 3 * grads.std(0) / draws**0.5).all()


def test_stratified_variance_with_numpy_reference() -> None:
    # The formula itself, against a brute-force numpy computation for one tiny case (b = 1 each).
    x, y, dom, theta0, peg = _linear_problem(sizes=(2, 3), d=2)
    alpha = np.array([0.7, 0.3])
    a_grads = peg[dom == 0].numpy()
    b_grads = peg[dom == 1].numpy()
    all_g = np.array([alpha[0] * ga + alpha[1] * gb for ga in a_grads for gb in b_grads])
    exact = all_g.var(0).sum()
    v2 = [((gs - gs.mean(0)) ** 2).sum(1).mean() for gs in (a_grads, b_grads)]
    assert exact == pytest.approx(alpha[0] ** 2 * v2[0] + alpha[1] ** 2 * v2[1], rel=1e-12)


def test_denominator_is_refused_with_per_domain_normalisation() -> None:
    w = DomainWeights.create(["a", "b"])
    with pytest.raises(ValueError, match="'denominator' parameter of weighted_loss"):
        weighted_loss(torch.ones(2), torch.tensor([0, 1]), w, normalize="per_domain", denominator=4.0)


def test_per_domain_weighted_loss_of_bfloat16_losses_counts_past_256() -> None:
    # 2,000 tokens of domain 0 and 10 of domain 1, every loss 2: a bfloat16 count would stop at 256.
    losses = torch.full((2010,), 2.0, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.cat([torch.zeros(2000, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    out = weighted_loss(losses, ids, DomainWeights.create(["a", "b"]), normalize="per_domain")
    assert out.dtype == torch.bfloat16 and float(out.detach()) == 2.0
    out.backward()
    assert losses.grad is not None and float(losses.grad[0]) == pytest.approx(0.5 / 2000, rel=1e-2)


@pytest.mark.parametrize("masked", [False, True])
def test_importance_weighted_loss_of_float16_tokens_sums_past_65504(masked: bool) -> None:
    """A float16 sum of a batch's token losses overflows: the loss was inf (NaN with a mask, and zero
    gradients that GradScaler takes for a good step). Summed in float32, only the mean is float16."""
    losses = torch.full((16, 2048), 10.0, dtype=torch.float16, requires_grad=True)
    ids = torch.arange(16) % 2
    mask = torch.ones(16, 2048) if masked else None
    out = weighted_loss(losses, ids, torch.tensor([1.0, 2.0]), mask=mask)
    assert out.dtype == torch.float16 and float(out.detach()) == 15.0  # (10 + 20) / 2
    out.backward()
    assert losses.grad is not None and float(losses.grad[1, 0]) == pytest.approx(2.0 / (16 * 2048), rel=1e-3)
    # a denominator past 65504 (the tokens of an accumulated batch) is not inf in float16 either
    big = weighted_loss(losses.detach(), ids, torch.tensor([1.0, 1.0]), mask=mask, denominator=4 * 16 * 2048)
    assert float(big) == pytest.approx(2.5, rel=1e-3)


@pytest.mark.parametrize("normalize", ["importance", "per_domain"])
def test_an_inf_loss_in_a_zero_weight_domain_leaves_the_loss_finite(normalize: str) -> None:
    # DoGE's out-of-domain target, say: drawn (q > 0) but weighted 0 in the loss; 0 · inf would be NaN.
    w = DomainWeights.create(["a", "b"], [1.0, 0.0], [0.5, 0.5])
    losses = torch.tensor([1.0, 2.0, float("inf"), NAN], requires_grad=True)
    out = weighted_loss(losses, torch.tensor([0, 0, 1, 1]), w, normalize=normalize)  # type: ignore[arg-type]
    out.backward()
    assert out.item() == pytest.approx(1.5)  # per_domain: the mean of a; importance: 2 · (1 + 2) / 4
    assert torch.isfinite(losses.grad).all() and losses.grad[2:].tolist() == [0.0, 0.0]


def test_fixed_denominator_makes_masked_token_loss_unbiased_whatever_q() -> None:
    """With per-token losses q draws sequences: the default token-count denominator is a ratio whose
    scale moves with q when the domains' lengths differ, a fixed one (here N) gives Σ α_i S_i, S_i the
    summed loss of a domain-i sequence, for every q (exact batches, as a stratified sampler draws)."""
    alpha = [0.5, 0.5]
    # domain a: 2 real tokens of loss 1 per sequence (S = 2); domain b: 8 of loss 3 (S = 24)
    row = {0: ([1.0] * 2 + [0.0] * 6, [1.0] * 2 + [0.0] * 6), 1: ([3.0] * 8, [1.0] * 8)}
    results = {}
    for counts in ((2, 2), (1, 3), (3, 1)):
        ids = torch.tensor([0] * counts[0] + [1] * counts[1])
        losses = torch.tensor([row[int(i)][0] for i in ids])
        mask = torch.tensor([row[int(i)][1] for i in ids])
        w = DomainWeights.create(["a", "b"], alpha, [c / 4 for c in counts])
        fixed = weighted_loss(losses, ids, w, mask=mask, denominator=len(ids)).item()
        default = weighted_loss(losses, ids, w, mask=mask).item()
        results[counts] = (fixed, default)
        assert fixed == pytest.approx(0.5 * 2 + 0.5 * 24)
    assert len({round(d, 6) for _, d in results.values()}) == 3  # the default's scale depends on q


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"denominator": "5"}, "'denominator' parameter of weighted_loss must be a finite positive"),
        ({"denominator": True}, "'denominator' parameter"),
        ({"denominator": torch.tensor([1.0, 2.0])}, "'denominator' parameter"),
        ({"denominator": 0}, "'denominator' parameter"),
        ({"mask": torch.tensor([-1.0, 1.0, 1.0])}, "'mask' parameter .* such as -1.0"),
        ({"mask": torch.tensor([NAN, 1.0, 1.0])}, "'mask' parameter .* such as nan"),
        ({"mask": torch.tensor([0.5, 1.0, 1.0])}, "'mask' parameter .* 0/1 values"),
    ],
)
def test_bad_denominators_and_masks_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_loss(torch.ones(3), torch.tensor([0, 1, 1]), ALPHA_Q, **kwargs)


def test_a_multiplier_tensor_shorter_than_the_ids_names_the_weights() -> None:
    with pytest.raises(ValueError, match=r"'weights' parameter .*\(domain_ids reach 1, so at least 2\)"):
        weighted_loss(torch.ones(2), torch.tensor([0, 1]), torch.tensor([1.0]))


def test_a_bool_mask_is_accepted() -> None:
    got = weighted_loss(
        torch.tensor([1.0, 3.0]), torch.tensor([0, 0]), ALPHA_Q, mask=torch.tensor([True, False])
    )
    assert got.item() == pytest.approx(2.0)
