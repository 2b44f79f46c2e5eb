"""WeightingController: the one imperative shell around a pure :class:`~domainmix.strategies.Strategy`."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from domainmix import _tree
from domainmix._distributed import assert_same_on_all_ranks, broadcast_from_zero, is_distributed
from domainmix._rows import check_inputs
from domainmix._state import check_state_keys, state_counts
from domainmix._statistics import domain_axis_masks, provided_by, statistic
from domainmix._validation import Interval, Options, check_param, check_weight_vector, param_error
from domainmix.losses import domain_losses
from domainmix.stats import Probe, StatsCollector, StepLosses
from domainmix.strategies import AverageState, Strategy
from domainmix.types import DomainStats, DomainWeights, WeightsLike

LogSink = str | os.PathLike[str] | Callable[[dict[str, Any]], None]


class WeightSink(Protocol):
    """What the controller needs from a sampler: ``set_weights`` (and optionally ``effective_sampling``)."""

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Use these sampling weights from the next batch on."""


class WeightingController:
    """Runs a strategy on a schedule, keeps the current weights and pushes q to the sampler.

    One training step, in this order (docs/design.md, "One step")::

        with controller.record():                       # probes that hook the forward
            losses = loss_fn(model(x), y)               # per-example (or per-token) losses
        controller.step(losses, domain_ids)             # observe; update α, q when a window closes
        loss = weighted_loss(losses, domain_ids, controller.loss_multipliers())
        loss.backward(); optimizer.step()

    so the weights a window's statistics produce weight that same step's update. :meth:`step` feeds the
    training losses to the collector (if the strategy reads them), lets each probe observe the step, and
    when a window closes runs the probes' window observations and then the strategy; steps of a warm-up
    window, which would be discarded, are not observed at all. Windows of ``update_every`` steps close at
    steps ``update_every, 2·update_every, ...`` (1-based counts of :meth:`step` calls); windows that
    close before ``warmup_steps`` are discarded, later ones call the strategy. ``step()`` without
    losses is for loops that feed :attr:`collector` themselves. A strategy that reads no
    statistics (``requires`` empty: static weights, schedules) is evaluated at construction and at every
    step instead. Each update is logged as one JSON line: step, names, α, q, loss multipliers and the
    window's statistics.

    Failure handling: a window with a NaN or inf statistic skips the update with a ``RuntimeWarning``
    and leaves the weights untouched; a strategy output that is not a valid pair of distributions (or
    has q_i = 0 where α_i > 0) raises before anything is changed.

    Under ``torch.distributed`` every rank runs the controller; the collector all-reduces the
    statistics, so the deterministic strategy yields identical weights everywhere. ``check_sync=True``
    verifies that after every update (a broadcast; a debug aid). Only rank 0 writes the log file.

    Each log record holds the step, α, q, the loss multipliers, the window's statistics, ``achieved``
    (each domain's share of the loss elements the window observed: the batches' real composition, to
    read next to q) and ``schedule`` (:attr:`schedule_fingerprint`).

    State keys: ``step``, ``names``, ``strategy``, ``weights``, ``strategy_state``, ``collector``,
    ``num_updates``, ``num_skipped``, ``schedule_fingerprint``, ``held``, ``achieved``. The sampler
    keeps its own state (its weights included): save and load both.

    Args:
        strategy: the weighting method.
        initial: initial weights, or domain names: then α is uniform and q is the sampler's own weights
            (its ``weights``, e.g. in proportion to domain sizes), or uniform without a sampler. A
            strategy that sets q (every statistic-free one does, at construction) replaces them;
            explicit ``DomainWeights`` are pushed to the sampler.
        update_every: steps per statistics window, ≥ 1.
        warmup_steps: no update before this many steps, ≥ 0.
        sampler: optional; receives q after every update (``set_weights`` by name) and, if it has
            ``effective_sampling``, supplies the realised q for :meth:`loss_multipliers`. The constructor
            sets the sampler's weights too: on resume, load the sampler's state after building the
            controller, not before.
        collector: optional; a :class:`StatsCollector` over the same domains (made if omitted).
        ema: moving-average factor for a collector made here; ignored when ``collector`` is given.
        log: a JSON-lines file path, or a callable receiving each record.
        check_sync: compare the weights across ranks after each update.
        probes: the :class:`~domainmix.stats.Probe` objects the loop can offer; the controller keeps
            those that provide a statistic the strategy reads (:attr:`probes`) and, when ``probes`` is
            given, raises at construction if a statistic the strategy reads has no probe (the training
            losses, source ``train``, come from :meth:`step`).
    """

    STEP_KEY = "step"
    NAMES_KEY = "names"
    STRATEGY_KEY = "strategy"
    WEIGHTS_KEY = "weights"
    STRATEGY_STATE_KEY = "strategy_state"
    COLLECTOR_KEY = "collector"
    UPDATES_KEY = "num_updates"
    SKIPPED_KEY = "num_skipped"
    SCHEDULE_KEY = "schedule_fingerprint"
    HOLD_KEY = "held"
    ACHIEVED_KEY = "achieved"

    def __init__(
        self,
        strategy: Strategy,
        initial: DomainWeights | Sequence[str],
        *,
        update_every: int = 1,
        warmup_steps: int = 0,
        sampler: WeightSink | None = None,
        collector: StatsCollector | None = None,
        ema: float | None = None,
        log: LogSink | None = None,
        check_sync: bool = False,
        probes: Sequence[Probe] | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise param_error("WeightingController", "strategy", "a Strategy", strategy)
        from_sampler = False
        if not isinstance(initial, DomainWeights):
            initial = DomainWeights.create(initial)
            from_sampler = sampler is not None and getattr(sampler, "weights", None) is not None
        self._update_every: int = check_param(
            "WeightingController", "update_every", update_every, Interval(int, 1, None)
        )
        self._warmup: int = check_param(
            "WeightingController", "warmup_steps", warmup_steps, Interval(int, 0, None)
        )
        if collector is None:
            collector = StatsCollector(initial.num_domains, ema=ema)
        elif not isinstance(collector, StatsCollector) or collector.num_domains != initial.num_domains:
            raise param_error(
                "WeightingController",
                "collector",
                f"a StatsCollector over {initial.num_domains} domains",
                collector,
            )
        if sampler is not None:
            if not callable(getattr(sampler, "set_weights", None)):
                raise param_error("WeightingController", "sampler", "an object with set_weights()", sampler)
            sampler_names = tuple(getattr(sampler, "domains", initial.names))
            if sampler_names != initial.names:
                raise param_error(
                    "WeightingController",
                    "sampler",
                    f"a sampler over the domains {list(initial.names)} in this order",
                    f"a sampler over {list(sampler_names)}",
                )
            if from_sampler:
                initial = _sampler_weights(initial, sampler)
        if log is not None and not (callable(log) or isinstance(log, (str, os.PathLike))):
            raise param_error("WeightingController", "log", "a file path or a callable", log)
        self._probes = _choose_probes(strategy, probes)
        # The training stream costs a reduction per step: feed it only to a strategy that reads it.
        self._reads_train = bool(strategy.requires & provided_by(("train",)))
        self._strategy = strategy
        self._collector = collector
        self._sampler = sampler
        self._log = log
        self._check_sync = bool(check_sync)
        self._step = 0
        self._num_updates = 0
        self._num_skipped = 0
        self._multipliers: tuple[DomainWeights, tuple[float, ...] | None, Tensor] | None = None
        self._in_hand: Tensor | None = None  # set_batch_sampling: the shares of the batch the loop holds
        self._weights = initial
        self._schedule = _chain_fingerprint("", initial)
        self._held = False  # set by override(hold=True): the strategy does not update until release()
        self._achieved: Tensor | None = None  # the last window's domain shares (see achieved)
        self._state = strategy.init(initial)
        self._unlogged: DomainStats | None = None  # the construction's evaluation, logged at the first step
        if self.stat_free:
            # push_unchanged: the sampler may have been built with other weights; sync it even when the
            # first evaluation leaves the controller's weights as they were. Its log record waits for the
            # first step, so that a controller built to load a saved state does not log a stale step 0.
            self._unlogged = self._empty_stats(0)
            self._apply(self._unlogged, push_unchanged=True, write_log=False)
        elif sampler is not None and not from_sampler:
            sampler.set_weights(self._by_name(initial.sampling))

    # ----------------------------------------------------------------------------------------------
    @property
    def weights(self) -> DomainWeights:
        """Current α (mixture) and q (sampling) as set by the strategy."""
        return self._weights

    @property
    def achieved(self) -> Tensor | None:
        """(k,) each domain's share of the loss elements the last closed window observed, or None.

        The batches' real composition, to read next to q (``weights.sampling``); None before a window
        has closed. Elements are what the losses hold: examples, or with per-token losses unmasked
        tokens, so with sequences of unequal length these are token shares, not q's sequence shares.
        """
        return None if self._achieved is None else self._achieved.clone()

    @property
    def schedule_fingerprint(self) -> str:
        """A hash of every (α, q) this controller has set, in order (16 hex digits).

        Chained: each change hashes the previous fingerprint with the new float64 weights, so two runs
        (or two ranks) with the same fingerprint followed the same weighting schedule bit for bit.
        """
        return self._schedule

    @property
    def requires(self) -> frozenset[str]:
        """Statistics the strategy reads."""
        return self._strategy.requires

    @property
    def stat_free(self) -> bool:
        """True for strategies that read no statistics (evaluated every step)."""
        return not self._strategy.requires

    @property
    def probes(self) -> tuple[Probe, ...]:
        """The probes chosen for the strategy's statistics (empty for a statistic-free strategy)."""
        return self._probes

    @property
    def collector(self) -> StatsCollector:
        """The statistics collector feeding the strategy."""
        return self._collector

    @property
    def step_count(self) -> int:
        """Calls to :meth:`step`: optimizer steps (accumulated micro-batches go to :meth:`observe`)."""
        return self._step

    @property
    def strategy_state(self) -> Any:
        """The strategy's current state (read-only by convention)."""
        return self._state

    def loss_multipliers(self, sampling: Tensor | None = None) -> Tensor:
        """(k,) α_i / q_i with q the distribution the sampler realises for the batch in hand.

        That is ``sampling`` if given, else the shares of :meth:`set_batch_sampling`, else the sampler's
        ``batch_sampling`` (the shares of the batch it last yielded, the q it was drawn with even when
        this step's update has since moved q), else its ``effective_sampling``, else the controller's q.
        A stratified sampler rounds B·q to integer counts b; using b/B here keeps the importance-weighted
        loss exactly unbiased. Behind a loader that prefetches (DataLoader workers, Accelerate's
        ``DataLoaderShard``, Lightning's fetcher) the batch last yielded is not the batch in hand: pass
        ``sampling=sampler.sampling_of(n)`` for global batch n (counted from 0 since construction), or
        set it once per batch with :meth:`set_batch_sampling` (the Lightning callback does), or for as
        many steps as the loader runs ahead of a change of q the multipliers use the new shares.
        """
        realised = sampling if sampling is not None else self._in_hand
        if realised is None:
            realised = getattr(self._sampler, "batch_sampling", None)
        if realised is None:
            realised = getattr(self._sampler, "effective_sampling", None)
        weights = self._weights
        shares = None if realised is None else tuple(torch.as_tensor(realised).tolist())
        cached = self._multipliers
        # Called every step: recompute only when the weights object or the realised shares change.
        if cached is None or cached[0] is not weights or cached[1] != shares:
            if shares is not None:
                given = "sampling" if sampling is not None else "the sampler's or set_batch_sampling's shares"
                q = self._realised("WeightingController.loss_multipliers", given, realised)
                self._warn_undrawn(shares)
                weights = weights._replace(sampling=q)
            cached = self._multipliers = (self._weights, shares, weights.loss_multipliers())
        return cached[2].clone()

    def set_batch_sampling(self, shares: Tensor | None) -> None:
        """The realised shares of the batch the loop holds, for :meth:`loss_multipliers` from now on.

        For a framework integration that counts the batches its loop consumes, behind a loader that
        prefetches (``sampler.sampling_of(n)`` for the n-th batch): the training code then calls
        ``loss_multipliers()`` as usual. ``None`` goes back to the sampler's ``batch_sampling``.
        """
        self._in_hand = (
            None
            if shares is None
            else self._realised("WeightingController.set_batch_sampling", "shares", shares)
        )

    def _realised(self, caller: str, name: str, shares: Any) -> Tensor:
        """``shares`` as a (k,) float64 tensor, refused unless they are shares: finite, >= 0, summing to 1.

        A NaN would otherwise turn into a multiplier of α (a zero share is read as "not drawn"), and
        counts b instead of shares b/B would scale the loss by 1/B.
        """
        q = check_weight_vector(caller, name, shares, self._weights.names, normalize=False)
        if abs(float(q.sum()) - 1.0) > 1e-6:
            raise param_error(
                caller, name, "shares that sum to 1 (the batch's counts divided by the global batch size, as "
                "sampler.sampling_of(n) gives them)", q.tolist(),
            )  # fmt: skip
        return q

    def _warn_undrawn(self, shares: tuple[float, ...]) -> None:
        """Warn (once per change of weights or shares) about domains weighted in the loss but never drawn."""
        alpha = self._weights.mixture.tolist()
        undrawn = [n for n, a, q in zip(self._weights.names, alpha, shares, strict=True) if a > 0 and q == 0]
        if undrawn:
            warnings.warn(
                f"WeightingController: domains {undrawn} have a positive loss weight but the sampler draws "
                "none of their examples (a stratified B·q below one half rounds to 0), so their loss is "
                "missing from the objective. Use min_count=1 or carry_remainder=True on the sampler, or a "
                "floor on q.",
                RuntimeWarning,
                stacklevel=3,
            )

    def averaged_weights(self) -> DomainWeights | None:
        """Time-averaged weights if the strategy contains ``track_average()``, else None."""
        found = _tree.find(self._state, AverageState)
        average = found[0].average() if found else None
        if average is None:
            return None
        return self._weights._replace(mixture=average[0], sampling=average[1])

    @property
    def closes_window(self) -> bool:
        """Whether the next :meth:`step` closes a window and runs the strategy."""
        nxt = self._step + 1
        return not self.stat_free and nxt % self._update_every == 0 and nxt >= self._warmup

    # ----------------------------------------------------------------------------------------------
    @contextmanager
    def record(self) -> Iterator[None]:
        """A context for the training forward: the probes that hook it (gradient taps) record in it.

        Nothing records on the steps of a warm-up window, which :meth:`step` does not observe either.
        """
        with ExitStack() as stack:
            if self._observes_coming_step():
                for probe in self._probes:
                    stack.enter_context(probe.record())
            yield

    def step(
        self,
        losses: Tensor | None = None,
        domain_ids: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        indices: Tensor | None = None,
    ) -> bool:
        """Mark one training step done; run the strategy if a window closes.

        Returns whether the strategy ran (a window closed; every step for a statistics-free strategy not
        held by :meth:`override`), not whether the weights moved: compare :attr:`weights` for that.

        Args:
            losses: the step's (N,) per-example or (N, T) per-token losses (before weighting), or None
                when the loop feeds :attr:`collector` itself. They go into the ``train`` stream when
                the strategy reads one of its statistics (``loss``, ``count``, ``loss_var``), and to
                the probes. Gradient probes differentiate them, so pass them before the backward.
            domain_ids: (N,) domain of each example; required with ``losses``.
            mask: optional 0/1 mask with the shape of ``losses`` (padding = 0).
            indices: optional (N,) dataset indices of the batch, for probes that read per-example caches.
        """
        caller = "WeightingController.step"
        if (losses is None) != (domain_ids is None):  # one without the other is a mistake, not a choice
            name, given = ("domain_ids", None) if domain_ids is None else ("losses", None)
            raise param_error(caller, name, "a tensor when the other of losses / domain_ids is given", given)
        if losses is not None and domain_ids is not None:
            check_inputs(caller, losses, domain_ids, self._collector.num_domains, mask)
        if self._unlogged is not None:
            self._write_log(self._unlogged, skipped=False)
            self._unlogged = None
        step = self._step + 1
        # A step is all or nothing: if the strategy or a probe raises, the step count, the weights and the
        # collector's window stay as they were before the call (a probe may raise after the training
        # losses were observed, on any step; without probes only a closing step can fail midway).
        with self._window_restored_on_error(self.closes_window or bool(self._probes)):
            if losses is not None and domain_ids is not None:
                self._observe(losses, domain_ids, mask, indices)
            updated = self._advance(step)
        self._step = step
        return updated

    def observe(
        self,
        losses: Tensor,
        domain_ids: Tensor,
        *,
        mask: Tensor | None = None,
        indices: Tensor | None = None,
    ) -> None:
        """Observe one micro-batch of the coming step without ending the step (gradient accumulation).

        With A micro-batches per optimizer step, call ``observe`` after each micro-batch's forward (inside
        :meth:`record`, as ``step`` would be) and ``step()`` without losses once the optimizer has
        stepped. Every micro-batch of an optimizer step is then weighted by the same α (and, behind a
        loader that does not prefetch, drawn with the same q), and the steps counted by ``update_every``,
        ``warmup_steps`` and the log are optimizer steps; the weights a window produces apply from the
        next optimizer step (docs/design.md, "Gradient accumulation"). Arguments as in :meth:`step`.
        All or nothing: if a probe raises, the window is left as it was before the call.
        """
        check_inputs("WeightingController.observe", losses, domain_ids, self._collector.num_domains, mask)
        with self._window_restored_on_error(bool(self._probes)):
            self._observe(losses, domain_ids, mask, indices)

    @contextmanager
    def _window_restored_on_error(self, needed: bool) -> Iterator[None]:
        """Put the collector's window back as it was if the block raises.

        ``needed``: something in the block can fail after the window has changed (else no snapshot).
        """
        saved = self._collector._snapshot() if needed else None
        try:
            yield
        except BaseException:
            if saved is not None:
                self._collector.load_state_dict(saved)
            raise

    def _observe(
        self, losses: Tensor, domain_ids: Tensor, mask: Tensor | None, indices: Tensor | None
    ) -> None:
        """Feed the training losses (if the strategy reads them) and the probes; not in a warm-up window."""
        if not self._observes_coming_step():
            return
        if self._reads_train:
            self._collector.observe(
                domain_losses(losses.detach(), domain_ids, self._collector.num_domains, mask)
            )
        seen = StepLosses(losses, domain_ids, mask, indices)
        for probe in self._probes:
            probe.observe_step(self._collector, seen)

    def _advance(self, step: int) -> bool:
        """End the step that brings the count to ``step``; run the strategy if a window closes."""
        if self.stat_free:
            return False if self._held else self._apply(self._empty_stats(step))
        if step % self._update_every != 0:
            return False
        if step < self._warmup:
            self._collector.reset()
            return False
        for probe in self._probes:
            probe.observe_window(self._collector, step)
        return self.update(self._collector.summarize(step))

    def _observes_coming_step(self) -> bool:
        """Whether the coming step is observed: statistics are read and its window is not a warm-up one."""
        closes_at = -(-(self._step + 1) // self._update_every) * self._update_every
        return not self.stat_free and closes_at >= self._warmup

    def update(self, stats: DomainStats) -> bool:
        """Run the strategy on ``stats`` now. Returns False when the update was skipped (non-finite stats)."""
        if not isinstance(stats, DomainStats):
            raise param_error("WeightingController.update", "stats", "a DomainStats", stats)
        achieved = _shares(stats.count)
        stats = self._undrawn_zeroed(stats)
        # Only what the strategy reads can corrupt the weights: an overflowing statistic it never reads
        # (a loss variance of huge losses, say) must not skip its every update.
        non_finite = self._non_finite(stats, self._strategy.requires | {"count"})
        if non_finite:
            self._num_skipped += 1
            warnings.warn(
                f"WeightingController: skipping the weight update at step {stats.step}: non-finite "
                f"statistics {non_finite}. The weights stay as they were "
                f"(windows skipped so far: {self._num_skipped}). Frequent causes: a variance of a domain "
                "with fewer than two examples in the window; a non-finite loss; gradients that overflow "
                "float16 (a probe differentiates the unscaled loss, which GradScaler does not protect: "
                "use bfloat16 autocast).",
                RuntimeWarning,
                stacklevel=2,
            )
            self._achieved = achieved
            self._write_log(stats, skipped=True)
            return False
        if self._held:
            self._achieved = achieved
            return False  # hand-set weights hold until release(); this window's statistics are dropped
        updated = self._apply(stats, log_unchanged=True)  # all or nothing: it may raise
        self._achieved = achieved
        return updated

    def override(
        self, mixture: WeightsLike | None = None, sampling: WeightsLike | None = None, *, hold: bool = False
    ) -> None:
        """Set α and/or q by hand, now: an operator's correction in the middle of a run.

        The loss multipliers change at once and q reaches the sampler (from its next batch); the
        strategy's next update starts from these weights (an ``ema`` in the chain restarts from them
        too, and FGLS's and ERMA's loss weights become w = α / π), or, with ``hold=True``, no update
        happens until :meth:`release`. The change is logged (``"override": true``), enters
        :attr:`schedule_fingerprint` and is kept by :meth:`state_dict`. Under ``torch.distributed``
        every rank must call it: rank 0's values are broadcast, so every rank applies the same weights.

        Args:
            mixture: new α (mapping by name, sequence or tensor; normalised), or ``None`` to keep α.
            sampling: new q, or ``None`` to keep q.
            hold: suspend the strategy's updates until :meth:`release`.

        Raises:
            ValueError: for invalid weights, q_i = 0 where α_i > 0, or an α the strategy's state cannot
                hold (FGLS, ERMA: no weight on any domain of their population).
        """
        check_param("WeightingController.override", "hold", hold, Options((False, True)))
        names = self._weights.names
        new = DomainWeights.create(
            names,
            self._weights.mixture if mixture is None else mixture,
            self._weights.sampling if sampling is None else sampling,
        )
        flags = torch.tensor([float(bool(hold))], dtype=torch.float64)
        for tensor in (new.mixture, new.sampling, flags):
            broadcast_from_zero(tensor)
        # States that mirror the weights (an EMA, FGLS's and ERMA's w) restart from the hand-set ones, or
        # the next update would pull the weights back towards those before the override. Made before
        # anything changes: it may refuse the weights.
        state = _tree.restart(self._state, new)
        changed = self._differs(new)
        self._weights, self._held, self._state = new, bool(flags.item()), state
        if changed:
            self._schedule = _chain_fingerprint(self._schedule, new)
        if self._sampler is not None:
            self._sampler.set_weights(self._by_name(new.sampling))
        self._write_log(self._empty_stats(self._step), skipped=False, override=True)

    def release(self) -> None:
        """End a ``hold``: the strategy updates again from the next window that closes."""
        self._held = False

    @property
    def held(self) -> bool:
        """Whether hand-set weights are holding (:meth:`override` with ``hold=True``)."""
        return self._held

    def _undrawn_zeroed(self, stats: DomainStats) -> DomainStats:
        """``stats`` with the NaN/inf entries of domains at α_i = q_i = 0 set to 0.

        Such a domain is never drawn, so its variance (say) is undefined by design, not a failure: it must
        not make every update skip. Entries of a matrix statistic are zeroed along each domain axis.
        """
        off = (self._weights.mixture == 0) & (self._weights.sampling == 0)
        if not bool(off.any()):
            return stats
        changes: dict[str, Any] = {}
        for name, value in stats.items():
            bad = ~torch.isfinite(value)
            if not bool(bad.any()):
                continue
            try:
                axes = statistic(name).shape
            except ValueError:  # not in the table: only its leading axis is known to be per domain
                axes = ("k",) + ("",) * (value.ndim - 1)
            touches = torch.zeros_like(bad)  # an entry that belongs to any switched-off domain
            for along in domain_axis_masks(axes, off, value.shape):
                touches = touches | along
            if bool((bad & touches).any()):
                changes[name] = torch.where(bad & touches, torch.zeros_like(value), value)
        return stats.replace(**changes) if changes else stats

    def _non_finite(self, stats: DomainStats, fields: frozenset[str]) -> dict[str, list[str]]:
        """Statistic (of ``fields``) -> the domains (rows, for a matrix) where it is NaN or inf."""
        names = self._weights.names
        found: dict[str, list[str]] = {}
        for field, value in stats.items():
            if field not in fields:
                continue
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                rows = bad.reshape(len(names), -1).any(1) if value.shape[:1] == (len(names),) else None
                found[field] = (
                    ["all"] if rows is None else [n for n, b in zip(names, rows.tolist(), strict=True) if b]
                )
        return found

    def _apply(
        self,
        stats: DomainStats,
        *,
        log_unchanged: bool = False,
        push_unchanged: bool = False,
        write_log: bool = True,
    ) -> bool:
        new, state = self._strategy.update(self._weights, self._state, stats)
        new = self._validated(new)
        changed = self._differs(new)
        self._weights, self._state = new, state
        if changed:
            self._schedule = _chain_fingerprint(self._schedule, new)
        self._num_updates += 1
        if self._check_sync:
            assert_same_on_all_ranks("mixture weights", new.mixture)
            assert_same_on_all_ranks("sampling weights", new.sampling)
        if (changed or push_unchanged) and self._sampler is not None:
            self._sampler.set_weights(self._by_name(new.sampling))
        if write_log and (changed or log_unchanged):
            self._write_log(stats, skipped=False)
        return True

    def _differs(self, new: DomainWeights) -> bool:
        """Whether ``new`` changes α or q bit for bit (what the sampler, the log and the fingerprint see)."""
        return not (
            torch.equal(new.mixture, self._weights.mixture)
            and torch.equal(new.sampling, self._weights.sampling)
        )

    def _validated(self, new: Any) -> DomainWeights:
        name = self._strategy.name
        if not isinstance(new, DomainWeights) or new.names != self._weights.names:
            raise RuntimeError(
                f"Strategy {name!r} returned {new!r}, not DomainWeights over {self._weights.names}."
            )
        k = self._weights.num_domains
        values: dict[str, list[float]] = {}
        for field in ("mixture", "sampling"):
            x = getattr(new, field)
            # Checked on Python floats: k is small and this runs every step for stat-free strategies.
            v = x.tolist() if isinstance(x, Tensor) and x.shape == (k,) else None
            if (
                v is None
                or not all(math.isfinite(e) and e >= 0 for e in v)
                or not math.isclose(math.fsum(v), 1.0, abs_tol=1e-6)
            ):
                raise RuntimeError(
                    f"Strategy {name!r} returned an invalid {field}: {x!r}; expected a distribution over "
                    f"{k} domains. The weights were left unchanged."
                )
            values[field] = v
        starved = [
            n
            for n, a, q in zip(new.names, values["mixture"], values["sampling"], strict=True)
            if a > 0 and q <= 0
        ]
        if starved:
            raise RuntimeError(
                f"Strategy {name!r} set q = 0 for domains with α > 0 ({starved}): their loss could never be "
                "sampled. Keep q > 0 wherever α > 0 (follow_mixture() on the sampling side, say). The "
                "weights were left unchanged."
            )
        return new._replace(
            mixture=torch.tensor(values["mixture"], dtype=torch.float64) / math.fsum(values["mixture"]),
            sampling=torch.tensor(values["sampling"], dtype=torch.float64) / math.fsum(values["sampling"]),
        )

    def _empty_stats(self, step: int) -> DomainStats:
        zeros = torch.zeros(self._weights.num_domains, dtype=torch.float64)
        return DomainStats(step=step, loss=zeros, count=zeros.clone())

    def _by_name(self, x: Tensor) -> dict[str, float]:
        return dict(zip(self._weights.names, x.tolist(), strict=True))

    # ----------------------------------------------------------------------------------------------
    def _write_log(self, stats: DomainStats, *, skipped: bool, override: bool = False) -> None:
        if self._log is None:
            return
        record: dict[str, Any] = {
            "step": int(stats.step),
            "names": list(self._weights.names),
            "mixture": self._weights.mixture.tolist(),
            "sampling": self._weights.sampling.tolist(),
            "loss_multipliers": self.loss_multipliers().tolist(),
            "achieved": _shares(stats.count).tolist(),
            "schedule": self._schedule,
            "skipped": skipped,
            "override": override,
            "stats": {f: _finite_or_str(v.tolist()) for f, v in stats.items()},
        }
        if callable(self._log):
            self._log(record)
            return
        if is_distributed() and torch.distributed.get_rank() != 0:
            return
        with open(Path(self._log), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step, weights, strategy state and collector state (plain containers and tensors)."""
        return {
            self.STEP_KEY: self._step,
            self.NAMES_KEY: list(self._weights.names),
            self.STRATEGY_KEY: self._strategy.name,
            self.WEIGHTS_KEY: {
                "mixture": self._weights.mixture.clone(),
                "sampling": self._weights.sampling.clone(),
            },
            self.STRATEGY_STATE_KEY: _tree.to_plain(self._state),
            self.COLLECTOR_KEY: self._collector.state_dict(),
            self.UPDATES_KEY: self._num_updates,
            self.SKIPPED_KEY: self._num_skipped,
            self.SCHEDULE_KEY: self._schedule,
            self.HOLD_KEY: self._held,
            self.ACHIEVED_KEY: None if self._achieved is None else self._achieved.clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` made by a controller over the same domains and strategy.

        The sampler is not touched: restore it from its own ``state_dict``.

        Raises:
            ValueError: on missing keys, other domain names, another strategy or a state of another shape.
        """
        keys = (
            self.STEP_KEY,
            self.NAMES_KEY,
            self.STRATEGY_KEY,
            self.WEIGHTS_KEY,
            self.STRATEGY_STATE_KEY,
            self.COLLECTOR_KEY,
            self.UPDATES_KEY,
            self.SKIPPED_KEY,
            self.SCHEDULE_KEY,
            self.HOLD_KEY,
            self.ACHIEVED_KEY,
        )
        check_state_keys("WeightingController", state_dict, keys)
        if tuple(state_dict[self.NAMES_KEY]) != self._weights.names:
            raise ValueError(
                f"WeightingController.load_state_dict: saved for domains {state_dict[self.NAMES_KEY]}, "
                f"this controller has {list(self._weights.names)}."
            )
        if state_dict[self.STRATEGY_KEY] != self._strategy.name:
            raise ValueError(
                f"WeightingController.load_state_dict: saved for strategy {state_dict[self.STRATEGY_KEY]!r}, "
                f"this controller runs {self._strategy.name!r}."
            )
        # Everything is checked before anything is assigned: a corrupt checkpoint leaves the controller as
        # it was, and fails naming the key.
        owner = "WeightingController"
        counters = (self.STEP_KEY, self.UPDATES_KEY, self.SKIPPED_KEY)
        step, updates, skipped = (state_counts(owner, state_dict, key) for key in counters)
        saved = state_dict[self.WEIGHTS_KEY]
        key = self.WEIGHTS_KEY
        if not isinstance(saved, Mapping) or not {"mixture", "sampling"} <= set(saved):
            raise ValueError(
                f"{owner}.load_state_dict: state[{key!r}] must be a mapping with 'mixture' and 'sampling'. "
                f"Got {saved!r} instead."
            )
        try:
            DomainWeights.create(self._weights.names, saved["mixture"], saved["sampling"])  # validates
        except ValueError as error:
            raise ValueError(f"{owner}.load_state_dict: state[{key!r}]: {error}") from None
        # Keep the saved tensors bit for bit: renormalising would perturb the resumed trajectory.
        # On the CPU, where the controller keeps its state, whatever map_location the checkpoint had.
        weights = DomainWeights(
            self._weights.names,
            torch.as_tensor(saved["mixture"], dtype=torch.float64, device="cpu").clone(),
            torch.as_tensor(saved["sampling"], dtype=torch.float64, device="cpu").clone(),
        )
        for side in ("mixture", "sampling"):
            total = float(getattr(weights, side).sum())
            if abs(total - 1.0) > 1e-9:  # a state_dict() always holds normalised weights
                raise ValueError(
                    f"{owner}.load_state_dict: state[{self.WEIGHTS_KEY!r}][{side!r}] must sum to 1 (a saved "
                    f"state is normalised). Got a sum of {total!r} instead."
                )
        hold, achieved = state_dict[self.HOLD_KEY], state_dict[self.ACHIEVED_KEY]
        if not isinstance(hold, bool):
            key = self.HOLD_KEY
            raise ValueError(f"{owner}.load_state_dict: state[{key!r}] must be a bool. Got {hold!r} instead.")
        if achieved is not None:
            achieved = torch.as_tensor(achieved, dtype=torch.float64, device="cpu").clone()
            if tuple(achieved.shape) != (len(self._weights.names),):
                raise ValueError(
                    f"{owner}.load_state_dict: state[{self.ACHIEVED_KEY!r}] must be None or one share per "
                    f"domain. Got shape {tuple(achieved.shape)} instead."
                )
        try:
            state = _tree.from_plain(self._strategy.init(weights), state_dict[self.STRATEGY_STATE_KEY])
        except ValueError as error:
            raise ValueError(
                f"{owner}.load_state_dict: state[{self.STRATEGY_STATE_KEY!r}]: {error}"
            ) from None
        self._collector.load_state_dict(state_dict[self.COLLECTOR_KEY])
        self._weights, self._state = weights, state
        self._step, self._num_updates, self._num_skipped = step, updates, skipped
        self._unlogged = None  # the saved run logged its own construction
        self._schedule = str(state_dict[self.SCHEDULE_KEY])
        self._held = hold
        self._achieved = achieved


def _shares(count: Tensor) -> Tensor:
    count = count.to(torch.float64)
    return count / count.sum().clamp_min(1.0)


def _chain_fingerprint(previous: str, weights: DomainWeights) -> str:
    digest = hashlib.sha256(previous.encode())
    for x in (weights.mixture, weights.sampling):
        digest.update(x.to(torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _sampler_weights(initial: DomainWeights, sampler: WeightSink) -> DomainWeights:
    """Uniform α with the sampler's own q: domain names as ``initial`` leave the sampling weights to it."""
    weights: Any = getattr(sampler, "weights", None)
    q = check_weight_vector("WeightingController", "sampler", weights, initial.names)
    zero = [n for n, x in zip(initial.names, q.tolist(), strict=True) if not x > 0]
    if zero:
        raise param_error(
            "WeightingController",
            "sampler",
            "a sampler with positive weights for every domain when 'initial' is domain names (the "
            f"initial mixture is uniform; zero for {zero}), or initial=DomainWeights.create(names, "
            "mixture, sampling)",
            q.tolist(),
        )
    return DomainWeights.create(initial.names, initial.mixture, q)


def _finite_or_str(values: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so a skipped window's log line stays valid JSON."""
    if isinstance(values, list):
        return [_finite_or_str(v) for v in values]
    return values if math.isfinite(values) else str(values)


def _choose_probes(strategy: Strategy, probes: Sequence[Probe] | None) -> tuple[Probe, ...]:
    """The probes providing a statistic ``strategy`` reads; with ``probes`` given, all must be covered."""
    if probes is None:
        return ()
    if isinstance(probes, Probe) or not all(isinstance(p, Probe) for p in probes):
        raise param_error("WeightingController", "probes", "a sequence of domainmix.stats.Probe", probes)
    chosen = tuple(p for p in probes if p.provides & strategy.requires)
    covered = provided_by(("train",)).union(*(p.provides for p in chosen))
    missing = sorted(strategy.requires - covered)
    if missing:
        wanted = {name: statistic(name).source for name in missing}
        raise param_error(
            "WeightingController",
            "probes",
            f"probes providing every statistic {strategy.name!r} reads (missing, by source: {wanted})",
            [type(p).__name__ for p in probes],
        )
    return chosen
