"""The table of per-domain statistics: one declaration per statistic, everything else derives from it.

A row says what a statistic is called, its shape over the k domains, where its observations come from
(a *source*: a stream of per-domain loss reductions, or a probe that estimates it) and how the
observations of a window reduce across micro-batches and ranks. :class:`~domainmix.types.DomainStats`,
the :class:`~domainmix.stats.StatsCollector`, the strategies' shape checks, the probes'
``provides`` and the README's table all read this one table. Adding a statistic is one
:func:`register_statistic` call (or one row in ``_BUILTIN`` below) plus the code that observes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

Reduction = Literal["mean", "variance", "count", "estimate"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
# Reductions computed from a loss stream's (sum, count, sum of squares); "estimate" rows average the
# finished estimates a probe hands in (one per micro-batch or window).
LOSS_REDUCTIONS: frozenset[str] = frozenset({"mean", "variance", "count"})
# "k" is the domain axis; "t" the target-task axis of DIDS's statistics (its length is the number of tasks,
# fixed by the first estimate of a window rather than by the table).
SHAPES: tuple[tuple[str, ...], ...] = (("k",), ("k", "k"), ("t",), ("k", "t"))
# DomainStats' own members (a statistic of one of these names could not be read as an attribute) and the
# keyword its constructor and replace() take besides the statistics.
RESERVED: frozenset[str] = frozenset(
    {
        "step", "fields", "get", "items", "replace", "as_dict", "num_domains", "present", "is_finite",
        "observed_entries", "observed",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Statistic:
    """One per-domain statistic a strategy can read.

    Attributes:
        name: the field name in :class:`~domainmix.types.DomainStats` (a Python identifier).
        shape: ``("k",)`` for one value per domain, ``("k", "k")`` for a matrix over domain pairs,
            ``("t",)`` for one value per target task or ``("k", "t")`` for a matrix over (domain, task).
        source: where the observations come from. For the loss reductions (``mean``, ``variance``,
            ``count``) it names a loss stream fed by ``StatsCollector.observe(losses, source=...)``;
            for ``estimate`` it names the probe kind that hands the estimates in.
        reduction: how a window's observations combine, across micro-batches and ranks alike:
            ``mean`` Σ sum / Σ count per domain (0 where the count is 0); ``variance`` the unbiased
            per-example variance from the pooled sums of values and squares (0 where the count is < 2);
            ``count`` Σ count; ``estimate`` the mean of the estimates handed in.
        doc: one line for the README table and the docs.
        always: present in every window (zeros when nothing was observed) instead of ``None``.
    """

    name: str
    shape: tuple[str, ...]
    source: str
    reduction: Reduction
    doc: str
    always: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.name.isidentifier() or self.name.startswith("_") or self.name in RESERVED:
            problems.append(
                f"'name' must be a public identifier, none of {sorted(RESERVED)}. Got {self.name!r} instead."
            )
        if self.shape not in SHAPES:
            problems.append(f"'shape' must be one of {list(SHAPES)}. Got {self.shape!r} instead.")
        if not self.source.isidentifier():
            problems.append(f"'source' must be an identifier. Got {self.source!r} instead.")
        if self.reduction not in REDUCTIONS:
            problems.append(f"'reduction' must be one of {list(REDUCTIONS)}. Got {self.reduction!r} instead.")
        elif self.reduction in LOSS_REDUCTIONS and self.shape != ("k",):
            problems.append(f"a {self.reduction!r} statistic has shape ('k',). Got {self.shape!r} instead.")
        if problems:
            raise ValueError("Statistic: " + " ".join(problems))

    def dims(self, k: int, t: int | None = None) -> tuple[int, ...]:
        """The tensor shape for k domains (and t tasks), e.g. (k,), (k, k) or (k, t).

        Raises:
            ValueError: for a statistic with a task axis when ``t`` is None.
        """
        if self.has_task_axis and t is None:
            raise ValueError(f"Statistic {self.name!r} has a task axis: dims needs the number of tasks t.")
        return tuple(k if axis == "k" else int(t or 0) for axis in self.shape)

    @property
    def has_task_axis(self) -> bool:
        """Whether one of the axes is the target-task axis ``"t"``."""
        return "t" in self.shape

    def fits(self, shape: tuple[int, ...], k: int) -> bool:
        """Whether ``shape`` is this statistic's for k domains (a task axis takes any length >= 1)."""
        return len(shape) == len(self.shape) and all(
            n == k if axis == "k" else n >= 1 for axis, n in zip(self.shape, shape, strict=True)
        )

    def describe(self, k: int) -> str:
        """The expected shape for k domains as text, e.g. ``(4, 4)`` or ``(4, t)``."""
        sizes = [str(k) if axis == "k" else "t" for axis in self.shape]
        return "(" + ", ".join(sizes) + (",)" if len(sizes) == 1 else ")")


_BUILTIN: tuple[Statistic, ...] = (
    Statistic("loss", ("k",), "train", "mean", "mean training loss per domain over the window", always=True),
    Statistic("count", ("k",), "train", "count", "training examples (or tokens) per domain", always=True),
    Statistic("loss_var", ("k",), "train", "variance", "unbiased variance of the per-example training loss"),
    Statistic("ref_loss", ("k",), "reference", "mean", "a reference model's mean loss on the same examples"),
    Statistic("heldout_loss", ("k",), "heldout", "mean", "mean loss on a held-out estimation split"),
    Statistic("heldout_loss_var", ("k",), "heldout", "variance", "variance of the per-example held-out loss"),
    Statistic("heldout_count", ("k",), "heldout", "count", "held-out examples (or tokens) per domain"),
    Statistic(
        "grad_var", ("k",), "gradient_variance", "estimate", "within-domain gradient variance tr Cov_i[∇ℓ]"
    ),
    Statistic(
        "grad_sq_norm", ("k",), "gradient_products", "estimate", "squared norm of each domain's mean gradient"
    ),
    Statistic("grad_dot", ("k", "k"), "gradient_products", "estimate", "inner products ⟨g_i, g_j⟩"),
    Statistic(
        "target_grad_dot",
        ("k",),
        "target_gradient_products",
        "estimate",
        "⟨g_i, g_target⟩ against a target gradient",
    ),
    Statistic("excess_loss", ("k",), "excess", "mean", "mean per-token clipped excess max(ℓ − ℓ_ref, 0)"),
    Statistic("fisher_cross", ("k", "t"), "fisher_products", "estimate", "g_iᵀ F h_j (F: diagonal Fisher)"),
    Statistic("fisher_domain_sq", ("k",), "fisher_products", "estimate", "g_iᵀ F g_i, domain mean gradients"),
    Statistic("fisher_task_sq", ("t",), "fisher_products", "estimate", "h_jᵀ F h_j, task mean gradients"),
    Statistic("task_loss", ("t",), "task_loss", "estimate", "mean loss on each target task's examples"),
)

_REGISTRY: dict[str, Statistic] = {s.name: s for s in _BUILTIN}


def register_statistic(statistic: Statistic) -> Statistic:
    """Add a statistic to the table (idempotent for an identical row); returns it.

    Register before building the collectors and strategies that use it: a collector lays out its
    window from the table as it is when the collector is made.

    Raises:
        ValueError: when another statistic of that name is already declared.
    """
    if not isinstance(statistic, Statistic):
        raise ValueError(f"register_statistic expects a Statistic. Got {statistic!r} instead.")
    known = _REGISTRY.get(statistic.name)
    if known is not None and known != statistic:
        raise ValueError(
            f"register_statistic: a different statistic {statistic.name!r} is already declared: {known}."
        )
    _REGISTRY[statistic.name] = statistic
    return statistic


def statistics() -> Mapping[str, Statistic]:
    """The table as it is now, by name, in declaration order (a copy)."""
    return dict(_REGISTRY)


def statistic(name: str) -> Statistic:
    """The row for ``name``.

    Raises:
        ValueError: for an undeclared name, listing the declared ones.
    """
    found = _REGISTRY.get(name)
    if found is None:
        raise ValueError(f"Unknown statistic {name!r}; declared: {list(_REGISTRY)}.")
    return found


def domain_axis_masks(axes: Sequence[str], mask: Tensor, shape: Sequence[int]) -> list[Tensor]:
    """The (k,) per-domain ``mask`` shaped to broadcast along each domain axis of a statistic.

    ``axes`` is the statistic's ``shape`` (``("k", "k")``, say) and ``shape`` its value's; an axis counts
    when it is a ``"k"`` axis of length k. Callers combine the masks: any axis (an entry touching a
    domain) or every axis (an entry whose domains all qualify).
    """
    k = mask.shape[0]
    return [
        mask.reshape([k if a == axis else 1 for a in range(len(shape))])
        for axis, kind in enumerate(axes)
        if kind == "k" and shape[axis] == k
    ]


def sources(table: Mapping[str, Statistic], reductions: frozenset[str]) -> tuple[str, ...]:
    """The distinct sources of the rows with one of ``reductions``, in declaration order."""
    return tuple(dict.fromkeys(s.source for s in table.values() if s.reduction in reductions))


def provided_by(source_names: tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """Names of the statistics whose source is one of ``source_names``."""
    return frozenset(s.name for s in _REGISTRY.values() if s.source in source_names)


# The probes of the library by the sources they feed, for the hint of how_to_observe (a class may feed
# several sources; GradientProductProbe feeds target_gradient_products only when given a target).
_PROBES: Mapping[str, str] = {
    "heldout": "HeldoutLossProbe",
    "reference": "ReferenceLossProbe",
    "excess": "ReferenceLossProbe",
    "gradient_variance": "GradientVarianceProbe",
    "gradient_products": "GradientProductProbe",
    "target_gradient_products": "GradientProductProbe(..., target=...)",
    "fisher_products": "FisherProductProbe",
    "task_loss": "FisherProductProbe",
}


def how_to_observe(name: str) -> str:
    """How a window comes to hold the statistic ``name``, as a sentence for error messages.

    Derived from the row's source and reduction: a loss-stream statistic is fed by
    ``StatsCollector.observe(losses, source=...)`` (``train`` by ``controller.step``), an estimate by
    ``StatsCollector.observe_stat(name, ...)``; both name the library's probe for the source, if any.
    """
    row = statistic(name)
    probe = _PROBES.get(row.source)
    by_probe = (
        f"a {probe} or another probe of source {row.source!r}"
        if probe
        else (f"a probe of source {row.source!r}")
    )
    if row.reduction == "estimate":
        call = f"StatsCollector.observe_stat({name!r}, value)"
    elif row.source == "train":
        return (
            "pass the training losses to controller.step(losses, domain_ids) (or feed "
            "StatsCollector.observe(domain_losses(...), source='train'))"
        )
    else:
        call = f"StatsCollector.observe(domain_losses(...), source={row.source!r})"
    return f"give the controller {by_probe}, or feed its collector with {call}"


def markdown_table() -> str:
    """The README's table of statistics, generated from the declarations."""
    lines = ["| statistic | shape | source | reduction | meaning |", "|---|---|---|---|---|"]
    for s in _REGISTRY.values():
        shape = "(" + ", ".join(s.shape) + (",)" if len(s.shape) == 1 else ")")
        lines.append(f"| `{s.name}` | {shape} | {s.source} | {s.reduction} | {s.doc} |")
    return "\n".join(lines)
