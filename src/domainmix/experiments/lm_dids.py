"""DIDS online on the base model: ``domainmix run lm --stage base --weights dids|dids-flat|dids-inverted``.

Shi et al. (2025), arXiv:2504.13227 (``strategies.dids``, ``docs/algorithms.md`` §5). The base stage
starts from uniform (``dids_initial``) weights and every ``dids_round_steps`` steps the strategy moves
the *sampling* weights of the training groups (the mixture follows them: plain resampling):

1. **Groups.** ``dids-flat``: one group per training domain (``"<domain>/0"``). ``dids`` and
   ``dids-inverted``: every window of the training pool is sketched on the reference stage's model
   (``reference_model.pt``; :func:`~domainmix.stats.gradient_sketch` of the per-example gradients of its
   last 10 % of tensors, ``dids_sketch_dim`` dimensions) and each domain is split into
   ``dids_clusters`` k-means clusters (:func:`~domainmix.partition.repartition`, ``dids_metric``). The
   partition is cached as JSON (``partition.json``) under a key of the reference model's weights, the
   pool's tokens and the settings: a second run with the same key reads it and computes no features.
2. **Tasks.** Universal setting (no ``target_domain``): each training domain's validation split, m =
   the number of training domains. Out-of-domain: the held-out domain's validation split only, m = 1
   (it is never trained on: the groups come from the training pool).
3. **Rounds.** A :class:`~domainmix.stats.FisherProductProbe` on the base model's last 10 % of tensors
   reads ``dids_examples`` windows of every group and of every task, drawn as a function of
   (seed, step) alone; ``dids`` (KL impact) or ``dids-inverted`` (the reference code's inverted impact,
   an ablation) turns them into the next sampling ratios.

``metrics.json`` then holds, besides the base stage's evaluation: ``trajectory`` (the groups' sampling
every 10 steps and each original domain's total, ``parents``), ``scores`` (per round: the mean impact of
each group over the tasks, and g_iᵀFg_i), ``dids`` (per round: the step, seconds, each group's and each
parent's sampling, the impact I of every (group, task), the task losses and the gains ΔL + P; the
smallest parent share reached) and ``dids_costs`` (seconds of the features, the clustering and the
rounds, and the training they steer).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from domainmix._atomic import atomic_write_json
from domainmix._validation import ConfigError
from domainmix.experiments import lm
from domainmix.experiments.config import LmConfig
from domainmix.experiments.gpt import GPT, per_token_loss
from domainmix.experiments.methods import DIDS_SCHEDULE, ONLINE_METHODS, UNCLUSTERED, MethodContext
from domainmix.partition import Partition, repartition
from domainmix.stats import FisherProductProbe, Probe, gradient_sketch, last_parameters
from domainmix.strategies._dids import impact, potential

_CACHE_FORMAT = 1
_DRAW_TAG = 11  # the rounds' draws: a stream of their own, (seed, 11, step)
# torch.func's vmap runs CPU attention example by example (a UserWarning on every first call); the
# costs are measured and reported (dids_costs), so the warning is left out of the logs.
_VMAP_ATTENTION = "There is a performance drop because we have not yet implemented the batching rule"


def example_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """(n,) mean per-token loss of each window: the per-example loss of the features and the rounds."""
    return per_token_loss(logits, targets).mean(1)


def task_pool(cfg: LmConfig) -> lm.Windows:
    """DIDS's target tasks: every training domain's validation split, or the held-out domain's."""
    domains = (cfg.target_domain,) if cfg.target_domain else lm.training_domains(cfg)
    return lm.load_windows(cfg, "validation", cfg.eval_windows or None, domains)


def flat_partition(pool: lm.Windows) -> Partition:
    """One group per training domain: DIDS without repartition."""
    return Partition.create(
        [f"{n}/0" for n in pool.names],
        pool.names,
        [np.arange(pool.ranges[n].start, pool.ranges[n].stop) for n in pool.names],
    )


def clustered_partition(
    cfg: LmConfig, pool: lm.Windows, reference_dir: Path | None, cache: Path
) -> tuple[Partition, dict[str, Any]]:
    """Gradient clusters of every pool window on the reference model, cached at ``cache``.

    Returns the partition and ``{"cached", "features_seconds", "clustering_seconds", "feature_tensors",
    "windows"}`` (the seconds are those of the run that made it when it comes from the cache).
    """
    if reference_dir is None:
        raise ValueError("--weights dids and dids-inverted need --reference DIR (a reference stage's --out).")
    device = lm.device_for(cfg)
    model = lm.load_model(reference_dir / lm.REFERENCE_MODEL, device)
    key = _cache_key(cfg, pool, model)
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("format") == _CACHE_FORMAT and saved.get("key") == key:
            return Partition.from_json(saved["partition"]), {**saved["costs"], "cached": True}
    names = last_parameters(model)
    start = time.perf_counter()
    seq = pool.tokens.long().to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _VMAP_ATTENTION, UserWarning)
        features = gradient_sketch(
            model, example_loss, seq[:, :-1], seq[:, 1:], params=names, dim=cfg.dids_sketch_dim,
            seed=cfg.seed, chunk_size=64,
        )  # fmt: skip
    middle = time.perf_counter()
    domains = {n: np.arange(r.start, r.stop) for n, r in pool.ranges.items()}
    made = repartition(features, domains, cfg.dids_clusters, metric=cfg.dids_metric, seed=cfg.seed)  # type: ignore[arg-type]
    costs = {
        "features_seconds": middle - start,
        "clustering_seconds": time.perf_counter() - middle,
        "feature_tensors": names,
        "windows": len(pool.domain),
    }
    atomic_write_json(
        cache, {"format": _CACHE_FORMAT, "key": key, "costs": costs, "partition": made.to_json()}
    )
    return made, {**costs, "cached": False}


def _cache_key(cfg: LmConfig, pool: lm.Windows, model: GPT) -> str:
    """What the partition depends on: the settings, the pool's windows and the model's weights."""
    h = hashlib.sha256()
    settings = [cfg.dids_clusters, cfg.dids_sketch_dim, cfg.dids_metric, cfg.seed, list(pool.names)]
    h.update(json.dumps(settings + [[len(r) for r in pool.ranges.values()]]).encode())
    h.update(pool.tokens.numpy().tobytes())
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def grouped(pool: lm.Windows, partition: Partition) -> lm.Windows:
    """The pool's windows reordered so that each group of ``partition`` is one contiguous range."""
    order = torch.from_numpy(np.concatenate(partition.members))
    sizes = [int(m.size) for m in partition.members]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    ranges = {n: range(starts[i], starts[i + 1]) for i, n in enumerate(partition.names)}
    domain = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return lm.Windows(partition.names, pool.tokens[order], domain, ranges, partition.sizes())


def draw_for(
    groups: lm.Windows, tasks: lm.Windows, per: int, seed: int, device: torch.device
) -> Callable[[int], tuple[Tensor, Tensor, Tensor]]:
    """The probe's ``draw(step)``: ``per`` windows of each group (ids < k) and of each task (ids k + j).

    A deterministic function of (seed, step): a resumed run draws what the uninterrupted one drew.
    """
    k = len(groups.names)

    def draw(step: int) -> tuple[Tensor, Tensor, Tensor]:
        rng = np.random.default_rng([seed, _DRAW_TAG, step])
        rows, ids = [], []
        for offset, windows in ((0, groups), (k, tasks)):
            for i, r in enumerate(windows.ranges.values()):
                pick = r.start + rng.choice(len(r), size=min(per, len(r)), replace=False)
                rows.append(windows.tokens[torch.from_numpy(pick)])
                ids += [offset + i] * len(pick)
        seq = torch.cat(rows).long().to(device)
        return seq[:, :-1], seq[:, 1:], torch.tensor(ids, device=device)

    return draw


class RoundLog:
    """Every DIDS round: its seconds, the groups' and parents' sampling, I, the task losses and gains.

    The gains ΔL_j + P_j are recomputed from the logged task losses by the strategy's own functions
    (``potential`` with ``methods.DIDS_SCHEDULE``), and I by ``impact`` from the logged products.
    """

    def __init__(self, partition: Partition, tasks: tuple[str, ...], form: str) -> None:
        self.partition, self.tasks, self.form = partition, tasks, form
        self.sources = tuple(dict.fromkeys(partition.parents))
        self.steps: list[int] = []
        self.seconds: list[float] = []
        self.skipped = 0
        self.sampling: dict[str, list[float]] = {n: [] for n in partition.names}
        self.impact: dict[str, dict[str, list[float]]] = {n: {t: [] for t in tasks} for n in partition.names}
        self.task_loss: dict[str, list[float]] = {t: [] for t in tasks}
        self.gain: dict[str, list[float]] = {t: [] for t in tasks}
        self._losses: list[list[float]] = []
        self._start: float | None = None

    def start(self) -> None:
        """A round begins (the probe's window observation)."""
        self._start = time.perf_counter()

    def record(self, entry: dict[str, Any]) -> None:
        """The controller's record of the round just done."""
        seconds = 0.0 if self._start is None else time.perf_counter() - self._start
        self._start = None
        if entry["skipped"]:
            self.skipped += 1
            return
        stats = entry["stats"]
        f64 = torch.float64
        influence = impact(
            torch.tensor(stats["fisher_cross"], dtype=f64),
            torch.tensor(stats["fisher_domain_sq"], dtype=f64),
            torch.tensor(stats["fisher_task_sq"], dtype=f64),
            self.form,  # type: ignore[arg-type]
        )
        losses = [float(v) for v in stats["task_loss"]]
        if self._losses:
            recent = torch.tensor(self._losses + [losses], dtype=f64)[-DIDS_SCHEDULE["history"] :]
            ahead, needed = DIDS_SCHEDULE["horizon"], DIDS_SCHEDULE["min_history"]
            gains = [
                self._losses[-1][j] - losses[j] + potential(recent[:, j], ahead, needed)
                for j in range(len(self.tasks))
            ]
        else:
            gains = [1.0] * len(self.tasks)  # the first round: the impact alone
        self._losses.append(losses)
        self.steps.append(int(entry["step"]))
        self.seconds.append(seconds)
        for i, name in enumerate(self.partition.names):
            self.sampling[name].append(float(entry["sampling"][i]))
            for j, task in enumerate(self.tasks):
                self.impact[name][task].append(float(influence[i, j]))
        for j, task in enumerate(self.tasks):
            self.task_loss[task].append(losses[j])
            self.gain[task].append(gains[j])

    def by_parent(self, groups: dict[str, float]) -> dict[str, float]:
        """Each original domain's total of a by-group mapping."""
        totals = dict.fromkeys(self.sources, 0.0)
        for name, parent in zip(self.partition.names, self.partition.parents, strict=True):
            totals[parent] += groups[name]
        return totals

    def averaged(self, initial: dict[str, float], steps: int) -> dict[str, float]:
        """Each group's share of the ``steps`` batches: round r's ratios hold from the batch after it."""
        bounds = [0, *self.steps, steps]
        values = [initial] + [{n: v[r] for n, v in self.sampling.items()} for r in range(len(self.steps))]
        return {
            n: sum(p[n] * (b - a) for p, a, b in zip(values, bounds, bounds[1:], strict=False)) / steps
            for n in self.partition.names
        }

    def as_dict(self) -> dict[str, Any]:
        """The rounds as JSON-able lists, one entry per round."""
        parents = [
            self.by_parent({n: v[r] for n, v in self.sampling.items()}) for r in range(len(self.steps))
        ]
        return {
            "step": self.steps,
            "seconds": self.seconds,
            "skipped": self.skipped,
            "sampling": self.sampling,
            "parent_sampling": {a: [p[a] for p in parents] for a in self.sources},
            "impact": self.impact,
            "task_loss": self.task_loss,
            "gain": self.gain,
        }


class _TimedProbe(FisherProductProbe):
    """The Fisher products, telling the round log when a round begins."""

    def __init__(self, rounds: RoundLog, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rounds = rounds

    def observe_window(self, collector: Any, step: int) -> None:
        self._rounds.start()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _VMAP_ATTENTION, UserWarning)
            super().observe_window(collector, step)


def train_dids(
    cfg: LmConfig, method: str, reference_dir: Path | None, cache: Path
) -> tuple[GPT, dict[str, float], dict[str, Any]]:
    """Train the base model with DIDS moving its sampling; (model, averaged sampling by domain, info).

    Raises:
        ConfigError: when the settings would leave DIDS without a round (``LmConfig.dids_problems``).
    """
    problems = cfg.dids_problems()
    if problems:
        raise ConfigError(problems)
    pool = lm.training_pool(cfg)
    if method in UNCLUSTERED:
        partition, made = flat_partition(pool), {"features_seconds": 0.0, "clustering_seconds": 0.0}
    else:
        partition, made = clustered_partition(cfg, pool, reference_dir, cache)
    groups, tasks = grouped(pool, partition), task_pool(cfg)
    start = {n: 1.0 if cfg.dids_initial == "uniform" else float(pool.sizes[n]) for n in pool.names}
    carried = partition.carry_weights(start)
    initial = {n: v / sum(carried.values()) for n, v in carried.items()}
    context = MethodContext(
        tuple(partition.sizes().values()), num_tasks=len(tasks.names), partition=partition
    )
    strategy = ONLINE_METHODS[method].build(cfg, context)
    form = "inverted" if method == "dids-inverted" else "kl"
    rounds = RoundLog(partition, tasks.names, form)

    def probes(model: GPT) -> list[Probe]:
        draw = draw_for(groups, tasks, cfg.dids_examples, cfg.seed, lm.device_for(cfg))
        return [_TimedProbe(rounds, model, example_loss, draw, len(tasks.names), chunk_size=32)]

    online = lm.Online(probes, cfg.dids_round_steps, initial, rounds.record)
    model, _, info = lm.train(cfg, "base", strategy, groups, cfg.base_steps, online=online)
    averaged = rounds.averaged(initial, cfg.base_steps)
    trajectory = info["trajectory"]
    trajectory["parents"] = {a: [] for a in rounds.sources}
    for t in range(len(trajectory["step"])):
        for a, total in rounds.by_parent({n: v[t] for n, v in trajectory["mixture"].items()}).items():
            trajectory["parents"][a].append(total)
    log = rounds.as_dict()
    after = [{a: v[r] for a, v in log["parent_sampling"].items()} for r in range(len(rounds.steps))]
    mean_impact = {n: np.mean(list(rows.values()), axis=0).tolist() for n, rows in rounds.impact.items()}
    info["scores"] = {**info.get("scores", {"step": rounds.steps}), "impact": mean_impact}
    info["dids"] = {
        "method": method,
        "impact_form": form,
        "tasks": list(tasks.names),
        "groups": list(partition.names),
        "parents": list(partition.parents),
        "group_sizes": partition.sizes(),
        "partition_digest": partition.digest,
        "probe_tensors": last_parameters(model),
        "initial": initial,
        "averaged_sampling": averaged,
        "min_parent_sampling": min(min(s.values()) for s in [rounds.by_parent(initial), *after]),
        "rounds": log,
    }
    spent = sum(rounds.seconds)
    info["dids_costs"] = {
        "features_seconds": made["features_seconds"],
        "clustering_seconds": made["clustering_seconds"],
        "partition_cached": bool(made.get("cached", False)),
        "feature_tensors": made.get("feature_tensors"),
        "rounds_seconds": spent,
        "rounds": len(rounds.seconds),
        "train_seconds": info["train_seconds"],  # the rounds included
        "rounds_share_of_training": spent / info["train_seconds"],
        "overhead_vs_plain_training": (made["features_seconds"] + made["clustering_seconds"] + spent)
        / max(info["train_seconds"] - spent, 1e-9),
    }
    return model, rounds.by_parent(averaged), info
