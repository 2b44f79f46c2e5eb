"""DIDS's impact- and trajectory-driven sampling ratios (Shi et al. 2025, arXiv:2504.13227, §3).

Reference-code choices and our deviations: ``docs/algorithms.md`` §5.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from domainmix._validation import Interval, Options, check_param, param_error
from domainmix.strategies._base import Strategy, make_strategy
from domainmix.types import DomainStats, DomainWeights

Impact = Literal["kl", "kernel", "inverted"]
_REQUIRES = frozenset({"loss", "count", "fisher_cross", "fisher_domain_sq", "fisher_task_sq", "task_loss"})


class DidsState(NamedTuple):
    """DIDS's state: the partition it belongs to and the last ``history`` task losses.

    Attributes:
        partition: the digest of the domain partition (``""`` when none was given).
        rounds: updates done so far.
        task_losses: (history, t) float64, the last task losses in time order, the newest in the last
            row; rows before the first round are zeros (only the last ``min(rounds, history)`` count).
    """

    partition: str
    rounds: int
    task_losses: Tensor  # (history, t)


def impact(cross: Tensor, domain_sq: Tensor, task_sq: Tensor, form: Impact = "kl") -> Tensor:
    r"""(k, t) DIDS's domain impact I_ij of training group i on task j, each column on the simplex.

    * ``"kl"`` (default, the paper's): the divergence between a step on group i and a step on task j,
      D_ij = ½ (Δ_i − Δ_j)ᵀ F (Δ_i − Δ_j) with Δ = −η ḡ, expanded from the products
      ½ η² (g_iᵀFg_i − 2 g_iᵀFh_j + h_jᵀFh_j); small is good, so

      .. math:: I_{ij} = \frac{\max_{i'} D_{i'j} - D_{ij}}{\sum_{i'} (\max_{i''} D_{i''j} - D_{i'j})}.

    * ``"kernel"``: the Fisher kernel K_ij = ½ η² g_iᵀ F h_j, a similarity (large is good), clipped at
      zero: I_ij = max(K_ij, 0) / Σ_i' max(K_i'j, 0).
    * ``"inverted"``: the reference code's choice, the kernel put through the divergence's
      normalisation, (max_i' K_i'j − K_ij) / Σ: the most task-aligned group gets impact 0. An ablation
      only (``docs/algorithms.md`` §5.3, D1).

    η and the scale of F cancel in every form. Where a column's denominator is 0 (every group equally
    far from the task) the impact is 1/k for every group.

    Args:
        cross: (k, t) g_iᵀ F h_j.
        domain_sq: (k,) g_iᵀ F g_i.
        task_sq: (t,) h_jᵀ F h_j.
        form: ``"kl"``, ``"kernel"`` or ``"inverted"``.
    """
    cross, domain_sq, task_sq = (x.to(torch.float64) for x in (cross, domain_sq, task_sq))
    if form == "kl":
        divergence = (0.5 * (domain_sq[:, None] - 2.0 * cross + task_sq[None, :])).clamp_min(0.0)
        score = divergence.max(0, keepdim=True).values - divergence
    elif form == "kernel":
        score = (0.5 * cross).clamp_min(0.0)
    else:
        kernel = 0.5 * cross
        score = kernel.max(0, keepdim=True).values - kernel
    total = score.sum(0, keepdim=True)
    equal = torch.full_like(score, 1.0 / score.shape[0])
    return torch.where(total > 0, score / torch.where(total > 0, total, 1.0), equal)


def potential(losses: Tensor, horizon: int = 5, min_points: int = 5) -> float:
    r"""The drop of a task's loss over the next ``horizon`` rounds predicted by an exponential fit.

    Fits L(x) = a e^{−bx} + c to the history L(0), …, L(n−1) with ``scipy.optimize.curve_fit``
    (start a = L(0) − L(n−1), b = 0.1, c = L(n−1), at most 2000 evaluations, as the reference code) and
    returns P = L(n−1) − L̂(n−1+horizon): the predicted improvement ``horizon`` rounds after the last
    observation (the reference code evaluates at n + 5, six rounds ahead: D11). With fewer than
    ``min_points`` observations, or when the fit fails or is not finite, P = 0: the utility then rests on
    the observed drop alone, rather than on the reference code's default of 1.0, which swamps observed
    drops of 0.01-0.1 (D5).

    Args:
        losses: (n,) the loss history, oldest first.
        horizon: rounds ahead, ≥ 1.
        min_points: observations needed to fit, ≥ 3 (three parameters).

    Raises:
        ImportError: when SciPy is missing (``pip install 'domainmix[experiments]'``).
    """
    y = [float(v) for v in losses.tolist()]
    n = len(y)
    if n < min_points or not all(math.isfinite(v) for v in y):
        return 0.0
    try:
        import numpy as np
        from scipy.optimize import OptimizeWarning, curve_fit  # type: ignore[import-untyped]
    except ImportError as error:  # pragma: no cover - scipy is in the test extra
        raise ImportError(
            "DIDS's loss-trajectory potential needs SciPy: pip install 'domainmix[experiments]'."
        ) from error

    def curve(x: Any, a: float, b: float, c: float) -> Any:
        return a * np.exp(-b * x) + c

    x = np.arange(n, dtype=np.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            fitted, _ = curve_fit(curve, x, np.asarray(y), p0=[y[0] - y[-1], 0.1, y[-1]], maxfev=2000)
    except (RuntimeError, ValueError):
        return 0.0
    predicted = float(curve(np.float64(n - 1 + horizon), *fitted))
    drop = y[-1] - predicted
    return drop if math.isfinite(drop) else 0.0


def dids(
    num_tasks: int,
    *,
    impact_form: Impact = "kl",
    decay: float = 0.5,
    utility_floor: float = 1e-7,
    min_weight: float = 0.0,
    parent_floor: float = 0.0,
    horizon: int = 5,
    min_history: int = 5,
    history: int = 25,
    partition: str | Any | None = None,
) -> Strategy:
    r"""DIDS: sampling ratios from each group's Fisher-guided impact on the target tasks and their progress.

    One update is one DIDS round. With the round's statistics (``fisher_cross`` g_iᵀFh_j,
    ``fisher_domain_sq`` g_iᵀFg_i, ``fisher_task_sq`` h_jᵀFh_j and ``task_loss`` L_j^(r), from
    :class:`~domainmix.stats.FisherProductProbe`) and the previous ratios p^(r−1):

    .. math::
        I_{ij} &= \text{impact}(D)_{ij} \quad (\text{see } \texttt{impact}), \\
        \Delta L_j &= L_j^{(r-1)} - L_j^{(r)}, \qquad
            P_j = L_j^{(r)} - \hat L_j(r + 5), \\
        U_i &= \frac{1}{m} \sum_j I_{ij} (\Delta L_j + P_j) / p_i^{(r-1)}, \qquad
            w_i = \max(U_i, \epsilon), \\
        p^{(r)} &= \beta\, p^{(r-1)} + (1 - \beta)\, w / \textstyle\sum_i w_i ,

    with L̂ the exponential fit of :func:`potential` (0 before ``min_history`` rounds). At the first
    round there is no drop yet and every task counts 1 (ΔL_j + P_j := 1): the impact alone, as the
    reference code's first round. The ratios set the sampling distribution, and the mixture follows it
    (α = q = p, plain resampling as in the paper).

    A group that the round's Fisher draw missed (its ``fisher_domain_sq`` entry or a ``fisher_cross``
    entry unobserved, :meth:`~domainmix.types.DomainStats.observed_entries`) has no products: they read
    0, which is not a measurement. Such a group keeps its share. The impact is computed over the drawn
    groups M alone (its columns are normalised over the groups), w / Σ w is taken over M and scaled by
    1 − Σ_{i ∉ M} p_i, and every other group's target is its p_i. With every group drawn this is the rule
    above.

    Damping: for fixed statistics the map is p ↦ βp + (1 − β) T(p) with T(p) ∝ s / p
    (s_i = Σ_j I_ij E_j), whose fixed point is p* ∝ √s. Near it T moves p's relative error by −1, so
    the damped map multiplies it by 2β − 1 per round: β = 0.2 (the reference code) flips the sign every
    round and decays by only 0.6; β ≥ 0.5 never oscillates, and β = 0.5 (default) reaches the fixed
    point in one round to first order.

    Args:
        num_tasks: m ≥ 1, the number of target tasks (the length of the statistics' task axis).
        impact_form: ``"kl"`` (default), ``"kernel"`` (clipped at 0) or ``"inverted"`` (the reference
            code's; an ablation).
        decay: β in [0, 1), the weight of the previous ratios (reference code: 0.2).
        utility_floor: ε > 0, the floor of a utility (reference: 1e-7); keeps every positive ratio
            positive (a group at p_i = 0 stays at 0).
        min_weight: a floor on the final ratios in [0, 1/k], lifted then renormalised (0: none).
        parent_floor: a floor in [0, 1) on each source domain's total ratio (0: none); needs a
            :class:`~domainmix.partition.Partition` (its parents) with ``parent_floor`` × sources ≤ 1.
            Applied last (:func:`lift_parents`): a lifted source's groups keep their ratios to each
            other, the other sources give up mass in proportion.
        horizon: rounds ahead for the potential, ≥ 1 (paper: 5).
        min_history: task-loss observations before the fit is used, ≥ 3 (reference: 5).
        history: task-loss rounds kept in the state (and fitted), ≥ ``min_history``.
        partition: the :class:`~domainmix.partition.Partition` the groups come from, or its digest: the
            state records it and refuses to continue under another one; the domain names must then
            be the partition's.

    References:
        Shi, Zhang, Wu, Fang, Zhang, Xu, Zhu, Chen, Zhao, Han, Zhou (2025), "DIDS: Domain Impact-aware
        Data Sampling for Large Language Model Training", EMNLP, arXiv:2504.13227, §3.
    """
    caller = "dids"
    m = check_param(caller, "num_tasks", num_tasks, Interval(int, 1, None))
    check_param(caller, "impact_form", impact_form, Options(("kl", "kernel", "inverted")))
    beta = float(check_param(caller, "decay", decay, Interval(float, 0.0, 1.0, closed="left")))
    eps = float(
        check_param(caller, "utility_floor", utility_floor, Interval(float, 0.0, None, closed="neither"))
    )
    floor = float(check_param(caller, "min_weight", min_weight, Interval(float, 0.0, 1.0)))
    lift = float(check_param(caller, "parent_floor", parent_floor, Interval(float, 0.0, 1.0, closed="left")))
    ahead = check_param(caller, "horizon", horizon, Interval(int, 1, None))
    needed = check_param(caller, "min_history", min_history, Interval(int, 3, None))
    kept = check_param(caller, "history", history, Interval(int, needed, None))
    digest, names = _partition(caller, partition)
    parents: tuple[str, ...] = tuple(getattr(partition, "parents", ())) if names is not None else ()
    sources = tuple(dict.fromkeys(parents))
    if lift > 0 and not sources:
        raise param_error(caller, "partition", "a Partition (its parents) when parent_floor > 0", partition)
    if lift * len(sources) > 1.0:
        raise param_error(
            caller, "parent_floor", f"at most 1/{len(sources)} for {len(sources)} source domains", lift
        )
    parent_of = torch.tensor([sources.index(a) for a in parents], dtype=torch.long)
    name = f"dids({impact_form}, m={m})" + (f"[partition {digest[:12]}]" if digest else "")

    def init_fn(weights: DomainWeights) -> DidsState:
        if names is not None and weights.names != names:
            raise param_error(
                caller, "weights", f"weights over the partition's groups {list(names)}", list(weights.names)
            )
        if floor * weights.num_domains > 1.0:
            raise param_error(
                caller, "min_weight", f"at most 1/k = {1.0 / weights.num_domains:g} for k domains", floor
            )
        return DidsState(digest, 0, torch.zeros(kept, m, dtype=torch.float64))

    def update_fn(
        weights: DomainWeights, state: DidsState, stats: DomainStats
    ) -> tuple[DomainWeights, DidsState]:
        if state.partition != digest:
            raise ValueError(
                f"Strategy {name!r}: the state belongs to another partition (digest "
                f"{state.partition[:12] or 'none'!r}, this strategy's {digest[:12] or 'none'!r}); "
                "restart DIDS or use the partition it was saved under."
            )
        _check_tasks(name, m, stats)
        losses = stats["task_loss"].to(torch.float64)
        recorded = torch.cat([state.task_losses[1:], losses[None, :]])
        seen = min(state.rounds + 1, kept)
        if state.rounds == 0:
            gain = torch.ones(m, dtype=torch.float64)
        else:
            drop = state.task_losses[-1] - losses
            ahead_drop = torch.tensor(
                [potential(recorded[kept - seen :, j], ahead, needed) for j in range(m)], dtype=torch.float64
            )
            gain = drop + ahead_drop
        # Groups the round's Fisher draw missed have no products (they read 0): they take no part in the
        # impact, whose columns are normalised over the groups, and keep their share.
        drawn = stats.observed_entries("fisher_domain_sq") & stats.observed_entries("fisher_cross").all(dim=1)
        p = weights.sampling.to(torch.float64)
        target = torch.where(drawn, 0.0, p)
        # A group at p_i = 0 was excluded on purpose and stays at 0 (its 1/p_i is not evaluated).
        live = p[drawn] > 0
        if bool(live.any()):
            cross, domain_sq = stats["fisher_cross"][drawn], stats["fisher_domain_sq"][drawn]
            influence = impact(cross, domain_sq, stats["fisher_task_sq"], impact_form)
            utility = (influence @ gain) / m / torch.where(live, p[drawn], 1.0)
            w = torch.where(live, utility.nan_to_num(nan=eps).clamp_min(eps), 0.0)
            target[drawn] = (1.0 - target.sum()) * w / w.sum()
        else:  # nothing measured: nothing moves
            target = p
        moved = beta * p + (1.0 - beta) * target
        if floor > 0:
            moved = torch.where(moved > 0, moved.clamp_min(floor), moved)
        moved = moved / moved.sum()
        if lift > 0:
            moved = lift_parents(moved, parent_of, lift)
        return weights._replace(mixture=moved, sampling=moved.clone()), DidsState(
            digest, state.rounds + 1, recorded
        )

    return make_strategy(name, init_fn, update_fn, _REQUIRES)


def lift_parents(p: Tensor, parent_of: Tensor, floor: float) -> Tensor:
    """``p`` with every source's total raised to at least ``floor``, the rest scaled down to fit.

    Water-filling over the sources (``parent_of[i]``: the source of group i): a source below the floor
    is set to it, its groups scaled alike; the sources not yet set share the remaining mass in
    proportion to their totals; repeated until no free source is below the floor (each round fixes at
    least one, so at most one round per source). A source with no mass at all stays at 0. Needs
    ``floor`` × sources ≤ 1.
    """
    p = p / p.sum()
    n = int(parent_of.max()) + 1 if parent_of.numel() else 0
    fixed = torch.zeros(n, dtype=torch.bool)
    for _ in range(n):
        totals = torch.zeros(n, dtype=p.dtype).index_add_(0, parent_of, p)
        low = (totals < floor) & (totals > 0) & ~fixed
        if not bool(low.any()):
            break
        fixed |= low
        free = totals.masked_fill(fixed, 0.0).sum()
        rest = (1.0 - floor * float(fixed.sum())) / float(free) if free > 0 else 0.0
        scale = torch.where(fixed, floor / torch.where(totals > 0, totals, 1.0), rest)
        p = p * scale[parent_of]
    return p / p.sum()


def _partition(caller: str, partition: str | Any | None) -> tuple[str, tuple[str, ...] | None]:
    """(digest, group names or None) of a Partition, a digest string, or None."""
    if partition is None:
        return "", None
    if isinstance(partition, str) and partition:
        return partition, None
    digest, names = getattr(partition, "digest", None), getattr(partition, "names", None)
    if isinstance(digest, str) and digest and isinstance(names, tuple):
        return digest, names
    raise param_error(caller, "partition", "None, a Partition or its digest (a non-empty str)", partition)


def _check_tasks(name: str, m: int, stats: DomainStats) -> None:
    """The task axis of every task statistic must have the strategy's m entries."""
    for field in ("task_loss", "fisher_task_sq", "fisher_cross"):
        shape = tuple(stats[field].shape)
        if shape[-1] != m:
            expected = (m,) if len(shape) == 1 else (stats.num_domains, m)
            raise ValueError(
                f"Strategy {name!r}: statistic {field!r} must have shape {expected} (num_tasks={m}), "
                f"got {shape}: the statistics cover {shape[-1]} tasks."
            )
