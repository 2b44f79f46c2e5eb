r"""Paired differences over seeds, with a Student-t interval: can an experiment tell two methods apart?

Two methods run on the same seeds (same initialisation and sampler stream per seed) give paired results
a_s, b_s. The difference d_s = a_s − b_s removes what the seed does to both; its mean has the interval

.. math:: \bar d \pm t_{n-1,\,(1+c)/2}\; s_d / \sqrt{n},

and the methods are *distinguishable* at confidence c when that interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from domainmix._validation import Interval, check_param, param_error


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a − b over paired seeds and its confidence interval.

    Attributes:
        mean: the mean difference.
        low: lower end of the interval.
        high: upper end of the interval.
        n: number of pairs.
        confidence: the interval's level, e.g. 0.95.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def distinguishable(self) -> bool:
        """True when the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | int | bool]:
        """Plain JSON-able form."""
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "confidence": self.confidence,
            "distinguishable": self.distinguishable,
        }


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """The mean of a_s − b_s over pairs and its Student-t interval (needs scipy for the quantile).

    Args:
        a: one method's results, one per seed.
        b: the other's, on the same seeds in the same order.
        confidence: level of the interval, in (0, 1).

    Raises:
        ValueError: for sequences of different lengths, fewer than two pairs, or non-finite values.
    """
    check_param("paired_difference", "confidence", confidence, Interval(float, 0.0, 1.0, closed="neither"))
    if len(a) != len(b) or len(a) < 2:
        raise param_error(
            "paired_difference", "b", f"as many values as a ({len(a)}), at least two pairs", list(b)
        )
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    if not all(math.isfinite(v) for v in d):
        raise param_error("paired_difference", "a", "finite values (and b too)", list(a))
    from scipy.stats import t  # an optional dependency of the experiments

    n = len(d)
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (n - 1))
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, confidence)


def paired_to_uniform(tables: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Every weighting's paired difference to ``uniform`` over seeds, as JSON-ready dicts.

    Args:
        tables: one ``comparison.json`` table per seed (``{label: {"log_<name>": value, ...}}``), the
            labels the same in every table; the same seed pairs the rows of one table.
        names: the metrics, e.g. ``("average", "worst")`` or with ``"target"``.

    Returns:
        ``{label: {name: PairedDifference.as_dict()}}`` for every label but ``uniform``.
    """
    return {
        label: {
            name: paired_difference(
                [float(t[label][f"log_{name}"]) for t in tables],
                [float(t["uniform"][f"log_{name}"]) for t in tables],
            ).as_dict()
            for name in names
        }
        for label in tables[0]
        if label != "uniform"
    }
