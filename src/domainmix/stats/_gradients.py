"""Within-domain gradient statistics for Variance-Aware sampling, for any ``nn.Module``.

Variance-Aware sampling (Salmani, Worah, Razaviyayn, Mirrokni 2025, "Sampling and Loss Weights in
Multi-Domain Training", arXiv:2511.06913, §4 / Algorithm 2) allocates the batch in proportion to
π_i w_i v_i, where

    v_i² = tr Cov_i[∇ℓ] = (1/(n_i − 1)) Σ_j ‖g_j − ḡ_i‖²

is the within-domain gradient variance, estimated here from per-example gradients g_j (exact, through
``torch.func``) or from micro-batch mean gradients (cheaper, one ordinary backward per micro-batch).
Both reduce to per-domain sums that merge across chunks, calls and ranks before the variance is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from domainmix._distributed import all_reduce_sum, is_distributed
from domainmix._validation import Interval, Options, check_param, param_error

LossFn = Callable[[Any, Tensor], Tensor]
Inputs = Tensor | tuple[Tensor, ...]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_MAX_LISTED_NAMES = 20  # an error message listing every parameter of a large model helps nobody
MICRO_BATCH_SIZE = 8  # gradient_variance's default examples per micro-batch (method="micro_batch")


class DomainGradients(NamedTuple):
    r"""Per-domain sums of gradient samples: enough for the within-domain gradient variance.

    A *sample* is one per-example gradient (:func:`per_example_gradients`) or one micro-batch mean
    gradient (:func:`micro_batch_gradients`), flattened over the chosen parameters into a vector of
    length P. Sums (not means) so that chunks, calls and ranks combine exactly: :meth:`merged` adds two
    results, and a distributed all-reduce of the fields pools the ranks' samples.

    ``examples / count`` is the number of training examples averaged in each sample (1 for per-example
    gradients, the micro-batch size m_b for micro-batch means). A mean of m_b i.i.d. gradients has
    covariance Cov/m_b, so :meth:`variance` multiplies the samples' variance by it and always estimates
    the per-example v_i², whichever estimator produced the sums.

    The raw-moment form Σ‖g‖² − ‖Σg‖²/n loses about log10(‖ḡ‖² / v̂²) of float64's 16 digits to
    cancellation: harmless unless the mean gradient dwarfs the noise by many orders of magnitude (the
    gradients themselves are only as precise as the model's dtype).

    Attributes:
        sum: (k, P) float64 Σ of the samples of each domain.
        sq_norm: (k,) float64 Σ ‖g‖² of the samples.
        count: (k,) float64 number of samples.
        examples: (k,) float64 number of training examples behind the samples (= ``count`` for
            per-example gradients, ``count · m_b`` for micro-batch means).

    References:
        Salmani, Worah, Razaviyayn, Mirrokni (2025), "Sampling and Loss Weights in Multi-Domain
        Training", arXiv:2511.06913, §4 / Algorithm 2 (Variance-Aware sampling).
    """

    sum: Tensor  # (k, P)
    sq_norm: Tensor  # (k,)
    # mypy flags a NamedTuple field that shadows tuple.count; the public field name stays.
    count: Tensor  # type: ignore[assignment]  # (k,)
    examples: Tensor  # (k,)

    @property
    def num_domains(self) -> int:
        """K, the number of domains."""
        return self.sum.shape[0]

    @property
    def num_params(self) -> int:
        """P, the number of gradient coordinates."""
        return self.sum.shape[1]

    def merged(self, other: DomainGradients) -> DomainGradients:
        """Element-wise sum of two results, e.g. two batches of examples or two chunks.

        Args:
            other: a result over the same k domains and the same P parameters, from the same estimator
                (same number of examples per sample wherever both have samples).

        Returns:
            The statistics of the union of both sets of samples.

        Raises:
            ValueError: if the shapes differ, or if one result holds per-example gradients and the other
                micro-batch means (or means of another micro-batch size): their samples have different
                covariances and pooling them would estimate neither.
        """
        caller = "DomainGradients.merged"
        if not isinstance(other, DomainGradients) or other.sum.shape != self.sum.shape:
            got = f"sum of shape {tuple(other.sum.shape)}" if isinstance(other, DomainGradients) else other
            raise param_error(
                caller, "other", f"a DomainGradients with sum of shape {tuple(self.sum.shape)}", got
            )
        both = (self.count > 0) & (other.count > 0)
        mine = self.examples / self.count.clamp_min(1.0)
        theirs = other.examples / other.count.clamp_min(1.0)
        if bool((both & (mine != theirs)).any()):
            raise param_error(
                caller,
                "other",
                f"samples of the same size as this result's ({mine[both].tolist()} examples per sample)",
                f"samples of {theirs[both].tolist()} examples",
            )
        return DomainGradients(*(a + b for a, b in zip(self, other, strict=True)))

    def mean(self) -> Tensor:
        """(k, P) mean gradient of each domain; NaN rows where a domain has no samples."""
        return self.sum / self.count.unsqueeze(1)

    def variance(self) -> Tensor:
        r"""(k,) unbiased estimate of v_i² = tr Cov_i[∇ℓ] of the per-example gradient.

        .. math::
            \hat v_i^2 = \frac{\text{examples}_i}{\text{count}_i} \cdot
                \frac{\sum_j \lVert g_j \rVert^2 - \lVert \sum_j g_j \rVert^2 / n_i}{n_i - 1},

        the trace of the sample covariance with ddof=1 (``Σ_coords var(G, ddof=1)``), scaled by the number
        of examples per sample: for micro-batch means E[tr of their sample covariance] = tr Cov / m_b, so
        m_b times it estimates tr Cov. Clamped at ≥ 0 (rounding can push an exact 0 below it).

        NaN where a domain has fewer than two samples: there is no estimate, and a NaN statistic makes
        the ``WeightingController`` skip the window rather than act on a made-up value.
        """
        n = self.count
        centered = self.sq_norm - (self.sum * self.sum).sum(dim=1) / n.clamp_min(1.0)
        per_sample = centered.clamp_min(0.0) / (n - 1).clamp_min(1.0)
        scaled = per_sample * (self.examples / n.clamp_min(1.0))
        return torch.where(n > 1, scaled, torch.full_like(n, float("nan")))

    def mean_sq_norm(self, *, unbiased: bool = True) -> Tensor:
        r"""(k,) squared norm of each domain's mean gradient, ‖μ_i‖² (the ``grad_sq_norm`` statistic).

        The plain ‖ḡ_i‖² is biased upwards: E‖ḡ_i‖² = ‖μ_i‖² + v_i² / (number of examples). With
        ``unbiased`` (default) that term is subtracted, ‖ḡ_i‖² − v̂_i² / examples_i, which is unbiased
        but can be negative when the mean is small next to the noise (not clamped: clamping would
        re-introduce a bias).

        Args:
            unbiased: subtract the noise term (needs two samples; NaN otherwise). If false, return
                ‖ḡ_i‖² (NaN only where a domain has no samples).
        """
        mean = self.mean()
        plain = (mean * mean).sum(dim=1)
        if not unbiased:
            return plain
        return plain - self.variance() / self.examples


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    domain_ids: Tensor,
    num_domains: int,
    *,
    params: Sequence[str] | None = None,
    chunk_size: int = 64,
    reduce: bool = True,
) -> DomainGradients:
    r"""Per-domain sums of per-example gradients g_j = ∇_θ ℓ(θ; x_j, y_j), for any ``nn.Module``.

    The gradients come from ``torch.func.vmap(torch.func.grad(...))`` over a ``functional_call`` of the
    model on a batch of one, ``chunk_size`` examples at a time; each chunk is folded into the (k, P)
    sums and (k,) squared norms at once (float64, one parameter at a time), so memory is
    O(chunk_size · P), never O(N · P). Read v̂_i² = (1/(n_i − 1)) Σ_j ‖g_j − ḡ_i‖² with
    :meth:`DomainGradients.variance`.

    The model is not modified: parameters are passed detached to ``functional_call``, so ``.grad``
    fields and the autograd graph of the caller are untouched; buffers are used as they are. Every
    forward sees one example, so layers that use batch statistics cannot be evaluated per example: a
    BatchNorm in training mode that tracks running statistics is refused. Put the model in ``eval()``
    mode (BatchNorm then uses its running statistics, and dropout is off: ``vmap`` refuses random
    operations). ``torch.func.replace_all_batch_norm_modules_`` also makes it run, but then each example
    is normalised by its own statistics, which is not the function training differentiates; or use
    :func:`micro_batch_gradients`, whose forwards see whole micro-batches. Under
    ``DistributedDataParallel`` pass the wrapped ``model.module``.

    Args:
        model: the module; ``model(*inputs)`` returns the outputs for a batch.
        loss_fn: ``loss_fn(outputs, targets)`` → per-example losses of shape (n,), e.g.
            ``lambda out, y: F.cross_entropy(out, y, reduction="none")``.
        inputs: a tensor, or a tuple of tensors passed positionally, batched along dim 0 (N examples).
        targets: a tensor batched along dim 0.
        domain_ids: (N,) integer domain of each example, in [0, num_domains).
        num_domains: k ≥ 1.
        params: names (as in ``model.named_parameters()``) of the parameters to differentiate; the others
            are held constant. Default: every parameter with ``requires_grad``. The gradient vector
            follows the order of ``model.named_parameters()``.
        chunk_size: examples per vectorised gradient call, ≥ 1; trades memory for speed, never the result.
        reduce: under an initialised ``torch.distributed`` process group of world size > 1, all-reduce
            the sums (one packed tensor) so every rank returns the statistics of all ranks' examples;
            the pooled unbiased estimator is then exact, not an average of per-rank estimates. A
            collective: every rank must call it, with the same ``params``.

    Returns:
        :class:`DomainGradients` (``examples == count``), float64 on the parameters' device, detached.

    Raises:
        ValueError: for a bad argument (shapes, id range, unknown parameter names, non-positive sizes)
            or a ``loss_fn`` that does not return per-example losses.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.randn(6, 2), torch.randn(6, 1)
        >>> stats = per_example_gradients(
        ...     model, lambda out, t: 0.5 * ((out - t) ** 2).sum(1), x, y, torch.tensor([0, 0, 0, 1, 1, 1]), 2
        ... )
        >>> stats.count.tolist(), stats.variance().shape
        ([3.0, 3.0], torch.Size([2]))
    """
    caller = "per_example_gradients"
    k, xs, ids = _check_common(caller, model, loss_fn, inputs, targets, domain_ids, num_domains)
    size = check_param(caller, "chunk_size", chunk_size, Interval(int, 1, None))
    names = _select_params(caller, model, params)
    check_per_example_model(caller, model)
    active, frozen = _split_params(model, names)
    device = next(iter(active.values())).device
    ids = ids.to(device)

    per_example = vmap(grad(_example_loss(caller, model, loss_fn, frozen)), in_dims=(None, 0, 0))
    total = torch.zeros(k, sum(active[n].numel() for n in names), dtype=torch.float64, device=device)
    sq_norm = torch.zeros(k, dtype=torch.float64, device=device)
    n = ids.shape[0]
    # The caller's grad mode must not matter, and no outer graph to the parameters is wanted.
    with torch.no_grad():
        for start in range(0, n, size):
            chunk = slice(start, start + size)
            grads = _run(caller, per_example, active, tuple(x[chunk] for x in xs), targets[chunk])
            _accumulate(grads, names, ids[chunk], k, total, sq_norm)
    count = torch.zeros(k, dtype=torch.float64, device=device).index_add_(
        0, ids, torch.ones(n, dtype=torch.float64, device=device)
    )
    return _finish(DomainGradients(total, sq_norm, count, count.clone()), reduce)


def micro_batch_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    domain_ids: Tensor,
    num_domains: int,
    *,
    micro_batch_size: int,
    params: Sequence[str] | None = None,
    reduce: bool = True,
) -> DomainGradients:
    r"""Per-domain sums of micro-batch mean gradients: the cheaper estimator of v_i².

    Each domain's examples, in the given order, are cut into micro-batches of ``micro_batch_size`` = m_b
    (a trailing partial micro-batch is dropped: a smaller one would have a larger covariance and bias the
    pooled estimate); each micro-batch's mean gradient ḡ_b comes from one ordinary
    ``torch.autograd.grad`` and is one sample. A mean of m_b i.i.d. gradients has covariance Cov_i / m_b,
    so with r_i micro-batches

    .. math:: \hat v_i^2 = m_b \cdot \frac{1}{r_i - 1} \sum_b \lVert \bar g_b - \bar{\bar g} \rVert^2 ,

    the micro-batch form of docs/algorithms.md §3.5, (m/r) Σ_coords var(micro-batch means). The returned
    :class:`DomainGradients` records ``examples = m_b · count`` and its :meth:`~DomainGradients.variance`
    applies the factor m_b, so it estimates v_i² directly, like :func:`per_example_gradients`. If the
    order of the examples is random, E[v̂_i²] equals the per-example estimate on the same examples;
    shuffle first if the order carries structure (e.g. sorted by length), or the micro-batches are not
    exchangeable and the estimate is biased.
    A domain needs 2 m_b examples for an estimate (NaN otherwise).

    Unlike :func:`per_example_gradients` this needs no ``vmap``: the model sees batches of m_b, as in
    training, so batch-statistics layers and dropout run as they are (and their noise enters the
    estimate). Buffers are cloned first, so train-mode BatchNorm does not update the model's running
    statistics. Parameters and ``.grad`` fields are untouched. Under ``DistributedDataParallel`` pass
    the wrapped ``model.module``.

    Args:
        model: the module; ``model(*inputs)`` returns the outputs for a batch.
        loss_fn: ``loss_fn(outputs, targets)`` → per-example losses of shape (n,).
        inputs: a tensor, or a tuple of tensors passed positionally, batched along dim 0 (N examples).
        targets: a tensor batched along dim 0.
        domain_ids: (N,) integer domain of each example, in [0, num_domains).
        num_domains: k ≥ 1.
        micro_batch_size: m_b ≥ 1, examples per micro-batch.
        params: names of the parameters to differentiate (default: every parameter with
            ``requires_grad``); the others are held constant.
        reduce: all-reduce the sums across ranks (see :func:`per_example_gradients`); a collective.

    Returns:
        :class:`DomainGradients` of micro-batch means, float64 on the parameters' device, detached.

    Raises:
        ValueError: for a bad argument or a ``loss_fn`` that does not return per-example losses.
    """
    caller = "micro_batch_gradients"
    k, xs, ids = _check_common(caller, model, loss_fn, inputs, targets, domain_ids, num_domains)
    m_b = check_param(caller, "micro_batch_size", micro_batch_size, Interval(int, 1, None))
    names = _select_params(caller, model, params)
    active, frozen = _split_params(model, names)
    device = next(iter(active.values())).device
    buffers = {name for name, _ in model.named_buffers()}
    frozen = {name: t.clone() if name in buffers else t for name, t in frozen.items()}
    leaves = {name: t.requires_grad_(True) for name, t in active.items()}
    total = torch.zeros(k, sum(t.numel() for t in leaves.values()), dtype=torch.float64, device=device)
    sq_norm = torch.zeros(k, dtype=torch.float64, device=device)
    count = torch.zeros(k, dtype=torch.float64, device=device)
    for d in range(k):
        members = torch.nonzero(ids == d).flatten()
        r = members.numel() // m_b
        for b in range(r):
            rows = members[b * m_b : (b + 1) * m_b]
            with torch.enable_grad():
                out = functional_call(model, (leaves, frozen), tuple(x[rows.to(x.device)] for x in xs))
                losses = loss_fn(out, targets[rows.to(targets.device)])
                if not isinstance(losses, Tensor) or tuple(losses.shape) != (m_b,):
                    raise _loss_shape_error(caller, losses, m_b)
                g = torch.autograd.grad(losses.mean(), [leaves[n] for n in names], allow_unused=True)
            # A parameter that does not reach the loss has a zero gradient, as torch.func.grad reports it.
            grads = {
                n: (torch.zeros_like(leaves[n]) if gn is None else gn).unsqueeze(0)
                for n, gn in zip(names, g, strict=True)
            }
            flat = _flatten(grads, names).squeeze(0)
            total[d] += flat
            sq_norm[d] += flat @ flat
        count[d] = r
    return _finish(DomainGradients(total, sq_norm, count, count * m_b), reduce)


def gradient_variance(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    domain_ids: Tensor,
    num_domains: int,
    *,
    params: Sequence[str] | None = None,
    method: Literal["per_example", "micro_batch"] = "per_example",
    chunk_size: int = 64,
    micro_batch_size: int = MICRO_BATCH_SIZE,
    reduce: bool = True,
) -> Tensor:
    r"""(k,) within-domain gradient variances v̂_i² = tr Cov_i[∇ℓ], ready for ``observe_stat("grad_var", ·)``.

    .. math:: \hat v_i^2 = \frac{1}{n_i - 1} \sum_{j \in S_i} \lVert g_j - \bar g_i \rVert^2 ,
        \qquad g_j = \nabla_\theta \ell(\theta; x_j, y_j),

    the unbiased trace of the sample covariance of the per-example gradients (``method="per_example"``,
    :func:`per_example_gradients`), or m_b times that of micro-batch mean gradients
    (``method="micro_batch"``, :func:`micro_batch_gradients`: one backward per micro-batch instead of a
    vectorised per-example pass). This is the v_i of Variance-Aware sampling, b_i ∝ π_i w_i v_i
    (Salmani, Worah, Razaviyayn, Mirrokni 2025, arXiv:2511.06913, §4 / Algorithm 2).

    NaN for a domain with fewer than two samples (examples, or micro-batches); the controller then
    skips the window instead of allocating by a missing estimate.

    Args:
        model: the module; ``model(*inputs)`` returns the outputs for a batch.
        loss_fn: ``loss_fn(outputs, targets)`` → per-example losses of shape (n,).
        inputs: a tensor, or a tuple of tensors passed positionally, batched along dim 0.
        targets: a tensor batched along dim 0.
        domain_ids: (N,) integer domain of each example, in [0, num_domains).
        num_domains: k ≥ 1.
        params: names of the parameters to differentiate (default: every parameter with
            ``requires_grad``).
        method: ``"per_example"`` or ``"micro_batch"``.
        chunk_size: ``"per_example"``: examples per vectorised call, ≥ 1.
        micro_batch_size: ``"micro_batch"``: examples per micro-batch, ≥ 1.
        reduce: pool the statistics of all ranks under ``torch.distributed`` (a collective).

    Returns:
        (k,) float64 tensor on the parameters' device.

    Raises:
        ValueError: for a bad argument.

    References:
        Salmani, Worah, Razaviyayn, Mirrokni (2025), "Sampling and Loss Weights in Multi-Domain
        Training", arXiv:2511.06913, §4 / Algorithm 2.
    """
    caller = "gradient_variance"
    check_param(caller, "method", method, Options(("per_example", "micro_batch")))
    check_param(caller, "chunk_size", chunk_size, Interval(int, 1, None))
    check_param(caller, "micro_batch_size", micro_batch_size, Interval(int, 1, None))
    if method == "per_example":
        stats = per_example_gradients(
            model,
            loss_fn,
            inputs,
            targets,
            domain_ids,
            num_domains,
            params=params,
            chunk_size=chunk_size,
            reduce=reduce,
        )
    else:
        stats = micro_batch_gradients(
            model,
            loss_fn,
            inputs,
            targets,
            domain_ids,
            num_domains,
            micro_batch_size=micro_batch_size,
            params=params,
            reduce=reduce,
        )
    return stats.variance()


def _check_common(
    caller: str,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    domain_ids: Tensor,
    num_domains: int,
) -> tuple[int, tuple[Tensor, ...], Tensor]:
    """Validate the arguments both estimators share; return k, the inputs as a tuple and the ids."""
    k = check_param(caller, "num_domains", num_domains, Interval(int, 1, None))
    if not isinstance(model, nn.Module):
        raise param_error(caller, "model", "a torch.nn.Module", model)
    if not callable(loss_fn):
        raise param_error(caller, "loss_fn", "a callable loss_fn(outputs, targets)", loss_fn)
    if not isinstance(domain_ids, Tensor) or domain_ids.dtype not in _INTEGER_DTYPES or domain_ids.ndim != 1:
        got = (
            f"dtype {domain_ids.dtype}, shape {tuple(domain_ids.shape)}"
            if isinstance(domain_ids, Tensor)
            else domain_ids
        )
        raise param_error(caller, "domain_ids", "an integer tensor of shape (N,)", got)
    n = domain_ids.shape[0]
    if n:
        lo, hi = int(domain_ids.min()), int(domain_ids.max())
        if lo < 0 or hi >= k:
            raise param_error(
                caller, "domain_ids", f"ids in the range [0, {k - 1}]", f"ids from {lo} to {hi}"
            )
    xs = (inputs,) if isinstance(inputs, Tensor) else inputs
    if not isinstance(xs, tuple) or not xs or not all(isinstance(x, Tensor) and x.ndim >= 1 for x in xs):
        raise param_error(
            caller, "inputs", "a tensor or a non-empty tuple of tensors batched along dim 0", inputs
        )
    shapes = [tuple(x.shape) for x in xs]
    if any(shape[0] != n for shape in shapes):
        raise param_error(
            caller, "inputs", f"batched along dim 0 like domain_ids (N = {n})", f"shapes {shapes}"
        )
    if not isinstance(targets, Tensor) or targets.ndim < 1 or targets.shape[0] != n:
        got = f"shape {tuple(targets.shape)}" if isinstance(targets, Tensor) else targets
        raise param_error(caller, "targets", f"a tensor batched along dim 0 like domain_ids (N = {n})", got)
    return k, xs, domain_ids.long()


def check_per_example_model(caller: str, model: nn.Module) -> None:
    """Refuse a model with train-mode BatchNorm, which per-example (vmap) gradients cannot run."""
    batch_norms = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.training
        and module.track_running_stats
    ]
    if batch_norms:
        raise param_error(
            caller,
            "model",
            "free of train-mode BatchNorm, which needs a batch (call model.eval() or use "
            "micro_batch_gradients)",
            f"BatchNorm in training mode at {batch_norms[:_MAX_LISTED_NAMES]}",
        )


def _select_params(caller: str, model: nn.Module, params: Sequence[str] | None) -> list[str]:
    """Names of the parameters to differentiate, in ``named_parameters()`` order."""
    available = [name for name, _ in model.named_parameters()]
    if params is None:
        chosen = [name for name, p in model.named_parameters() if p.requires_grad]
        if not chosen:
            raise param_error(
                caller, "params", "names of parameters to differentiate (no parameter requires grad)", params
            )
        return chosen
    if isinstance(params, str) or not isinstance(params, Sequence) or not params:
        raise param_error(caller, "params", "None or a non-empty sequence of parameter names", params)
    listed = available[:_MAX_LISTED_NAMES] + (["..."] if len(available) > _MAX_LISTED_NAMES else [])
    unknown = [name for name in params if name not in available]
    if unknown:
        raise param_error(
            caller, "params", f"names of model.named_parameters(), from {listed} (unknown: {unknown})", params
        )
    if len(set(params)) != len(params):
        raise param_error(caller, "params", "distinct parameter names", list(params))
    wanted = set(params)
    return [name for name in available if name in wanted]


def _split_params(model: nn.Module, names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached aliases (no copies) of the differentiated parameters, and everything held constant."""
    wanted = set(names)
    active = {name: p.detach() for name, p in model.named_parameters() if name in wanted}
    frozen = {name: p.detach() for name, p in model.named_parameters() if name not in wanted}
    frozen.update(dict(model.named_buffers()))
    return active, frozen


def _accumulate(
    grads: dict[str, Tensor], names: list[str], ids: Tensor, k: int, total: Tensor, sq_norm: Tensor
) -> None:
    """Add a chunk's per-example gradients into the (k, P) domain sums and (k,) squared norms.

    One parameter at a time, with a 0/1 domain matrix product for the sums: no (chunk, P) float64 copy of
    the whole chunk is ever built (2.2× faster than flatten + ``index_add_`` on a 270k-parameter MLP).
    """
    membership = torch.nn.functional.one_hot(ids, k).to(torch.float64).T  # (k, chunk)
    offset = 0
    for name in names:
        g = grads[name].reshape(grads[name].shape[0], -1).to(torch.float64)
        total[:, offset : offset + g.shape[1]] += membership @ g
        sq_norm.index_add_(0, ids, torch.einsum("ij,ij->i", g, g))
        offset += g.shape[1]


def _flatten(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    """(c, P) float64 matrix of c flattened gradients, coordinates in the order of ``names``."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1).to(torch.float64) for n in names], dim=1)


def _run(
    caller: str,
    fn: Callable[..., dict[str, Tensor]],
    theta: dict[str, Tensor],
    x: tuple[Tensor, ...],
    y: Tensor,
) -> dict[str, Tensor]:
    """Call the vectorised gradient, turning vmap's terse refusals into advice.

    Autocast is off inside, whatever the caller's: under it, vmap of a LayerNorm fails in torch 2.13
    ("expected scalar type BFloat16 but found Float"), and per-example gradients in the parameters'
    precision are the better estimate anyway.
    """
    device_type = next(iter(theta.values())).device.type
    try:
        with torch.autocast(device_type, enabled=False):
            return fn(theta, x, y)
    except RuntimeError as error:
        text = str(error)
        if "randomness" in text:
            raise RuntimeError(
                f"{caller}: the model draws random numbers, which vmap refuses ({text.splitlines()[0]}). "
                "Dropout needs model.eval() here, or use micro_batch_gradients."
            ) from error
        raise


def _example_loss(
    caller: str, model: nn.Module, loss_fn: LossFn, frozen: dict[str, Tensor]
) -> Callable[[dict[str, Tensor], tuple[Tensor, ...], Tensor], Tensor]:
    """The loss of one example as a function of the active parameters, for ``vmap(grad(...))``."""

    def example_loss(theta: dict[str, Tensor], x: tuple[Tensor, ...], y: Tensor) -> Tensor:
        # vmap hides the batch dimension: re-add it so the model sees the batch of one it expects.
        out = functional_call(model, (theta, frozen), tuple(t.unsqueeze(0) for t in x))
        losses = loss_fn(out, y.unsqueeze(0))
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (1,):
            raise _loss_shape_error(caller, losses, 1)
        return losses[0]

    return example_loss


def _loss_shape_error(caller: str, losses: Any, n: int) -> ValueError:
    got = f"a tensor of shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else losses
    return param_error(
        caller,
        "loss_fn",
        f"a callable returning per-example losses of shape (n,) (here ({n},)), e.g. with reduction='none'",
        got,
    )


def _finish(stats: DomainGradients, reduce: bool) -> DomainGradients:
    """Pool the ranks' sums with one packed all-reduce (a no-op outside torch.distributed)."""
    if not (reduce and is_distributed()):
        return stats
    k, p = stats.sum.shape
    packed = torch.cat([stats.sum.flatten(), stats.sq_norm, stats.count, stats.examples])
    all_reduce_sum(packed)
    return DomainGradients(
        packed[: k * p].view(k, p),
        packed[k * p : k * p + k],
        packed[k * p + k : k * p + 2 * k],
        packed[k * p + 2 * k :],
    )
