"""The tiny GPT: shapes, causality, tied weights, per-token loss, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch

from domainmix.experiments.gpt import GPT, GPTConfig, per_token_loss

SMALL = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_shapes_and_initial_loss_near_uniform() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 256, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 256)
    targets = torch.randint(0, 256, (3, 16))  # not idx: the tied head favours repeating its input
    loss = per_token_loss(logits, targets).detach()
    assert loss.shape == (3, 16)
    assert abs(float(loss.mean()) - math.log(256)) < 0.1  # small init: near-uniform predictions


def test_causal_and_tied() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 256
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the future never leaks into the past
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    assert model.head.weight is model.tok.weight
    names = [n for n, _ in model.untied_parameters()]
    assert "tok.weight" not in names and "pos.weight" in names
    assert model.num_parameters() == sum(p.numel() for _, p in model.named_parameters())


def test_learns_a_repeating_sequence() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL)
    data = torch.tensor([1, 2, 3, 4, 5, 6, 7] * 6)[:17]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = per_token_loss(model(data[None, :-1]), data[None, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1


def test_bad_config_and_long_input() -> None:
    with pytest.raises(ValueError, match="'n_embd' \\(30\\) must be divisible by 'n_head' \\(4\\)"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="'n_layer' must be an int >= 1. Got 0"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(SMALL)(torch.zeros(1, 17, dtype=torch.long))
