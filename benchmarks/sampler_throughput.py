"""Throughput of DomainBatchSampler against torch's WeightedRandomSampler + BatchSampler, same process.

8 domains (2.05M examples), batch 256, weights .4/.2/.1/.1/.08/.06/.04/.02. For each sampler we time
``--batches`` batches per repetition and report the median batches/s. "warm" figures continue a sampler
that has already run one repetition (steady state: permutations are generated as passes wrap, one element
per draw); "cold" figures include constructing the sampler and generating every domain's first-pass
permutation (2.05M elements) inside the timed region. The torch baseline re-draws its multinomial on every
``iter()``, as it does every epoch; building its per-example weight vector is not timed. Rows: the three
modes, and ``stratified_carried`` (stratified with ``carry_remainder=True``: batches of floor or ceil of
B·q, the remainders carried, so the prefix deviation from q·t stays below one batch's rounding).

``online``: what an online method pays when it sets new weights before every batch (a fresh random float
vector each time, as DoReMi's per-step update does): microseconds per ``set_weights`` + batch, the median
over repetitions of ``--online-batches`` batches, and the size of the JSON state after them (the weight
history keeps only the entries a resume can still need, so it does not grow with the run).

``loader``: the samplers inside a ``DataLoader`` (no workers) over a tensor-backed dataset whose
``__getitems__`` gathers a whole batch of rows (16 int32 tokens per example) in one indexing call:
batches/s for torch's sampler, ``DomainBatchSampler`` stratified (lists) and the same with
``as_numpy=True``. ``torch.as_tensor`` of a list of Python ints converts every element; of an int64 array
it is free, so the end-to-end gain of arrays shows here.

Usage: python benchmarks/sampler_throughput.py [--json] [--batches 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, WeightedRandomSampler

from domainmix.sampling import DomainBatchSampler

SIZES = [50_000, 100_000, 150_000, 200_000, 250_000, 300_000, 400_000, 600_000]
WEIGHTS = [0.4, 0.2, 0.1, 0.1, 0.08, 0.06, 0.04, 0.02]
BATCH = 256
MODES = ("stratified", "low_discrepancy", "iid")
# Every row of the report: the modes, and stratified with the rounding remainders carried across batches.
ROWS: dict[str, dict[str, Any]] = {
    **{m: {"mode": m} for m in MODES},
    "stratified_carried": {"mode": "stratified", "carry_remainder": True},
}


def _domains() -> dict[str, range]:
    bounds = np.cumsum([0, *SIZES]).tolist()
    return {f"d{i}": range(bounds[i], bounds[i + 1]) for i in range(len(SIZES))}


def _time(make_iter: Any, n: int) -> float:
    start = time.perf_counter()
    it = make_iter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - start)


def _torch_sampler(n: int) -> BatchSampler:
    """The baseline: torch's sampler over one weight per example, ``n`` batches per ``iter()``."""
    per_example = torch.cat(
        [torch.full((s,), w / s, dtype=torch.float64) for s, w in zip(SIZES, WEIGHTS, strict=True)]
    )
    gen = torch.Generator().manual_seed(0)
    return BatchSampler(
        WeightedRandomSampler(per_example, n * BATCH, replacement=True, generator=gen), BATCH, True
    )


def _measure(n: int, repeats: int) -> dict[str, dict[str, float]]:
    """Interleave the samplers in every repetition so that machine noise hits them alike."""
    wrs = _torch_sampler(n)
    streams = {m: iter(DomainBatchSampler(_domains(), BATCH, WEIGHTS, **ROWS[m])) for m in ROWS}
    for m in ROWS:  # warm-up repetition: first-pass permutations (reported separately as "cold")
        _time(lambda m=m: streams[m], n)
    rates: dict[str, list[float]] = {"torch_wrs": [], **{m: [] for m in ROWS}}
    cold: dict[str, list[float]] = {m: [] for m in ROWS}
    for r in range(repeats):
        rates["torch_wrs"].append(_time(lambda: iter(wrs), n))
        for m in ROWS:
            rates[m].append(_time(lambda m=m: streams[m], n))
            cold[m].append(
                _time(
                    lambda m=m, r=r: iter(
                        DomainBatchSampler(_domains(), BATCH, WEIGHTS, seed=r + 1, **ROWS[m])
                    ),
                    n,
                )
            )
    out = {"torch_wrs": {"batches_per_s": statistics.median(rates["torch_wrs"])}}
    for m in ROWS:
        out[m] = {
            "batches_per_s": statistics.median(rates[m]),
            "cold_batches_per_s": statistics.median(cold[m]),
            "ratio_vs_torch_wrs": statistics.median(
                a / b for a, b in zip(rates[m], rates["torch_wrs"], strict=True)
            ),
            "cold_ratio_vs_torch_wrs": statistics.median(
                a / b for a, b in zip(cold[m], rates["torch_wrs"], strict=True)
            ),
        }
    return out


def _online(n: int, repeats: int) -> dict[str, dict[str, float]]:
    """Microseconds per batch with ``set_weights`` before every batch, and the state size after the run."""
    vectors = np.random.default_rng(0).dirichlet(50 * np.asarray(WEIGHTS), size=n).tolist()
    out = {}
    for m in ROWS:
        sampler = DomainBatchSampler(_domains(), BATCH, WEIGHTS, **ROWS[m])
        it = iter(sampler)
        per_batch = []
        for _ in range(repeats + 1):  # the first repetition warms up (first-pass permutations)
            start = time.perf_counter()
            for q in vectors:
                sampler.set_weights(q)
                next(it)
            per_batch.append((time.perf_counter() - start) / n * 1e6)
        state = json.dumps(sampler.state_dict())
        out[m] = {
            "us_per_batch": statistics.median(per_batch[1:]),
            "weight_changes": n * (repeats + 1),
            "state_bytes": len(state),
            "history_entries": len(sampler.weight_history),
        }
    return out


class _TokenRows(Dataset[Tensor]):
    """Every example is a row of tokens; ``__getitems__`` gathers a batch of rows at once."""

    def __init__(self, n: int, width: int = 16) -> None:
        self.rows = torch.arange(n * width, dtype=torch.int32).reshape(n, width)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Tensor:
        return self.rows[i]

    def __getitems__(self, indices: Any) -> Tensor:
        return self.rows[torch.as_tensor(indices)]


def _loader(n: int, repeats: int) -> dict[str, dict[str, float]]:
    """Batches/s of a ``DataLoader`` over ``_TokenRows`` driven by each sampler, interleaved repetitions."""
    dataset = _TokenRows(sum(SIZES))
    samplers: dict[str, Any] = {
        "torch_wrs": _torch_sampler(n),
        "stratified": DomainBatchSampler(_domains(), BATCH, WEIGHTS),
        "stratified_as_numpy": DomainBatchSampler(_domains(), BATCH, WEIGHTS, as_numpy=True),
    }
    loaders = {k: DataLoader(dataset, batch_sampler=s, collate_fn=_identity) for k, s in samplers.items()}
    streams = {k: iter(loader) for k, loader in loaders.items() if k != "torch_wrs"}

    def make(k: str) -> Any:
        return iter(loaders[k]) if k == "torch_wrs" else streams[k]  # torch: a fresh epoch, as above

    rates: dict[str, list[float]] = {k: [] for k in loaders}
    for r in range(repeats + 1):  # the first repetition warms up
        for k in loaders:
            rate = _time(lambda k=k: make(k), n)
            if r:
                rates[k].append(rate)
    return {
        k: {
            "batches_per_s": statistics.median(v),
            "ratio_vs_torch_wrs": statistics.median(
                a / b for a, b in zip(v, rates["torch_wrs"], strict=True)
            ),
        }
        for k, v in rates.items()
    }


def _identity(batch: Tensor) -> Tensor:
    return batch


def _max_prefix_deviation(row: str, n: int, effective: bool) -> float:
    """max over t (examples) and domains of |count_i(t) - q_i t|, over n batches in yield order.

    With ``effective`` the target is the sampler's ``effective_sampling`` (stratified rounding: 102/256
    instead of 0.4), otherwise the requested weights.
    """
    sampler = DomainBatchSampler(_domains(), BATCH, WEIGHTS, **ROWS[row])
    target = sampler.effective_sampling.numpy() if effective else np.asarray(WEIGHTS)
    starts = np.cumsum([0, *SIZES])
    flat = np.fromiter((i for _, b in zip(range(n), sampler, strict=False) for i in b), dtype=np.int64)
    ids = np.searchsorted(starts, flat, side="right") - 1
    q = target
    worst = 0.0
    counts = np.zeros(len(q))
    for chunk in np.array_split(np.arange(len(ids)), max(1, len(ids) // 65536)):
        onehot = np.zeros((len(chunk), len(q)))
        onehot[np.arange(len(chunk)), ids[chunk]] = 1
        cum = counts + np.cumsum(onehot, axis=0)
        t = (chunk + 1)[:, None]
        worst = max(worst, float(np.abs(cum - t * q).max()))
        counts = cum[-1]
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--online-batches", type=int, default=1000)
    args = parser.parse_args()
    measured = _measure(args.batches, args.repeats)
    torch_wrs = measured.pop("torch_wrs")
    modes = measured
    for m in ROWS:
        modes[m]["max_prefix_deviation"] = _max_prefix_deviation(m, args.batches, effective=False)
        modes[m]["max_prefix_deviation_vs_effective"] = _max_prefix_deviation(m, args.batches, effective=True)
    base = torch_wrs["batches_per_s"]
    result = {
        "config": {
            "domain_sizes": SIZES,
            "total_examples": sum(SIZES),
            "weights": WEIGHTS,
            "batch_size": BATCH,
            "batches_per_repeat": args.batches,
            "repeats": args.repeats,
            "statistic": "median",
            "torch": torch.__version__,
            "numpy": np.__version__,
        },  # fmt: skip
        "torch_wrs": torch_wrs,
        "modes": modes,
        "ratio_vs_torch_wrs": modes["stratified"]["ratio_vs_torch_wrs"],
        "online": _online(args.online_batches, args.repeats),
        "loader": _loader(args.batches, args.repeats),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'sampler':<26}{'batches/s':>11}{'cold':>9}{'x WRS':>7}{'dev vs q':>10}{'dev vs eff':>11}")
    print(f"{'torch WRS + BatchSampler':<26}{base:>11.0f}{'':>9}{1:>7.2f}")
    for m in ROWS:
        r = modes[m]
        rate, cold, ratio = r["batches_per_s"], r["cold_batches_per_s"], r["ratio_vs_torch_wrs"]
        dev, dev_eff = r["max_prefix_deviation"], r["max_prefix_deviation_vs_effective"]
        print(f"{m:<26}{rate:>11.0f}{cold:>9.0f}{ratio:>7.2f}{dev:>10.2f}{dev_eff:>11.2f}")
    print(f"\nset_weights before every batch:\n{'sampler':<26}{'us/batch':>10}{'changes':>9}{'state B':>9}")
    for m, r in result["online"].items():
        print(f"{m:<26}{r['us_per_batch']:>10.0f}{r['weight_changes']:>9}{r['state_bytes']:>9}")
    print(f"\nDataLoader with __getitems__:\n{'sampler':<26}{'batches/s':>11}{'x WRS':>7}")
    for m, r in result["loader"].items():
        print(f"{m:<26}{r['batches_per_s']:>11.0f}{r['ratio_vs_torch_wrs']:>7.2f}")


if __name__ == "__main__":
    main()
