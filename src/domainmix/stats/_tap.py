"""DoGE's per-domain gradient products from one backward, for subsets made of Linear and LayerNorm layers."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from domainmix._rows import check_inputs, masked_row_sums
from domainmix._validation import Interval, check_param, param_error
from domainmix.stats._products import (
    GradientProducts,
    ProductBuffer,
    check_max_norm,
    domain_counts,
    target_elements,
)

_SUPPORTED = (nn.Linear, nn.LayerNorm)


class GradientProductTap:
    r"""Per-domain mean gradients of a Linear/LayerNorm parameter subset at the cost of about one backward.

    :func:`domain_gradient_products` runs one ``autograd.grad`` per domain, each back through the loss
    head and the subset over the whole batch: k partial backwards. The tap needs one. Forward hooks keep
    each tapped layer's input X and output Y; one ``autograd.grad`` of Σ_rows ℓ gives Δ = ∂/∂Y, and since
    rows (examples) do not interact, the rows of Δ belonging to domain i are domain i's own. The weight
    gradients then follow in closed form, per domain:

    * Linear: ∇W_i = Σ_{r ∈ i} Δ_rᵀ X_r, ∇b_i = Σ_{r ∈ i} Δ_r (summed over any middle axes, e.g. tokens);
    * LayerNorm: ∇γ_i = Σ_{r ∈ i} Δ_r ⊙ x̂_r with x̂ the normalised input, ∇β_i = Σ_{r ∈ i} Δ_r;

    k matmuls that together cost one weight gradient of the subset. The products, pooling across ranks
    and clipping are those of :func:`domain_gradient_products`, which gives the same numbers (to
    rounding) on any parameter subset and serves as this class's test oracle.

    Requirements, checked where they can be: the first axis of every tapped layer's output is the row
    axis of ``losses`` (no BatchNorm or other mixing of examples before the loss); a tapped output is not
    modified in place afterwards; the forward whose losses are passed runs inside :meth:`record`; every
    tapped output leads to ``losses``; the tapped layers do not run inside a ``torch.compile`` graph
    (compile the other blocks), and the tap exists before a compiled model's first forward.
    A target batch (out-of-domain DoGE) runs in a forward of its own inside the same :meth:`record`
    block (its rows are not ``losses``'s rows).

    Example::

        tap = GradientProductTap(model.blocks[-1], model.ln)  # the last block and the final LayerNorm
        with tap.record():
            per_token = per_token_loss(model(x), y)
        products = tap.products(per_token, domain_ids, k, max_norm=5.0)
        weighted_loss(per_token, domain_ids, multipliers).backward()  # the graph is kept

    Args:
        *modules: the subset: Linear or LayerNorm layers, or containers whose parameterised
            submodules are all Linear or LayerNorm (their parameters are the subset; a layer reached
            twice counts once).
        only: optional parameters of those layers to keep (e.g. a cancellation-effect selection,
            :class:`CancellationScores`); the rest of the layers' parameters are left out.

    References:
        Fan, Pagliardini, Jaggi (2024), "DoGE: Domain Reweighting with Generalization Estimation", §3.
    """

    def __init__(self, *modules: nn.Module, only: Iterable[Tensor] | None = None) -> None:
        caller = "GradientProductTap"
        keep = None if only is None else {id(p) for p in only}
        layers: list[nn.Module] = []
        for index, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise param_error(caller, f"modules[{index}]", "an nn.Module", module)
            for name, sub in module.named_modules():
                own = list(sub.parameters(recurse=False))
                if not own:
                    continue
                where = f"modules[{index}]" + (f".{name}" if name else "")
                if not isinstance(sub, _SUPPORTED):
                    raise param_error(caller, where, "Linear or LayerNorm layers only", type(sub).__name__)
                if isinstance(sub, nn.LayerNorm) and len(sub.normalized_shape) != 1:
                    raise param_error(
                        caller,
                        where,
                        "a LayerNorm over the last axis only",
                        f"normalized_shape {sub.normalized_shape}",
                    )
                if all(sub is not seen for seen in layers) and (
                    keep is None or any(id(p) in keep for p in own)
                ):
                    layers.append(sub)
        # Layer j's kept parameters by name ("weight", "bias"), in the order of the gradient rows.
        self._kept = [
            {n: p for n, p in layer.named_parameters(recurse=False) if keep is None or id(p) in keep}
            for layer in layers
        ]
        self._params = [p for kept in self._kept for p in kept.values()]
        shared = len({id(p) for p in self._params}) != len(self._params)
        if shared:  # each use would get a block of its own: [g_1, g_2] instead of g_1 + g_2
            raise param_error(
                caller, "modules", "layers that share no parameter (for tied weights, tap one of the layers "
                "or use domain_gradient_products)", f"{len(self._params)} tensors, "
                f"{len({id(p) for p in self._params})} distinct",
            )  # fmt: skip
        if keep is not None and len(self._params) != len(keep):
            raise param_error(caller, "only", "parameters of the tapped layers", f"{len(keep)} tensors")
        if not layers:
            raise param_error(
                caller, "modules", "at least one Linear or LayerNorm layer with parameters", modules
            )
        self._layers = layers
        sizes = [sum(p.numel() for p in kept.values()) for kept in self._kept]
        self._offsets = [sum(sizes[:j]) for j in range(len(layers))]  # layer j's slice of a gradient row
        self._size = sum(sizes)
        self._captures: list[list[tuple[Tensor, Tensor, int]]] = [[] for _ in layers]
        self._recording = False
        self._compiled = False  # a tapped layer ran inside a torch.compile graph since the last record()
        self._handles: list[RemovableHandle] = [
            layer.register_forward_hook(self._hook(j)) for j, layer in enumerate(layers)
        ]

    def parameters(self) -> list[nn.Parameter]:
        """The subset, in the order of the gradient rows (weight then bias, layer by layer)."""
        return list(self._params)

    @contextmanager
    def record(self) -> Iterator[None]:
        """Keep the tapped layers' inputs and outputs of the forwards run inside this block."""
        self._clear()
        self._recording = True
        try:
            yield
        except BaseException:
            self._clear()  # a failed forward (out of memory, say) must not keep its graph alive
            raise
        finally:
            self._recording = False

    def remove(self) -> None:
        """Detach the hooks from the model (the tap can no longer be used)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._clear()

    def products(
        self,
        losses: Tensor,
        domain_ids: Tensor,
        num_domains: int,
        *,
        mask: Tensor | None = None,
        target_losses: Tensor | None = None,
        target_mask: Tensor | None = None,
        max_norm: float | None = None,
        reduce: bool = True,
    ) -> GradientProducts:
        """The products of :func:`domain_gradient_products` for the recorded forward(s).

        Arguments as in :func:`domain_gradient_products`, without ``params`` (the subset is the tap's).
        Consumes the recording, also when it raises (the recorded outputs hold their graphs): the next
        step records again.
        """
        try:
            return self._products(
                losses, domain_ids, num_domains, mask=mask, target_losses=target_losses,
                target_mask=target_mask, max_norm=max_norm, reduce=reduce,
            )  # fmt: skip
        finally:
            self._clear()

    def _products(
        self,
        losses: Tensor,
        domain_ids: Tensor,
        num_domains: int,
        *,
        mask: Tensor | None,
        target_losses: Tensor | None,
        target_mask: Tensor | None,
        max_norm: float | None,
        reduce: bool,
    ) -> GradientProducts:
        caller = "GradientProductTap.products"
        k = check_param(caller, "num_domains", num_domains, Interval(int, 1, None))
        check_max_norm(caller, max_norm)
        m = check_inputs(caller, losses, domain_ids, k, mask)
        if not losses.requires_grad:
            raise param_error(caller, "losses", "an (N,) or (N, T) tensor attached to the graph", losses)
        if not self._handles:
            raise RuntimeError("GradientProductTap.products: the tap was removed.")
        if self._compiled:
            # Inside a compiled graph a kept output is an extra output of the graph, which the loss does
            # not flow through: its gradient would be None (the layer's block 0) or its version wrong. A
            # graph break at the layer is no way out: torch (2.13) then skips a nested module's hooks.
            raise RuntimeError(
                "GradientProductTap.products: the tapped layers ran inside a torch.compile graph, whose "
                "intermediate outputs autograd cannot differentiate the loss by. Leave the tapped layers "
                "uncompiled (compile the other blocks, e.g. `block.compile()` for each block before the "
                "tapped ones), or use domain_gradient_products."
            )
        captures = [(j, x, y) for j, recorded in enumerate(self._captures) for x, y, _ in recorded]
        if not captures:
            raise RuntimeError(
                "GradientProductTap.products: nothing was recorded; run the forward inside "
                "`with tap.record():` with gradients enabled. (A model compiled with torch.compile does not "
                "see hooks added after its first compiled forward: make the tap before that forward. "
                "torch.utils.checkpoint with use_reentrant=True runs the forward without gradients: use "
                "use_reentrant=False.)"
            )
        silent = [
            f"{type(self._layers[j]).__name__} layer {j}" for j, got in enumerate(self._captures) if not got
        ]
        if silent:  # its block of every gradient would be 0 without a word
            raise RuntimeError(
                f"GradientProductTap.products: {silent} recorded no forward. A tapped layer's own forward "
                "must run (nn.MultiheadAttention, say, uses out_proj's weight without calling out_proj); "
                "tap layers whose forward runs, or use domain_gradient_products."
            )
        for j, recorded in enumerate(self._captures):
            if any(y._version != version for _, y, version in recorded):
                raise RuntimeError(
                    f"GradientProductTap.products: the output of {type(self._layers[j]).__name__} layer {j} "
                    "was modified in place after the forward; its gradient cannot be taken."
                )
        ids = domain_ids.to(losses.device).long()
        buffer = ProductBuffer(k, self._size, losses.device)
        buffer.counts[:k] = domain_counts(ids, m, k)
        outputs = [y for _, _, y in captures]
        deltas = torch.autograd.grad(
            masked_row_sums(losses, m).sum(), outputs, retain_graph=True, allow_unused=True
        )
        if all(delta is None for delta in deltas):
            raise RuntimeError(
                "GradientProductTap.products: no recorded forward leads to `losses`; run the forward that "
                "computes them inside `with tap.record():`."
            )
        reached = {j for (j, _, _), delta in zip(captures, deltas, strict=True) if delta is not None}
        unreached = [
            f"{type(self._layers[j]).__name__} layer {j}"
            for j in range(len(self._layers))
            if j not in reached
        ]
        if unreached:  # their blocks of every gradient would be 0 without a word
            raise RuntimeError(
                f"GradientProductTap.products: the recorded outputs of {unreached} do not lead to `losses`; "
                "tap layers that the loss depends on, through the recorded outputs themselves."
            )
        groups = _Groups.by_domain(ids, k)
        for (j, x, _), delta in zip(captures, deltas, strict=True):
            if delta is None:  # a forward that did not lead to ``losses`` (e.g. the target batch)
                continue
            if delta.shape[0] != len(ids):
                raise param_error(
                    caller,
                    "losses",
                    f"one row per row of the forward's tapped outputs ({type(self._layers[j]).__name__} "
                    f"layer {j} output has {delta.shape[0]}; a target batch needs a forward of its own)",
                    f"{len(ids)} rows",
                )
            self._add_grads(j, delta, x, groups, buffer.matrix[:k])
        if target_losses is not None:
            tm = target_elements(caller, target_losses, target_mask)
            deltas = torch.autograd.grad(
                masked_row_sums(target_losses, tm).sum(), outputs, retain_graph=True, allow_unused=True
            )
            if all(delta is None for delta in deltas):
                raise RuntimeError(
                    "GradientProductTap.products: no recorded forward leads to `target_losses`; run the "
                    "target batch's forward inside the same `with tap.record():` block."
                )
            for (j, x, _), delta in zip(captures, deltas, strict=True):
                if delta is not None:
                    self._add_grads(j, delta, x, _Groups.single(delta.shape[0]), buffer.matrix[k:])
            buffer.counts[k] = tm.sum(dtype=torch.float64)  # a tensor copy, not float(): no host sync
        return buffer.finish(target=target_losses is not None, max_norm=max_norm, reduce=reduce)

    def _hook(self, j: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if self._recording and torch.is_grad_enabled():
                if torch.compiler.is_compiling():  # traced: the compiled graph replays this at every call
                    self._compiled = True
                self._captures[j].append((args[0].detach(), out, out._version))

        return hook

    def _add_grads(self, j: int, delta: Tensor, x: Tensor, groups: _Groups, out: Tensor) -> None:
        """Add layer j's weight (and bias) gradient of each group of rows into its slice of ``out``'s rows."""
        layer = self._layers[j]
        # float32 whatever the forward ran in: under autocast an output (so delta) is bfloat16 while
        # its input may be float32, and a gradient summed in bfloat16 loses the products' precision.
        dtype = torch.promote_types(torch.promote_types(delta.dtype, x.dtype), torch.float32)
        n = delta.shape[0]
        delta, x = delta.reshape(n, -1, delta.shape[-1]).to(dtype), x.reshape(n, -1, x.shape[-1]).to(dtype)
        offset = self._offsets[j]
        for name, p in self._kept[j].items():
            where = slice(offset, offset + p.numel())
            offset += p.numel()
            if name == "bias":
                out[:, where] += groups.sums(delta.sum(1))
            elif isinstance(layer, nn.LayerNorm):
                x_hat = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
                out[:, where] += groups.sums((delta * x_hat).sum(1))
            else:  # Δ_iᵀ X_i: one matmul per group, over its rows taken contiguously
                d, z = groups.sort(delta), groups.sort(x)
                for i, start, end in groups.spans():
                    out[i, where] += (d[start:end].flatten(0, 1).T @ z[start:end].flatten(0, 1)).reshape(-1)

    def _clear(self) -> None:
        for recorded in self._captures:
            recorded.clear()
        self._compiled = False


class _Groups:
    """The rows of a batch grouped by domain, for per-group sums and per-group matmuls.

    Sums go through one ``index_add`` whatever the number of groups; matmuls need each group's rows
    contiguous, so the rows are sorted by group once per step (one gather per tapped tensor, not one
    per group) and the group boundaries are read on the host: one device sync per step, not k.
    """

    def __init__(self, ids: Tensor | None, order: Tensor | None, bounds: list[int]) -> None:
        self._ids, self._order, self._bounds = ids, order, bounds

    @classmethod
    def by_domain(cls, ids: Tensor, k: int) -> _Groups:
        """Group i: the rows with ``ids == i``, for i in [0, k)."""
        ends = torch.bincount(ids, minlength=k).cumsum(0).tolist()
        return cls(ids, torch.argsort(ids, stable=True), [0, *ends])

    @classmethod
    def single(cls, n: int) -> _Groups:
        """All n rows in one group."""
        return cls(None, None, [0, n])

    def sums(self, rows: Tensor) -> Tensor:
        """(groups, d) sums of the (N, d) ``rows`` per group."""
        if self._ids is None:
            return rows.sum(0, keepdim=True)
        return torch.zeros(
            len(self._bounds) - 1, rows.shape[1], dtype=rows.dtype, device=rows.device
        ).index_add_(0, self._ids, rows)

    def sort(self, rows: Tensor) -> Tensor:
        """``rows`` with each group's rows contiguous, in group order."""
        return rows if self._order is None else rows.index_select(0, self._order)

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """(group, start, end) of every non-empty group in the sorted rows."""
        for i, (start, end) in enumerate(itertools.pairwise(self._bounds)):
            if end > start:
                yield i, start, end
