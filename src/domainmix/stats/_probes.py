"""Probes: the code that observes a statistic, chosen once from what the strategy reads.

A probe feeds the :class:`~domainmix.stats.StatsCollector` the statistics of one or more *sources*
of the statistics table (``domainmix/_statistics.py``); its ``provides`` is derived from that table.
It can act at three points of a training step, which the
:class:`~domainmix.WeightingController` calls in this order (docs/design.md, "One step"):

1. :meth:`Probe.record` wraps the forward (``with controller.record(): losses = ...``);
2. :meth:`Probe.observe_step` sees the step's per-example losses (``controller.step(losses, ids)``);
3. :meth:`Probe.observe_window` runs once when a window closes, before the strategy updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from domainmix._statistics import provided_by
from domainmix._validation import Options, check_param, param_error
from domainmix.losses import domain_losses
from domainmix.stats._collector import StatsCollector
from domainmix.stats._gradients import _select_params, gradient_variance
from domainmix.stats._products import check_max_norm
from domainmix.stats._tap import GradientProductTap

__all__ = [
    "GradientProductProbe",
    "GradientVarianceProbe",
    "HeldoutLossProbe",
    "Probe",
    "ReferenceLossProbe",
    "StepLosses",
]


class StepLosses(NamedTuple):
    """What a probe sees of one training step.

    Attributes:
        losses: (N,) per-example or (N, T) per-token losses of the step's batch, still attached to the
            graph (a probe that needs gradients of them, like :class:`GradientProductProbe`, takes them).
        domains: (N,) domain id of each example.
        mask: optional 0/1 mask with the shape of ``losses`` (padding = 0).
        indices: optional (N,) dataset indices of the batch, for probes that read per-example caches.
    """

    losses: Tensor
    domains: Tensor
    mask: Tensor | None = None
    indices: Tensor | None = None


class Probe:
    """Observes the statistics of ``sources``; every hook does nothing unless a probe overrides it.

    Subclass it and set ``sources`` to the statistics-table sources it feeds; ``provides`` follows.
    """

    sources: tuple[str, ...] = ()

    @property
    def provides(self) -> frozenset[str]:
        """The statistics whose source is one of :attr:`sources` (from the statistics table)."""
        return provided_by(self.sources)

    def record(self) -> AbstractContextManager[None]:
        """A context around the training forward (e.g. forward hooks); none by default."""
        return nullcontext()

    def observe_step(self, collector: StatsCollector, step: StepLosses) -> None:
        """Observe one training step's losses (called every step, before the backward)."""

    def observe_window(self, collector: StatsCollector, step: int) -> None:
        """Observe once when the window closing at ``step`` (steps done, 1-based) is about to update."""


class HeldoutLossProbe(Probe):
    """Losses on a held-out estimation split when a window closes (FGLS's and ERMA's statistics).

    Args:
        losses: ``losses() -> (per-example losses, domain ids)`` of the current model on the held-out
            split; called under ``torch.no_grad()``.
    """

    sources = ("heldout",)

    def __init__(self, losses: Callable[[], tuple[Tensor, Tensor]]) -> None:
        if not callable(losses):
            raise param_error(
                "HeldoutLossProbe", "losses", "a callable returning (losses, domain ids)", losses
            )
        self._losses = losses

    def observe_window(self, collector: StatsCollector, step: int) -> None:
        """Evaluate the held-out split and add it to the window's ``heldout`` stream."""
        with torch.no_grad():
            losses, domains = self._losses()
        collector.observe(domain_losses(losses, domains, collector.num_domains), source="heldout")


class ReferenceLossProbe(Probe):
    """A reference model's losses on the training batch, and DoReMi's clipped excess over them.

    Every step adds the reference losses (``ref_loss``) and the per-token excess
    max(ℓ − ℓ_ref, 0), clipped per token before the per-domain mean (``excess_loss``; Xie et al. 2023,
    arXiv:2305.10429, Alg. 1).

    Args:
        reference: ``reference(step) -> tensor`` of the reference losses for ``step.losses``' elements
            (same shape), e.g. looked up in a cache by ``step.indices``.
    """

    sources = ("reference", "excess")

    def __init__(self, reference: Callable[[StepLosses], Tensor]) -> None:
        if not callable(reference):
            raise param_error(
                "ReferenceLossProbe", "reference", "a callable returning reference losses", reference
            )
        self._reference = reference

    def observe_step(self, collector: StatsCollector, step: StepLosses) -> None:
        """Add the batch's reference losses and clipped excess to their streams."""
        # At least float32: under bfloat16 losses a per-token excess of a few hundredths would round away.
        dtype = torch.promote_types(step.losses.dtype, torch.float32)
        ref = self._reference(step).to(step.losses.device, dtype)
        if ref.shape != step.losses.shape:
            raise param_error(
                "ReferenceLossProbe", "reference", f"losses of shape {tuple(step.losses.shape)}", ref
            )
        k = collector.num_domains
        excess = (step.losses.detach().to(dtype) - ref).clamp_min(0.0)
        collector.observe(domain_losses(ref, step.domains, k, step.mask), source="reference")
        collector.observe(domain_losses(excess, step.domains, k, step.mask), source="excess")


class GradientVarianceProbe(Probe):
    """Within-domain gradient variances when a window closes (Variance-Aware sampling's statistic).

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-example losses.
        draw: ``draw(step) -> (inputs, targets, domain ids)``, the examples to estimate on, for the
            window closing at ``step``. Drawing them from a generator keyed by ``step`` keeps the probe
            stateless (an exact resume needs nothing of it).
        method: ``"per_example"`` or ``"micro_batch"`` (see :func:`~domainmix.stats.gradient_variance`).
        params: optional names of the parameters to estimate on (default: all).
    """

    sources = ("gradient_variance",)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        draw: Callable[[int], tuple[Tensor, Tensor, Tensor]],
        *,
        method: Literal["per_example", "micro_batch"] = "per_example",
        params: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise param_error("GradientVarianceProbe", "model", "a torch.nn.Module", model)
        for name, fn in (("loss_fn", loss_fn), ("draw", draw)):
            if not callable(fn):
                raise param_error("GradientVarianceProbe", name, "a callable", fn)
        check_param("GradientVarianceProbe", "method", method, Options(("per_example", "micro_batch")))
        if params is not None:  # checked now, not at the first window close (after any warm-up)
            _select_params("GradientVarianceProbe", model, params)
        self._model, self._loss_fn, self._draw = model, loss_fn, draw
        self._method, self._params = method, params

    def observe_window(self, collector: StatsCollector, step: int) -> None:
        """Estimate tr Cov_i[∇ℓ] per domain on the drawn examples and hand the estimate in."""
        inputs, targets, domains = self._draw(step)
        variance = gradient_variance(
            self._model, self._loss_fn, inputs, targets, domains, collector.num_domains,
            method=self._method, params=self._params,
        )  # fmt: skip
        collector.observe_stat("grad_var", variance)


class GradientProductProbe(Probe):
    """DoGE's per-domain gradient products, every step, from a :class:`GradientProductTap`.

    The forward runs inside :meth:`record` (the tap keeps the tapped layers' inputs and outputs); with
    ``target``, a target batch's forward runs at the end of the same block and ``target_grad_dot`` is
    provided too (DoGE's out-of-domain mode). Each step's products are those of that step's mean
    gradients, so ``grad_sq_norm`` is ‖ḡ_i‖², which exceeds ‖E g_i‖² by the noise tr Cov_i / n_i (as
    in DoGE's reference code; :meth:`DomainGradients.mean_sq_norm` gives the unbiased form). A domain
    absent from a step is left out of the window's mean for that step, not counted as a zero.

    Args:
        tap: the tap on the parameter subset, or a function making it: then the tap (and its forward
            hooks) is made at the first :meth:`record`, so a probe the controller does not choose
            costs nothing.
        max_norm: clip each domain's mean gradient to this norm before the products (DoGE's reference
            code clips); None: no clipping.
        target: optional ``target() -> per-example or per-token losses`` of a target batch.
    """

    def __init__(
        self,
        tap: GradientProductTap | Callable[[], GradientProductTap],
        *,
        max_norm: float | None = None,
        target: Callable[[], Tensor] | None = None,
    ) -> None:
        if not (isinstance(tap, GradientProductTap) or callable(tap)):
            raise param_error(
                "GradientProductProbe", "tap", "a GradientProductTap or a function making one", tap
            )
        if target is not None and not callable(target):
            raise param_error("GradientProductProbe", "target", "a callable returning target losses", target)
        check_max_norm("GradientProductProbe", max_norm)
        self._tap = tap if isinstance(tap, GradientProductTap) else None
        self._factory = None if isinstance(tap, GradientProductTap) else tap
        self._max_norm, self._target = max_norm, target
        self._target_losses: Tensor | None = None
        self.sources = ("gradient_products",) + (() if target is None else ("target_gradient_products",))

    @property
    def tap(self) -> GradientProductTap | None:
        """The tap (None while a deferred one has not been made yet)."""
        return self._tap

    def close(self) -> None:
        """Remove the tap's hooks from the model (when training goes on without the probe)."""
        if self._tap is not None:
            self._tap.remove()

    @contextmanager
    def _record(self) -> Iterator[None]:
        self._target_losses = None  # never keep a previous step's graph alive
        if self._tap is None and self._factory is not None:
            made = self._factory()
            if not isinstance(made, GradientProductTap):
                raise param_error(
                    "GradientProductProbe", "tap", "a function returning a GradientProductTap", made
                )
            self._tap = made
        assert self._tap is not None  # one of tap and factory is always set
        with self._tap.record():
            yield
            self._target_losses = None if self._target is None else self._target()

    def record(self) -> AbstractContextManager[None]:
        """Record the tapped layers during the forward (and the target batch's forward, if any)."""
        return self._record()

    def observe_step(self, collector: StatsCollector, step: StepLosses) -> None:
        """One extra backward to the tapped outputs; hand in the Gram matrix and the norms."""
        if self._tap is None:
            raise RuntimeError("GradientProductProbe: run the forward inside controller.record() first.")
        products = self._tap.products(
            step.losses, step.domains, collector.num_domains, mask=step.mask,
            target_losses=self._target_losses, max_norm=self._max_norm,
        )  # fmt: skip
        self._target_losses = None
        # A domain absent from the step has g_i = 0 here, not an estimate: leave it out of the window's mean.
        present = products.count > 0
        collector.observe_stat("grad_dot", products.grad_dot, present=present)
        collector.observe_stat("grad_sq_norm", products.grad_sq_norm, present=present)
        if products.target_grad_dot is not None:
            collector.observe_stat("target_grad_dot", products.target_grad_dot, present=present)
