"""Accumulate per-domain statistics over an update window, across micro-batches and ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from domainmix._distributed import all_reduce_sum
from domainmix._validation import Interval, Options, check_param, param_error
from domainmix.losses import DomainLosses
from domainmix.types import DomainStats

Source = Literal["train", "heldout", "reference", "excess"]
_SOURCES: tuple[str, ...] = ("train", "heldout", "reference", "excess")
# Statistics that arrive as finished estimates (e.g. from a gradient probe) and are averaged.
_ESTIMATES: dict[str, tuple[str, ...]] = {
    "grad_var": ("k",),
    "grad_sq_norm": ("k",),
    "grad_dot": ("k", "k"),
    "target_grad_dot": ("k",),
}


class StatsCollector:
    """Per-domain statistics of an update window: loss sums, counts, squares and gradient estimates.

    Feed it :func:`~domainmix.losses.domain_losses` reductions of every micro-batch (``observe``) and any
    gradient estimates (``observe_stat``); ``summarize`` closes the window and returns a
    :class:`~domainmix.types.DomainStats`. Under an initialised ``torch.distributed`` process group,
    ``summarize`` all-reduces the window's sums once (one packed tensor), so every rank returns the same
    statistics; it is then a collective and every rank must call it.

    With ``ema=β``, each returned mean is an exponential moving average over windows,
    m ← β m + (1 − β) x, updated only for domains seen in the window (the first sighting initialises
    it, so there is no bias towards zero). A window with a NaN or inf statistic is returned as is (the
    controller skips it) but never folded into the moving averages.

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
        self._k = check_param("StatsCollector", "num_domains", num_domains, Interval(int, 1, None))
        self._ema = check_param("StatsCollector", "ema", ema, Interval(float, 0.0, 1.0, closed="left"), None)
        self._averages: dict[str, Tensor] = {}
        self.reset()

    @property
    def num_domains(self) -> int:
        """K."""
        return self._k

    def reset(self) -> None:
        """Discard the current window (moving averages are kept)."""
        zeros = torch.zeros(self._k, dtype=torch.float64)
        self._window: dict[str, Tensor] = {}
        for source in _SOURCES:
            for part in ("sum", "count", "sum_sq"):
                self._window[f"{source}.{part}"] = zeros.clone()
        for name, shape in _ESTIMATES.items():
            self._window[f"{name}.sum"] = torch.zeros(*(self._k for _ in shape), dtype=torch.float64)
            self._window[f"{name}.n"] = torch.zeros(1, dtype=torch.float64)

    def observe(self, losses: DomainLosses, *, source: Source = "train") -> None:
        """Add one reduction (a micro-batch) to the window.

        Args:
            losses: output of :func:`~domainmix.losses.domain_losses`.
            source: ``"train"`` (training batches), ``"heldout"`` (an estimation split, FGLS/ERMA),
                ``"reference"`` (a reference model's losses on the training batch) or ``"excess"``
                (the per-token clipped excess ``(loss - ref_loss).clamp_min(0)`` on the training batch,
                DoReMi's statistic: clip per token first, then reduce).
        """
        check_param("StatsCollector.observe", "source", source, Options(_SOURCES))
        if not isinstance(losses, DomainLosses) or losses.sum.shape != (self._k,):
            raise param_error(
                "StatsCollector.observe", "losses", f"a DomainLosses over {self._k} domains", losses
            )
        for part, value in zip(("sum", "count", "sum_sq"), losses, strict=True):
            self._window[f"{source}.{part}"] += value.detach().to("cpu", torch.float64)

    def observe_stat(self, name: str, value: Tensor) -> None:
        """Add an estimate of a gradient statistic; the window reports the mean of its estimates.

        Args:
            name: one of ``grad_var``, ``grad_sq_norm``, ``target_grad_dot`` (shape (k,)) or ``grad_dot``
                (shape (k, k)).
            value: the estimate.
        """
        check_param("StatsCollector.observe_stat", "name", name, Options(tuple(_ESTIMATES)))
        shape = tuple(self._k for _ in _ESTIMATES[name])
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            raise param_error(
                "StatsCollector.observe_stat", "value", f"a tensor of shape {shape} for {name!r}", value
            )
        self._window[f"{name}.sum"] += value.detach().to("cpu", torch.float64)
        self._window[f"{name}.n"] += 1.0

    def summarize(self, step: int) -> DomainStats:
        """Close the window: reduce across ranks, update moving averages, reset, return the statistics."""
        keys = sorted(self._window)
        packed = torch.cat([self._window[key].flatten() for key in keys])
        all_reduce_sum(packed)
        totals: dict[str, Tensor] = {}
        offset = 0
        for key in keys:
            n = self._window[key].numel()
            totals[key] = packed[offset : offset + n].view_as(self._window[key])
            offset += n
        # (name, window value, domains it observes) for every statistic present in this window.
        window: list[tuple[str, Tensor, Tensor]] = []
        absent: list[str] = []
        for source, mean_name, var_name in (
            ("train", "loss", "loss_var"),
            ("heldout", "heldout_loss", "heldout_loss_var"),
            ("reference", "ref_loss", None),
            ("excess", "excess_loss", None),
        ):
            reduced = DomainLosses(
                totals[f"{source}.sum"], totals[f"{source}.count"], totals[f"{source}.sum_sq"]
            )
            seen = reduced.count > 0
            names = [mean_name] if var_name is None else [mean_name, var_name]
            if not bool(seen.any()):
                absent.extend(names)
                continue
            window.append((mean_name, reduced.mean, seen))
            if var_name is not None:
                # A variance needs two elements; one element is no observation of it.
                window.append((var_name, reduced.var, reduced.count > 1))
        for name in _ESTIMATES:
            n = float(totals[f"{name}.n"])
            if n > 0:
                window.append((name, totals[f"{name}.sum"] / n, torch.ones(self._k, dtype=torch.bool)))
            else:
                absent.append(name)
        # One non-finite statistic makes the whole window unusable (the controller skips it): fold none of
        # its statistics into the moving averages, not only the broken one.
        clean = all(bool(torch.isfinite(value[seen]).all()) for _, value, seen in window)
        fields: dict[str, Tensor | None] = dict.fromkeys(absent)
        for name, value, seen in window:
            fields[name] = self._average(name, value, seen) if clean else value
        held = totals["heldout.count"]
        fields["heldout_count"] = held.clone() if bool((held > 0).any()) else None
        count = totals["train.count"].clone()
        loss = fields.pop("loss")
        self.reset()
        return DomainStats(
            step=int(step),
            loss=loss if loss is not None else torch.zeros(self._k, dtype=torch.float64),
            count=count,
            **fields,
        )

    def _average(self, name: str, value: Tensor, seen: Tensor) -> Tensor:
        """Fold a window value into its moving average (if enabled) for the domains seen."""
        if self._ema is None:
            return value
        previous = self._averages.get(name)
        if value.ndim == 2:  # grad_dot: the whole matrix is one estimate
            seen = torch.ones_like(value, dtype=torch.bool)
        if previous is None:
            updated = torch.where(seen, value, torch.zeros_like(value))
            known = seen.clone()
        else:
            old, known = previous[0], previous[1].bool()
            blended = torch.where(known, self._ema * old + (1 - self._ema) * value, value)
            updated = torch.where(seen, blended, old)
            known = known | seen
        self._averages[name] = torch.stack([updated, known.to(updated.dtype)])
        return updated.clone()

    def state_dict(self) -> dict[str, Any]:
        """Window sums and moving averages, as plain tensors."""
        return {
            self.NUM_DOMAINS_KEY: self._k,
            self.EMA_KEY: self._ema,
            self.WINDOW_KEY: {key: value.clone() for key, value in self._window.items()},
            self.AVERAGES_KEY: {key: value.clone() for key, value in self._averages.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the number of domains and the EMA setting must match."""
        missing = [
            key
            for key in (self.NUM_DOMAINS_KEY, self.EMA_KEY, self.WINDOW_KEY, self.AVERAGES_KEY)
            if key not in state_dict
        ]
        if missing:
            raise ValueError(f"StatsCollector.load_state_dict: state is missing keys {missing}.")
        if state_dict[self.NUM_DOMAINS_KEY] != self._k or state_dict[self.EMA_KEY] != self._ema:
            raise ValueError(
                "StatsCollector.load_state_dict: the state was saved with "
                f"num_domains={state_dict[self.NUM_DOMAINS_KEY]}, ema={state_dict[self.EMA_KEY]}; "
                f"this collector has num_domains={self._k}, ema={self._ema}."
            )
        window = dict(state_dict[self.WINDOW_KEY])
        # States saved before the "excess" source existed resume with an empty excess window.
        for key in set(self._window) - set(window):
            if key.startswith("excess."):
                window[key] = torch.zeros_like(self._window[key])
        if set(window) != set(self._window):
            raise ValueError("StatsCollector.load_state_dict: window keys differ from this version's.")
        self._window = {
            key: torch.as_tensor(value, dtype=torch.float64).clone() for key, value in window.items()
        }
        self._averages = {
            key: torch.as_tensor(value, dtype=torch.float64).clone()
            for key, value in state_dict[self.AVERAGES_KEY].items()
        }
