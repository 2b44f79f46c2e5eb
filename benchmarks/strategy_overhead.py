"""Seconds per training step with each weighting strategy against plain training, same model and batch.

A tiny byte-level GPT (``domainmix.experiments.gpt``: vocab 256, T = 128, 4 layers, d = 128 by default)
trains with AdamW on batches of 32 random byte sequences from k = 6 domains (stratified counts,
``allocate_counts``). Every variant is a full training step (forward, loss, backward, optimizer step
and, where there is one, the controller's step) on its own copy of the same initial model, over the
same fixed pool of batches:

* ``plain``: mean per-token cross entropy, backward, step. The baseline.
* ``uniform``: the library's bookkeeping with a static strategy (``controller.record()`` around the
  forward, ``controller.step(losses, ids)``, ``weighted_loss`` with the controller's loss multipliers;
  a statistics-free strategy reduces nothing per step).
* ``doremi_cached``: DoReMi's proxy step (``combine(loss=doremi(), sampling=uniform())``,
  ``update_every=1``) with the reference model's per-token losses read from a precomputed fp16 cache
  indexed by the batch's example ids (a ``ReferenceLossProbe``, docs/algorithms.md §1.4): no reference
  forward.
* ``doremi_reference_forward`` (informative): the same, with a frozen reference GPT's forward under
  ``torch.inference_mode()`` every step instead of the cache: what the cache saves (docs/algorithms.md §1.4).
* ``doge_subset``: DoGE updating every step (``combine(loss=doge(lr), sampling=uniform())``): the
  products of the per-domain mean gradients on the last transformer block + final LayerNorm from a
  ``GradientProductTap`` (one backward to the subset's layer outputs, then per-domain weight gradients
  in closed form) through a ``GradientProductProbe`` in ``controller.step(losses, ids)``, then the
  ordinary weighted backward.
* ``doge_last_mlp``: the same on the last block's MLP only (a smaller subset), and ``doge_last_mlp_out``
  on its output projection only (one weight matrix and bias, the smallest subset tried).
* ``doge_all_blocks`` (informative): the tap on every block and the final LayerNorm (every parameter
  but the token and position embeddings).
* ``doge_subset_autograd`` (informative): the ``doge_subset`` products from
  ``domain_gradient_products`` (one ``autograd.grad`` per domain on the subset, docs/algorithms.md §2.4;
  a small ``Probe`` subclass here),
  the general path for subsets that are not Linear/LayerNorm layers. The two paths' agreement on one
  batch is reported.

Timing: ``--warmup`` steps per variant, then per repetition ``--steps`` rounds in which every variant
runs one step (round-robin, the order rotated every round so that machine noise hits all alike).
Reported: the median over repetitions of the mean seconds per step, and the median over repetitions
of the per-repetition ratio to ``plain``.

Memory of the gradient statistics: both paths keep a (k+1) × P_subset float64 matrix (``matrix_bytes``,
analytic). The measured figure is the peak of live CPU tensor bytes allocated during
one call, from the torch profiler's allocator events (``profile_memory=True``), relative to the bytes
live when the call starts; the same measure is given for one whole step of every variant.
``tracemalloc`` does not see tensor storage and ``ru_maxrss`` only moves on a new process-wide peak, so
the max RSS is reported for context only.

Usage: python benchmarks/strategy_overhead.py [--json] [--steps 10] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from domainmix import StatsCollector, WeightingController, weighted_loss
from domainmix.experiments.gpt import GPT, GPTConfig, per_token_loss
from domainmix.sampling import allocate_counts
from domainmix.stats import (
    GradientProductProbe,
    GradientProductTap,
    Probe,
    ReferenceLossProbe,
    StepLosses,
    domain_gradient_products,
)
from domainmix.strategies import combine, doge, doremi, uniform

VARIANTS = (
    "plain",
    "uniform",
    "doremi_cached",
    "doremi_reference_forward",
    "doge_subset",
    "doge_last_mlp",
    "doge_last_mlp_out",
    "doge_all_blocks",
    "doge_subset_autograd",
)
INFORMATIVE = ("doremi_reference_forward", "doge_all_blocks", "doge_subset_autograd")
DOGE_VARIANTS = (
    "doge_subset",
    "doge_last_mlp",
    "doge_last_mlp_out",
    "doge_all_blocks",
    "doge_subset_autograd",
)
TARGETS = {"doge_subset_max_ratio": 1.5, "doremi_cached_max_ratio": 1.05}
LR, WEIGHT_DECAY, MAX_NORM, DOGE_MU = 5e-4, 0.01, 5.0, 0.01  # DoGE reference config (docs/algorithms.md §2.3)


# --------------------------------------------------------------------------------------------------
# Data: a fixed pool of batches, every batch stratified over the k domains.
class Data:
    def __init__(self, args: argparse.Namespace) -> None:
        g = torch.Generator().manual_seed(args.seed)
        self.k, self.batch = args.domains, args.batch
        self.counts = allocate_counts([1.0] * self.k, self.batch).tolist()
        n = args.pool * self.batch
        self.tokens = torch.randint(0, args.vocab, (n, args.block_size + 1), generator=g)
        ids = torch.repeat_interleave(torch.arange(self.k), torch.tensor(self.counts))
        self.domain_ids = ids.repeat(args.pool)
        self.pool = args.pool
        self.ref_cache: Tensor | None = None  # (n, T) fp16 reference per-token losses, filled by cache()

    def get(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Example ids, inputs, targets and domain ids of batch ``step`` (cycling through the pool)."""
        start = (step % self.pool) * self.batch
        index = torch.arange(start, start + self.batch)
        seq = self.tokens[index]
        return index, seq[:, :-1], seq[:, 1:], self.domain_ids[index]

    def cache(self, reference: nn.Module) -> None:
        with torch.inference_mode():
            rows = [
                per_token_loss(reference(x), y).to(torch.float16)
                for _, x, y, _ in (self.get(i) for i in range(self.pool))
            ]
        self.ref_cache = torch.cat(rows)


class _FixedSink:
    """Stands in for the sampler: the controller reads the batch's realised q (stratified counts / B)."""

    def __init__(self, names: Sequence[str], counts: Sequence[int]) -> None:
        self.domains = tuple(names)
        self.effective_sampling = torch.tensor(counts, dtype=torch.float64) / sum(counts)

    def set_weights(self, weights: Any) -> None:
        del weights


# --------------------------------------------------------------------------------------------------
# Parameter subsets for DoGE (never the tied embedding tok.weight = head.weight).
def subset_modules(model: GPT, which: str) -> list[nn.Module]:
    last = model.blocks[-1]
    return {
        "doge_subset": [last, model.ln],
        "doge_subset_autograd": [last, model.ln],
        "doge_last_mlp": [last.mlp],
        "doge_last_mlp_out": [last.mlp[2]],
        "doge_all_blocks": [model.blocks, model.ln],
    }[which]


class AutogradProducts(Probe):
    """DoGE's products by one ``autograd.grad`` per domain (``domain_gradient_products``), as a probe."""

    sources = ("gradient_products",)

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params

    def observe_step(self, collector: StatsCollector, step: StepLosses) -> None:
        k = collector.num_domains
        out = domain_gradient_products(step.losses, step.domains, k, params=self.params, max_norm=MAX_NORM)
        collector.observe_stat("grad_dot", out.grad_dot)
        collector.observe_stat("grad_sq_norm", out.grad_sq_norm)


# --------------------------------------------------------------------------------------------------
# One runner per variant: its own model copy, optimizer and controller (with the variant's probe).
class Runner:
    def __init__(self, name: str, base: GPT, reference: GPT, data: Data) -> None:
        self.name, self.data, self.reference = name, data, reference
        self.model = copy.deepcopy(base)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.k = data.k
        self.i = 0
        self.subset: list[Tensor] = []
        self.subset_names: list[str] = []
        self.tap: GradientProductTap | None = None
        self.inputs: tuple[Tensor, Tensor] | None = None  # the step's (x, y), for the reference forward
        names = [f"d{i}" for i in range(self.k)]
        sink = _FixedSink(names, data.counts)
        probes: list[Probe] = []
        if name in DOGE_VARIANTS:
            tap = GradientProductTap(*subset_modules(self.model, name))
            self.subset = tap.parameters()
            chosen = {id(p) for p in self.subset}
            self.subset_names = [n for n, p in self.model.named_parameters() if id(p) in chosen]
            if name == "doge_subset_autograd":
                tap.remove()
                probes.append(AutogradProducts(self.subset))
            else:
                self.tap = tap
                probes.append(GradientProductProbe(tap, max_norm=MAX_NORM))
            strategy = combine(loss=doge(LR, mu=DOGE_MU), sampling=uniform())
        elif name.startswith("doremi"):
            strategy = combine(loss=doremi(), sampling=uniform())
            lookup = self.cached_reference if name == "doremi_cached" else self.reference_forward
            probes.append(ReferenceLossProbe(lookup))
        else:
            strategy = uniform()
        self.controller = (
            None
            if name == "plain"
            else WeightingController(strategy, names, update_every=1, sampler=sink, probes=probes)
        )

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
        self.opt.step()

    def products(self, tok: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        if self.tap is not None:
            out = self.tap.products(tok, ids, self.k, max_norm=MAX_NORM)
        else:
            out = domain_gradient_products(tok, ids, self.k, params=self.subset, max_norm=MAX_NORM)
        return out.grad_dot, out.grad_sq_norm


# --------------------------------------------------------------------------------------------------
# Memory: peak of live tensor bytes (CPU allocator events) during a call, relative to its start.
def peak_tensor_bytes(fn: Callable[[], Any]) -> int | None:
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


def measure_memory(runners: dict[str, Runner]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "method": (
            "matrix_bytes: the (k+1) x P_subset float64 matrix of the gradient rows (analytic, both "
            "paths). call_peak_bytes / step_peak_bytes: "
            "peak live CPU tensor bytes during one products call / one whole step, from torch profiler "
            "allocator events, relative to the bytes live at its start. max_rss_bytes: process-wide, "
            "context only."
        )
    }
    step_peaks = {}
    for name, runner in runners.items():
        step_peaks[name] = peak_tensor_bytes(runner.step)
    for name, runner in runners.items():
        if name not in DOGE_VARIANTS:
            continue
        size = sum(p.numel() for p in runner.subset)
        _, x, y, ids = runner.data.get(0)
        with runner.tap.record() if runner.tap is not None else nullcontext():
            tok = per_token_loss(runner.model(x), y)
        entry = {
            "parameters": size,
            "matrix_bytes": (runner.k + 1) * size * 8,
            "call_peak_bytes": peak_tensor_bytes(lambda r=runner, t=tok, i=ids: r.products(t, i)),
        }
        out[name] = entry
        del tok
    out["step_peak_bytes"] = step_peaks
    out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def check_agreement(base: GPT, data: Data) -> dict[str, float]:
    """Largest difference between the tap's and domain_gradient_products' products, on one batch."""
    model = copy.deepcopy(base)
    tap = GradientProductTap(*subset_modules(model, "doge_subset"))
    _, x, y, ids = data.get(0)
    with tap.record():
        tok = per_token_loss(model(x), y)
    lib = domain_gradient_products(tok, ids, data.k, params=tap.parameters(), max_norm=MAX_NORM)
    got = tap.products(tok, ids, data.k, max_norm=MAX_NORM)
    scale = float(lib.grad_dot.abs().max().clamp_min(1e-30))
    return {
        "max_abs_error_grad_dot": float((got.grad_dot - lib.grad_dot).abs().max()),
        "max_rel_error_grad_dot": float((got.grad_dot - lib.grad_dot).abs().max()) / scale,
        "max_rel_error_grad_sq_norm": float(
            ((got.grad_sq_norm - lib.grad_sq_norm).abs() / lib.grad_sq_norm.abs().clamp_min(1e-30)).max()
        ),
    }


# --------------------------------------------------------------------------------------------------
def measure(runners: dict[str, Runner], steps: int, warmup: int, repeats: int) -> dict[str, list[float]]:
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
                runner = runners[name]
                start = time.perf_counter()
                runner.step()
                totals[name] += time.perf_counter() - start
        for name in names:
            times[name].append(totals[name] / steps)
    return times


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list; plain is always run")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="sequences per batch")
    parser.add_argument("--domains", type=int, default=6)
    parser.add_argument("--pool", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler memory measurements")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.variants = [v for v in VARIANTS if v == "plain" or v in chosen]
    if args.batch < args.domains:
        parser.error("--batch must be at least --domains (every domain in every batch)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(
        vocab_size=args.vocab,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    base = GPT(cfg)
    reference = GPT(cfg).eval().requires_grad_(False)  # another init: a frozen "reference model"
    data = Data(args)
    data.cache(reference)
    runners = {name: Runner(name, base, reference, data) for name in args.variants}
    times = measure(runners, args.steps, args.warmup, args.repeats)
    plain = times["plain"]
    results: dict[str, Any] = {}
    for name, ts in times.items():
        results[name] = {
            "seconds_per_step": statistics.median(ts),
            "all": ts,
            "ratio_vs_plain": statistics.median(a / b for a, b in zip(ts, plain, strict=True)),
            "informative": name in INFORMATIVE,
        }
    total = base.num_parameters()
    subsets = {
        name: {
            "names": runner.subset_names,
            "parameters": sum(p.numel() for p in runner.subset),
            "fraction": sum(p.numel() for p in runner.subset) / total,
        }
        for name, runner in runners.items()
        if name in DOGE_VARIANTS
    }
    meets: dict[str, bool | None] = {}
    for name in ("doge_subset", "doge_last_mlp", "doge_last_mlp_out"):
        if name in results:
            meets[name] = results[name]["ratio_vs_plain"] <= TARGETS["doge_subset_max_ratio"]
    if "doremi_cached" in results:
        meets["doremi_cached"] = (
            results["doremi_cached"]["ratio_vs_plain"] <= TARGETS["doremi_cached_max_ratio"]
        )
    report: dict[str, Any] = {
        "benchmark": "strategy_overhead",
        "config": {
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
            "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY},
            "doge": {"learning_rate": LR, "mu": DOGE_MU, "max_norm": MAX_NORM, "update_every": 1},
            "doremi": {"update_every": 1, "reference_cache_dtype": "float16"},
            "variants": args.variants,
        },
        "torch": torch.__version__,
        "results": results,
        "doge_subset": subsets.get("doge_subset"),
        "doge_subsets": subsets,
        "targets": TARGETS,
        "meets_targets": meets,
    }
    if "doge_subset_autograd" in runners:
        report["doge_subset_tap_vs_autograd"] = check_agreement(base, data)
    if not args.no_memory:
        report["gradient_statistics_memory_bytes"] = measure_memory(runners)
    return report


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def print_table(report: dict[str, Any]) -> None:
    c = report["config"]
    m = c["model"]
    print(
        f"GPT {m['n_layer']}x{m['n_embd']} (T={m['block_size']}, {m['parameters']:,} params), "
        f"batch {c['batch_sequences']}x{m['block_size']}, k={c['domains']}, threads={c['threads']}, "
        f"steps={c['steps']} x repeats={c['repeats']}, torch {report['torch']}"
    )
    print(f"{'variant':<28}{'s/step':>9}{'x plain':>9}  target")
    for name, r in report["results"].items():
        target = ""
        if name in report["meets_targets"]:
            limit = TARGETS["doremi_cached_max_ratio" if name == "doremi_cached" else "doge_subset_max_ratio"]
            target = f"<= {limit}: {'met' if report['meets_targets'][name] else 'NOT met'}"
        elif r["informative"]:
            target = "(informative)"
        print(f"{name:<28}{r['seconds_per_step']:>9.4f}{r['ratio_vs_plain']:>9.3f}  {target}")
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
        )
    mem = report.get("gradient_statistics_memory_bytes")
    if mem:
        print("memory (MiB): variant, (k+1) x P float64 matrix, measured call peak, measured step peak")
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
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
