"""domain_gradient_products against per-domain gradients computed one by one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from domainmix.stats import domain_gradient_products


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    ids = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0])  # domain 2 absent
    return model, x, y, ids


def naive(model, x, y, rows, params):
    loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_matches_one_gradient_per_domain_and_keeps_the_graph() -> None:
    model, x, y, ids = setup()
    params = list(model[2].parameters())  # a subset: the last layer
    target_x, target_y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    target = nn.functional.cross_entropy(model(target_x), target_y, reduction="none")
    out = domain_gradient_products(losses, ids, 3, params, target_losses=target)
    g0, g1 = naive(model, x, y, ids == 0, params), naive(model, x, y, ids == 1, params)
    gt = naive(model, target_x, target_y, slice(None), params)
    grads = torch.stack([g0, g1, torch.zeros_like(g0)])
    torch.testing.assert_close(out.grad_dot, grads @ grads.T)
    torch.testing.assert_close(out.grad_sq_norm, (grads * grads).sum(1))
    torch.testing.assert_close(out.target_grad_dot, grads @ gt)
    assert out.count.tolist() == [7.0, 5.0, 0.0]
    losses.mean().backward()  # the forward graph survives for the training step
    assert model[0].weight.grad is not None


def test_per_token_mask_and_clipping() -> None:
    model, x, y, ids = setup()
    params = list(model.parameters())
    per_token = nn.functional.cross_entropy(model(x), y, reduction="none")[:, None].repeat(1, 2)
    mask = torch.ones_like(per_token)
    mask[:, 1] = 0.0
    per_token = per_token.clone()
    per_token[:, 1] = float("nan")  # padding must not leak
    out = domain_gradient_products(per_token, ids, 3, params, mask=mask, max_norm=0.01)
    assert torch.isfinite(out.grad_dot).all()
    assert out.grad_sq_norm[:2].sqrt().tolist() == pytest.approx([0.01, 0.01])


def test_bad_inputs_name_the_parameter() -> None:
    model, x, y, ids = setup()
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    params = list(model.parameters())
    with pytest.raises(ValueError, match="'losses' parameter"):
        domain_gradient_products(losses.detach(), ids, 3, params)
    with pytest.raises(ValueError, match="'domain_ids' parameter"):
        domain_gradient_products(losses, ids + 5, 3, params)
    with pytest.raises(ValueError, match="'params' parameter"):
        domain_gradient_products(losses, ids, 3, [])
    with pytest.raises(ValueError, match="'max_norm' parameter"):
        domain_gradient_products(losses, ids, 3, params, max_norm=0.0)


def test_token_counts_of_a_bfloat16_mask_are_exact() -> None:
    # the mask takes the losses' dtype; summed in bfloat16 the counts came out [5824, 5824, 5824]
    w = torch.ones((), requires_grad=True)
    losses = (w * torch.ones(3, 6000)).to(torch.bfloat16)
    mask = torch.zeros(3, 6000)
    for row, n in enumerate((5826, 5821, 5819)):
        mask[row, :n] = 1.0
    got = domain_gradient_products(losses, torch.tensor([0, 1, 2]), 3, [w], mask=mask)
    assert got.count.tolist() == [5826.0, 5821.0, 5819.0]
