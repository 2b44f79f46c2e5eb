"""The results of ``domainmix run lm --compare --seeds ...`` as JSON, Markdown tables and a figure.

``python -m domainmix.experiments.lm_report RUN --name NAME`` reads the run folder (every finished
seed's stage outputs; the paired differences are computed as ``compare_seeds`` computes them) and
writes ``docs/results/NAME.json`` (:func:`summarize`), the Markdown tables made from that JSON alone
(:func:`markdown`; docs/language-models.md carries them verbatim and a test checks they are equal) and
``docs/images/NAME.png`` (:func:`plot_run`: one seed's weight trajectories and the per-domain scores
that moved them); with DIDS rows also ``docs/images/NAME-dids.png`` (:func:`plot_dids`).

Log-perplexities are the mean per-token loss in nats (``ln`` of the perplexity); paired differences are
to uniform with the same seed (``experiments/paired.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from domainmix._atomic import atomic_path, atomic_write_json, atomic_write_text
from domainmix.experiments.methods import ONLINE_METHODS, PROXY_METHODS
from domainmix.experiments.paired import paired_difference, paired_to_uniform

SCORE_NAMES = {
    "excess_loss": "λ (excess loss)",
    "target_grad_dot": "W = ⟨g_i, g_target⟩",
    "grad_sq_norm": "‖g_i‖²",
}
PLOTTED_SCORES = ("excess_loss", "target_grad_dot")  # what each update follows; not DoGE's norms


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: is this the --out of `domainmix run lm --compare --seeds`?"
        )
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _proxies(folder: Path) -> list[str]:
    """The proxy methods a seed's folder holds, in ``PROXY_METHODS``' order."""
    return [m for m in PROXY_METHODS if (folder / f"proxy-{m}").is_dir()]


def _share(shares: dict[str, float], domain: str) -> float:
    """A domain's share, summed over its groups (``domain/c``) when the run sampled DIDS's groups."""
    return sum(v for name, v in shares.items() if name == domain or name.startswith(f"{domain}/"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(run: Path, command: str = "") -> dict[str, Any]:
    """Everything the docs report about one ``--compare --seeds`` run, per seed and averaged.

    Returns:
        ``config`` (seed 0's, with ``seed`` dropped), ``seeds``, ``domains`` (training domains),
        ``target_domain``; ``base[weighting]``: per-seed and mean test log-perplexity per domain (the
        target included), ``average``, ``worst`` and ``target``; ``paired``: the paired
        differences to uniform; ``mixtures[method]``: per-seed time-averaged and final α and the largest
        time-averaged α of each seed; ``scores[method][statistic][domain]``: per-seed mean over the
        proxy's steps of the logged score; ``costs[stage]``: per-seed wall seconds.
    """
    # The seeds whose comparison finished (all of them once paired.json is written; fewer while the
    # run goes on), and their paired differences, computed as compare_seeds computes them.
    seeds = sorted(int(p.parent.name.removeprefix("seed-")) for p in run.glob("seed-*/comparison.json"))
    if len(seeds) < 2:
        raise FileNotFoundError(
            f"{run} holds {len(seeds)} finished seed(s) (seed-N/comparison.json); paired needs 2 or more"
        )
    folders = [run / f"seed-{s}" for s in seeds]
    reference = [_read(f / "reference" / "reference.json") for f in folders]
    settings = [{k: v for k, v in r["config"].items() if k != "seed"} for r in reference]
    differing = [s for s, c in zip(seeds, settings, strict=True) if c != settings[0]]
    if differing:  # pooled, their differences would mix two experiments under one config
        keys = sorted(k for k in settings[0] if any(c.get(k) != settings[0][k] for c in settings))
        raise ValueError(
            f"{run}: seeds {differing} ran with other settings than seed {seeds[0]} ({keys}); a report "
            "pools the seeds of one configuration."
        )
    proxies = {m: [_read(f / f"proxy-{m}" / "weights.json") for f in folders] for m in _proxies(folders[0])}
    config = {k: v for k, v in reference[0]["config"].items() if k != "seed"}
    target = config["target_domain"]
    domains = list(reference[0]["weights"])
    tables = [_read(f / "comparison.json") for f in folders]
    # The base runs every seed has, in the comparison's order (a --reuse run adding rows seed by seed
    # has them in some seeds only while it goes on).
    labels = [label for label in tables[0] if all(label in t for t in tables)]
    tables = [{label: t[label] for label in labels} for t in tables]
    base: dict[str, Any] = {}
    for label in labels:
        rows = [t[label] for t in tables]
        per_domain = {
            d: [math.log(r["test_perplexity"][d]) for r in rows] for d in rows[0]["test_perplexity"]
        }
        base[label] = {
            "test_log_perplexity": {d: _mean(v) for d, v in per_domain.items()},
            "per_seed": {d: v for d, v in per_domain.items()},
            **{k: _mean([r[f"log_{k}"] for r in rows]) for k in ("average", "worst")},
            "target": _mean([r["log_target"] for r in rows]) if config["target_domain"] else None,
            "sampling": [r["sampling"] for r in rows],
            "achieved": [r.get("achieved") or replayed_shares(config, r["sampling"]) for r in rows],
            "train_seconds": [r["train_seconds"] for r in rows],
        }
    mixtures = {
        m: {
            "averaged": {d: [r["averaged"][d] for r in runs] for d in domains},
            "final": {d: [r["final"][d] for r in runs] for d in domains},
            "max_averaged": [max(r["averaged"].values()) for r in runs],
        }
        for m, runs in proxies.items()
    }
    scores = {
        m: {
            field: {d: [_mean(r["scores"][field][d]) for r in runs] for d in domains}
            for field in runs[0].get("scores", {})
            if field != "step"
        }
        for m, runs in proxies.items()
    }
    costs: dict[str, list[float | None]] = {
        "reference training": [r["train_seconds"] for r in reference],
        "reference loss cache": [r.get("cache_seconds") for r in reference],
        **{f"proxy {m}": [r["train_seconds"] for r in runs] for m, runs in proxies.items()},
        **{f"base {label}": base[label]["train_seconds"] for label in labels},
    }
    return {
        "command": command,
        "config": config,
        "seeds": seeds,
        "domains": domains,
        "target_domain": config["target_domain"] or None,
        "base": base,
        "paired": paired_to_uniform(tables, ("average", "worst") + (("target",) if target else ())),
        "mixtures": mixtures,
        "scores": scores,
        "costs": costs,
        "dids": _dids_summary(folders, [label for label in labels if label in ONLINE_METHODS]),
        "dids_ablation": _ablation(tables, ("average", "worst") + (("target",) if target else ())),
    }


def _ablation(tables: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any] | None:
    """``dids-inverted`` minus ``dids`` (the reference code's impact against the KL form), paired by seed."""
    if not all({"dids", "dids-inverted"} <= set(t) for t in tables):
        return None
    return {
        n: paired_difference(
            [t["dids-inverted"][f"log_{n}"] for t in tables], [t["dids"][f"log_{n}"] for t in tables]
        ).as_dict()
        for n in names
    }


DIDS_COSTS = (
    "features_seconds",
    "clustering_seconds",
    "rounds",
    "rounds_seconds",
    "train_seconds",
    "rounds_share_of_training",
    "overhead_vs_plain_training",
)


def _dids_summary(folders: list[Path], labels: list[str]) -> dict[str, Any]:
    """Per DIDS row (``base-<label>/metrics.json`` of every seed): what its docs section reports.

    ``min_parent_sampling``: per seed, the smallest sampling mass of any original domain (its groups
    summed) at the start or after any round; ``final_parent_sampling`` and ``averaged_parent_sampling``:
    per domain and seed, after the last round and time-averaged; ``group_sizes``: per seed, the windows
    in each group; ``costs``: per seed, ``DIDS_COSTS`` (the features and the clustering are made once
    per seed, on the reference model, and shared by the rows that regroup).
    """
    out: dict[str, Any] = {}
    for label in labels:
        runs = [_read(f / f"base-{label}" / "metrics.json") for f in folders]
        parents = {
            a: [r["trajectory"]["parents"][a][-1] for r in runs] for a in runs[0]["trajectory"]["parents"]
        }
        out[label] = {
            "impact_form": runs[0]["dids"]["impact_form"],
            "groups_per_domain": len(runs[0]["dids"]["groups"]) // len(parents),
            "min_parent_sampling": [r["dids"]["min_parent_sampling"] for r in runs],
            "final_parent_sampling": parents,
            "averaged_parent_sampling": {a: [r["sampling"][a] for r in runs] for a in parents},
            "group_sizes": [r["dids"]["group_sizes"] for r in runs],
            "costs": {key: [r["dids_costs"][key] for r in runs] for key in DIDS_COSTS},
            "partition_cached": [r["dids_costs"]["partition_cached"] for r in runs],
        }
    return out


def replayed_shares(config: dict[str, Any], sampling: dict[str, float]) -> dict[str, float]:
    """The shares a base run drew, replayed, for runs from before ``metrics.json`` recorded them.

    Those runs drew base batches from a stratified ``DomainBatchSampler`` (every domain in every
    batch), which rounds B·q the same way at every step; its allocation depends only on the weights,
    the batch size and the pool, so replaying the sampler gives the shares exactly.
    """
    from domainmix.sampling import DomainBatchSampler

    names = list(sampling)
    pool = int(config["train_windows"]) or 1_000_000  # allocation does not depend on the pool's size
    ranges = {n: range(i * pool, (i + 1) * pool) for i, n in enumerate(names)}
    sampler = DomainBatchSampler(ranges, int(config["batch_size"]), sampling, min_count=1, seed=0)
    counts = dict.fromkeys(names, 0)
    for _, batch in zip(range(int(config["base_steps"])), sampler, strict=False):
        for index in batch:
            counts[names[index // pool]] += 1
    total = sum(counts.values())
    return {n: c / total for n, c in counts.items()}


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(summary: dict[str, Any]) -> str:
    """The Markdown tables of one summary.

    Base log-perplexities, paired differences, mixtures, scores and costs, made from the summary alone,
    so the docs' tables follow from ``docs/results/*.json``.
    """
    domains, seeds, target = summary["domains"], summary["seeds"], summary["target_domain"]
    columns = domains + ([target] if target else [])
    out = [f"Test log-perplexity (nats per token), mean over seeds {seeds}:", ""]
    out += _table(
        ["weights", *columns, "average", "worst"],
        [
            [label]
            + [f"{row['test_log_perplexity'][d]:.3f}" for d in columns]
            + [f"{row['average']:.3f}", f"{row['worst']:.3f}"]
            for label, row in summary["base"].items()
        ],
    )
    names = ["average", "worst"] + (["target"] if target else [])
    head = [f"{n} ({target})" if n == "target" else n for n in names]
    out += [
        "",
        "Paired difference to uniform (same seed), mean [95 % interval]; * : the interval excludes 0:",
        "",
    ]
    out += _table(
        ["weights", *head],
        [
            [label]
            + [
                f"{row[n]['mean']:+.4f} [{row[n]['low']:+.4f}, {row[n]['high']:+.4f}]"
                + (" *" if row[n]["distinguishable"] else "")
                for n in names
            ]
            for label, row in summary["paired"].items()
        ],
    )
    out += [
        "",
        "Learned mixtures: time-averaged α, mean over seeds (largest of any seed in the last column):",
        "",
    ]
    out += _table(
        ["method", *domains, "max α (per seed)"],
        [
            [m]
            + [f"{_mean(mix['averaged'][d]):.3f}" for d in domains]
            + [" / ".join(f"{v:.3f}" for v in mix["max_averaged"])]
            for m, mix in summary["mixtures"].items()
        ],
    )
    out += ["", "Sampling shares of the base runs, requested → achieved (windows drawn), seed mean:", ""]
    out += _table(
        ["weights", *domains],
        [
            [label]
            + [
                f"{_mean([_share(q, d) for q in row['sampling']]):.3f} → "
                f"{_mean([_share(a, d) for a in row['achieved']]):.3f}"
                for d in domains
            ]
            for label, row in summary["base"].items()
        ],
    )
    out += ["", "Logged scores, mean over the proxy's steps and the seeds:", ""]
    out += _table(
        ["method: score", *domains],
        [
            [f"{m}: {SCORE_NAMES.get(field, field)}"] + [f"{_mean(values[d]):.4g}" for d in domains]
            for m, fields in summary["scores"].items()
            for field, values in fields.items()
        ],
    )
    out += _dids_markdown(summary.get("dids", {}), domains)
    ablation = summary.get("dids_ablation")
    if ablation:
        out += ["", "DIDS ablation: `dids-inverted` minus `dids` (same seed), mean [95 % interval]:", ""]
        out += _table(
            head,
            [
                [
                    f"{ablation[n]['mean']:+.4f} [{ablation[n]['low']:+.4f}, {ablation[n]['high']:+.4f}]"
                    + (" *" if ablation[n]["distinguishable"] else "")
                    for n in names
                ]
            ],
        )
    out += ["", "Wall seconds per stage, per seed:", ""]
    out += _table(
        ["stage", *(f"seed {s}" for s in seeds)],
        [
            [stage, *("–" if v is None else f"{v:.0f}" for v in values)]
            for stage, values in summary["costs"].items()
        ],
    )
    return "\n".join(out) + "\n"


def _dids_markdown(dids: dict[str, Any], domains: list[str]) -> list[str]:
    """The DIDS rows' own tables: sampling mass per original domain, its minimum, and the costs."""
    if not dids:
        return []
    out = [
        "",
        "DIDS: time-averaged sampling mass of each original domain (its groups summed), seed mean:",
        "",
    ]
    out += _table(
        ["row", *domains, "smallest mass at any round (per seed)"],
        [
            [label]
            + [f"{_mean(row['averaged_parent_sampling'][d]):.3f}" for d in domains]
            + [" / ".join(f"{v:.3f}" for v in row["min_parent_sampling"])]
            for label, row in dids.items()
        ],
    )
    out += [
        "",
        "DIDS costs, mean over the seeds (the gradient features and the k-means run once per seed, on the "
        "reference model; `dids-inverted` reuses those of `dids`):",
        "",
    ]
    names = {
        "features_seconds": "features (s)",
        "clustering_seconds": "k-means (s)",
        "rounds": "rounds",
        "rounds_seconds": "rounds (s)",
        "train_seconds": "training, rounds included (s)",
        "rounds_share_of_training": "rounds / training",
        "overhead_vs_plain_training": "(features + k-means + rounds) / rest of training",
    }
    rows = []
    for label, row in dids.items():
        cells = []
        for key in names:
            value = _mean(row["costs"][key])
            cached = key in ("features_seconds", "clustering_seconds") and all(row["partition_cached"])
            cells.append(("0" if value == 0 else f"{value:.3g}") + (" (reused)" if cached else ""))
        rows.append([label, *cells])
    out += _table(["row", *names.values()], rows)
    return out


def plot_dids(folder: Path, labels: list[str], path: Path, floor: float = 0.05) -> None:
    """One seed's DIDS rows: sampling mass per original domain over the steps, and per group.

    Top: each original domain's mass (its groups summed), the ``floor`` dotted. Bottom: every group's
    time-averaged sampling weight, by domain, shaded by the group's share of its domain's windows.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = {label: _read(folder / f"base-{label}" / "metrics.json") for label in labels}
    fig = Figure(figsize=(5.5 * len(runs), 7.2), layout="constrained")
    axes = fig.subplots(2, len(runs), squeeze=False)
    for column, (label, result) in enumerate(runs.items()):
        trajectory, dids = result["trajectory"], result["dids"]
        ax = axes[0][column]
        for index, (name, values) in enumerate(trajectory["parents"].items()):
            ax.plot(trajectory["step"], values, color=f"C{index}", label=name)
        ax.axhline(floor, color="black", linestyle=":", linewidth=0.8)
        ax.set(title=f"{label}: sampling mass per domain", xlabel="base step", ylabel="mass")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small", ncol=2)
        ax = axes[1][column]
        parents = list(trajectory["parents"])
        sizes, averaged = dids["group_sizes"], dids["averaged_sampling"]
        x = 0.0
        for index, parent in enumerate(parents):
            groups = [g for g, a in zip(dids["groups"], dids["parents"], strict=True) if a == parent]
            total = sum(sizes[g] for g in groups)
            for g in groups:
                ax.bar(x, averaged[g], width=0.8, color=f"C{index}", alpha=0.35 + 0.65 * sizes[g] / total)
                x += 1
            x += 0.6
        ax.set(
            title=f"{label}: time-averaged weight per group (lighter: fewer of the domain's windows)",
            xlabel="groups, by domain",
            ylabel="weight",
        )
        ax.title.set_fontsize("small")
        ax.set_xticks([])
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def plot_trajectories(proxies: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per proxy run: every domain's weight α over the steps, its time average dashed."""
    plot_run(proxies, path, with_scores=False)


def plot_run(proxies: dict[str, dict[str, Any]], path: Path, *, with_scores: bool = True) -> None:
    """Per proxy run (a ``weights.json``): α over the steps (time average dashed) and its scores.

    Below the weights, the per-domain score its update read (DoReMi's λ, DoGE's W), smoothed over 10
    steps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = 2 if with_scores else 1
    fig = Figure(figsize=(5.5 * len(proxies), 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, len(proxies), squeeze=False)
    for column, (label, result) in enumerate(proxies.items()):
        ax = axes[0][column]
        trajectory = result["trajectory"]
        for index, (name, values) in enumerate(trajectory["mixture"].items()):
            colour = f"C{index}"
            ax.plot(trajectory["step"], values, color=colour, label=name)
            ax.axhline(result["averaged"][name], color=colour, linestyle="--", linewidth=0.8)
        ax.set(title=f"{label}: domain weights α (dashed: time average)", xlabel="proxy step", ylabel="α")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small", ncol=2)
        if not with_scores:
            continue
        ax = axes[1][column]
        scores = result.get("scores", {})
        for field in (f for f in scores if f in PLOTTED_SCORES):
            for index, (name, values) in enumerate(scores[field].items()):
                smooth = [_mean(values[max(0, i - 9) : i + 1]) for i in range(len(values))]
                ax.plot(scores["step"], smooth, color=f"C{index}", label=name)
            ax.set(title=f"{label}: {SCORE_NAMES.get(field, field)}", xlabel="proxy step")
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Write ``<results>/NAME.json``, ``<results>/NAME.md`` and ``<images>/NAME.png`` from a run folder."""
    parser = argparse.ArgumentParser(
        prog="python -m domainmix.experiments.lm_report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run", type=Path, help="the --out of `domainmix run lm --compare --seeds ...`")
    parser.add_argument("--name", required=True, help="file stem of the outputs, e.g. lm-cpu-universal")
    parser.add_argument("--results", type=Path, default=Path("docs/results"))
    parser.add_argument("--images", type=Path, default=Path("docs/images"))
    parser.add_argument("--command", default="", help="the command that made the run (kept in the JSON)")
    parser.add_argument("--figure-seed", type=int, default=None, help="the seed whose trajectories are drawn")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.run, args.command)
        if args.figure_seed is not None and args.figure_seed not in summary["seeds"]:
            raise ValueError(f"--figure-seed {args.figure_seed} is not a finished seed of {summary['seeds']}")
    except (FileNotFoundError, ValueError) as error:  # before anything is written
        print(f"lm_report: {error}", file=sys.stderr)
        return 2
    args.results.mkdir(parents=True, exist_ok=True)
    args.images.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / f"{args.name}.json", summary, indent=1, allow_nan=False)
    atomic_write_text(args.results / f"{args.name}.md", markdown(summary))
    seed = summary["seeds"][0] if args.figure_seed is None else args.figure_seed
    folder = args.run / f"seed-{seed}"
    proxies = {m: _read(folder / f"proxy-{m}" / "weights.json") for m in _proxies(folder)}
    plot_run(proxies, args.images / f"{args.name}.png")
    if summary["dids"]:
        plot_dids(folder, list(summary["dids"]), args.images / f"{args.name}-dids.png")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
