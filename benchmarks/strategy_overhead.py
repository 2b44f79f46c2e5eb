"""Seconds per training step with each weighting strategy against plain training, same model and batch.

Three configurations (``--config``):

* ``experiment`` (default): the proxy of ``domainmix run lm`` as its defaults run it. The model, batch,
  block size, learning rate, gradient clipping and DoGE's settings are ``LmConfig()``'s
  (``src/domainmix/experiments/config.py``): a GPT of ``proxy_layers`` × ``proxy_width`` (2 × 128, 4 heads
  as ``experiments.lm.model_for`` builds it, T = 128) over the tokenizer's vocabulary (``bpe_vocab`` =
  4096 for the default BPE tokens, 256 for ``tokenizer=bytes``; the tied embedding is then most of the
  parameters), ``batch_size`` = 32 sequences, AdamW at ``lr`` with ``clip_grad_norm_(grad_clip)`` every
  step of every variant; DoReMi and DoGE are the experiment's strategies
  (``experiments.methods.build_proxy``: DoReMi's step size, smoothing and delay, DoGE's µ and its η_t =
  ``lr`` × the proxy's schedule ``experiments.lm.lr_factor``). DoGE runs in the experiment's universal mode:
  every step a separate target batch of ``batch_size`` sequences, drawn uniformly over the domains by a
  ``DomainBatchSampler`` of its own (as ``experiments.lm.probes_for`` draws it), goes through the forward
  inside ``controller.record()``, and the tap computes ``target_grad_dot`` with the products
  (``GradientProductProbe(tap, max_norm=doge_max_norm, target=...)``). ``doge_leave_one_out`` is the
  experiment's other DoGE mode (``--set doge_target=leave_one_out``): no target batch.
* ``legacy``: the configuration of the earlier figures (a 4 × 128 GPT, lr 5e-4, DoGE's µ 0.01 and clip 5,
  DoGE scoring ⟨g_i, Σ_{j≠i} g_j⟩ from the training batch alone, i.e. today's ``leave_one_out``; DoReMi
  with step 1), kept so that they stay reproducible. ``doge_leave_one_out`` is not among its variants
  (it is what its ``doge_subset`` already runs).
* ``gpt100m``: the statistics' cost at scale, meant for one CUDA GPU. A GPT built by
  ``experiments.gpt.GPT`` of 12 layers × width 768 with 12 heads, vocabulary 32,768 and T = 512
  (110,615,040 parameters, the tied 32,768 × 768 embedding 23 % of them), batch 16 sequences (8,192
  tokens), AdamW at lr 3e-4 with ``clip_grad_norm_(1.0)``. The strategies are the experiment's
  (``LmConfig()``'s DoReMi settings; DoGE's µ, ``doge_max_norm``, universal target mode with a target
  batch of ``doge_target_batch`` windows, here the batch's 16; η_t = lr × ``lr_factor``). Its default
  variants: ``plain``, ``uniform``, ``doremi_cached``, the four DoGE subset variants and the four VA
  subset variants (below). The figures (docs/language-models.md, "The statistics' cost at 110 M
  parameters") are made by::

      python benchmarks/strategy_overhead.py --config gpt100m --device cuda --repeats 3 \
          --out benchmarks/results/strategy_overhead_gpt100m_cuda.json

  (97 s on one H100, memory measurements included; float32, no TF32.)

  It runs on the CPU too (``--device cpu``), slowly: 11 model copies with their AdamW states take about
  20 GB, and a plain step of 16 × 512 tokens takes minutes on one thread (6 s at ``--block-size 32
  --batch 12`` on a loaded 2-core machine).

``--vocab``, ``--n-layer``, ``--n-embd``, ``--n-head``, ``--block-size``, ``--batch`` and ``--lr``
override the chosen configuration's values (the report lists what was overridden).

Device (``--device cpu|cuda|auto``, default ``cpu``; ``auto``: CUDA when ``torch.cuda.is_available()``,
``cuda`` without CUDA is an error naming ``--device``): the models, the data pool, the target pool and
the reference cache live on it, in float32 (no autocast). On CUDA every timed region synchronises the
device before each clock reading (``timed``), so a step's queued kernels are charged to that step; the
report's config records the device and, on CUDA, ``torch.cuda.get_device_name()`` and the float32
matmul precision. The CPU path is the default and the one the figures in docs/ come from.

Data: random token sequences from k = 6 domains (the corpus's six); every training batch has stratified
counts (``allocate_counts``). Every variant is a full training step (forward, loss, backward, optimizer
step and, where there is one, the controller's step) on its own copy of the same initial model, over the
same fixed pool of batches (and the same stream of target batches):

* ``plain``: mean per-token cross entropy, backward, step. The baseline.
* ``uniform``: the library's bookkeeping with a static strategy (``controller.record()`` around the
  forward, ``controller.step(losses, ids)``, ``weighted_loss`` with the controller's loss multipliers;
  a statistics-free strategy reduces nothing per step).
* ``doremi_cached``: DoReMi's proxy step (``combine(loss=doremi(...), sampling=uniform())``,
  ``update_every=1``) with the reference model's per-token losses read from a precomputed fp16 cache
  indexed by the batch's example ids (a ``ReferenceLossProbe``, docs/algorithms.md §1.4): no reference
  forward.
* ``doremi_reference_forward`` (informative): the same, with a frozen reference GPT's forward under
  ``torch.inference_mode()`` every step instead of the cache: what the cache saves (docs/algorithms.md §1.4).
* ``doge_subset``: DoGE updating every step (``combine(loss=doge(...), sampling=uniform())``): the
  products of the per-domain mean gradients on the last transformer block + final LayerNorm from a
  ``GradientProductTap`` (one backward to the subset's layer outputs, then per-domain weight gradients
  in closed form) through a ``GradientProductProbe`` in ``controller.step(losses, ids)``, then the
  ordinary weighted backward. In the experiment configuration: with the universal target batch.
* ``doge_leave_one_out`` (experiment configuration): the same subset, no target batch.
* ``doge_last_mlp``: as ``doge_subset`` on the last block's MLP only (a smaller subset), and
  ``doge_last_mlp_out`` on its output projection only (one weight matrix and bias, the smallest subset
  tried).
* ``doge_all_blocks`` (informative): the tap on every block and the final LayerNorm (every parameter
  but the token and position embeddings).
* ``doge_subset_autograd`` (informative): the ``doge_subset`` products from
  ``domain_gradient_products`` (one ``autograd.grad`` per domain on the subset, docs/algorithms.md §2.4;
  a small ``Probe`` subclass here; the target batch's forward runs in its ``observe_step``),
  the general path for subsets that are not Linear/LayerNorm layers. The two paths' agreement on one
  batch is reported.
* ``va_last_mlp_out``, ``va_last_mlp``, ``va_subset``, ``va_all_blocks``: Variance-Aware sampling's
  statistic every step on the same four parameter subsets as ``doge_last_mlp_out``, ``doge_last_mlp``,
  ``doge_subset`` and ``doge_all_blocks`` (``subset_modules``): ``combine(loss=uniform(),
  sampling=variance_aware(B))`` (α = π, uniform here; VA moves q only and reads only ``grad_var``; the
  default ``min_count=2`` because v_i is estimated on the training batch) with ``update_every=1`` and a
  ``GradientVarianceProbe(model, loss_fn, draw, method="per_example", params=<the subset's names>)``
  whose ``draw(step)`` returns that step's training batch and whose per-example loss is each window's
  mean per-token loss (``_window_loss``). The probe runs when a window closes, i.e. every step: a
  second forward of the batch, one example at a time under ``torch.func.vmap``, and per-example
  gradients of the subset only, folded into (k, P_subset) float64 sums. The per-example forward of the
  whole model is paid whatever the subset; only the backward and the sums shrink with it. The
  controller pushes q to
  the benchmark's fixed-count sampler stand-in, which ignores it: every variant trains on the same
  stratified batches (the timing is the statistic's and the update's, not a different batch mix). Not
  in the ``experiment`` and ``legacy`` default sets (the experiment's default run already takes several
  minutes on a loaded 2-core machine; the four would add several more): ``--variants va_subset,...``
  runs them in any configuration; ``gpt100m`` runs all four by default.
  They need ``--batch`` ≥ 2 × ``--domains`` (two examples per domain define a variance).
* ``dids_round`` (opt-in: ``--variants dids_round``; not in any configuration's default set): one
  DIDS round every step (``update_every=1``): a ``FisherProductProbe`` (per-example gradients through
  ``torch.func`` on the last 10 % of the tensors) over the round's windows at the experiment's size,
  ``dids_clusters`` × ``dids_examples`` windows of each of the k domains (the examples of its
  ``dids_clusters`` groups, drawn together: the per-example pass costs the same) and ``dids_examples``
  of each of m = k target tasks (universal setting), then ``dids``'s update. Its ratio − 1 is one
  round's cost in plain steps; ``run lm`` runs a round every ``dids_round_steps`` steps, so the
  report's ``dids.amortised_ratio`` is 1 + (ratio − 1) / ``dids_round_steps``. DIDS runs on the base
  model: ``--n-layer 4 --n-embd 192`` gives its shape (``LmConfig``'s ``base_layers``, ``base_width``).

The targets (DoGE ≤ 1.5 × plain for ``doge_subset``, ``doge_leave_one_out``, ``doge_last_mlp``,
``doge_last_mlp_out``; DoReMi cached ≤ 1.05 ×) are evaluated on the variants of the configuration run
(``targets_evaluated_on``); the experiment configuration is the one they are stated for.

Timing: ``--warmup`` steps per variant, then per repetition ``--steps`` rounds in which every variant
runs one step (round-robin, the order rotated every round so that machine noise hits all alike).
Reported: the median over repetitions of the mean seconds per step, and the median over repetitions
of the per-repetition ratio to ``plain``. The proxy's learning-rate schedule is left out of every
variant (a scalar per step); DoGE's η_t follows it.

Subset tables (``subset_cost``: ``{"doge": [...], "va": [...]}``, printed too): the per-step cost as a
function of the parameter subset the statistic is computed on, one row per subset from the smallest
(``last_mlp_out``) to the largest (``all_blocks``) among the variants run: the subset's parameter count,
its fraction of the model's parameters, seconds per step and the ratio to ``plain`` (median of the
per-repetition ratios).

Memory of the gradient statistics: DoGE's two paths keep a (k+1) × P_subset float64 matrix
(``matrix_bytes``, analytic). The measured figure is the peak of live CPU tensor bytes allocated during
one call, from the torch profiler's allocator events (``profile_memory=True``), relative to the bytes
live when the call starts; the same measure is given for one whole step of every variant.
``tracemalloc`` does not see tensor storage and ``ru_maxrss`` only moves on a new process-wide peak, so
the max RSS is reported for context only. For the VA variants: ``matrix_bytes`` is the (k, P_subset)
float64 sums, ``chunk_bytes`` one chunk of float32 per-example gradients (min(64, B) × P_subset, the
estimator's default chunk), and the call is one ``gradient_variance`` on the batch. On CUDA the profiler's
CPU allocator events do not see device memory: the figures are then the peak of
``torch.cuda.max_memory_allocated()`` over the call or step after ``torch.cuda.reset_peak_memory_stats()``,
relative to ``torch.cuda.memory_allocated()`` at its start (``memory_kind`` says which).

``--out PATH`` also writes the JSON report to PATH atomically; the report's ``command`` is the command
line that made it.

Usage: python benchmarks/strategy_overhead.py [--json] [--config experiment|legacy|gpt100m]
[--device cpu|cuda|auto] [--steps 10] [--repeats 5] [--threads 1] [--out PATH]
[--variants plain,dids_round --n-layer 4 --n-embd 192]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from domainmix import StatsCollector, WeightingController, weighted_loss
from domainmix._atomic import atomic_write_json
from domainmix.experiments.config import LmConfig
from domainmix.experiments.gpt import GPT, GPTConfig, per_token_loss
from domainmix.experiments.lm import lr_factor, model_for
from domainmix.experiments.methods import MethodContext, build_proxy
from domainmix.sampling import DomainBatchSampler, allocate_counts
from domainmix.stats import (
    FisherProductProbe,
    GradientProductProbe,
    GradientProductTap,
    GradientVarianceProbe,
    Probe,
    ReferenceLossProbe,
    StepLosses,
    domain_gradient_products,
    gradient_variance,
)
from domainmix.strategies import Strategy, combine, dids, doge, doremi, uniform, variance_aware

CONFIGS = ("experiment", "legacy", "gpt100m")
DEVICES = ("cpu", "cuda", "auto")
VARIANTS = (
    "plain",
    "uniform",
    "doremi_cached",
    "doremi_reference_forward",
    "doge_subset",
    "doge_leave_one_out",
    "doge_last_mlp",
    "doge_last_mlp_out",
    "doge_all_blocks",
    "doge_subset_autograd",
)
LEGACY_VARIANTS = tuple(v for v in VARIANTS if v != "doge_leave_one_out")  # the earlier figures' set
# Variance-Aware sampling's statistic on the DoGE variants' subsets, smallest subset first.
VA_VARIANTS = ("va_last_mlp_out", "va_last_mlp", "va_subset", "va_all_blocks")
# Outside the experiment and legacy default sets: run only when --variants (or gpt100m's set) names them.
OPTIONAL = (*VA_VARIANTS, "dids_round")
ALL_VARIANTS = VARIANTS + OPTIONAL  # the report's order
# The subset tables' rows, smallest subset first: subset -> (DoGE variant, VA variant).
SUBSET_ROWS = {
    "last_mlp_out": ("doge_last_mlp_out", "va_last_mlp_out"),
    "last_mlp": ("doge_last_mlp", "va_last_mlp"),
    "subset": ("doge_subset", "va_subset"),
    "all_blocks": ("doge_all_blocks", "va_all_blocks"),
}
GPT100M_VARIANTS = (
    ("plain", "uniform", "doremi_cached") + tuple(d for d, _ in SUBSET_ROWS.values()) + VA_VARIANTS
)
DEFAULT_VARIANTS = {"experiment": VARIANTS, "legacy": LEGACY_VARIANTS, "gpt100m": GPT100M_VARIANTS}
INFORMATIVE = ("doremi_reference_forward", "doge_all_blocks", "doge_subset_autograd")
DOGE_VARIANTS = (
    "doge_subset",
    "doge_leave_one_out",
    "doge_last_mlp",
    "doge_last_mlp_out",
    "doge_all_blocks",
    "doge_subset_autograd",
)
TARGET_VARIANTS = ("doge_subset", "doge_leave_one_out", "doge_last_mlp", "doge_last_mlp_out")
TARGETS = {"doge_subset_max_ratio": 1.5, "doremi_cached_max_ratio": 1.05}
WEIGHT_DECAY = 0.01  # experiments.lm.train's AdamW
SOURCES = {
    "experiment": "LmConfig() defaults (src/domainmix/experiments/config.py): the proxy of domainmix run lm",
    "legacy": "the earlier figures' 4x128 byte-level configuration (DoGE scoring leave_one_out)",
    "gpt100m": (
        "a 12x768 GPT (vocabulary 32768, T=512, batch 16, AdamW lr 3e-4, clip 1.0) with LmConfig()'s "
        "DoReMi and DoGE settings (universal target batch): the statistics' cost at scale"
    ),
}
# The earlier figures' configuration (DoGE reference config, docs/algorithms.md §2.3, on a 4 x 128 GPT).
LEGACY = {
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "block_size": 128,
    "batch": 32,
    "lr": 5e-4,
    "doge_mu": 0.01,
    "doge_max_norm": 5.0,
    "doge_target": "leave_one_out",
    "vocab": 256,
    "grad_clip": 0.0,
}
# The statistics' cost at scale: a GPT of >= 100 M parameters (110,615,040) for one CUDA GPU.
# DoGE's mu, max_norm, target mode and target batch are LmConfig()'s (resolve takes them from there).
GPT100M = {
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "block_size": 512,
    "batch": 16,
    "lr": 3e-4,
    "vocab": 32768,
    "grad_clip": 1.0,
}
OVERRIDABLE = ("vocab", "n_layer", "n_head", "n_embd", "block_size", "batch", "lr")


@dataclass(frozen=True)
class Setup:
    """The resolved configuration: the model's shape, the batch and the strategies' settings."""

    name: str
    model: GPTConfig
    batch: int
    lr: float
    doge_mu: float
    doge_max_norm: float
    doge_target: str  # the mode of every DoGE variant but doge_leave_one_out
    grad_clip: float  # clip_grad_norm_ before every optimizer step (0: none)
    lm: LmConfig | None  # the experiment's config, whose strategies' settings are used (None: legacy)
    overrides: dict[str, Any]

    def strategy(self, variant: str, k: int, domain_size: int) -> Strategy:
        """The variant's strategy, built as the configuration builds it."""
        if variant in ("plain", "uniform"):
            return uniform()
        if variant in VA_VARIANTS:
            # VA moves q only and reads only grad_var; the loss rule keeps alpha = pi (as "uniform+va" of
            # the experiments' methods). min_count stays 2: v_i is estimated on the training batch.
            return combine(loss=uniform(), sampling=variance_aware(self.batch))
        doge_target = "leave_one_out" if variant == "doge_leave_one_out" else self.doge_target
        if self.lm is not None:
            proxy_steps, warmup = self.lm.proxy_steps, self.lm.warmup_steps
            ctx = MethodContext(
                (domain_size,) * k,
                learning_rate=lambda step: self.lr * lr_factor(step, proxy_steps, warmup),
            )
            if variant.startswith("doremi"):
                return build_proxy("doremi", self.lm, ctx)
            return build_proxy("doge", dataclasses.replace(self.lm, doge_target=doge_target), ctx)
        if variant.startswith("doremi"):
            return combine(loss=doremi(), sampling=uniform())
        return combine(
            loss=doge(self.lr, target=doge_target, mu=self.doge_mu),  # type: ignore[arg-type]
            sampling=uniform(),
        )

    def universal(self, variant: str) -> bool:
        """Whether the DoGE variant draws a separate target batch every step."""
        return (
            variant in DOGE_VARIANTS and variant != "doge_leave_one_out" and self.doge_target == "universal"
        )


def resolve(args: argparse.Namespace) -> Setup:
    """The configuration ``--config`` names, with the command line's explicit overrides."""
    overrides = {key: getattr(args, key) for key in OVERRIDABLE if getattr(args, key) is not None}
    if args.config == "legacy":
        values: dict[str, Any] = dict(LEGACY)
        lm = None
    elif args.config == "gpt100m":
        lm = LmConfig()
        values = dict(GPT100M)
        values.update(doge_mu=lm.doge_mu, doge_max_norm=lm.doge_max_norm, doge_target=lm.doge_target)
    else:
        lm = LmConfig()
        # The experiment's proxy as run lm builds it; its vocabulary is the tokenizer's (model_for reads
        # the corpus's BPE file for it, which a benchmark need not have: bpe_vocab is its size).
        proxy = model_for(dataclasses.replace(lm, tokenizer="bytes"), "proxy").cfg
        values = {
            "vocab": 256 if lm.tokenizer == "bytes" else lm.bpe_vocab,
            "n_layer": proxy.n_layer,
            "n_head": proxy.n_head,
            "n_embd": proxy.n_embd,
            "block_size": proxy.block_size,
            "batch": lm.batch_size,
            "lr": lm.lr,
            "doge_mu": lm.doge_mu,
            "doge_max_norm": lm.doge_max_norm,
            "doge_target": lm.doge_target,
            "grad_clip": lm.grad_clip,
        }
    values.update(overrides)
    if lm is not None:
        lm = dataclasses.replace(
            lm,
            block_size=values["block_size"],
            batch_size=values["batch"],
            lr=values["lr"],
            grad_clip=values["grad_clip"],
        )
    model = GPTConfig(
        vocab_size=values["vocab"],
        block_size=values["block_size"],
        n_layer=values["n_layer"],
        n_head=values["n_head"],
        n_embd=values["n_embd"],
    )
    return Setup(
        name=args.config,
        model=model,
        batch=values["batch"],
        lr=values["lr"],
        doge_mu=values["doge_mu"],
        doge_max_norm=values["doge_max_norm"],
        doge_target=values["doge_target"],
        grad_clip=values["grad_clip"],
        lm=lm,
        overrides=overrides,
    )


# --------------------------------------------------------------------------------------------------
# Device: where the models and data live, and clock readings that wait for it.
def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names (``auto``: CUDA when ``torch.cuda.is_available()``).

    Raises:
        ValueError: for an unknown name, or ``cuda`` when torch sees no CUDA device.
    """
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {list(DEVICES)}; got {name!r}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(
            f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA device; "
            "use --device cpu or --device auto."
        )
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn()`` takes, the device synchronised before both clock readings."""
    synchronize(device)  # kernels queued before the call are not the call's
    start = time.perf_counter()
    fn()
    synchronize(device)  # the call's own kernels are: without this CUDA would time the launches only
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Data: a fixed pool of batches, every batch stratified over the k domains, and a pool of windows per
# domain that the target batches are drawn from (uniformly over the domains, as run lm draws them).
class Data:
    def __init__(self, args: argparse.Namespace, setup: Setup, device: torch.device) -> None:
        # Drawn on the CPU from a seeded generator, then moved: the same tokens on every device.
        g = torch.Generator().manual_seed(args.seed)
        self.device = device
        self.k, self.batch, self.seed = args.domains, setup.batch, args.seed
        # DoGE's target batch: --target-batch, else the experiment's doge_target_batch, else the batch.
        self.target_batch = args.target_batch or (setup.lm.doge_target_batch if setup.lm else 0) or self.batch
        block_size, vocab = setup.model.block_size, setup.model.vocab_size
        self.counts = allocate_counts([1.0] * self.k, self.batch).tolist()
        n = args.pool * self.batch
        self.tokens = torch.randint(0, vocab, (n, block_size + 1), generator=g).to(device)
        ids = torch.repeat_interleave(torch.arange(self.k), torch.tensor(self.counts))
        self.domain_ids = ids.repeat(args.pool).to(device)
        self.pool = args.pool
        self.ref_cache: Tensor | None = None  # (n, T) fp16 reference per-token losses, filled by cache()
        per_domain = max(self.batch, n // self.k)
        self.target_tokens = torch.randint(0, vocab, (self.k * per_domain, block_size + 1), generator=g).to(
            device
        )
        self.target_ranges = {f"d{i}": range(i * per_domain, (i + 1) * per_domain) for i in range(self.k)}
        self.dids_examples = args.dids_examples or (setup.lm or LmConfig()).dids_examples

    def get(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Example ids, inputs, targets and domain ids of batch ``step`` (cycling through the pool)."""
        start = (step % self.pool) * self.batch
        index = torch.arange(start, start + self.batch, device=self.device)
        seq = self.tokens[index]
        return index, seq[:, :-1], seq[:, 1:], self.domain_ids[index]

    def target_stream(self) -> Iterator[Tensor]:
        """Target batches' windows: ``target_batch`` of them a step, drawn uniformly over the domains."""
        sampler = DomainBatchSampler(
            self.target_ranges,
            self.target_batch,
            dict.fromkeys(self.target_ranges, 1.0),
            min_count=1,
            seed=self.seed + 1,  # a stream of its own, as in experiments.lm.probes_for
        )
        for batch in sampler:
            yield self.target_tokens[torch.as_tensor(batch, device=self.device)]

    def dids_draw(self, per_domain: int, per_task: int) -> Callable[[int], tuple[Tensor, Tensor, Tensor]]:
        """A DIDS round's windows: ``per_domain`` of each domain (ids < k), ``per_task`` of each task.

        The tasks are the target pool's k domains (the universal setting); a function of the step.
        """
        rows_of = [torch.nonzero(self.domain_ids == i).flatten() for i in range(self.k)]

        def draw(step: int) -> tuple[Tensor, Tensor, Tensor]:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            parts, ids = [], []
            for i, rows in enumerate(rows_of):
                pick = torch.randint(len(rows), (per_domain,), generator=g).to(self.device)
                parts.append(self.tokens[rows[pick]])
                ids += [i] * per_domain
            for j, r in enumerate(self.target_ranges.values()):
                pick = torch.randint(r.start, r.stop, (per_task,), generator=g).to(self.device)
                parts.append(self.target_tokens[pick])
                ids += [self.k + j] * per_task
            seq = torch.cat(parts)
            return seq[:, :-1], seq[:, 1:], torch.tensor(ids, device=self.device)

        return draw

    def cache(self, reference: nn.Module) -> None:
        with torch.inference_mode():
            rows = [
                per_token_loss(reference(x), y).to(torch.float16)
                for _, x, y, _ in (self.get(i) for i in range(self.pool))
            ]
        self.ref_cache = torch.cat(rows)


def _window_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """(n,) mean per-token loss of each window (DIDS's per-example loss, as ``run lm``'s)."""
    return per_token_loss(logits, targets).mean(1)


class _FixedSink:
    """Stands in for the sampler: the controller reads the batch's realised q (stratified counts / B)."""

    def __init__(self, names: Sequence[str], counts: Sequence[int]) -> None:
        self.domains = tuple(names)
        self.effective_sampling = torch.tensor(counts, dtype=torch.float64) / sum(counts)

    def set_weights(self, weights: Any) -> None:
        del weights


# --------------------------------------------------------------------------------------------------
# Parameter subsets for DoGE and VA (never the tied embedding tok.weight = head.weight).
SUBSET_OF = {
    "doge_subset": "subset",
    "doge_leave_one_out": "subset",
    "doge_subset_autograd": "subset",
    "doge_last_mlp": "last_mlp",
    "doge_last_mlp_out": "last_mlp_out",
    "doge_all_blocks": "all_blocks",
    "va_subset": "subset",
    "va_last_mlp": "last_mlp",
    "va_last_mlp_out": "last_mlp_out",
    "va_all_blocks": "all_blocks",
}


def subset_modules(model: GPT, which: str) -> list[nn.Module]:
    """The modules whose parameters form a subset, named by a variant or by its ``SUBSET_ROWS`` key."""
    last: Any = model.blocks[-1]
    modules: dict[str, list[nn.Module]] = {
        "subset": [last, model.ln],
        "last_mlp": [last.mlp],
        "last_mlp_out": [last.mlp[2]],
        "all_blocks": [model.blocks, model.ln],
    }
    return modules[SUBSET_OF.get(which, which)]


def subset_parameters(model: GPT, which: str) -> list[tuple[str, nn.Parameter]]:
    """The subset's named parameters, in ``named_parameters()`` order (the order the estimators use)."""
    chosen = {id(p) for module in subset_modules(model, which) for p in module.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in chosen]


class AutogradProducts(Probe):
    """DoGE's products by one ``autograd.grad`` per domain (``domain_gradient_products``), as a probe.

    With ``target``, the target batch's forward runs here and ``target_grad_dot`` is provided too.
    """

    def __init__(
        self, params: list[Tensor], max_norm: float, target: Callable[[], Tensor] | None = None
    ) -> None:
        self.params, self.max_norm, self.target = params, max_norm, target
        self.sources = ("gradient_products",) + (() if target is None else ("target_gradient_products",))

    def observe_step(self, collector: StatsCollector, step: StepLosses) -> None:
        k = collector.num_domains
        out = domain_gradient_products(
            step.losses,
            step.domains,
            k,
            params=self.params,
            max_norm=self.max_norm,
            target_losses=None if self.target is None else self.target(),
        )
        collector.observe_stat("grad_dot", out.grad_dot)
        collector.observe_stat("grad_sq_norm", out.grad_sq_norm)
        if out.target_grad_dot is not None:
            collector.observe_stat("target_grad_dot", out.target_grad_dot)


# --------------------------------------------------------------------------------------------------
# One runner per variant: its own model copy, optimizer and controller (with the variant's probe).
class Runner:
    def __init__(self, name: str, base: GPT, reference: GPT, data: Data, setup: Setup) -> None:
        self.name, self.data, self.reference, self.setup = name, data, reference, setup
        self.device = data.device
        self.model = copy.deepcopy(base)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=setup.lr, weight_decay=WEIGHT_DECAY)
        self.k = data.k
        self.i = 0
        self.subset: list[Tensor] = []
        self.subset_names: list[str] = []
        self.tap: GradientProductTap | None = None
        self.universal = setup.universal(name)
        self.targets = data.target_stream()  # every runner sees the same stream of target batches
        self.inputs: tuple[Tensor, Tensor] | None = None  # the step's (x, y), for the reference forward
        names = [f"d{i}" for i in range(self.k)]
        sink = _FixedSink(names, data.counts)
        probes: list[Probe] = []
        target = self.target_losses if self.universal else None
        if name in DOGE_VARIANTS:
            tap = GradientProductTap(*subset_modules(self.model, name))
            self.subset = tap.parameters()
            chosen = {id(p) for p in self.subset}
            self.subset_names = [n for n, p in self.model.named_parameters() if id(p) in chosen]
            if name == "doge_subset_autograd":
                tap.remove()
                probes.append(AutogradProducts(self.subset, setup.doge_max_norm, target))
            else:
                self.tap = tap
                probes.append(GradientProductProbe(tap, max_norm=setup.doge_max_norm, target=target))
        elif name in VA_VARIANTS:
            named = subset_parameters(self.model, name)
            self.subset = [p for _, p in named]
            self.subset_names = [n for n, _ in named]
            probes.append(
                GradientVarianceProbe(
                    self.model,
                    _window_loss,
                    self.training_batch,
                    method="per_example",
                    params=self.subset_names,
                )
            )
        elif name.startswith("doremi"):
            lookup = self.cached_reference if name == "doremi_cached" else self.reference_forward
            probes.append(ReferenceLossProbe(lookup))
        if name == "dids_round":
            lm = setup.lm or LmConfig()
            draw = data.dids_draw(lm.dids_clusters * data.dids_examples, data.dids_examples)
            probes.append(FisherProductProbe(self.model, _window_loss, draw, self.k, chunk_size=32))
            strategy = dids(self.k, decay=lm.dids_decay)
        else:
            strategy = setup.strategy(name, self.k, len(data.domain_ids) // self.k)
        self.controller = (
            None
            if name == "plain"
            else WeightingController(strategy, names, update_every=1, sampler=sink, probes=probes)
        )

    def training_batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """VA's draw: the inputs, targets and domain ids of the training batch of controller step ``step``.

        The controller counts steps from 1 and closes a window (update_every = 1) in the step that ends
        with ``step`` calls, the one that trained on batch ``step - 1``: keyed by the step, no state.
        """
        assert step == self.i, "the controller and the runner count the same steps"
        _, x, y, ids = self.data.get(step - 1)
        return x, y, ids

    def target_losses(self) -> Tensor:
        """The next target batch's per-token losses, attached to the graph (DoGE's universal target)."""
        seq = next(self.targets)
        return per_token_loss(self.model(seq[:, :-1]), seq[:, 1:])

    def cached_reference(self, step: StepLosses) -> Tensor:
        assert self.data.ref_cache is not None and step.indices is not None
        return self.data.ref_cache[step.indices].float()

    def reference_forward(self, step: StepLosses) -> Tensor:
        assert self.inputs is not None
        with torch.inference_mode():
            return per_token_loss(self.reference(self.inputs[0]), self.inputs[1])

    def step(self) -> None:
        index, x, y, ids = self.data.get(self.i)
        self.i += 1
        ctl = self.controller
        if ctl is None:
            loss = per_token_loss(self.model(x), y).mean()
        else:
            self.inputs = (x, y)
            with ctl.record():
                tok = per_token_loss(self.model(x), y)
            ctl.step(tok, ids, indices=index)  # the one order of a step (docs/design.md, "One step")
            loss = weighted_loss(tok, ids, ctl.loss_multipliers())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.setup.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.setup.grad_clip)
        self.opt.step()

    def products(self, tok: Tensor, ids: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        max_norm = self.setup.doge_max_norm
        if self.tap is not None:
            out = self.tap.products(tok, ids, self.k, max_norm=max_norm, target_losses=target)
        else:
            out = domain_gradient_products(
                tok, ids, self.k, params=self.subset, max_norm=max_norm, target_losses=target
            )
        return out.grad_dot, out.grad_sq_norm


# --------------------------------------------------------------------------------------------------
# Memory: peak of live tensor bytes during a call, relative to its start: CPU allocator events from the
# profiler on the CPU, the CUDA caching allocator's peak statistic on CUDA (the profiler's CPU events
# do not see device memory).
MEMORY_KINDS = {
    "cpu": "cpu_profiler_tensor_bytes",
    "cuda": "cuda_max_memory_allocated",
}


def peak_tensor_bytes(fn: Callable[[], Any], device: torch.device | None = None) -> int | None:
    if device is not None and device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:  # private profiler API: report "not measured" rather than fail the benchmark
        return None
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def measure_memory(runners: dict[str, Runner], device: torch.device) -> dict[str, Any]:
    kind = MEMORY_KINDS["cuda" if device.type == "cuda" else "cpu"]
    how = (
        "peak of torch.cuda.max_memory_allocated() during the call after torch.cuda.reset_peak_memory_stats()"
        if device.type == "cuda"
        else "peak live CPU tensor bytes during the call, from torch profiler allocator events"
    )
    out: dict[str, Any] = {
        "memory_kind": kind,
        "method": (
            "DoGE: matrix_bytes: the (k+1) x P_subset float64 matrix of the gradient rows (analytic, both "
            "paths); call: one products call (a universal-target call includes the target batch's "
            "backward). VA: matrix_bytes: the (k, P_subset) float64 sums; chunk_bytes: one chunk of "
            "min(64, B) float32 per-example gradients (analytic); call: one gradient_variance on the "
            f"batch. call_peak_bytes / step_peak_bytes (one call / one whole step): {how}, relative to "
            "the bytes allocated at its start. max_rss_bytes: process-wide, context only."
        ),
    }
    step_peaks = {}
    for name, runner in runners.items():
        step_peaks[name] = peak_tensor_bytes(runner.step, device)
    for name, runner in runners.items():
        if name in VA_VARIANTS:
            size = sum(p.numel() for p in runner.subset)
            _, x, y, ids = runner.data.get(0)
            # The probe's own call (its default chunk of 64 examples), on the batch of the first step.
            call = functools.partial(
                gradient_variance, runner.model, _window_loss, x, y, ids, runner.k, params=runner.subset_names
            )
            out[name] = {
                "parameters": size,
                "matrix_bytes": runner.k * size * 8,
                "chunk_bytes": min(64, len(ids)) * size * 4,
                "call_peak_bytes": peak_tensor_bytes(call, device),
            }
            continue
        if name not in DOGE_VARIANTS:
            continue
        size = sum(p.numel() for p in runner.subset)
        _, x, y, ids = runner.data.get(0)
        with runner.tap.record() if runner.tap is not None else nullcontext():
            tok = per_token_loss(runner.model(x), y)
            target = runner.target_losses() if runner.universal else None
        entry = {
            "parameters": size,
            "matrix_bytes": (runner.k + 1) * size * 8,
            "call_peak_bytes": peak_tensor_bytes(
                lambda r=runner, t=tok, i=ids, g=target: r.products(t, i, g), device
            ),
        }
        out[name] = entry
        del tok, target
    out["step_peak_bytes"] = step_peaks
    out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def check_agreement(base: GPT, data: Data, setup: Setup) -> dict[str, float]:
    """Largest difference between the tap's and domain_gradient_products' products, on one batch."""
    model = copy.deepcopy(base)
    tap = GradientProductTap(*subset_modules(model, "doge_subset"))
    _, x, y, ids = data.get(0)
    universal = setup.universal("doge_subset")
    with tap.record():
        tok = per_token_loss(model(x), y)
        if universal:
            seq = next(data.target_stream())
            target: Tensor | None = per_token_loss(model(seq[:, :-1]), seq[:, 1:])
        else:
            target = None
    max_norm = setup.doge_max_norm
    lib = domain_gradient_products(
        tok, ids, data.k, params=tap.parameters(), max_norm=max_norm, target_losses=target
    )
    got = tap.products(tok, ids, data.k, max_norm=max_norm, target_losses=target)
    scale = float(lib.grad_dot.abs().max().clamp_min(1e-30))
    out = {
        "max_abs_error_grad_dot": float((got.grad_dot - lib.grad_dot).abs().max()),
        "max_rel_error_grad_dot": float((got.grad_dot - lib.grad_dot).abs().max()) / scale,
        "max_rel_error_grad_sq_norm": float(
            ((got.grad_sq_norm - lib.grad_sq_norm).abs() / lib.grad_sq_norm.abs().clamp_min(1e-30)).max()
        ),
    }
    if got.target_grad_dot is not None and lib.target_grad_dot is not None:
        tscale = float(lib.target_grad_dot.abs().max().clamp_min(1e-30))
        out["max_rel_error_target_grad_dot"] = (
            float((got.target_grad_dot - lib.target_grad_dot).abs().max()) / tscale
        )
    return out


# --------------------------------------------------------------------------------------------------
def measure(
    runners: dict[str, Runner], steps: int, warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per step of every variant and repetition, the variants interleaved step by step."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        totals = dict.fromkeys(names, 0.0)
        for s in range(steps):
            shift = (r * steps + s) % len(names)
            for name in names[shift:] + names[:shift]:
                totals[name] += timed(runners[name].step, device)
        for name in names:
            times[name].append(totals[name] / steps)
    return times


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--config",
        choices=CONFIGS,
        default="experiment",
        help="experiment: LmConfig()'s proxy and DoGE settings (default); legacy: the earlier 4x128 figures; "
        "gpt100m: a 12x768 GPT of 110.6 M parameters with the experiment's strategies (for one CUDA GPU)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the models and data live (default cpu; auto: cuda when torch.cuda.is_available())",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--variants", default=None, help="comma list; plain is always run (default: the config's set)"
    )
    parser.add_argument("--vocab", type=int, default=None, help="override the config's vocabulary")
    parser.add_argument("--block-size", type=int, default=None, help="override the config's")
    parser.add_argument("--n-layer", type=int, default=None, help="override the config's")
    parser.add_argument("--n-head", type=int, default=None, help="override the config's")
    parser.add_argument("--n-embd", type=int, default=None, help="override the config's")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (override)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW's and DoGE's learning rate (override)")
    parser.add_argument(
        "--target-batch",
        type=int,
        default=0,
        help="windows in DoGE's universal target batch (0: the config's)",
    )
    parser.add_argument(
        "--dids-examples", type=int, default=0, help="dids_round: windows per group and task (0: LmConfig's)"
    )
    parser.add_argument("--domains", type=int, default=6)
    parser.add_argument("--pool", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file (atomically)")
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    # The command line that made the report, recorded in it.
    args.command = shlex.join(["python", "benchmarks/strategy_overhead.py", *given])
    try:
        resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.variants is None:
        chosen = list(DEFAULT_VARIANTS[args.config])
    else:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(ALL_VARIANTS)}")
    args.variants = [v for v in ALL_VARIANTS if v == "plain" or v in chosen]
    if args.batch is not None:
        batch = args.batch
    else:
        batch = {"legacy": LEGACY["batch"], "gpt100m": GPT100M["batch"]}.get(
            args.config, LmConfig().batch_size
        )
    if batch < args.domains:
        parser.error("--batch must be at least --domains (every domain in every batch)")
    if batch < 2 * args.domains and any(v in VA_VARIANTS for v in args.variants):
        parser.error("the va_* variants need --batch >= 2 x --domains (a variance needs two examples)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    setup = resolve(args)
    device = resolve_device(args.device)
    cfg = setup.model
    # Built on the CPU from the seed, then moved: the same initial weights on every device.
    base = GPT(cfg).to(device)
    reference = GPT(cfg).to(device).eval().requires_grad_(False)  # another init: a frozen "reference model"
    data = Data(args, setup, device)
    data.cache(reference)
    runners = {name: Runner(name, base, reference, data, setup) for name in args.variants}
    times = measure(runners, args.steps, args.warmup, args.repeats, device)
    plain = times["plain"]
    total = base.num_parameters()
    subsets = {
        name: {
            "names": runner.subset_names,
            "parameters": sum(p.numel() for p in runner.subset),
            "fraction": sum(p.numel() for p in runner.subset) / total,
            "target": "universal" if runner.universal else "leave_one_out",
            "target_batch_sequences": data.target_batch if runner.universal else 0,
        }
        for name, runner in runners.items()
        if name in DOGE_VARIANTS
    }
    va_subsets = {
        name: {
            "names": runner.subset_names,
            "parameters": sum(p.numel() for p in runner.subset),
            "fraction": sum(p.numel() for p in runner.subset) / total,
            "estimator": "per_example",
            "examples": data.batch,
            # q after the last update: VA's statistic reached the strategy (stratified, >= 2 per domain).
            "final_sampling": runner.controller.weights.sampling.tolist() if runner.controller else None,
        }
        for name, runner in runners.items()
        if name in VA_VARIANTS
    }
    results: dict[str, Any] = {}
    for name, ts in times.items():
        results[name] = {
            "seconds_per_step": statistics.median(ts),
            "all": ts,
            "ratio_vs_plain": statistics.median(a / b for a, b in zip(ts, plain, strict=True)),
            "informative": name in INFORMATIVE,
        }
        if name in subsets:
            results[name]["subset_fraction"] = subsets[name]["fraction"]
            results[name]["doge_target"] = subsets[name]["target"]
        if name in va_subsets:
            results[name]["subset_fraction"] = va_subsets[name]["fraction"]
    meets: dict[str, bool | None] = {}
    for name in TARGET_VARIANTS:
        if name in results:
            meets[name] = results[name]["ratio_vs_plain"] <= TARGETS["doge_subset_max_ratio"]
    if "doremi_cached" in results:
        meets["doremi_cached"] = (
            results["doremi_cached"]["ratio_vs_plain"] <= TARGETS["doremi_cached_max_ratio"]
        )
    lm = setup.lm
    doge_settings: dict[str, Any] = {
        "learning_rate": setup.lr
        if lm is None
        else f"{setup.lr} x lr_factor (warm-up {lm.warmup_steps}, cosine over {lm.proxy_steps} steps)",
        "mu": setup.doge_mu,
        "max_norm": setup.doge_max_norm,
        "update_every": 1,
        "target": setup.doge_target,
        "target_batch": (
            "a separate batch of batch_sequences windows a step, DomainBatchSampler(uniform weights, "
            "min_count=1, seed + 1), forward inside controller.record()"
            if setup.doge_target == "universal"
            else None
        ),
    }
    doremi_settings: dict[str, Any] = {"update_every": 1, "reference_cache_dtype": "float16"}
    if lm is not None:
        doremi_settings.update(
            step_size=lm.doremi_step_size, smoothing=lm.doremi_smoothing, delay=lm.doremi_delay
        )
    else:
        doremi_settings.update(step_size=1.0, smoothing=1e-3, delay=0)
    # gpt100m's model is its own: of LmConfig only what the strategies read is listed.
    shape_keys = ("tokenizer", "bpe_vocab", "proxy_layers", "proxy_width")
    report: dict[str, Any] = {
        "benchmark": "strategy_overhead",
        "command": args.command,
        "config": {
            "name": setup.name,
            "source": SOURCES[setup.name],
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "lm_config": None
            if lm is None
            else {
                key: getattr(lm, key)
                for key in (
                    *(shape_keys if setup.name == "experiment" else ()),
                    "block_size",
                    "batch_size",
                    "lr",
                    "warmup_steps",
                    "grad_clip",
                    "proxy_steps",
                    "doge_mu",
                    "doge_max_norm",
                    "doge_target",
                    "doremi_step_size",
                    "doremi_smoothing",
                    "doremi_delay",
                )
            },
            "overrides": setup.overrides,
            "model": {
                "vocab_size": cfg.vocab_size,
                "block_size": cfg.block_size,
                "n_layer": cfg.n_layer,
                "n_head": cfg.n_head,
                "n_embd": cfg.n_embd,
                "parameters": total,
                "tied_embedding": "tok.weight",
            },
            "domains": data.k,
            "batch_sequences": data.batch,
            "batch_tokens": data.batch * cfg.block_size,
            "domain_counts": data.counts,
            "pool_batches": args.pool,
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "statistic": "median; ratio = median over repetitions of variant/plain",
            "order": "round-robin over variants step by step, rotated every round",
            "optimizer": {
                "name": "AdamW",
                "lr": setup.lr,
                "weight_decay": WEIGHT_DECAY,
                "grad_clip": setup.grad_clip,
                "schedule": "constant (the run's warm-up/cosine schedule is left out of every variant)",
            },
            "doge": doge_settings,
            "doremi": doremi_settings,
            "va": {
                "strategy": f"combine(loss=uniform(), sampling=variance_aware({data.batch})), min_count 2",
                "update_every": 1,
                "probe": "GradientVarianceProbe(method='per_example', params=<the subset's names>)",
                "draw": "the step's training batch",
                "per_example_loss": "mean per-token cross entropy of each window",
                "chunk_size": 64,
            },
            "variants": args.variants,
        },
        "torch": torch.__version__,
        "results": results,
        "doge_subset": subsets.get("doge_subset"),
        "doge_subsets": subsets,
        "va_subsets": va_subsets,
        "subset_cost": subset_cost(results, subsets, va_subsets),
        "targets": TARGETS,
        "targets_evaluated_on": setup.name,
        "meets_targets": meets,
    }
    if "dids_round" in results:
        report["dids"] = dids_report(results, setup.lm or LmConfig(), data)
    if "doge_subset_autograd" in runners:
        report["doge_subset_tap_vs_autograd"] = check_agreement(base, data, setup)
    if not args.no_memory:
        report["gradient_statistics_memory_bytes"] = measure_memory(runners, device)
    return report


def subset_cost(
    results: dict[str, Any], doge: dict[str, dict[str, Any]], va: dict[str, dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """The per-step cost as a function of the subset, for DoGE and VA: rows smallest subset first."""
    tables: dict[str, list[dict[str, Any]]] = {"doge": [], "va": []}
    for subset, pair in SUBSET_ROWS.items():
        for method, variant, info in (("doge", pair[0], doge), ("va", pair[1], va)):
            if variant not in info:
                continue  # not run
            tables[method].append(
                {
                    "subset": subset,
                    "variant": variant,
                    "parameters": info[variant]["parameters"],
                    "fraction": info[variant]["fraction"],
                    "seconds_per_step": results[variant]["seconds_per_step"],
                    "ratio_vs_plain": results[variant]["ratio_vs_plain"],
                }
            )
    return tables


def dids_report(results: dict[str, Any], lm: LmConfig, data: Data) -> dict[str, Any]:
    """One DIDS round's size and cost in plain steps, and amortised over ``dids_round_steps``."""
    extra = results["dids_round"]["ratio_vs_plain"] - 1.0
    groups = data.k * lm.dids_clusters
    return {
        "groups": groups,
        "tasks": data.k,
        "examples_per_group_and_task": data.dids_examples,
        "round_windows": (groups + data.k) * data.dids_examples,
        "round_seconds": results["dids_round"]["seconds_per_step"] - results["plain"]["seconds_per_step"],
        "round_in_plain_steps": extra,
        "round_steps": lm.dids_round_steps,
        "amortised_ratio": 1.0 + extra / lm.dids_round_steps,
        "decay": lm.dids_decay,
    }


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def print_table(report: dict[str, Any]) -> None:
    c = report["config"]
    m = c["model"]
    print(
        f"config {c['name']}: GPT {m['n_layer']}x{m['n_embd']} (T={m['block_size']}, {m['parameters']:,} "
        f"params), batch {c['batch_sequences']}x{m['block_size']}, k={c['domains']}, threads={c['threads']}, "
        f"steps={c['steps']} x repeats={c['repeats']}, torch {report['torch']}, device {c['device_name']}"
        + (f", overrides {c['overrides']}" if c["overrides"] else "")
    )
    print(f"{'variant':<28}{'s/step':>9}{'x plain':>9}{'subset':>8}  {'DoGE target':<14}  target")
    for name, r in report["results"].items():
        target = ""
        if name in report["meets_targets"]:
            limit = TARGETS["doremi_cached_max_ratio" if name == "doremi_cached" else "doge_subset_max_ratio"]
            target = f"<= {limit}: {'met' if report['meets_targets'][name] else 'NOT met'}"
        elif r["informative"]:
            target = "(informative)"
        share = f"{r['subset_fraction']:.1%}" if "subset_fraction" in r else ""
        print(
            f"{name:<28}{r['seconds_per_step']:>9.4f}{r['ratio_vs_plain']:>9.3f}{share:>8}  "
            f"{r.get('doge_target', ''):<14}  {target}"
        )
    for method, label in (("doge", "DoGE"), ("va", "VA (grad_var, per_example)")):
        rows = report["subset_cost"][method]
        if not rows:
            continue
        print(f"{label} cost by subset:")
        print(f"  {'subset':<14}{'params':>13}{'share':>8}{'s/step':>9}{'x plain':>9}")
        for row in rows:
            print(
                f"  {row['subset']:<14}{row['parameters']:>13,}{row['fraction']:>8.1%}"
                f"{row['seconds_per_step']:>9.4f}{row['ratio_vs_plain']:>9.3f}"
            )
    if "dids" in report:
        d = report["dids"]
        print(
            f"dids_round: {d['round_windows']} windows a round ({d['groups']} groups, {d['tasks']} tasks, "
            f"{d['examples_per_group_and_task']} each) = {d['round_in_plain_steps']:.2f} plain steps; "
            f"one round every {d['round_steps']} steps: x{d['amortised_ratio']:.3f} plain"
        )
    for name, s in report["doge_subsets"].items():
        print(
            f"{name}: {s['parameters']:,} parameters ({s['fraction']:.1%}): {', '.join(s['names'][:8])}"
            + (" ..." if len(s["names"]) > 8 else "")
        )
    if "doge_subset_tap_vs_autograd" in report:
        a = report["doge_subset_tap_vs_autograd"]
        print(
            "GradientProductTap vs domain_gradient_products: max rel error grad_dot "
            f"{a['max_rel_error_grad_dot']:.2e}"
            + (
                f", target_grad_dot {a['max_rel_error_target_grad_dot']:.2e}"
                if "max_rel_error_target_grad_dot" in a
                else ""
            )
        )
    mem = report.get("gradient_statistics_memory_bytes")
    if mem:
        print(
            f"memory (MiB, {mem['memory_kind']}): variant, float64 statistics matrix, measured call peak, "
            "measured step peak"
        )
        for name in report["results"]:
            entry = mem.get(name, {})
            print(
                f"  {name:<26}{_mb(entry.get('matrix_bytes')):>9}{_mb(entry.get('call_peak_bytes')):>9}"
                f"{_mb(mem['step_peak_bytes'].get(name)):>9}"
            )
        print(f"  max RSS of the process (context only): {_mb(mem['max_rss_bytes'])}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    if args.out:
        atomic_write_json(args.out, report, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
