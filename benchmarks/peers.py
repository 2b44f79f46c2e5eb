"""Side-by-side throughput of domain samplers: domainmix against torch, torchdata, HF, lhotse and Megatron.

The setting of ``benchmarks/sampler_throughput.py`` (its constants are imported): 8 domains of 50k-600k
examples (2.05 M in all), weights .4/.2/.1/.1/.08/.06/.04/.02, batches of 256. What is measured is the
rate at which each system hands out example indices (indices per second), in one process:

* ``torch_wrs``: ``BatchSampler(WeightedRandomSampler(per_example_weights, n * 256), 256)``; a fresh
  ``iter()`` per repetition, as every epoch, so its one ``torch.multinomial`` is timed. The baseline: every
  ratio is against it, repetition by repetition.
* ``torchdata_mnws``: ``Batcher(MultiNodeWeightedSampler({name: IterableWrapper(range)}, weights,
  stop_criteria=CYCLE_FOREVER), 256)``, nodes pulled directly (no ``Loader``).
* ``hf_interleave``: ``interleave_datasets([Dataset.from_dict({"idx": ...}).to_iterable_dataset() ...],
  probabilities, seed=0, stopping_strategy="all_exhausted")`` read with ``.iter(batch_size=256)``: what a
  user streaming Arrow-backed datasets does; the Arrow-to-Python conversion of every example is timed.
* ``lhotse_mux``: ``LazyIteratorMultiplexer(*[LazyRepeater(range)], weights)``, 256 items per batch.
* ``megatron_blend``: Megatron-Core's C++ ``build_blending_indices`` building an index of ``n * 256``
  entries (its two output arrays allocated inside the timed region). The index holds (dataset id, position
  in that dataset), not dataset-wide example indices, and is built once before training.
* ``domainmix_*``: ``DomainBatchSampler`` in modes ``stratified``, ``low_discrepancy`` and ``iid``; the
  first two also with ``set_weights`` alternating between the weights and their reverse every 100 batches
  (``*_weight_change``) or to a new random vector every 100 batches (``*_new_weights``: floats, as an
  online method sets them); ``domainmix_stratified_carried``: ``carry_remainder=True``;
  ``domainmix_keyed_permutation``: stratified over 8 domains of 125 M examples
  (10^9 in all, past the materialisation limit of ``domainmix.sampling._streams``), where every index goes
  through the keyed Feistel bijection instead of a stored permutation.
* ``list_floor`` (a reference, not a sampler): random indices drawn before timing, handed out as lists with
  one ``tolist()`` per 100 batches; the cost of yielding lists of Python ints at all, under every row that
  does (all but the ``*_numpy`` rows and Megatron).
* ``permutation_floor`` (a reference): every domain in turn, a fresh ``Generator.permutation`` of it cut
  into batches of arrays; the cost of drawing indices through stored per-pass permutations, as the
  stratified and low-discrepancy rows do, without planning.
* ``randperm_floor`` (a reference): the same with ``torch.randperm``, the fastest shuffle a package on
  torch and numpy has (the sampler does not use it: see ``docs/design.md``, "Streams"); what the lists'
  budget would be with it.

Protocol: every system is set up (not timed), then runs one untimed warm-up repetition, whose indices give
the achieved domain shares; the streaming ones (all but torch and Megatron) then continue from where they
are (steady state). Each of the ``--repeats`` timed repetitions times every system once, in a fixed order,
so that machine noise hits them alike; the report gives medians. Systems run different numbers of batches
per repetition (``config.batches_per_repeat``) so that each timing lasts about half a second. A system
whose package or compiled extension is missing is reported as unavailable, with the reason, never with a
number.

Usage: python benchmarks/peers.py [--json] [--out benchmarks/results/peers.json] [--repeats 15] [--scale 1]
       [--systems torch_wrs,domainmix_stratified,...] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sampler_throughput import BATCH, MODES, SIZES, WEIGHTS  # benchmarks/ is on sys.path when run as a script
from torch.utils.data import BatchSampler, WeightedRandomSampler

from domainmix._atomic import atomic_write_json
from domainmix.sampling import DomainBatchSampler
from domainmix.sampling._streams import _MATERIALIZE_LIMIT

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "peers.json"
BASELINE = "torch_wrs"
PEERS = ("torch_wrs", "torchdata_mnws", "hf_interleave", "lhotse_mux", "megatron_blend")
DOMAINMIX = (
    *(f"domainmix_{m}" for m in MODES),
    "domainmix_stratified_weight_change",
    "domainmix_low_discrepancy_weight_change",
    "domainmix_stratified_new_weights",
    "domainmix_low_discrepancy_new_weights",
    "domainmix_stratified_carried",
    "domainmix_keyed_permutation",
    "domainmix_stratified_weight_change_numpy",
    "domainmix_low_discrepancy_weight_change_numpy",
)
# Not samplers: handing out ready-made lists (the floor under every row that yields lists of Python ints)
# and drawing through per-pass permutations (under every stratified and low-discrepancy row).
REFERENCE = ("list_floor", "permutation_floor", "randperm_floor")
SYSTEMS = (*PEERS, *DOMAINMIX, *REFERENCE)
PACKAGES = ("torch", "numpy", "torchdata", "datasets", "pyarrow", "lhotse", "megatron-core", "domainmix")

LABELS = {
    "torch_wrs": "torch `WeightedRandomSampler` + `BatchSampler`",
    "torchdata_mnws": "torchdata `MultiNodeWeightedSampler` + `Batcher`",
    "hf_interleave": "HF datasets `interleave_datasets` (IterableDataset)",
    "lhotse_mux": "lhotse `LazyIteratorMultiplexer`",
    "megatron_blend": "Megatron-Core `build_blending_indices` (index build)",
    "domainmix_stratified": "domainmix `DomainBatchSampler` stratified",
    "domainmix_low_discrepancy": "domainmix `DomainBatchSampler` low_discrepancy",
    "domainmix_iid": "domainmix `DomainBatchSampler` iid",
    "domainmix_stratified_weight_change": "domainmix stratified, alternating `set_weights`",
    "domainmix_low_discrepancy_weight_change": "domainmix low_discrepancy, alternating `set_weights`",
    "domainmix_stratified_new_weights": "domainmix stratified, new random weights",
    "domainmix_low_discrepancy_new_weights": "domainmix low_discrepancy, new random weights",
    "domainmix_stratified_carried": "domainmix stratified, `carry_remainder=True`",
    "domainmix_keyed_permutation": "domainmix stratified, keyed-permutation path",
    "domainmix_stratified_weight_change_numpy": "domainmix stratified, alternating, `as_numpy=True`",
    "domainmix_low_discrepancy_weight_change_numpy": (
        "domainmix low_discrepancy, alternating, `as_numpy=True`"
    ),
    "list_floor": "floor: ready-made lists, no sampling (one `tolist()` per 100 batches)",
    "permutation_floor": "floor: per-pass permutations sliced into arrays, no plan",
    "randperm_floor": "floor: the same with `torch.randperm` (not used by the sampler)",
}


def _answer(answer: str, how: str) -> dict[str, str]:
    return {"answer": answer, "how": how}


_DOMAINMIX_CAPABILITIES: dict[str, Any] = {
    "online_weight_change": _answer(
        "yes", "`set_weights()` applies from the next batch; the change is recorded in `weight_history`"
    ),
    "exact_resume": _answer(
        "yes",
        "`state_dict()` is a few integers per domain plus the weight history; a resume reproduces the "
        "uninterrupted run batch for batch, across weight changes",
    ),
    "rank_consistent_plan": _answer(
        "yes",
        "every rank computes the same plan for each global batch and takes its share, with no communication",
    ),
    "plan": "online",
    "sources": ["docs/design.md"],
}

# What each system can do, from its own source, documentation and issue tracker at the benchmarked release.
CAPABILITIES: dict[str, dict[str, Any]] = {
    "torch_wrs": {
        "online_weight_change": _answer(
            "partial",
            "no setter; an assignment to `sampler.weights` takes effect at the next `iter()`, which draws "
            "the whole epoch with one `torch.multinomial`",
        ),
        "exact_resume": _answer(
            "no", "no `state_dict`; only re-seeding the generator and replaying the epoch"
        ),
        "rank_consistent_plan": _answer(
            "no", "not rank-aware: every rank draws its own sample (open request pytorch#77154)"
        ),
        "plan": "static per epoch",
        "sources": [
            "https://github.com/pytorch/pytorch/blob/main/torch/utils/data/sampler.py",
            "https://github.com/pytorch/pytorch/issues/77154",
        ],
    },
    "torchdata_mnws": {
        "online_weight_change": _answer(
            "no",
            "no setter; the weights are validated at construction and copied into the draw generator at "
            "`reset()`",
        ),
        "exact_resume": _answer(
            "yes",
            "`state_dict()` holds the generator state and offset, the items yielded, the per-source states "
            "and the exhaustion flags",
        ),
        "rank_consistent_plan": _answer(
            "no",
            "each rank draws its own domain sequence, seeded from (seed, rank, world_size, epoch); the "
            "global mix holds in expectation only",
        ),
        "plan": "static",
        "sources": [
            "https://github.com/meta-pytorch/data/blob/v0.11.0/torchdata/nodes/samplers/multi_node_weighted_sampler.py",
            "https://github.com/meta-pytorch/data/blob/v0.11.0/torchdata/nodes/samplers/utils.py",
        ],
    },
    "hf_interleave": {
        "online_weight_change": _answer(
            "no", "the probabilities are fixed when the datasets are interleaved (open request datasets#7387)"
        ),
        "exact_resume": _answer(
            "yes",
            "`IterableDataset.state_dict()` / `load_state_dict()` (bit-generator state and offset, "
            "per-source states)",
        ),
        "rank_consistent_plan": _answer(
            "no",
            '"In a distributed setup or in PyTorch DataLoader workers, the stopping strategy is applied per '
            'process" (`interleave_datasets` docstring): each rank interleaves its own shard',
        ),
        "plan": "static",
        "sources": [
            "https://github.com/huggingface/datasets/blob/main/src/datasets/combine.py",
            "https://huggingface.co/docs/datasets/stream#save-a-dataset-checkpoint-and-resume-iteration",
            "https://github.com/huggingface/datasets/issues/7387",
        ],
    },
    "lhotse_mux": {
        "online_weight_change": _answer(
            "yes",
            "the weights may be a shared-memory torch tensor edited in place; it is read at every draw, also "
            "in DataLoader workers (lhotse#1266)",
        ),
        "exact_resume": _answer(
            "no",
            "in 1.33.0 the multiplexer keeps no state (checkpointable data loading, lhotse#1570, landed "
            "after this release)",
        ),
        "rank_consistent_plan": _answer("no", "every process draws each item from its own `random.Random`"),
        "plan": "online",
        "sources": [
            "https://github.com/lhotse-speech/lhotse/blob/v1.33.0/lhotse/lazy.py",
            "https://github.com/lhotse-speech/lhotse/blob/v1.33.0/test/dataset/test_controllable_weights.py",
            "https://github.com/lhotse-speech/lhotse/pull/1266",
            "https://github.com/lhotse-speech/lhotse/pull/1570",
        ],
    },
    "megatron_blend": {
        "online_weight_change": _answer(
            "no",
            "the blend is an index precomputed before training (and cached on disk); other weights mean "
            "another index (Megatron-LM#457)",
        ),
        "exact_resume": _answer("yes", "a consumed-samples counter into the static index"),
        "rank_consistent_plan": _answer(
            "yes",
            "one global index (built on rank 0 and cached, or identically on every rank) that all ranks read",
        ),
        "plan": "static",
        "sources": [
            "https://github.com/NVIDIA/Megatron-LM/blob/core_v0.16.1/megatron/core/datasets/helpers.cpp",
            "https://github.com/NVIDIA/Megatron-LM/blob/core_v0.16.1/megatron/core/datasets/blended_dataset.py",
            "https://github.com/NVIDIA/Megatron-LM/issues/457",
        ],
    },
    **{name: _DOMAINMIX_CAPABILITIES for name in DOMAINMIX},
    "list_floor": {
        **{
            key: _answer("no", "not a sampler: the same few blocks of indices, drawn before timing")
            for key in ("online_weight_change", "exact_resume", "rank_consistent_plan")
        },
        "plan": "none (reference)",
        "sources": ["benchmarks/peers.py"],
    },
}
CAPABILITIES["permutation_floor"] = CAPABILITIES["randperm_floor"] = {
    **CAPABILITIES["list_floor"],
    **{
        key: _answer("no", "not a sampler: fresh permutations of each domain in turn, without weights")
        for key in ("online_weight_change", "exact_resume", "rank_consistent_plan")
    },
}


@dataclass(frozen=True)
class Config:
    """What is measured: the domains, weights, batch size, repetitions and batches per system.

    Attributes:
        sizes: examples per domain; domain i holds the indices ``[sum(sizes[:i]), sum(sizes[:i+1]))``.
        weights: the target domain weights.
        batch_size: indices per batch.
        repeats: timed repetitions (each after one untimed warm-up repetition). 15: on a shared 2-core
            machine one system's rate moved twofold between the repetitions of one run (stratified,
            alternating: 9.8 to 20.8 M indices/s over 5), so a median of 5 moved by 10 % between runs.
        batches_per_repeat: batches each system hands out per repetition (Megatron: the index built has
            ``batches * batch_size`` entries).
        weight_change_every: batches between two ``set_weights`` calls in the ``*_weight_change`` variants.
        large_domain_size: examples per domain of the keyed-permutation variant (8 domains).
        hf_stopping_strategy: the ``stopping_strategy`` of ``interleave_datasets``.
        seed: seed of every system that takes one.
    """

    sizes: tuple[int, ...] = tuple(SIZES)
    weights: tuple[float, ...] = tuple(WEIGHTS)
    batch_size: int = BATCH
    repeats: int = 15
    batches_per_repeat: Mapping[str, int] = field(
        default_factory=lambda: {
            "torch_wrs": 4000,
            "torchdata_mnws": 2000,
            "hf_interleave": 40,
            "lhotse_mux": 400,
            "megatron_blend": 40_000,
            "domainmix_stratified": 40_000,
            "domainmix_low_discrepancy": 40_000,
            "domainmix_iid": 40_000,
            "domainmix_stratified_weight_change": 20_000,
            "domainmix_low_discrepancy_weight_change": 20_000,
            "domainmix_stratified_new_weights": 20_000,
            "domainmix_low_discrepancy_new_weights": 1_000,
            "domainmix_stratified_carried": 20_000,
            "domainmix_keyed_permutation": 20_000,
            "domainmix_stratified_weight_change_numpy": 20_000,
            "domainmix_low_discrepancy_weight_change_numpy": 20_000,
            "list_floor": 40_000,
            "permutation_floor": 40_000,
            "randperm_floor": 40_000,
        }
    )
    weight_change_every: int = 100
    large_domain_size: int = 125_000_000
    hf_stopping_strategy: str = "all_exhausted"
    seed: int = 0

    def scaled(self, factor: float) -> Config:
        """The same configuration with every batch count multiplied by ``factor`` (at least one batch)."""
        counts = {name: max(1, round(n * factor)) for name, n in self.batches_per_repeat.items()}
        return dataclasses.replace(self, batches_per_repeat=counts)


def quick_config() -> Config:
    """A configuration that runs in a second or two: domains 1/100 of the size, a few batches, 2 repeats.

    The keyed-permutation variant keeps its 125 M-example domains (ranges cost nothing to hold), so it
    still exercises the lazy path.
    """
    return Config(
        sizes=tuple(s // 100 for s in SIZES),
        repeats=2,
        batches_per_repeat={name: 4 for name in SYSTEMS},
        weight_change_every=2,
    )


class Unavailable(Exception):
    """A system cannot run here (a missing package or compiled extension); the message says why."""


@dataclass
class Source:
    """One system, set up: ``batches(n)`` hands out ``n`` batches; ``domains_of`` maps a batch to domain ids.

    Attributes:
        batches: ``n -> iterable`` of ``n`` batches of indices (Megatron: one index of ``n * batch_size``).
        domains_of: batch -> (len(batch),) int64 domain ids, for the achieved shares (not timed).
        targets: ``(start_batch, n) -> (k,)`` mean target weights over those batches.
    """

    batches: Callable[[int], Iterable[Sequence[int] | np.ndarray]]
    domains_of: Callable[[Any], np.ndarray]
    targets: Callable[[int, int], np.ndarray]


def _bounds(sizes: Sequence[int]) -> np.ndarray:
    return np.cumsum([0, *sizes]).astype(np.int64)


def _domain_ranges(sizes: Sequence[int]) -> dict[str, range]:
    b = _bounds(sizes).tolist()
    return {f"d{i}": range(b[i], b[i + 1]) for i in range(len(sizes))}


def _by_bounds(bounds: np.ndarray) -> Callable[[Any], np.ndarray]:
    def domains_of(batch: Any) -> np.ndarray:
        ids: np.ndarray = np.searchsorted(bounds, np.asarray(batch, dtype=np.int64), side="right") - 1
        return ids

    return domains_of


def _static(weights: Sequence[float]) -> Callable[[int, int], np.ndarray]:
    q = np.asarray(weights, dtype=np.float64) / sum(weights)
    return lambda start, n: q


def _pull(iterator: Iterator[Any], n: int) -> Iterator[Any]:
    return itertools.islice(iterator, n)


def _import(module: str, package: str) -> Any:
    """Import ``module``, raising :class:`Unavailable` (naming the pip package) if it cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Megatron warns that Transformer Engine and Apex are missing
            return importlib.import_module(module)
    except ImportError as e:
        raise Unavailable(
            f"cannot import {module} ({type(e).__name__}: {e}); install it with "
            f"pip install 'domainmix[peers]' (pins {package})"
        ) from e


# ---------------------------------------------------------------------------------------------- systems


def _torch_wrs(cfg: Config) -> Source:
    per_example = torch.cat(
        [torch.full((s,), w / s, dtype=torch.float64) for s, w in zip(cfg.sizes, cfg.weights, strict=True)]
    )
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches(n: int) -> Iterator[list[int]]:
        wrs = WeightedRandomSampler(per_example, n * cfg.batch_size, replacement=True, generator=gen)
        return iter(BatchSampler(wrs, cfg.batch_size, drop_last=True))

    return Source(batches, _by_bounds(_bounds(cfg.sizes)), _static(cfg.weights))


def _torchdata_mnws(cfg: Config) -> Source:
    nodes = _import("torchdata.nodes", "torchdata==0.11.0")
    ranges = _domain_ranges(cfg.sizes)
    sampler = nodes.MultiNodeWeightedSampler(
        {name: nodes.IterableWrapper(r) for name, r in ranges.items()},
        dict(zip(ranges, cfg.weights, strict=True)),
        stop_criteria=nodes.StopCriteria.CYCLE_FOREVER,
        seed=cfg.seed,
    )
    it = iter(nodes.Batcher(sampler, cfg.batch_size, drop_last=True))
    return Source(lambda n: _pull(it, n), _by_bounds(_bounds(cfg.sizes)), _static(cfg.weights))


def _hf_interleave(cfg: Config) -> Source:
    hf = _import("datasets", "datasets==5.2.0")
    hf.disable_progress_bars()
    sources = [
        hf.Dataset.from_dict({"idx": np.arange(r.start, r.stop, dtype=np.int64)}).to_iterable_dataset()
        for r in _domain_ranges(cfg.sizes).values()
    ]
    mixed = hf.interleave_datasets(
        sources, probabilities=list(cfg.weights), seed=cfg.seed, stopping_strategy=cfg.hf_stopping_strategy
    )
    it = iter(mixed.iter(batch_size=cfg.batch_size, drop_last_batch=True))

    def batches(n: int) -> Iterator[list[int]]:
        for _ in range(n):
            yield next(it)["idx"]

    return Source(batches, _by_bounds(_bounds(cfg.sizes)), _static(cfg.weights))


def _lhotse_mux(cfg: Config) -> Source:
    lazy = _import("lhotse.lazy", "lhotse==1.33.0")
    forever = [lazy.LazyRepeater(r, preserve_id=True) for r in _domain_ranges(cfg.sizes).values()]
    items = iter(lazy.LazyIteratorMultiplexer(*forever, weights=list(cfg.weights), seed=cfg.seed))
    b = cfg.batch_size

    def batches(n: int) -> Iterator[list[int]]:
        for _ in range(n):
            yield list(itertools.islice(items, b))

    return Source(batches, _by_bounds(_bounds(cfg.sizes)), _static(cfg.weights))


def _megatron_blend(cfg: Config) -> Source:
    try:
        helpers = _import("megatron.core.datasets.helpers_cpp", "megatron-core==0.16.1")
    except Unavailable as e:
        raise Unavailable(
            f"{e}; helpers_cpp is megatron-core's compiled C++ extension (shipped in its binary wheels); "
            "no build from source was attempted"
        ) from e
    weights = np.asarray(cfg.weights, dtype=np.float64)
    k = len(cfg.sizes)

    def batches(n: int) -> Iterator[np.ndarray]:
        size = n * cfg.batch_size
        dataset_index = np.zeros(size, dtype=np.int16)
        dataset_sample_index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(dataset_index, dataset_sample_index, weights, k, size, False)
        yield dataset_index

    return Source(batches, lambda index: np.asarray(index, dtype=np.int64), _static(cfg.weights))


def _domainmix(
    cfg: Config,
    mode: str,
    *,
    change: str = "",
    large: bool = False,
    carry: bool = False,
    as_numpy: bool = False,
) -> Source:
    """``change``: "" (fixed weights), "alternate" (the weights and their reverse, in turn) or "fresh"
    (a new random weight vector each time, as an online method sets them). ``as_numpy``: batches as int64
    arrays instead of lists."""
    sizes = [cfg.large_domain_size] * len(cfg.sizes) if large else list(cfg.sizes)
    if large and cfg.large_domain_size <= _MATERIALIZE_LIMIT:
        raise ValueError(f"large_domain_size must exceed the materialisation limit {_MATERIALIZE_LIMIT}")
    sampler = DomainBatchSampler(
        _domain_ranges(sizes), cfg.batch_size, list(cfg.weights), mode=mode, seed=cfg.seed,
        carry_remainder=carry, as_numpy=as_numpy,
    )  # fmt: skip
    it = iter(sampler)
    if not change:
        return Source(lambda n: _pull(it, n), _by_bounds(_bounds(sizes)), _static(cfg.weights))
    every, done = cfg.weight_change_every, [0]
    vectors = [list(cfg.weights), list(reversed(cfg.weights))]
    if change == "fresh":  # floats with no short period: the low-discrepancy order is computed slot by slot
        rng = np.random.default_rng(cfg.seed)
        vectors = [list(cfg.weights)]

    def vector(period: int) -> list[float]:
        if change == "alternate":
            return vectors[period % 2]
        while len(vectors) <= period:
            vectors.append(rng.dirichlet(50 * np.asarray(cfg.weights)).tolist())
        return vectors[period]

    def batches(n: int) -> Iterator[list[int]]:
        t = done[0]
        for _ in range(n):
            if t and t % every == 0:
                sampler.set_weights(vector(t // every))
            yield next(it)
            t += 1
        done[0] = t

    def targets(start: int, n: int) -> np.ndarray:
        periods = np.arange(start, start + n) // every
        mean: np.ndarray = np.asarray([vector(int(p)) for p in periods], dtype=np.float64).mean(axis=0)
        return mean

    return Source(batches, _by_bounds(_bounds(sizes)), targets)


def _list_floor(cfg: Config) -> Source:
    """Lists of Python ints out of ready-made index blocks: what handing out a list costs without sampling.

    Every row that yields lists pays this (``ndarray.tolist()`` creates and later frees one Python int
    per index), so no sampler yielding lists can beat it; the ``as_numpy=True`` rows do not pay it.
    """
    rng = np.random.default_rng(cfg.seed)
    blocks = rng.integers(0, sum(cfg.sizes), (_FLOOR_BLOCKS, _FLOOR_ROWS, cfg.batch_size))  # not timed
    done = [0]

    def batches(n: int) -> Iterator[list[int]]:
        start = done[0]
        for b in range(start // _FLOOR_ROWS, -(-(start + n) // _FLOOR_ROWS)):
            rows = blocks[b % _FLOOR_BLOCKS].tolist()
            lo, hi = max(start - b * _FLOOR_ROWS, 0), min(start + n - b * _FLOOR_ROWS, _FLOOR_ROWS)
            yield from rows[lo:hi]
        done[0] = start + n

    return Source(batches, _by_bounds(_bounds(cfg.sizes)), _static(cfg.sizes))


_FLOOR_ROWS = 100  # batches per ``tolist()``: the block length of the alternating rows
_FLOOR_BLOCKS = 4


def _permutation_floor(cfg: Config, shuffle: str = "numpy") -> Source:
    """Each domain in turn, a fresh permutation of it (numpy's ``Generator.permutation``, as the sampler's
    streams draw a pass; ``shuffle="torch"``: ``torch.randperm``) cut into batches of consecutive slices,
    as int64 arrays: the cost of drawing every index through a stored per-pass permutation, without a
    plan, a weight or a list."""
    starts = np.cumsum([0, *cfg.sizes[:-1]]).tolist()
    gen = torch.Generator()

    def permutation(d: int, p: int, size: int) -> np.ndarray:
        if shuffle == "numpy":
            return np.random.default_rng([cfg.seed, d, p]).permutation(size)
        gen.manual_seed(hash((cfg.seed, d, p)) & 0xFFFFFFFF)  # its Mersenne Twister takes 32 bits of seed
        return torch.randperm(size, generator=gen).numpy()

    def passes() -> Iterator[np.ndarray]:
        for p in itertools.count():
            for d, (start, size) in enumerate(zip(starts, cfg.sizes, strict=True)):
                yield permutation(d, p, size) + start

    def batches_forever() -> Iterator[np.ndarray]:
        left = np.zeros(0, dtype=np.int64)
        for perm in passes():
            perm = np.concatenate([left, perm]) if len(left) else perm
            cut = len(perm) - len(perm) % cfg.batch_size
            yield from perm[:cut].reshape(-1, cfg.batch_size)
            left = perm[cut:]

    it = batches_forever()
    return Source(lambda n: _pull(it, n), _by_bounds(_bounds(cfg.sizes)), _static(cfg.sizes))


FACTORIES: dict[str, Callable[[Config], Source]] = {
    "torch_wrs": _torch_wrs,
    "torchdata_mnws": _torchdata_mnws,
    "hf_interleave": _hf_interleave,
    "lhotse_mux": _lhotse_mux,
    "megatron_blend": _megatron_blend,
    **{f"domainmix_{m}": (lambda cfg, m=m: _domainmix(cfg, m)) for m in MODES},
    "domainmix_stratified_weight_change": lambda cfg: _domainmix(cfg, "stratified", change="alternate"),
    "domainmix_low_discrepancy_weight_change": lambda cfg: _domainmix(
        cfg, "low_discrepancy", change="alternate"
    ),
    "domainmix_stratified_new_weights": lambda cfg: _domainmix(cfg, "stratified", change="fresh"),
    "domainmix_low_discrepancy_new_weights": lambda cfg: _domainmix(cfg, "low_discrepancy", change="fresh"),
    "domainmix_stratified_carried": lambda cfg: _domainmix(cfg, "stratified", carry=True),
    "domainmix_keyed_permutation": lambda cfg: _domainmix(cfg, "stratified", large=True),
    "domainmix_stratified_weight_change_numpy": lambda cfg: _domainmix(
        cfg, "stratified", change="alternate", as_numpy=True
    ),
    "domainmix_low_discrepancy_weight_change_numpy": lambda cfg: _domainmix(
        cfg, "low_discrepancy", change="alternate", as_numpy=True
    ),
    "list_floor": _list_floor,
    "permutation_floor": _permutation_floor,
    "randperm_floor": lambda cfg: _permutation_floor(cfg, shuffle="torch"),
}


# ---------------------------------------------------------------------------------------------- timing


def _timed(source: Source, n: int) -> float:
    """Indices per second while ``source`` hands out ``n`` batches (counting the indices it really gave)."""
    gc.collect()
    count = 0
    start = time.perf_counter()
    for batch in source.batches(n):
        count += len(batch)
    return count / (time.perf_counter() - start)


def _warm_up(source: Source, n: int, k: int) -> tuple[np.ndarray, int]:
    """Run ``n`` batches untimed; return the indices per domain and the number of indices."""
    counts = np.zeros(k, dtype=np.int64)
    for batch in source.batches(n):
        counts += np.bincount(source.domains_of(batch), minlength=k)[:k]
    return counts, int(counts.sum())


def measure(
    cfg: Config, systems: Sequence[str] = SYSTEMS, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Set up, warm up and time ``systems`` (the torch baseline is always added), interleaved.

    Args:
        cfg: the configuration.
        systems: names from :data:`SYSTEMS`.
        log: called with one line per step (setup, repetition); ``None``: silent.

    Returns:
        The report: ``machine``, ``versions``, ``date_utc``, ``config`` and, per system, either the median
        ``indices_per_s`` with the per-repetition values and ratios against the baseline, or
        ``available: false`` with the ``reason``; every system also has its ``capabilities``.
    """
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    names = [BASELINE, *(s for s in SYSTEMS if s in systems and s != BASELINE)]
    say = log or (lambda line: None)
    k = len(cfg.sizes)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = _load_average()
    sources: dict[str, Source] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        n = cfg.batches_per_repeat[name]
        entry: dict[str, Any] = {"label": LABELS[name], "batches_per_repeat": n}
        entries[name] = entry
        start = time.perf_counter()
        try:
            source = FACTORIES[name](cfg)
        except Unavailable as e:
            entry.update(available=False, reason=str(e))
            say(f"{name}: unavailable: {e}")
            continue
        entry["setup_s"] = time.perf_counter() - start
        counts, total = _warm_up(source, n, k)
        shares, target = counts / total, source.targets(0, n)
        entry.update(
            available=True,
            indices_per_repeat=n * cfg.batch_size,
            warmup_shares=shares.tolist(),
            target_shares=target.tolist(),
            max_share_error=float(np.abs(shares - target).max()),
        )
        sources[name] = source
        say(f"{name}: set up in {entry['setup_s']:.2f} s, warmed up ({total} indices)")
    rates: dict[str, list[float]] = {name: [] for name in sources}
    for r in range(cfg.repeats):
        for name, source in sources.items():
            rates[name].append(_timed(source, cfg.batches_per_repeat[name]))
        say(f"repetition {r + 1}/{cfg.repeats}: " + ", ".join(f"{n}={v[-1]:.4g}/s" for n, v in rates.items()))
    for name, values in rates.items():
        ratios = [a / b for a, b in zip(values, rates[BASELINE], strict=True)]
        entries[name].update(
            indices_per_s=statistics.median(values),
            ratio_vs_torch_wrs=statistics.median(ratios),
            per_repeat_indices_per_s=values,
            per_repeat_ratio_vs_torch_wrs=ratios,
        )
    for name, entry in entries.items():
        entry["capabilities"] = CAPABILITIES[name]
    return {
        "benchmark": "peers",
        "date_utc": date,
        "machine": _machine(load_before),
        "versions": _versions(),
        "domainmix_source": _source_state(),
        "config": _config_record(cfg),
        "baseline": BASELINE,
        "systems": entries,
    }


# ---------------------------------------------------------------------------------------------- context


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _machine(load_before: float | None) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": load_before,
        "load_average_1min_after": _load_average(),
    }


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def _source_state() -> dict[str, Any]:
    """The commit of the domainmix checkout and whether ``src/domainmix`` has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain", "src")),
        }
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": None, "uncommitted_changes": None, "reason": f"{type(e).__name__}: {e}"}


def _config_record(cfg: Config) -> dict[str, Any]:
    return {
        "domain_sizes": list(cfg.sizes),
        "total_examples": sum(cfg.sizes),
        "weights": list(cfg.weights),
        "batch_size": cfg.batch_size,
        "repeats": cfg.repeats,
        "warmup_repeats": 1,
        "statistic": "median",
        "order": "every repetition times every system once, in the order of `systems`",
        "batches_per_repeat": dict(cfg.batches_per_repeat),
        "weight_change_every": cfg.weight_change_every,
        "alternate_weights": list(reversed(cfg.weights)),
        "large_domain_size": cfg.large_domain_size,
        "large_total_examples": cfg.large_domain_size * len(cfg.sizes),
        "materialize_limit": _MATERIALIZE_LIMIT,
        "hf_dataset": "Dataset.from_dict({'idx': ...}).to_iterable_dataset()",
        "hf_stopping_strategy": cfg.hf_stopping_strategy,
        "torchdata_stop_criteria": "CYCLE_FOREVER",
        "seed": cfg.seed,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- CLI


def _table(report: dict[str, Any]) -> str:
    lines = [f"{'system':<42}{'indices/s':>14}{'x torch':>9}"]
    for name, entry in report["systems"].items():
        if entry["available"]:
            lines.append(f"{name:<42}{entry['indices_per_s']:>14,.0f}{entry['ratio_vs_torch_wrs']:>9.3g}")
        else:
            lines.append(f"{name:<42}{'unavailable':>14}  {entry['reason']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print a table and, with ``--json``, write the report to ``--out``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write the JSON report to --out (atomically)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 15; quick: 2)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every system's batches per repetition"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of the systems")
    parser.add_argument("--quick", action="store_true", help="tiny domains and a few batches (tests)")
    args = parser.parse_args(argv)
    cfg = (quick_config() if args.quick else Config()).scaled(args.scale)
    if args.repeats is not None:
        cfg = dataclasses.replace(cfg, repeats=args.repeats)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    report = measure(cfg, systems, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(_table(report))
    if args.json:
        atomic_write_json(args.out, report, indent=2)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
