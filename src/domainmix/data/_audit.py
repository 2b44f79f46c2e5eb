"""Line overlap between a corpus's held-out splits and its training splits, with the limits a build obeys.

For a held-out domain ``a`` and a training domain ``b``, the overlap is the share of ``a``'s held-out
lines (normalised and at least 20 characters long, see :func:`~domainmix.data._clean.line_keys`; every
occurrence counts) that occur anywhere in ``b``'s train split. One set of ``b``'s train lines per domain,
one look-up per held-out line: about a second for a 3 MB-per-domain corpus.

A pair fails when the overlap is above its limit beyond sampling noise: when the lower end of the 95 %
Wilson interval of ``shared / lines`` is above the limit. On a 3 MB corpus (thousands of held-out lines)
that is the rate itself give or take a point; on a 32 KB test fixture (a few dozen lines) one shared
boilerplate paragraph is not taken for a leak, while a copied document (rate near 1) still fails. The
limits and why they are what they are: ``docs/algorithms.md`` §4.1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from domainmix.data._clean import MIN_LINE_CHARS, line_keys

__all__ = [
    "CROSS_DOMAIN_LIMIT",
    "DEFAULT_LIMIT",
    "HELD_OUT",
    "NORMALISATION",
    "SAME_DOMAIN_LIMITS",
    "Overlap",
    "format_overlaps",
    "limit_for",
    "overlap_error",
    "overlaps",
    "overlaps_json",
]

HELD_OUT = ("validation", "test")
NORMALISATION = (
    f"each line stripped, whitespace runs collapsed to one space, case-folded; lines under "
    f"{MIN_LINE_CHARS} characters ignored; every held-out occurrence counts"
)
# Held-out lines found in the same domain's train split. Code and legal text repeat idioms (`def
# __init__(self, *args, **kwargs):`, warranty disclaimers) in documents that are not copies of each other,
# so their limits sit above the rates measured on the deduplicated corpus with room for the sampling
# noise of a small test split; prose and generated problems have nothing that should recur.
SAME_DOMAIN_LIMITS: Mapping[str, float] = {
    "code": 0.15,
    "docs": 0.05,
    "drama": 0.02,
    "scripture": 0.02,
    "legal": 0.12,
    "math": 0.0,  # every problem is generated once: any shared line is a bug
}
_Z = 1.959963984540054  # the two-sided 95 % normal quantile
DEFAULT_LIMIT = 0.05  # a domain without its own limit (a custom source)
CROSS_DOMAIN_LIMIT = 0.02  # different domains share no documents; a higher rate means copied text


@dataclass(frozen=True)
class Overlap:
    """How much of one domain's held-out split occurs in one domain's train split.

    Attributes:
        split: the held-out split, ``"validation"`` or ``"test"``.
        held_out: the domain whose held-out split is checked.
        train: the domain whose train split is searched.
        lines: the held-out split's long normalised lines (every occurrence).
        shared: how many of them occur in the train split.
        limit: the largest rate a build accepts for this pair.
    """

    split: str
    held_out: str
    train: str
    lines: int
    shared: int
    limit: float

    @property
    def rate(self) -> float:
        """``shared / lines`` (0 for a split without long lines)."""
        return self.shared / self.lines if self.lines else 0.0

    @property
    def lower_bound(self) -> float:
        """The lower end of the 95 % Wilson score interval of :attr:`rate` (0 when nothing is shared)."""
        if not self.shared:
            return 0.0
        z2, n, p = _Z * _Z, self.lines, self.rate
        centre = p + z2 / (2 * n)
        margin = _Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
        return max(0.0, (centre - margin) / (1 + z2 / n))

    @property
    def exceeded(self) -> bool:
        """The rate is above the limit beyond sampling noise: :attr:`lower_bound` ``> limit``."""
        return self.lower_bound > self.limit


def limit_for(held_out: str, train: str) -> float:
    """The largest overlap a build accepts between these two domains (see :data:`SAME_DOMAIN_LIMITS`)."""
    if held_out != train:
        return CROSS_DOMAIN_LIMIT
    return SAME_DOMAIN_LIMITS.get(held_out, DEFAULT_LIMIT)


def overlaps(
    train: Mapping[str, str], held_out: Mapping[str, Mapping[str, str]], splits: Sequence[str] = HELD_OUT
) -> list[Overlap]:
    """Every (held-out domain, train domain) overlap, for each of ``splits``.

    Args:
        train: domain -> its train split's text.
        held_out: split name -> domain -> that split's text.
        splits: which held-out splits to check, in order.

    Returns:
        One :class:`Overlap` per split, held-out domain and train domain, in that nesting order.
    """
    train_lines = {domain: set(line_keys(text)) for domain, text in train.items()}
    rows = []
    for split in splits:
        for domain, text in held_out[split].items():
            keys = list(line_keys(text))
            for other, seen in train_lines.items():
                shared = sum(key in seen for key in keys)
                rows.append(Overlap(split, domain, other, len(keys), shared, limit_for(domain, other)))
    return rows


def overlap_error(row: Overlap) -> str:
    """The refusal for one pair above its limit, in the library's one message shape."""
    return (
        f"The overlap of the {row.held_out!r} {row.split} split with the {row.train!r} train split must "
        f"be at most {row.limit:.1%} (docs/algorithms.md §4.1). Got {row.rate:.1%} ({row.shared:,} of "
        f"{row.lines:,} lines; 95 % interval from {row.lower_bound:.1%}) instead."
    )


def format_overlaps(rows: Sequence[Overlap]) -> str:
    """One table per held-out split: rows are held-out domains, columns training domains, cells rates.

    A cell above its limit is marked ``!``, or ``~`` when only its point estimate is (within sampling
    noise, see the module docstring); the limits are printed under the tables.
    """
    blocks = []
    for split in dict.fromkeys(row.split for row in rows):
        chosen = [row for row in rows if row.split == split]
        columns = list(dict.fromkeys(row.train for row in chosen))
        corner = f"{split} \\ train"
        header = f"{corner:<18}{'lines':>8}" + "".join(f"{c:>11}" for c in columns)
        lines = [header]
        for domain in dict.fromkeys(row.held_out for row in chosen):
            cells = {row.train: row for row in chosen if row.held_out == domain}
            text = "".join(f"{cells[c].rate:>10.2%}{_mark(cells[c])}" for c in columns)
            lines.append(f"{domain:<18}{cells[columns[0]].lines:>8,}{text}")
        blocks.append("\n".join(lines))
    domains = dict.fromkeys(row.held_out for row in rows)
    limits = ", ".join(f"{d} {limit_for(d, d):.0%}" for d in domains)
    blocks.append(
        f"limits: same domain: {limits}; across domains {CROSS_DOMAIN_LIMIT:.0%} ('!' = above, '~' = "
        "above within sampling noise: the 95 % interval reaches the limit).\n"
        f"lines: {NORMALISATION}."
    )
    return "\n\n".join(blocks)


def overlaps_json(rows: Sequence[Overlap]) -> dict[str, Any]:
    """A JSON-ready record: the normalisation, the limits and every pair with its rate."""
    return {
        "normalisation": NORMALISATION,
        "min_line_chars": MIN_LINE_CHARS,
        "rule": "a pair fails when the lower end of the 95 % Wilson interval of its rate is above its limit",
        "pairs": [
            {**asdict(row), "rate": row.rate, "lower_bound": row.lower_bound, "exceeded": row.exceeded}
            for row in rows
        ],
        "passed": not any(row.exceeded for row in rows),
    }


def _mark(row: Overlap) -> str:
    return "!" if row.exceeded else "~" if row.rate > row.limit else " "
