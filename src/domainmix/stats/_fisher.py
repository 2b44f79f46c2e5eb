"""DIDS's round statistics: Fisher-weighted products of domain and task gradients, and task losses.

Shi et al. (2025), "DIDS: Domain Impact-aware Data Sampling for Large Language Model Training",
arXiv:2504.13227, §3 ("FIM-guided domain impact"): the effect of a step Δ_i = −η g_i on the model's
output distribution, next to a step Δ_j = −η h_j on a target task, is the KL divergence
½ (Δ_i − Δ_j)ᵀ F (Δ_i − Δ_j) to second order, with F the Fisher information (here its diagonal).
Both that form and the kernel ½ Δ_iᵀ F Δ_j follow from three products, which this module estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from domainmix._distributed import all_reduce_sum
from domainmix._validation import Interval, check_param, param_error
from domainmix.stats._collector import StatsCollector
from domainmix.stats._gradients import (
    Inputs,
    LossFn,
    _check_common,
    _example_loss,
    _run,
    _select_params,
    _split_params,
    check_per_example_model,
)
from domainmix.stats._probes import Probe
from domainmix.stats._sketch import last_parameters

PerExample = Callable[..., dict[str, Tensor]]  # _run's type; grad_and_value returns (grads, loss)


class FisherProducts(NamedTuple):
    """Products of the domain mean gradients g_i and task mean gradients h_j under the diagonal Fisher F.

    Attributes:
        cross: (k, t) g_iᵀ F h_j (the ``fisher_cross`` statistic).
        domain_sq: (k,) g_iᵀ F g_i (``fisher_domain_sq``).
        task_sq: (t,) h_jᵀ F h_j (``fisher_task_sq``).
        task_loss: (t,) mean loss on each task's examples (``task_loss``).
        fisher: (P,) the diagonal F = (1/N) Σ_x (∇ℓ_x)², over every example handed in.
        domain_count: (k,) examples behind each g_i (0: absent, g_i = 0).
        task_count: (t,) examples behind each h_j.
    """

    cross: Tensor
    domain_sq: Tensor
    task_sq: Tensor
    task_loss: Tensor
    fisher: Tensor
    domain_count: Tensor
    task_count: Tensor

    def kl(self) -> Tensor:
        r"""(k, t) ½ (g_i − h_j)ᵀ F (g_i − h_j) = ½ (g_iᵀFg_i − 2 g_iᵀFh_j + h_jᵀFh_j), clamped at ≥ 0.

        The KL divergence between a step on group i and a step on task j, in units of η² (η cancels
        in DIDS's normalised impact). Clamped because rounding can push an exact 0 below it.
        """
        return (0.5 * (self.domain_sq[:, None] - 2.0 * self.cross + self.task_sq[None, :])).clamp_min(0.0)

    def kernel(self) -> Tensor:
        r"""(k, t) the Fisher kernel ½ g_iᵀ F h_j, in units of η² (the reference code's score)."""
        return 0.5 * self.cross


def fisher_products(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    group_ids: Tensor,
    num_domains: int,
    num_tasks: int,
    *,
    params: Sequence[str] | None = None,
    chunk_size: int = 64,
    reduce: bool = True,
) -> FisherProducts:
    r"""DIDS's Fisher products from one set of examples of k training groups and t target tasks.

    Example x belongs to training group ``group_ids[x]`` when that is < k, and to task
    ``group_ids[x] − k`` otherwise. One vectorised per-example pass (``torch.func``, as
    :func:`~domainmix.stats.per_example_gradients`) gives every g_x = ∇_θ ℓ(θ; x) on ``params`` and
    its loss; then

    .. math::
        F = \frac{1}{N} \sum_x g_x \odot g_x, \qquad
        g_i = \operatorname{mean}_{x \in i} g_x, \quad h_j = \operatorname{mean}_{x \in j} g_x,

    and the products g_iᵀFh_j, g_iᵀFg_i, h_jᵀFh_j. F is the mean of per-example squares (the
    empirical Fisher's diagonal), not the square of a few batch-mean gradients as in the reference
    code, which is biased low by about the batch size on noise-dominated coordinates
    (``docs/algorithms.md`` §5.3, D3).

    Under ``torch.distributed`` (``reduce=True``) the sums (Σ g_x², Σ g_x per group, counts, loss sums)
    are all-reduced in one packed tensor before any division, so every rank gets the products of the
    pooled examples. Memory: O(chunk_size · P) for the gradients plus (k + t + 1) · P float64 sums.

    Args:
        model: the module; ``model(*inputs)`` returns the outputs for a batch.
        loss_fn: ``loss_fn(outputs, targets)`` → per-example losses of shape (n,).
        inputs: a tensor, or a tuple of tensors passed positionally, batched along dim 0 (N examples).
        targets: a tensor batched along dim 0.
        group_ids: (N,) integers in [0, k + t): a training group (< k) or a task (k + j).
        num_domains: k ≥ 1.
        num_tasks: t ≥ 1.
        params: names of the parameters to differentiate (default: :func:`last_parameters`).
        chunk_size: examples per vectorised gradient call, ≥ 1.
        reduce: pool across ranks when a process group is initialised (a collective).

    Returns:
        :class:`FisherProducts`, float64 on the parameters' device.

    Raises:
        ValueError: for a bad argument, or a task without examples (its h_j and loss are undefined).
    """
    caller = "fisher_products"
    k = check_param(caller, "num_domains", num_domains, Interval(int, 1, None))
    t = check_param(caller, "num_tasks", num_tasks, Interval(int, 1, None))
    size = check_param(caller, "chunk_size", chunk_size, Interval(int, 1, None))
    _, xs, ids = _check_common(caller, model, loss_fn, inputs, targets, group_ids, k + t)
    names = _select_params(caller, model, last_parameters(model) if params is None else params)
    check_per_example_model(caller, model)
    active, frozen = _split_params(model, names)
    device = next(iter(active.values())).device
    ids = ids.to(device)

    per_example = vmap(grad_and_value(_example_loss(caller, model, loss_fn, frozen)), in_dims=(None, 0, 0))
    p = sum(active[n].numel() for n in names)
    groups = k + t
    # One packed buffer of sums: [Σ g_x per group (groups × P) | Σ g_x² (P) | counts | loss sums].
    packed = torch.zeros(groups * p + p + 2 * groups, dtype=torch.float64, device=device)
    sums = packed[: groups * p].view(groups, p)
    squares = packed[groups * p : groups * p + p]
    counts = packed[groups * p + p : groups * p + p + groups]
    loss_sums = packed[groups * p + p + groups :]
    with torch.no_grad():
        for start in range(0, ids.shape[0], size):
            chunk = slice(start, start + size)
            pair = _run(
                caller, cast(PerExample, per_example), active, tuple(x[chunk] for x in xs), targets[chunk]
            )
            grads, losses = cast(tuple[dict[str, Tensor], Tensor], pair)
            flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1).to(torch.float64)
            membership = nn.functional.one_hot(ids[chunk], groups).to(torch.float64).T
            sums += membership @ flat
            squares += (flat * flat).sum(0)
            counts += membership.sum(1)
            loss_sums += membership @ losses.detach().to(torch.float64)
    if reduce:
        all_reduce_sum(packed)
    if bool((counts[k:] == 0).any()):
        empty = torch.nonzero(counts[k:] == 0).flatten().tolist()
        raise param_error(caller, "group_ids", "ids with examples of every task", f"none of tasks {empty}")
    fisher = squares / counts.sum().clamp_min(1.0)
    means = sums / counts.clamp_min(1.0)[:, None]
    weighted = means * fisher  # rows F g
    g, h = means[:k], means[k:]
    return FisherProducts(
        cross=weighted[:k] @ h.T,
        domain_sq=(weighted[:k] * g).sum(1),
        task_sq=(weighted[k:] * h).sum(1),
        task_loss=loss_sums[k:] / counts[k:],
        fisher=fisher,
        domain_count=counts[:k].clone(),
        task_count=counts[k:].clone(),
    )


class FisherProductProbe(Probe):
    """DIDS's round statistics when a window closes: Fisher products and task losses.

    Provides ``fisher_cross``, ``fisher_domain_sq``, ``fisher_task_sq`` and ``task_loss`` (the
    statistics table's ``fisher_products`` and ``task_loss`` sources) from :func:`fisher_products`
    on the current model.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-example losses.
        draw: ``draw(step) -> (inputs, targets, group ids)`` for the window closing at ``step``: examples
            of the k training groups (ids < k) and of the t tasks (ids k + j). Keying the draw by
            ``step`` keeps the probe stateless, so a resume needs nothing of it. A group the draw lacks
            has no mean gradient: its products are handed in as unobserved (a collector with ``ema``
            keeps their previous average; without, they read 0), not as a zero gradient.
        num_tasks: t ≥ 1.
        params: names of the parameters (default: the last 10 % of the tensors).
        chunk_size: examples per vectorised gradient call.
    """

    sources = ("fisher_products", "task_loss")

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        draw: Callable[[int], tuple[Inputs, Tensor, Tensor]],
        num_tasks: int,
        *,
        params: Sequence[str] | None = None,
        chunk_size: int = 64,
    ) -> None:
        caller = "FisherProductProbe"
        if not isinstance(model, nn.Module):
            raise param_error(caller, "model", "a torch.nn.Module", model)
        for name, fn in (("loss_fn", loss_fn), ("draw", draw)):
            if not callable(fn):
                raise param_error(caller, name, "a callable", fn)
        self._t = check_param(caller, "num_tasks", num_tasks, Interval(int, 1, None))
        self._size = check_param(caller, "chunk_size", chunk_size, Interval(int, 1, None))
        if params is not None:  # checked now, not at the first window close
            _select_params(caller, model, params)
        self._model, self._loss_fn, self._draw, self._params = model, loss_fn, draw, params

    def observe_window(self, collector: StatsCollector, step: int) -> None:
        """Estimate the products on the drawn examples and hand them in."""
        inputs, targets, groups = self._draw(step)
        products = fisher_products(
            self._model, self._loss_fn, inputs, targets, groups, collector.num_domains, self._t,
            params=self._params, chunk_size=self._size,
        )  # fmt: skip
        # a group absent from the draw has no mean gradient: its entries are not measured (not zeros)
        present = products.domain_count > 0
        collector.observe_stat("fisher_cross", products.cross, present=present)
        collector.observe_stat("fisher_domain_sq", products.domain_sq, present=present)
        collector.observe_stat("fisher_task_sq", products.task_sq)
        collector.observe_stat("task_loss", products.task_loss)
