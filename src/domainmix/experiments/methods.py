"""The named methods of ``domainmix run``: one registry, from which the CLI, the configs and the loops derive.

A method of the Salmani et al. experiments is a loss rule and a sampling rule, written ``LOSS`` or
``LOSS+SAMPLING`` (``fgls+va``; ``va`` alone is ``uniform+va``); the language-model pipeline's proxy
methods are whole strategies (``doremi``, ``doge``). Each entry is a :class:`Rule`: its name, a line
of documentation and a builder from the run's config and :class:`MethodContext`. Adding a method is one
entry here; the argparse choices, the config checks and the training loops read these tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from domainmix import strategies
from domainmix.strategies import Strategy


@dataclass(frozen=True)
class MethodContext:
    """What a builder may need besides the config.

    Attributes:
        domain_sizes: training examples per domain, in domain order.
        noise_variances: the true σ_i² (synthetic regression only; ``oracle_gls`` needs them).
        learning_rate: η_t of the model being trained, as a function of the step (DoGE's step size).
        num_tasks: DIDS's target tasks m.
        partition: the ``domainmix.partition.Partition`` DIDS's groups come from.
    """

    domain_sizes: tuple[int, ...]
    noise_variances: tuple[float, ...] | None = None
    learning_rate: Callable[[int], float] | None = None
    num_tasks: int = 1
    partition: Any = None


@dataclass(frozen=True)
class Rule:
    """One named rule: ``build(cfg, context) -> Strategy``.

    Attributes:
        name: the name used on the command line and in configs.
        doc: one line for ``--help`` and the docs.
        build: the builder; ``cfg`` is the run's config dataclass.
    """

    name: str
    doc: str
    build: Callable[[Any, MethodContext], Strategy]


def _oracle_gls(cfg: Any, ctx: MethodContext) -> Strategy:
    if ctx.noise_variances is None:
        raise ValueError("The loss rule 'oracle_gls' needs the true noise variances; this task has none.")
    return strategies.oracle_gls(ctx.noise_variances, domain_sizes=ctx.domain_sizes)


def _doge(cfg: Any, ctx: MethodContext) -> Strategy:
    if ctx.learning_rate is None:
        raise ValueError("The method 'doge' needs the proxy's learning-rate schedule.")
    target = "out_of_domain" if cfg.target_domain else cfg.doge_target
    return strategies.doge(ctx.learning_rate, target=target, mu=cfg.doge_mu)


def _table(*rules: Rule) -> Mapping[str, Rule]:
    return {rule.name: rule for rule in rules}


LOSS_RULES: Mapping[str, Rule] = _table(
    Rule("uniform", "α = π: the plain mixture", lambda cfg, ctx: strategies.uniform()),
    Rule("oracle_gls", "α ∝ n_i / σ_i² with the true noise variances (a ceiling)", _oracle_gls),
    Rule(
        "fgls",
        "one-shot feasible GLS from held-out losses, after warmup_steps",
        lambda cfg, ctx: strategies.delay(
            strategies.fgls(domain_sizes=ctx.domain_sizes, smoothing=cfg.fgls_smoothing), cfg.warmup_steps
        ),
    ),
    Rule(
        "erma",
        "ERMA's fixed-point iteration on held-out losses, after warmup_steps",
        lambda cfg, ctx: strategies.delay(
            strategies.erma(domain_sizes=ctx.domain_sizes, step_size=cfg.erma_step_size), cfg.warmup_steps
        ),
    ),
)
"""Loss rules: how much each domain's loss counts (the mixture α)."""

SAMPLING_RULES: Mapping[str, Rule] = _table(
    Rule("uniform", "q = α: sample as the loss weighs", lambda cfg, ctx: strategies.uniform()),
    Rule(
        "va",
        "Variance-Aware sampling q ∝ α_i v_i, stratified counts",
        lambda cfg, ctx: strategies.variance_aware(cfg.batch_size, min_count=1),
    ),
)
"""Sampling rules: how often each domain is drawn (q), for a given α."""

PROXY_METHODS: Mapping[str, Rule] = _table(
    Rule(
        "doremi",
        "DoReMi: Group DRO on the excess loss over a reference model",
        lambda cfg, ctx: strategies.delay(
            strategies.doremi(cfg.doremi_step_size, cfg.doremi_smoothing), cfg.doremi_delay
        ),
    ),
    Rule("doge", "DoGE: mirror ascent on the per-domain gradient alignment", _doge),
)
"""The language-model pipeline's proxy methods (they move α; the proxy samples uniformly)."""

DIDS_SCHEDULE: Mapping[str, int] = {"horizon": 5, "min_history": 5, "history": 25}
"""DIDS's loss-trajectory settings in the LM pipeline (the paper's and the strategy's defaults); the
pipeline's round log recomputes the gains with them."""


def _dids(impact_form: str) -> Callable[[Any, MethodContext], Strategy]:
    def build(cfg: Any, ctx: MethodContext) -> Strategy:
        return strategies.dids(
            ctx.num_tasks,
            impact_form=impact_form,  # type: ignore[arg-type]
            decay=cfg.dids_decay,
            parent_floor=cfg.dids_parent_floor,
            partition=ctx.partition,
            **DIDS_SCHEDULE,
        )

    return build


ONLINE_METHODS: Mapping[str, Rule] = _table(
    Rule("dids", "DIDS on gradient-clustered groups, KL-form impact", _dids("kl")),
    Rule("dids-flat", "DIDS without repartition (one group per domain), KL-form impact", _dids("kl")),
    Rule(
        "dids-inverted",
        "DIDS on gradient-clustered groups, the reference code's inverted impact",
        _dids("inverted"),
    ),
)
"""Methods that move the base model's sampling weights online (``--stage base --weights NAME``)."""
UNCLUSTERED = frozenset({"dids-flat"})
"""The online methods that keep one group per original domain (no repartition)."""


def parse_method(method: str) -> tuple[str, str]:
    """``"fgls+va"`` -> ("fgls", "va"); ``"va"`` -> ("uniform", "va"); ``"erma"`` -> ("erma", "uniform").

    Raises:
        ValueError: for a name outside :data:`LOSS_RULES` / :data:`SAMPLING_RULES`.
    """
    if method in SAMPLING_RULES and method not in LOSS_RULES:
        return "uniform", method
    loss, _, sampling = method.partition("+")
    sampling = sampling or "uniform"
    if loss not in LOSS_RULES or sampling not in SAMPLING_RULES:
        raise ValueError(
            f"Unknown method {method!r}: a method is LOSS or LOSS+SAMPLING with LOSS in {list(LOSS_RULES)} "
            f"and SAMPLING in {list(SAMPLING_RULES)}, or a sampling rule alone."
        )
    return loss, sampling


def build_method(method: str, cfg: Any, ctx: MethodContext) -> Strategy:
    """A Salmani et al. method (``fgls+va``) as ``combine(loss=<rule>, sampling=<rule>)``."""
    loss, sampling = parse_method(method)
    return strategies.combine(
        loss=LOSS_RULES[loss].build(cfg, ctx), sampling=SAMPLING_RULES[sampling].build(cfg, ctx)
    )


def build_proxy(method: str, cfg: Any, ctx: MethodContext) -> Strategy:
    """A proxy method (``doremi``, ``doge``): it moves α, the proxy samples uniformly.

    Raises:
        ValueError: for a name outside :data:`PROXY_METHODS`.
    """
    if method not in PROXY_METHODS:
        raise ValueError(f"Unknown proxy method {method!r}; choose one of {list(PROXY_METHODS)}.")
    return strategies.combine(loss=PROXY_METHODS[method].build(cfg, ctx), sampling=strategies.uniform())


def describe(rules: Mapping[str, Rule]) -> str:
    """``name: doc`` lines, for ``--help``."""
    return "; ".join(f"{rule.name}: {rule.doc}" for rule in rules.values())
