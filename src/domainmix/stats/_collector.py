"""Accumulate per-domain statistics over an update window, across micro-batches and ranks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from domainmix._distributed import all_reduce_sum
from domainmix._state import check_state_keys
from domainmix._statistics import LOSS_REDUCTIONS, Statistic, domain_axis_masks, sources, statistics
from domainmix._validation import Interval, Options, check_param, param_error
from domainmix.losses import DomainLosses
from domainmix.types import DomainStats


class StatsCollector:
    """Per-domain statistics of an update window: loss sums, counts, squares and gradient estimates.

    Feed it :func:`~domainmix.losses.domain_losses` reductions of every micro-batch (``observe``) and any
    gradient estimates (``observe_stat``); ``summarize`` closes the window and returns a
    :class:`~domainmix.types.DomainStats`. What it keeps and how each statistic reduces is the table of
    ``domainmix/_statistics.py``, read when the collector is made: a loss stream (``sum``, ``count``,
    ``sum_sq`` per domain) for every source of a ``mean``/``variance``/``count`` statistic, and a
    running sum of estimates for every ``estimate`` statistic. Under an initialised
    ``torch.distributed`` process group, ``summarize`` all-reduces the window's sums once (one packed
    tensor), so every rank returns the same statistics; it is then a collective and every rank must call
    it.

    With ``ema=β``, each returned mean is an exponential moving average over windows,
    m ← β m + (1 − β) x, updated only for domains seen in the window (the first sighting initialises
    it, so there is no bias towards zero). A NaN or inf entry is never folded into its moving average
    and is returned as it is (the controller then skips the window, or zeroes it for a domain that is
    never drawn); the finite entries of the window are folded.

    The window's sums stay on the device of what is handed in (a GPU loop makes no host copy per
    step); :meth:`summarize` brings them to the host once per window.

    State keys: ``num_domains``, ``ema``, ``window``, ``averages``.

    Args:
        num_domains: k ≥ 1.
        ema: β in [0, 1), or None for plain window means.
    """

    NUM_DOMAINS_KEY = "num_domains"
    EMA_KEY = "ema"
    WINDOW_KEY = "window"
    AVERAGES_KEY = "averages"

    def __init__(self, num_domains: int, *, ema: float | None = None) -> None:
        self._k: int = check_param("StatsCollector", "num_domains", num_domains, Interval(int, 1, None))
        self._ema = check_param("StatsCollector", "ema", ema, Interval(float, 0.0, 1.0, closed="left"), None)
        self._averages: dict[str, Tensor] = {}
        self._table = statistics()
        self._sources = sources(self._table, LOSS_REDUCTIONS)
        self._estimates = {n: row for n, row in self._table.items() if row.reduction == "estimate"}
        self.reset()

    @property
    def num_domains(self) -> int:
        """K."""
        return self._k

    @property
    def sources(self) -> tuple[str, ...]:
        """The loss streams :meth:`observe` accepts (``train``, ``heldout``, ``reference``, ``excess``...)."""
        return self._sources

    @property
    def estimates(self) -> tuple[str, ...]:
        """The statistics :meth:`observe_stat` accepts (``grad_var``, ``grad_dot``, ...)."""
        return tuple(self._estimates)

    def reset(self) -> None:
        """Discard the current window (moving averages are kept)."""
        zeros = torch.zeros(self._k, dtype=torch.float64)
        self._window: dict[str, Tensor] = {}
        for source in self._sources:
            for part in _PARTS:
                self._window[f"{source}.{part}"] = zeros.clone()
        for name, row in self._estimates.items():
            # A task axis takes its length from the window's first estimate (empty until then). Each
            # entry counts the estimates that covered it (a domain absent from a step is not covered).
            dims = (0,) if row.has_task_axis else row.dims(self._k)
            self._window[f"{name}.sum"] = torch.zeros(dims, dtype=torch.float64)
            self._window[f"{name}.n"] = torch.zeros(dims, dtype=torch.float64)

    def _add(self, key: str, value: Tensor) -> None:
        """Add ``value`` to the window entry ``key`` on ``value``'s device (the entry moves there once)."""
        value = value.detach().to(torch.float64)
        window = self._window[key]
        if window.device != value.device:
            window = self._window[key] = window.to(value.device)
        window += value

    def observe(self, losses: DomainLosses, *, source: str = "train") -> None:
        """Add one reduction (a micro-batch) to the window.

        Args:
            losses: output of :func:`~domainmix.losses.domain_losses`.
            source: the loss stream, one of :attr:`sources`: ``"train"`` (training batches),
                ``"heldout"`` (an estimation split, FGLS/ERMA), ``"reference"`` (a reference model's
                losses on the training batch) or ``"excess"`` (the per-token clipped excess
                ``(loss - ref_loss).clamp_min(0)`` on the training batch, DoReMi's statistic: clip per
                token first, then reduce).
        """
        check_param("StatsCollector.observe", "source", source, Options(self._sources))
        if not isinstance(losses, DomainLosses) or losses.sum.shape != (self._k,):
            raise param_error(
                "StatsCollector.observe", "losses", f"a DomainLosses over {self._k} domains", losses
            )
        for part, value in zip(_PARTS, losses, strict=True):
            self._add(f"{source}.{part}", value)

    def observe_stat(self, name: str, value: Tensor, *, present: Tensor | None = None) -> None:
        """Add an estimate of a statistic; the window reports, entry by entry, the mean of its estimates.

        Args:
            name: one of :attr:`estimates`, e.g. ``grad_var``, ``grad_sq_norm``, ``target_grad_dot``
                (shape (k,)) or ``grad_dot`` (shape (k, k)).
            value: the estimate.
            present: optional (k,) mask of the domains the estimate covers; the entries of the others
                (along every domain axis) are not estimates and are left out of the mean. A per-step
                probe passes the domains present in the step, so a domain seen in m of a window's E
                steps is averaged over its m estimates, not diluted by E − m zeros.
        """
        caller = "StatsCollector.observe_stat"
        check_param(caller, "name", name, Options(self.estimates))
        row = self._estimates[name]
        window = self._window[f"{name}.sum"]
        fits = isinstance(value, Tensor) and row.fits(tuple(value.shape), self._k)
        if not fits or (window.numel() and tuple(value.shape) != tuple(window.shape)):
            shape = row.describe(self._k) if not window.numel() else tuple(window.shape)
            raise param_error(caller, "value", f"a tensor of shape {shape} for {name!r}", value)
        average = self._averages.get(name)
        if average is not None and tuple(average.shape[1:]) != tuple(value.shape):
            raise param_error(
                caller, "value", f"of the shape {tuple(average.shape[1:])} that the moving average of "
                f"{name!r} has (the number of tasks cannot change while ema is on)", tuple(value.shape),
            )  # fmt: skip
        if present is not None and (not isinstance(present, Tensor) or tuple(present.shape) != (self._k,)):
            raise param_error(caller, "present", f"a ({self._k},) mask of the domains covered", present)
        covered = torch.ones_like(value, dtype=torch.bool)
        if present is not None:  # an entry counts when every domain it belongs to was covered
            for along in domain_axis_masks(row.shape, present.to(value.device).bool(), value.shape):
                covered = covered & along
        if not window.numel():
            self._window[f"{name}.sum"] = torch.zeros(tuple(value.shape), dtype=torch.float64)
            self._window[f"{name}.n"] = torch.zeros(tuple(value.shape), dtype=torch.float64)
        # where(), not a product: an uncovered entry may be NaN (a variance of nothing) and must not leak.
        self._add(f"{name}.sum", torch.where(covered, value.detach().to(torch.float64), 0.0))
        self._add(f"{name}.n", covered.to(torch.float64))

    def summarize(self, step: int) -> DomainStats:
        """Close the window: reduce across ranks, update moving averages, reset, return the statistics."""
        keys = sorted(self._window)
        packed = torch.cat([self._window[key].flatten().cpu() for key in keys])  # the window's host copy
        all_reduce_sum(packed)
        totals: dict[str, Tensor] = {}
        offset = 0
        for key in keys:
            n = self._window[key].numel()
            totals[key] = packed[offset : offset + n].view_as(self._window[key])
            offset += n
        # (row, window value, entries it observes) for every statistic present in this window.
        window: list[tuple[Statistic, Tensor, Tensor]] = []
        fields: dict[str, Tensor | None] = {}
        for row in self._table.values():
            reduced = _reduce(row, totals, self._k)
            if reduced is None:
                fields[row.name] = torch.zeros(row.dims(self._k), dtype=torch.float64) if row.always else None
            elif row.reduction == "count":  # counts are the window's own, never averaged
                fields[row.name] = reduced[0].clone()
            else:
                window.append((row, *reduced))
        observed: dict[str, Tensor] = {}  # of the estimates (a loss stream's unobserved entry has count 0)
        for row, value, seen in window:
            fields[row.name], known = self._average(row.name, value, seen)
            if row.reduction == "estimate":
                observed[row.name] = known
        self.reset()
        return DomainStats(step=int(step), observed=observed, **fields)  # type: ignore[arg-type]

    def _average(self, name: str, value: Tensor, seen: Tensor) -> tuple[Tensor, Tensor]:
        """Fold a window value into its moving average (if enabled) for the finite entries seen.

        Returns the value and the entries it measured: those seen in this window or, with a moving
        average, in an earlier one. A seen entry that is NaN or inf is returned as it is: the average
        must not hide the failure.
        """
        if self._ema is None:
            return value, seen
        finite = torch.isfinite(value)
        returned_raw = seen & ~finite
        seen = seen & finite
        previous = self._averages.get(name)
        if previous is None:
            updated = torch.where(seen, value, torch.zeros_like(value))
            known = seen.clone()
        else:
            # on the value's device: a state saved from (or loaded to) another device resumes here
            old, known = previous[0].to(value.device), previous[1].to(value.device).bool()
            blended = torch.where(known, self._ema * old + (1 - self._ema) * value, value)
            updated = torch.where(seen, blended, old)
            known = known | seen
        self._averages[name] = torch.stack([updated, known.to(updated.dtype)])
        return torch.where(returned_raw, value, updated), known | returned_raw

    def state_dict(self) -> dict[str, Any]:
        """Window sums and moving averages, as plain CPU tensors (a checkpoint loads on any machine)."""
        return self._copied(lambda value: value.detach().to("cpu", copy=True))

    def _snapshot(self) -> dict[str, Any]:
        """:meth:`state_dict` with the window left on its device: a per-step undo point, no host copy."""
        return self._copied(lambda value: value.clone())

    def _copied(self, copy: Callable[[Tensor], Tensor]) -> dict[str, Any]:
        return {
            self.NUM_DOMAINS_KEY: self._k,
            self.EMA_KEY: self._ema,
            self.WINDOW_KEY: {key: copy(value) for key, value in self._window.items()},
            self.AVERAGES_KEY: {key: copy(value) for key, value in self._averages.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the number of domains and the EMA setting must match."""
        keys = (self.NUM_DOMAINS_KEY, self.EMA_KEY, self.WINDOW_KEY, self.AVERAGES_KEY)
        check_state_keys("StatsCollector", state_dict, keys)
        if state_dict[self.NUM_DOMAINS_KEY] != self._k or state_dict[self.EMA_KEY] != self._ema:
            raise ValueError(
                "StatsCollector.load_state_dict: the state was saved with "
                f"num_domains={state_dict[self.NUM_DOMAINS_KEY]}, ema={state_dict[self.EMA_KEY]}; "
                f"this collector has num_domains={self._k}, ema={self._ema}."
            )
        # Everything is checked before anything is assigned: a corrupt state leaves the collector as it was.
        saved = state_dict[self.WINDOW_KEY]
        if not isinstance(saved, Mapping):
            raise _load_error(self.WINDOW_KEY, None, "a mapping of window entries", type(saved).__name__)
        window = {key: _loaded(self.WINDOW_KEY, key, value) for key, value in saved.items()}
        # A state saved before a source or statistic was declared resumes with an empty window for it.
        for key in set(self._window) - set(window):
            window[key] = torch.zeros_like(self._window[key])
        if set(window) != set(self._window):
            unknown = sorted(set(window) - set(self._window))
            raise _load_error(self.WINDOW_KEY, None, "this version's window entries", f"unknown {unknown}")
        for name in self._estimates:
            sums, n = window[f"{name}.sum"], window[f"{name}.n"]
            if n.shape != sums.shape and n.numel() == 1:  # saved when one count covered every entry
                window[f"{name}.n"] = n.expand(sums.shape).clone()
        task = {
            f"{name}.{part}"
            for name, row in self._estimates.items()
            if row.has_task_axis
            for part in ("sum", "n")
        }
        for key, value in window.items():  # a task axis takes its shape from the saved estimates
            if key not in task and value.shape != self._window[key].shape:
                wanted = f"of shape {tuple(self._window[key].shape)}"
                raise _load_error(self.WINDOW_KEY, key, wanted, f"shape {tuple(value.shape)}")
        averages = state_dict[self.AVERAGES_KEY]
        if not isinstance(averages, Mapping):
            raise _load_error(
                self.AVERAGES_KEY, None, "a mapping of moving averages", type(averages).__name__
            )
        loaded = {}
        for key, value in averages.items():
            if key not in self._table:
                raise _load_error(self.AVERAGES_KEY, key, f"a statistic's name {sorted(self._table)}", key)
            average = loaded[key] = _loaded(self.AVERAGES_KEY, key, value)
            if average.ndim < 2 or average.shape[0] != 2:  # (value, known) stacked
                raise _load_error(
                    self.AVERAGES_KEY, key, "a (2, ...) tensor", f"shape {tuple(average.shape)}"
                )
        self._window, self._averages = window, loaded


def _load_error(section: str, key: str | None, wanted: str, got: Any) -> ValueError:
    where = f"state[{section!r}]" + ("" if key is None else f"[{key!r}]")
    return ValueError(f"StatsCollector.load_state_dict: {where} must be {wanted}. Got {got!r} instead.")


def _loaded(section: str, key: str, value: Any) -> Tensor:
    """A saved entry as a float64 tensor (a copy, on the device it was loaded on)."""
    try:
        return torch.as_tensor(value, dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError):
        raise _load_error(section, key, "a tensor of numbers", type(value).__name__) from None


_PARTS = ("sum", "count", "sum_sq")  # a loss stream's window, in DomainLosses' field order


def _reduce(row: Statistic, totals: Mapping[str, Tensor], k: int) -> tuple[Tensor, Tensor] | None:
    """A statistic's window value and the entries it observed, or None when the window has none.

    The reduction rules of the statistics table (``domainmix/_statistics.py``): a loss stream's pooled
    mean, unbiased variance (an entry needs two elements) or count; an estimate's mean, entry by
    entry, over the estimates that covered the entry.
    """
    if row.reduction == "estimate":
        n = totals[f"{row.name}.n"]
        if not bool((n > 0).any()):
            return None
        seen = n > 0
        # an entry no estimate covered is 0 (an absent domain's product), not 0/0
        return torch.where(seen, totals[f"{row.name}.sum"] / n.clamp_min(1.0), 0.0), seen
    src = row.source
    reduced = DomainLosses(totals[f"{src}.sum"], totals[f"{src}.count"], totals[f"{src}.sum_sq"])
    if not bool((reduced.count > 0).any()):
        return None
    if row.reduction == "mean":
        return reduced.mean, reduced.count > 0
    if row.reduction == "variance":
        return reduced.var, reduced.count > 1
    return reduced.count, reduced.count > 0
