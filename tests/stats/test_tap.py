"""GradientProductTap (one backward) against domain_gradient_products (one autograd.grad per domain)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from domainmix.experiments.gpt import GPT, GPTConfig, per_token_loss
from domainmix.stats import GradientProductTap, domain_gradient_products


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, n_layer=2, n_head=2, n_embd=16)).double()


def batch(n: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 256, (n, 9), generator=g)
    return seq[:, :-1], seq[:, 1:]


def assert_same(a, b) -> None:
    for field in a._fields:
        x, y = getattr(a, field), getattr(b, field)
        if x is None or y is None:
            assert x is None and y is None, field
        else:
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=field)


def test_matches_the_autograd_oracle_on_a_gpt_block_with_mask_clip_and_an_absent_domain() -> None:
    model = gpt()
    tap = GradientProductTap(model.blocks[-1], model.ln)
    assert len(tap.parameters()) == 12 + 2  # ln1, qkv, proj, ln2, mlp.0, mlp.2 (weight, bias) + ln
    x, y = batch()
    ids = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1, 0, 3])  # domain 2 absent
    mask = torch.ones(10, 8, dtype=torch.float64)
    mask[:, 6:] = 0.0
    for max_norm in (None, 1e-3):
        with tap.record():
            per_token = per_token_loss(model(x), y)
        expected = domain_gradient_products(per_token, ids, 4, tap.parameters(), mask=mask, max_norm=max_norm)
        got = tap.products(per_token, ids, 4, mask=mask, max_norm=max_norm)
        assert_same(got, expected)
    assert got.count.tolist() == [5 * 6.0, 4 * 6.0, 0.0, 6.0]
    per_token.mean().backward()  # the forward graph survives for the training step
    assert model.tok.weight.grad is not None


def test_target_from_a_second_forward() -> None:
    model = gpt()
    tap = GradientProductTap(model.blocks[-1].mlp)
    x, y = batch()
    tx, ty = batch(4, seed=2)
    ids = torch.tensor([0, 1, 2, 1, 0, 0, 1, 2, 0, 1])
    with tap.record():
        per_token = per_token_loss(model(x), y)
        target = per_token_loss(model(tx), ty)
    expected = domain_gradient_products(
        per_token, ids, 3, tap.parameters(), target_losses=target, max_norm=0.05
    )
    assert_same(tap.products(per_token, ids, 3, target_losses=target, max_norm=0.05), expected)


def test_a_target_mask_leaves_its_masked_tokens_out_of_the_target_gradient() -> None:
    """Both the tap and the autograd oracle against a naive target gradient: the mean loss over the
    unmasked target tokens (a padded row and a padded tail left out)."""
    model = gpt()
    tap = GradientProductTap(model.blocks[-1].mlp)
    (x, y), (tx, ty) = batch(), batch(4, seed=2)
    ids = torch.tensor([0, 1, 2, 1, 0, 0, 1, 2, 0, 1])
    target_mask = torch.ones(4, 8, dtype=torch.float64)
    target_mask[:, 5:], target_mask[3] = 0.0, 0.0
    with tap.record():
        per_token = per_token_loss(model(x), y)
        target = per_token_loss(model(tx), ty)
    params = tap.parameters()

    def flat(value: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params, retain_graph=True)])

    domains = torch.stack([flat(per_token[ids == i].mean()) for i in range(3)])
    naive = domains @ flat((target * target_mask).sum() / target_mask.sum())
    assert not torch.allclose(naive, domains @ flat(target.mean()))  # the mask matters on this batch
    given = {"target_losses": target, "target_mask": target_mask}
    got = tap.products(per_token, ids, 3, **given)
    oracle = domain_gradient_products(per_token, ids, 3, params, **given)
    for products in (got, oracle):
        assert products.target_grad_dot is not None
        torch.testing.assert_close(products.target_grad_dot, naive, rtol=1e-9, atol=1e-12)


def test_a_layer_applied_twice_sums_both_uses_and_is_counted_once() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(3, 3).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    tap = GradientProductTap(model, shared)
    assert len(tap.parameters()) == 2
    x, ids = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 1])
    with tap.record():
        losses = model(x).pow(2).sum(1)
    expected = domain_gradient_products(losses, ids, 2, tap.parameters())
    assert_same(tap.products(losses, ids, 2), expected)


def test_misuse_is_reported() -> None:
    model = gpt()
    with pytest.raises(ValueError, match=r"'modules\[0\]\.tok' parameter.*Linear or LayerNorm.*Embedding"):
        GradientProductTap(model)
    with pytest.raises(ValueError, match="'modules' parameter"):
        GradientProductTap(nn.GELU())
    tap = GradientProductTap(model.ln)
    x, y = batch()
    ids = torch.zeros(10, dtype=torch.long)
    per_token = per_token_loss(model(x), y)
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        tap.products(per_token, ids, 1)
    with tap.record(), torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        tap.products(per_token, ids, 1)
    with tap.record():
        model(x)
    with pytest.raises(RuntimeError, match="no recorded forward leads to `losses`"):
        tap.products(per_token, ids, 1)  # losses of a forward outside the recording
    with tap.record():
        per_token = per_token_loss(model(x), y)
    with pytest.raises(ValueError, match="'max_norm' parameter"):
        tap.products(per_token, ids, 1, max_norm=0.0)
    with pytest.raises(RuntimeError, match="nothing was recorded"):  # a failed call consumed the recording
        tap.products(per_token, ids, 1)
    with tap.record():
        per_token = per_token_loss(model(x), y)
    with pytest.raises(ValueError, match="'losses' parameter.*forward of its own"):
        tap.products(per_token[:5], ids[:5], 1)  # e.g. a target batch riding in the training forward

    inplace = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True))
    tap = GradientProductTap(inplace)
    with tap.record():
        losses = inplace(torch.randn(4, 3)).sum(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        tap.products(losses, torch.zeros(4, dtype=torch.long), 1)

    tap.remove()
    with pytest.raises(RuntimeError, match="removed"):
        tap.products(losses, torch.zeros(4, dtype=torch.long), 1)


def test_only_keeps_the_chosen_tensors() -> None:
    model = gpt()
    chosen = [model.blocks[-1].mlp[0].bias, model.blocks[-1].qkv.weight, model.ln.weight]
    tap = GradientProductTap(model.blocks[-1], model.ln, only=chosen)
    kept = {id(p) for p in tap.parameters()}
    assert kept == {id(p) for p in chosen} and len(tap.parameters()) == 3
    x, y = batch()
    ids = torch.tensor([0, 1, 2, 1, 0, 0, 1, 2, 0, 1])
    with tap.record():
        per_token = per_token_loss(model(x), y)
    expected = domain_gradient_products(per_token, ids, 3, tap.parameters())
    assert_same(tap.products(per_token, ids, 3), expected)
    with pytest.raises(ValueError, match="'only' parameter"):
        GradientProductTap(model.ln, only=[model.head.weight])


def test_under_bfloat16_autocast_the_products_are_summed_in_float32() -> None:
    """Under autocast a Linear's output, so its delta, is bfloat16 while its input is float32. The tap sums
    Δᵀ X per domain in float32: against the same deltas and inputs summed in float64 it agrees to float32
    precision, where summing in bfloat16 is off by 5.6e-4 relative on this layer (measured)."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    tap = GradientProductTap(layer)
    x, ids = torch.randn(96, 16), torch.arange(96) % 3
    with tap.record(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    losses = out.float().pow(2).sum(-1) / 2  # d loss / d out = out itself, in bfloat16
    got = tap.products(losses, ids, 3)
    delta, inputs = out.double(), x.double()
    grads = torch.stack(
        [
            torch.cat([(delta[ids == i].T @ inputs[ids == i]).reshape(-1), delta[ids == i].sum(0)])
            / (ids == i).sum()
            for i in range(3)
        ]
    )
    torch.testing.assert_close(got.grad_dot, grads @ grads.T, rtol=1e-5, atol=0.0)
    # the whole model under autocast stays close to its float32 products
    model = GPT(GPTConfig(block_size=8, n_layer=2, n_head=2, n_embd=16))
    tap = GradientProductTap(model.blocks[-1], model.ln)
    (x, y), ids = batch(), torch.tensor([0, 1, 2, 1, 0, 0, 1, 2, 0, 1])
    with tap.record():
        exact = per_token_loss(model(x), y)
    expected = tap.products(exact, ids, 3)
    with tap.record(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = per_token_loss(model(x), y)
    torch.testing.assert_close(tap.products(mixed, ids, 3).grad_dot, expected.grad_dot, rtol=0.05, atol=1e-6)


def test_silent_failures_are_refused() -> None:
    # A layer whose own forward never runs: MultiheadAttention uses out_proj's weight functionally.
    attn, head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 1)
    x, ids = torch.randn(6, 5, 8), torch.tensor([0, 0, 0, 1, 1, 1])
    tap = GradientProductTap(attn.out_proj, head)
    with tap.record():
        losses = head(attn(x, x, x, need_weights=False)[0]).squeeze(-1) ** 2
    with pytest.raises(RuntimeError, match=r"Linear layer 0'\] recorded no forward"):
        tap.products(losses, ids, 2)
    # Tied weights: each use would get a block of its own instead of one summed gradient.
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.raises(
        ValueError, match="'modules' parameter of GradientProductTap must be layers that share"
    ):
        GradientProductTap(first, second)
    # A target forward outside the recording would give g_target = 0.
    model = gpt()
    tap = GradientProductTap(model.ln)
    (x, y), (tx, ty) = batch(), batch(4, seed=2)
    target = per_token_loss(model(tx), ty)
    with tap.record():
        per_token = per_token_loss(model(x), y)
    ids = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(RuntimeError, match="no recorded forward leads to `target_losses`"):
        tap.products(per_token, ids, 1, target_losses=target)
    with tap.record():
        per_token = per_token_loss(model(x), y)
        target = per_token_loss(model(tx), ty)
    with pytest.raises(
        ValueError, match="'target_mask' parameter of GradientProductTap.products must be a tensor"
    ):
        tap.products(per_token, ids, 1, target_losses=target, target_mask=torch.ones(len(tx), 1))
    with pytest.raises(ValueError, match="'target_mask' parameter of domain_gradient_products"):
        domain_gradient_products(
            per_token, ids, 1, list(model.ln.parameters()), target_losses=target, target_mask=torch.ones(1)
        )


def test_under_torch_compile_only_uncompiled_tapped_layers_are_accepted() -> None:
    """Traced into a compiled graph, the kept outputs are extra graph outputs that the loss does not flow
    through: the products came out 0 or wrong without a word. Refused; compiling the other blocks works."""
    x, y = batch()
    ids = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1, 0, 2])
    torch._dynamo.reset()
    model = gpt()
    tap = GradientProductTap(model.blocks[-1], model.ln)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):  # the first call traces, the second runs the cached graph
        with tap.record():
            per_token = per_token_loss(compiled(x), y)
        with pytest.raises(RuntimeError, match="the tapped layers ran inside a torch.compile graph"):
            tap.products(per_token, ids, 3)
    # Only the block before the tapped one compiled: its products equal the eager model's.
    torch._dynamo.reset()
    model = gpt()
    tap = GradientProductTap(model.blocks[-1], model.ln)
    model.blocks[0].compile(backend="aot_eager")
    for _ in range(2):
        with tap.record():
            per_token = per_token_loss(model(x), y)
        got = tap.products(per_token, ids, 3)
    expected = domain_gradient_products(per_token, ids, 3, tap.parameters())
    assert_same(got, expected)
    # A tap made after the compiled graph exists is never called: the error says why.
    late = GradientProductTap(model.blocks[0].ln1)
    with late.record():
        per_token = per_token_loss(model(x), y)
    with pytest.raises(RuntimeError, match="make the tap before that forward"):
        late.products(per_token, ids, 3)
    torch._dynamo.reset()


def test_torch_skips_a_graph_breaking_hook_of_a_nested_module() -> None:
    """Why the tap refuses compiled layers instead of breaking the graph at them: under torch.compile a
    torch.compiler.disable'd forward hook on a LayerNorm inside a GPT block is never called (torch 2.13;
    if this starts failing, a graph-breaking tap may have become possible)."""
    torch._dynamo.reset()
    model, calls = gpt(), []
    model.blocks[-1].ln2.register_forward_hook(torch.compiler.disable(lambda m, a, o: calls.append(1)))
    x, _ = batch()
    model(x)
    assert calls == [1]  # eager: called
    torch.compile(model, backend="eager")(x)
    assert calls == [1]  # compiled: skipped without a word
    torch._dynamo.reset()


def test_a_tapped_output_that_does_not_lead_to_the_loss_is_refused() -> None:
    first, head = nn.Linear(4, 4), nn.Linear(4, 1)
    tap = GradientProductTap(first, head)
    x, ids = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])
    with tap.record():
        losses = head(torch.tanh(first(x)).detach()).squeeze(-1) ** 2  # first's block would be 0
    with pytest.raises(RuntimeError, match=r"outputs of \['Linear layer 0'\] do not lead to `losses`"):
        tap.products(losses, ids, 2)


def test_a_failed_forward_or_products_call_releases_the_recorded_graphs() -> None:
    model = gpt()
    tap = GradientProductTap(model.ln)
    x, y = batch()
    with pytest.raises(RuntimeError, match="boom"), tap.record():
        model(x)
        raise RuntimeError("boom")  # e.g. out of memory halfway through the forward
    assert not any(tap._captures)
    with tap.record():
        per_token = per_token_loss(model(x), y)
    with pytest.raises(ValueError, match="'domain_ids' parameter"):
        tap.products(per_token, torch.zeros(3, dtype=torch.long), 1)
    assert not any(tap._captures)
