"""Generate ``docs/benchmarks.md`` from ``benchmarks/results/peers.json``, the report of ``peers.py``.

The page is a pure function of the JSON (:func:`render`), so a test can check that the committed page and
the committed results agree. Every number on it comes from the JSON; the notes that are not numbers
describe what ``peers.py`` times.

Usage: python benchmarks/peers_report.py [--json benchmarks/results/peers.json] [--out docs/benchmarks.md]
       [--check]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from domainmix._atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "peers.json"
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
CAPABILITY_COLUMNS = (
    ("online_weight_change", "online weight change"),
    ("exact_resume", "exact resume"),
    ("rank_consistent_plan", "rank-consistent plan"),
)
PEER_NAMES = {
    "torch_wrs": "torch `WeightedRandomSampler`",
    "torchdata_mnws": "torchdata `MultiNodeWeightedSampler`",
    "hf_interleave": "HF datasets `interleave_datasets`",
    "lhotse_mux": "lhotse `LazyIteratorMultiplexer`",
    "megatron_blend": "Megatron-Core `BlendedDataset` / `build_blending_indices`",
    "domainmix_stratified": "domainmix `DomainBatchSampler` (every mode)",
}


def _si(x: float) -> str:
    """Three significant digits with a k/M suffix: 2.52 M, 13.9 k, 512."""
    for factor, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


def _ratio(x: float) -> str:
    return f"{x:.3g}×"


def _yes_no(capability: dict[str, str]) -> str:
    return capability["answer"]


def _link(source: str) -> str:
    if source.startswith("http"):
        return f"<{source}>"
    return f"[{source}]({source.removeprefix('docs/')})"  # a file of this repository; the page is in docs/


def _load(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _versions(report: dict[str, Any]) -> str:
    versions = report["versions"]
    parts = [f"{name} {version}" for name, version in versions.items() if version is not None]
    missing = [name for name, version in versions.items() if version is None]
    line = ", ".join(parts)
    if missing:
        line += f" (not installed: {', '.join(missing)})"
    return line


def _source_line(report: dict[str, Any]) -> str:
    state = report["domainmix_source"]
    if state.get("commit") is None:
        return f"domainmix source: unknown ({state.get('reason', 'no git')})"
    changes = "with uncommitted changes" if state["uncommitted_changes"] else "no uncommitted changes"
    return f"domainmix source: commit `{state['commit'][:12]}`, {changes} under `src/`"


def _results_table(report: dict[str, Any]) -> list[str]:
    header = ["system", "indices/s (median)", "min–max over repetitions", "× torch sampler"]
    header += [title for _, title in CAPABILITY_COLUMNS] + ["plan"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in report["systems"].values():
        caps = entry["capabilities"]
        answers = [_yes_no(caps[key]) for key, _ in CAPABILITY_COLUMNS] + [caps["plan"]]
        if entry["available"]:
            rates = entry["per_repeat_indices_per_s"]
            cells = [
                _si(entry["indices_per_s"]),
                f"{_si(min(rates))}–{_si(max(rates))}",
                _ratio(entry["ratio_vs_torch_wrs"]),
            ]
        else:
            cells = ["unavailable (see below)", "—", "—"]
        lines.append("| " + " | ".join([entry["label"], *cells, *answers]) + " |")
    return lines


def _shares_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| system | batches per repetition | indices per repetition | max \\|achieved − target\\| share |",
        "|---|---|---|---|",
    ]
    for entry in report["systems"].values():
        if entry["available"]:
            lines.append(
                f"| {entry['label']} | {entry['batches_per_repeat']:,} | {entry['indices_per_repeat']:,} | "
                f"{entry['max_share_error']:.4f} |"
            )
    return lines


def _capabilities(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, title in PEER_NAMES.items():
        entry = report["systems"].get(name)
        if entry is None:
            continue
        caps = entry["capabilities"]
        lines.append(f"**{title}** ({caps['plan']}).")
        lines.append("")
        for key, column in CAPABILITY_COLUMNS:
            lines.append(f"- {column}: **{caps[key]['answer']}**: {caps[key]['how']}.")
        lines.append("- sources: " + ", ".join(_link(s) for s in caps["sources"]))
        lines.append("")
    return lines


# domainmix's throughput aims: (system, reference system, least median ratio of their rates).
AIMS = (
    ("domainmix_stratified_weight_change", "torch_wrs", 10.0),
    ("domainmix_stratified_weight_change", "torchdata_mnws", 20.0),
    ("domainmix_low_discrepancy_weight_change", "torch_wrs", 5.0),
    ("domainmix_keyed_permutation", "torch_wrs", 1.0),
    # the same aims for batches handed out as numpy arrays (no Python list of ints per batch)
    ("domainmix_stratified_weight_change_numpy", "torch_wrs", 10.0),
    ("domainmix_stratified_weight_change_numpy", "torchdata_mnws", 20.0),
    ("domainmix_low_discrepancy_weight_change_numpy", "torch_wrs", 5.0),
)


def _label_of(systems: dict[str, Any], name: str) -> str:
    return str(systems.get(name, {}).get("label", name))


def _aims(report: dict[str, Any]) -> list[str]:
    """Whether each aim of ``AIMS`` holds in this report, by two statistics: the ratio of the median rates
    and the median of the per-repetition ratios (repetitions time both systems back to back). An aim is
    met only when both reach it."""
    systems = report["systems"]
    lines = [
        "Aims for domainmix, and whether this run meets them (a weight change every 100 batches where the "
        "row says so). Two statistics, both required: the ratio of the median rates, and the median of "
        "the per-repetition ratios (each repetition times both systems back to back):",
        "",
        "| domainmix row | against | aim | ratio of medians | median ratio (min–max) | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, reference, aim in AIMS:
        a, b = systems.get(name, {}), systems.get(reference, {})
        if not (a.get("available") and b.get("available")):
            lines.append(
                f"| {_label_of(systems, name)} | {_label_of(systems, reference)} | ≥ {aim:g}× | n/a | n/a "
                "| n/a |"
            )
            continue
        ratio = a["indices_per_s"] / b["indices_per_s"]
        paired = [
            x / y for x, y in zip(a["per_repeat_indices_per_s"], b["per_repeat_indices_per_s"], strict=True)
        ]
        median = statistics.median(paired)
        met = "yes" if min(ratio, median) >= aim else "**no**"
        lines.append(
            f"| {a['label']} | {b['label']} | ≥ {aim:g}× | {ratio:.2f}× | {median:.2f}× "
            f"({min(paired):.2f}–{max(paired):.2f}) | {met} |"
        )
    return lines + _floor(systems)


def _floor(systems: dict[str, Any]) -> list[str]:
    """What the floors (the reference rows) leave a sampler within each aim against torch's sampler, and
    what yielding lists instead of arrays cost the domainmix rows measured both ways."""
    names = ("torch_wrs", "list_floor", "permutation_floor")
    if not all(systems.get(name, {}).get("available") for name in names):
        return []
    ns = {name: 1e9 / entry["indices_per_s"] for name, entry in systems.items() if entry.get("available")}
    torch_ns, list_ns, perm_ns = (ns[name] for name in names)
    randperm_ns = ns.get("randperm_floor")
    lines = [
        "",
        f"Floors, from the reference rows (medians): handing out ready-made lists takes {list_ns:.1f} ns "
        f"per index, drawing indices through per-pass permutations {perm_ns:.1f} ns"
        + ("" if randperm_ns is None else f" ({randperm_ns:.1f} ns with `torch.randperm`)")
        + f"; torch's sampler takes {torch_ns:.1f} ns. A stratified or low-discrepancy row pays the "
        "permutations, and the lists when it yields lists. What an aim leaves for planning and "
        "bookkeeping, per index:",
        "",
    ]
    extra = randperm_ns is not None
    lines += [
        "| aim against torch's sampler | time per index | left, arrays | left, lists |"
        + (" left, lists, `torch.randperm` |" if extra else ""),
        "|---|---|---|---|" + ("---|" if extra else ""),
    ]
    for aim in sorted({aim for _, reference, aim in AIMS if reference == "torch_wrs" and aim > 1}):
        budget = torch_ns / aim
        left_arrays, left_lists = budget - perm_ns, budget - perm_ns - list_ns
        row = f"| {aim:g}× | {budget:.1f} ns | {left_arrays:.1f} ns | {left_lists:.1f} ns |"
        if extra:
            row += f" {budget - (randperm_ns or 0.0) - list_ns:.1f} ns |"
        lines.append(row)
    paired = [
        f"{ns[lists] - ns[arrays]:.1f} ns ({systems[lists]['label']})"
        for lists, arrays in _LIST_ARRAY_PAIRS
        if lists in ns and arrays in ns
    ]
    if paired:
        lines += [
            "",
            f"Measured in this run, yielding lists instead of arrays costs {', '.join(paired)} per index, "
            f"against the list floor's {list_ns:.1f} ns.",
        ]
    return lines


# domainmix rows measured yielding lists and yielding numpy arrays: (lists, arrays)
_LIST_ARRAY_PAIRS = (
    ("domainmix_stratified_weight_change", "domainmix_stratified_weight_change_numpy"),
    ("domainmix_low_discrepancy_weight_change", "domainmix_low_discrepancy_weight_change_numpy"),
)


def render(report: dict[str, Any]) -> str:
    """The Markdown page for one ``peers.json`` report."""
    cfg, machine = report["config"], report["machine"]
    sizes = ", ".join(f"{s:,}" for s in cfg["domain_sizes"])
    weights = "/".join(f"{w:g}" for w in cfg["weights"])
    cpu = machine["cpu_model"] or machine["processor"] or machine["machine"]
    unavailable = [(e["label"], e["reason"]) for e in report["systems"].values() if not e["available"]]
    lines = [
        "# Benchmarks: domainmix against peer libraries",
        "",
        "<!-- Generated by benchmarks/peers_report.py from benchmarks/results/peers.json; do not edit. -->",
        "",
        "Regenerate the measurements and this page (installs the pinned peers of the `peers` extra first):",
        "",
        "```",
        "make bench-peers",
        "```",
        "",
        "## What is measured",
        "",
        "How many example indices each system hands out per second, in one process: "
        f"{len(cfg['domain_sizes'])} domains of {sizes} examples ({cfg['total_examples']:,} in all), "
        f"weights {weights}, batches of {cfg['batch_size']}. Every system is set up and runs one untimed "
        f"warm-up repetition; then each of the {cfg['repeats']} timed repetitions times every system once, "
        "in turn, so that machine noise hits them alike. The figures are medians over the repetitions; the "
        "ratio is the median of the per-repetition ratios to torch's sampler measured in the same "
        "repetition. No data is loaded: only the indices (Megatron: the blending index) are produced.",
        "",
        "## Machine, versions, date",
        "",
        f"- date (UTC): {report['date_utc']}",
        f"- machine: {machine['platform']}, {cpu}, "
        f"{machine['cpu_count']} CPUs (os.cpu_count), torch threads {machine['torch_threads']}; 1-minute "
        f"load average {_load(machine['load_average_1min_before'])} before and "
        f"{_load(machine['load_average_1min_after'])} after the run",
        f"- versions: {_versions(report)}",
        f"- {_source_line(report)}",
        "",
        "## Results",
        "",
        *_results_table(report),
        "",
    ]
    if unavailable:
        lines += ["Unavailable here:", ""]
        lines += [f"- {label}: {reason}" for label, reason in unavailable]
        lines.append("")
    lines += [*_aims(report), ""]
    lines += [
        "Batches per repetition differ between systems so that every timing lasts about half a second; the "
        "achieved domain shares over the warm-up repetition check that each system mixes as configured "
        "(the `alternating` rows are compared with the mean of the two weight vectors in force):",
        "",
        *_shares_table(report),
        "",
        "## Notes",
        "",
        "- **torch** (the baseline): `BatchSampler(WeightedRandomSampler(w, n·B), B)` over one weight per "
        "example; each repetition is a fresh `iter()`, as every epoch, so its single `torch.multinomial` is "
        "timed. Building the per-example weight vector is not.",
        "- **torchdata**: `Batcher(MultiNodeWeightedSampler({domain: IterableWrapper(range)}, weights, "
        f"stop_criteria={cfg['torchdata_stop_criteria']}), B)`, nodes pulled directly (no `Loader`): domain "
        "draws come from `torch.multinomial` in blocks, but every index passes through Python node objects.",
        f"- **HF datasets**: `{cfg['hf_dataset']}` per domain, then `interleave_datasets(..., probabilities, "
        f'stopping_strategy="{cfg["hf_stopping_strategy"]}")` (so that no source ends the stream) read with '
        "`.iter(batch_size=B)`: the streaming path of a user with Arrow-backed datasets. The work is per "
        "example, in Python: a profile shows most of the time in copying the per-source resume state for "
        "every example (`_fast_copy`) and in fetching one-row Arrow tables through a thread pool. (The "
        "map-style path precomputes an index table instead and, by default, stops when the first source "
        "runs out.)",
        "- **lhotse**: `LazyIteratorMultiplexer(*[LazyRepeater(range)], weights)`: pure Python per item; for "
        "every index it lists the active sources and calls `random.choices`.",
        "- **Megatron-Core**: the time to build the index of one repetition's n·B positions with the C++ "
        "helper `build_blending_indices`, which Megatron runs once before training (and caches on disk). "
        "The index is static and deterministic (each position goes to the dataset with the largest "
        "sampling error); it says which dataset and which of its samples, and the sub-dataset's own "
        "shuffle index (not timed) maps that to an example. Its rate is that of a precomputation, not of a "
        "sampler that can change course.",
        f"- **domainmix**: steady state (the sampler already ran the warm-up repetition). The `alternating` "
        f"rows call `set_weights` every {cfg['weight_change_every']} batches, switching between the weights "
        f"and their reverse ({'/'.join(f'{w:g}' for w in cfg['alternate_weights'])}); each change replans "
        f"from the next batch. The keyed-permutation row uses {len(cfg['domain_sizes'])} domains of "
        f"{cfg['large_domain_size']:,} examples ({cfg['large_total_examples']:,} in all), past the "
        f"materialisation limit of {cfg['materialize_limit']:,} examples per domain: no permutation is "
        "stored, each index goes through a keyed Feistel bijection. The `new random weights` rows set a "
        "fresh vector of floats every 100 batches, as an online method does: their low-discrepancy order "
        "has no short period to tile, so it is computed slot by slot in Python (earliest deadline first, "
        "about 1 µs a slot), the cost of its exact prefix guarantee. The `carry_remainder=True` row plans "
        "each batch's counts with a Python loop over the domains (a Pfair schedule). The `as_numpy=True` "
        "rows hand out each batch as an int64 numpy array (what a dataset's `__getitems__` can index with "
        "in one call) instead of a list of Python ints; every other row, and every peer, yields lists.",
        "- The machine is shared with other jobs; compare ratios within one run rather than absolute rates "
        "across runs.",
        "",
        "## What the capability columns rest on",
        "",
        "Answers for the releases benchmarked above, from each library's own source, documentation and "
        "issue tracker.",
        "",
        *_capabilities(report),
    ]
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the page for a ``peers.json`` report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="the report of benchmarks/peers.py")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the rendered page")
    args = parser.parse_args(argv)
    page = render(json.loads(args.json.read_text(encoding="utf-8")))
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != page:
            print(f"{args.out} is out of date; run python benchmarks/peers_report.py", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(args.out, page)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
