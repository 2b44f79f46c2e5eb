"""``domainmix run EXPERIMENT``: every (method, seed) of an experiment, in parallel; JSON, JSONL and a figure.

Outputs in ``--out DIR`` (a documented interface, read by other tools):

* ``metrics.json``: config, domains, metric name, one record per (method, seed) with the error curve and
  its steps, the final error, final loss-weight and sampling shares by domain and the wall time, and a
  per-method summary (see ``docs/reproduction.md``);
* ``weights.jsonl``: one line per (method, seed, evaluation step) with the loss and sampling shares;
* ``figure.png``: the error curve, domain 1's loss share and its sampling share over steps.

Examples:
    domainmix run linear --setting fig1def --out runs/fig1def
    domainmix run linear --setting custom --set input_scales=[1,10,100] --set noise_variances=[1,4,20] \
        --out runs/custom
    domainmix run logistic --setting fig2def --seeds 0,1,2 --out runs/logistic
    domainmix run mlp --out runs/mlp --config my.yaml
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from domainmix._validation import ConfigError
from domainmix.experiments.config import (
    TrainConfig,
    as_dict,
    load_config,
    parse_overrides,
    parse_seeds,
    read_yaml,
)
from domainmix.experiments.loop import train
from domainmix.experiments.methods import LOSS_RULES, SAMPLING_RULES, describe

EXPERIMENTS = {
    "linear": "domainmix.experiments.linear",
    "logistic": "domainmix.experiments.logistic",
    "mlp": "domainmix.experiments.mlp",
}
CHECKPOINTS = (2000, 5000)


def experiment_module(name: str) -> ModuleType:
    """The module defining ``CONFIG``, ``SETTINGS``, ``METRIC`` and ``make_task`` for ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}.")
    return importlib.import_module(EXPERIMENTS[name])


def _job(experiment: str, cfg: TrainConfig, method: str, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # one process per core; intra-op threads would only contend
    module = experiment_module(experiment)
    return train(module.make_task(cfg, seed), method, cfg, seed)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored inside the block (in the main thread; elsewhere it cannot be changed or received)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _star_job(job: tuple[str, TrainConfig, str, int]) -> dict[str, Any]:
    return _job(*job)


def run_jobs(experiment: str, cfg: TrainConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train every (method, seed) of ``cfg``; ``cfg.workers`` processes (1: in this process)."""
    jobs = [(method, seed) for method in cfg.methods for seed in cfg.seeds]
    bar = _progress(len(jobs), experiment) if progress else None
    results: list[dict[str, Any]] = []
    if cfg.workers == 1:
        for method, seed in jobs:
            results.append(_job(experiment, cfg, method, seed))
            if bar is not None:
                bar.update(1)
    else:
        # spawn, not fork: a forked child inherits the parent's torch thread pools and can deadlock.
        context = multiprocessing.get_context("spawn")
        # A terminal's Ctrl-C reaches the whole process group: a worker it interrupts mid-start or mid-job
        # takes its task with it and the pool waits for the result forever. So the workers ignore SIGINT
        # from their start (SIG_IGN survives the spawn's exec) and the parent alone handles it, by
        # terminating them; a second Ctrl-C must not interrupt that half-way either.
        with _sigint_ignored():
            pool = context.Pool(min(cfg.workers, len(jobs)))
        try:
            for result in pool.imap_unordered(_star_job, [(experiment, cfg, m, s) for m, s in jobs]):
                results.append(result)
                if bar is not None:
                    bar.update(1)
        except BaseException:  # KeyboardInterrupt included: no worker outlives the run
            with _sigint_ignored():
                pool.terminate()
                pool.join()
            raise
        pool.close()
        pool.join()
    if bar is not None:
        bar.close()
    order = {job: i for i, job in enumerate(jobs)}
    return sorted(results, key=lambda r: order[(r["method"], r["seed"])])


def _progress(total: int, label: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError as error:  # the experiments extra is missing: say so instead of running silently
        raise ImportError("domainmix run needs tqdm: pip install 'domainmix[experiments]'") from error
    return tqdm(total=total, desc=f"{label} runs", unit="run", file=sys.stderr)


def build_config(
    experiment: str, setting: str, path: str | None, overrides: Mapping[str, Any]
) -> TrainConfig:
    """Defaults, then the named setting's values, then the YAML file, then ``--set`` overrides."""
    module = experiment_module(experiment)
    errors = []
    if setting != "custom" and setting not in module.SETTINGS:  # reported with the others, checked alone
        known = sorted(module.SETTINGS)
        errors.append(f"unknown setting {setting!r} for {experiment}; choose one of {known} or 'custom'.")
    preset = dict(module.SETTINGS.get(setting, {}))
    try:
        from_file = read_yaml(path) if path is not None else {}
    except ConfigError as error:
        raise ConfigError(errors + error.errors) from None
    return load_config(module.CONFIG, None, {**preset, **from_file, **overrides}, earlier=errors)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the experiment, write the outputs, print the table."""
    from domainmix.experiments import _report

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm"]:  # the two-stage language-model pipeline has its own stages and options
        from domainmix.experiments import lm

        return lm.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="domainmix run",
        description=__doc__.splitlines()[0].replace("``", ""),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "experiment", choices=[*sorted(EXPERIMENTS), "lm"], help="'lm': see domainmix run lm --help"
    )
    parser.add_argument(
        "--setting", default=None, help="a named setting of the paper (default: the first) or 'custom'"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--config", default=None, help="YAML file of settings")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated LOSS or LOSS+SAMPLING, e.g. uniform,fgls,va,fgls+va. Loss rules: "
        f"{describe(LOSS_RULES)}. Sampling rules: {describe(SAMPLING_RULES)}",
    )
    parser.add_argument("--seeds", default=None, help="comma-separated ints, e.g. 0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="SGD steps per run")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (YAML value)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip figure.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    module = experiment_module(args.experiment)
    setting = args.setting or next(iter(module.SETTINGS))
    overrides, errors = parse_overrides(args.set)  # every problem of the command line, reported at once
    if args.methods is not None:
        overrides["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.seeds is not None:
        try:
            overrides["seeds"] = parse_seeds(args.seeds)
        except ConfigError as error:
            errors.extend(error.errors)
    for key in ("steps", "workers"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        cfg = build_config(args.experiment, setting, args.config, overrides)
    except (ConfigError, ValueError) as error:
        errors.extend(error.errors if isinstance(error, ConfigError) else [str(error)])
    if errors:
        shown = errors[0] if len(errors) == 1 else "\n" + "\n".join(f"- {e}" for e in errors)
        print(f"domainmix run {args.experiment}: invalid configuration: {shown}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    try:
        runs = run_jobs(args.experiment, cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ndomainmix run {args.experiment}: interrupted; nothing written.", file=sys.stderr)
        return 130
    for run in runs:
        if run["diverged_at"] is not None:
            print(
                f"domainmix run {args.experiment}: {run['method']} (seed {run['seed']}) diverged at step "
                f"{run['diverged_at']}; its later evaluations are null in metrics.json.",
                file=sys.stderr,
            )
    names = list(runs[0]["loss_share"])
    args.out.mkdir(parents=True, exist_ok=True)
    # the checkpoints that are evaluation steps (every eval_every steps, and the last)
    evaluated = [c for c in CHECKPOINTS if c <= cfg.steps and (c % cfg.eval_every == 0 or c == cfg.steps)]
    checkpoints = tuple(evaluated)
    summary = _report.write_outputs(
        args.out,
        experiment=args.experiment,
        setting=setting,
        config=as_dict(cfg),
        domains=names,
        metric_name=module.METRIC,
        runs=runs,
        checkpoints=checkpoints,
    )
    if args.no_plot:
        (args.out / "figure.png").unlink(missing_ok=True)  # an earlier run's figure would pass for this one's
    else:
        _report.plot_figure(
            args.out,
            title=f"{args.experiment} {setting}",
            domains=names,
            metric_name=module.METRIC,
            runs=runs,
            log_y=module.LOG_Y,
        )
    print(
        f"{args.experiment} {setting}: {len(cfg.methods)} methods × {len(cfg.seeds)} seeds, {cfg.steps} steps"
    )
    print(_report.format_table(summary, domains=names, checkpoints=checkpoints))
    print(f"wrote {args.out}/metrics.json, weights.jsonl" + ("" if args.no_plot else ", figure.png"))
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
