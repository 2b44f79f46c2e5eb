"""Outputs of one experiment: ``metrics.json``, ``weights.jsonl``, ``figure.png`` and a text table.

The training loop hands over one plain dict per (method, seed), a *run*::

    {"method": "fgls+va", "seed": 0,
     "steps": [0, 100, ...], "error": [...],          # the experiment's error metric at those steps
     "final_error": 0.013,
     "metrics": {"accuracy": [...]},                    # optional extra curves at ``steps``
     "final_metrics": {"accuracy": 0.97},               # optional
     "loss_share": {"d1": 0.95, "d2": 0.05},            # final α by domain name
     "sampling_share": {"d1": 0.31, "d2": 0.69},        # final realised q = b_i / B by domain name
     "trajectory": {"steps": [...], "loss_share": [[...], ...], "sampling_share": [[...], ...]},  # optional
     "wall_time_s": 12.3, "diverged_at": None}        # the step a non-finite loss stopped the run

``trajectory`` holds the shares after every weight update, one row per update, ordered like ``domains``.

``metrics.json`` is a documented interface (other tools read it; see :func:`load_metrics`)::

    {"schema_version": 1, "experiment": str, "setting": str, "config": {...}, "domains": [str, ...],
     "metric": str, "runs": [run, ...],
     "summary": {method: {"seeds": int,
                          "final_error": {"mean", "std", "min", "max"},
                          "error_at": {"2000": float, ...},
                          "loss_share": {domain: float}, "sampling_share": {domain: float},
                          "final_metrics": {name: float}, "wall_time_s": float}}}

JSON has no NaN or infinity, so every non-finite float (a diverged run, say) is written as ``null``,
in ``runs`` and in ``summary`` alike; a mean over seeds that include a NaN is itself ``null``, so a
diverged seed shows up instead of being averaged away.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from domainmix._atomic import atomic_path, atomic_write_text
from domainmix._validation import ConfigError

__all__ = [
    "FIGURE_FILE",
    "METRICS_FILE",
    "SCHEMA_VERSION",
    "WEIGHTS_FILE",
    "format_table",
    "load_metrics",
    "method_colour",
    "plot_figure",
    "write_outputs",
]

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "weights.jsonl"
FIGURE_FILE = "figure.png"

_RUN_KEYS = ("method", "seed", "steps", "error", "final_error", "loss_share", "sampling_share", "wall_time_s")
_TOP_KEYS = ("experiment", "setting", "config", "domains", "metric", "runs", "summary")
_LOADED_RUN_KEYS = ("method", "seed", "steps", "error", "final_error")

# Fixed colours for the paper's methods, so a method looks the same in every figure; other names get a
# colour from a stable hash (zlib.crc32: Python's hash() of a str changes between processes).
_METHOD_COLOURS = {
    "uniform": "#7f7f7f",
    "oracle_gls": "#000000",
    "fgls": "#1f77b4",
    "erma": "#2ca02c",
    "va": "#ff7f0e",
    "fgls+va": "#d62728",
    "erma+va": "#9467bd",
}
_FALLBACK_COLOURS = (
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#dbdb8d",
)


# ---------------------------------------------------------------------------------------------- writing


def write_outputs(
    out_dir: Path,
    *,
    experiment: str,
    setting: str,
    config: Mapping[str, Any],
    domains: Sequence[str],
    metric_name: str,
    runs: Sequence[Mapping[str, Any]],
    checkpoints: Sequence[int] = (2000, 5000),
) -> dict[str, Any]:
    """Write ``metrics.json`` and ``weights.jsonl`` into ``out_dir``, each atomically.

    Args:
        out_dir: Folder for the outputs; created if missing. Existing files of the same name are replaced.
        experiment: Experiment name, e.g. ``"linear"``.
        setting: Setting within the experiment, e.g. ``"fig1abc"``.
        config: The run configuration, written as given (dataclasses, paths and numpy values converted).
        domains: Domain names; the keys of every run's ``loss_share`` and ``sampling_share``.
        metric_name: Name of the error metric in ``error``, e.g. ``"‖θ−θ_gt‖"``.
        runs: One result dict per (method, seed), laid out as in the module docstring.
        checkpoints: Steps at which the summary reports the mean error. Each run contributes its error at
            its last evaluation step at or before the checkpoint; a checkpoint past a run's last
            evaluation step, or before its first, is skipped for that run.

    Returns:
        The summary, exactly as written (non-finite values as ``None``), keyed by method in order of
        first appearance in ``runs``.

    Raises:
        ConfigError: (a ``ValueError``) listing every malformed run: missing keys, curves of unequal
            length, share keys that are not ``domains``, or a repeated (method, seed).
    """
    domains = list(domains)
    _check_runs(runs, domains)
    ordered = _sorted_runs(runs)
    summary = _to_json(_summarize(ordered, domains, checkpoints))
    document = {
        "schema_version": SCHEMA_VERSION,
        "experiment": experiment,
        "setting": setting,
        "config": _to_json(config),
        "domains": domains,
        "metric": metric_name,
        "runs": _to_json(ordered),
        "summary": summary,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = _dumps_document(document)
    atomic_write_text(out_dir / METRICS_FILE, text)
    lines = [
        json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in _weight_rows(ordered, domains)
    ]
    atomic_write_text(out_dir / WEIGHTS_FILE, "".join(lines))
    return summary


def _check_runs(runs: Sequence[Mapping[str, Any]], domains: list[str]) -> None:
    errors: list[str] = []
    seen: set[tuple[Any, Any]] = set()
    for i, run in enumerate(runs):
        where = f"runs[{i}] ({run.get('method')!r}, seed {run.get('seed')!r})"
        missing = [key for key in _RUN_KEYS if key not in run]
        if missing:
            errors.append(f"{where} is missing {missing}")
            continue
        if (run["method"], run["seed"]) in seen:
            errors.append(f"{where} repeats a (method, seed) pair")
        seen.add((run["method"], run["seed"]))
        n = len(run["steps"])
        if len(run["error"]) != n:
            errors.append(f"{where} has {n} steps but {len(run['error'])} error values")
        for name, curve in (run.get("metrics") or {}).items():
            if len(curve) != n:
                errors.append(f"{where} has {n} steps but {len(curve)} values in metrics[{name!r}]")
        for key in ("loss_share", "sampling_share"):
            if sorted(run[key]) != sorted(domains):
                errors.append(f"{where} has {key} keys {sorted(run[key])}, expected the domains {domains}")
        trajectory = run.get("trajectory") or {}
        t = len(trajectory.get("steps", []))
        for key in ("loss_share", "sampling_share"):
            rows = trajectory.get(key, [])
            if len(rows) != t or any(len(row) != len(domains) for row in rows):
                errors.append(f"{where} has trajectory[{key!r}] not of shape ({t}, {len(domains)})")
    if errors:
        raise ConfigError(errors)


def _sorted_runs(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    order: dict[Any, int] = {}
    for run in runs:
        order.setdefault(run["method"], len(order))
    return sorted(runs, key=lambda run: (order[run["method"]], run["seed"]))


def _summarize(
    runs: list[Mapping[str, Any]], domains: list[str], checkpoints: Sequence[int]
) -> dict[str, dict[str, Any]]:
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    summary: dict[str, dict[str, Any]] = {}
    for method, group in by_method.items():
        final = np.array([_float(run["final_error"]) for run in group])
        error_at: dict[str, float] = {}
        for checkpoint in checkpoints:
            values = [v for run in group if (v := _error_at(run, checkpoint)) is not None]
            if values:
                error_at[str(checkpoint)] = float(np.mean(values))
        metric_names = list(dict.fromkeys(name for run in group for name in run.get("final_metrics") or {}))
        summary[method] = {
            "seeds": len(group),
            # Population std (ddof=0): defined for a single seed, and what np.std reports.
            "final_error": {
                "mean": float(final.mean()),
                "std": float(final.std()),
                "min": float(final.min()),
                "max": float(final.max()),
            },
            "error_at": error_at,
            "loss_share": {d: _mean(run["loss_share"][d] for run in group) for d in domains},
            "sampling_share": {d: _mean(run["sampling_share"][d] for run in group) for d in domains},
            "final_metrics": {
                name: _mean(
                    run["final_metrics"][name] for run in group if name in (run.get("final_metrics") or {})
                )
                for name in metric_names
            },
            "wall_time_s": _mean(run["wall_time_s"] for run in group),
        }
    return summary


def _error_at(run: Mapping[str, Any], checkpoint: int) -> float | None:
    """The error evaluated at step ``checkpoint``, or None if the run was not evaluated there.

    Not an earlier evaluation: with ``eval_every=2100`` that would be step 0's error under "@2000".
    """
    steps = list(run["steps"])
    return _float(run["error"][steps.index(checkpoint)]) if checkpoint in steps else None


def _float(value: Any) -> float:
    # A null read back from an earlier metrics.json stands for a non-finite value.
    return math.nan if value is None else float(value)


def _mean(values: Any) -> float:
    return float(np.mean([_float(v) for v in values]))


def _weight_rows(runs: list[Mapping[str, Any]], domains: list[str]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        trajectory = run.get("trajectory") or {}
        for step, alpha, q in zip(
            trajectory.get("steps", []),
            trajectory.get("loss_share", []),
            trajectory.get("sampling_share", []),
            strict=True,
        ):
            rows.append(
                _to_json(
                    {
                        "method": run["method"],
                        "seed": run["seed"],
                        "step": step,
                        "loss_share": dict(zip(domains, alpha, strict=True)),
                        "sampling_share": dict(zip(domains, q, strict=True)),
                    }
                )
            )
    return rows


def _dumps_document(document: Mapping[str, Any]) -> str:
    """JSON with one line per top-level key, per run and per method summary.

    ``indent=`` would put every number of every curve on its own line (tens of thousands of lines);
    this keeps the file diffable and greppable by run while staying strict JSON.
    """

    def dumps(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)

    items = []
    for key, value in document.items():
        if key == "runs":
            body = ",\n".join(f"  {dumps(run)}" for run in value)
            items.append(f' "runs": [\n{body}\n ]' if value else ' "runs": []')
        elif key == "summary":
            body = ",\n".join(f"  {dumps(method)}: {dumps(row)}" for method, row in value.items())
            items.append(f' "summary": {{\n{body}\n }}' if value else ' "summary": {}')
        else:
            items.append(f" {dumps(key)}: {dumps(value)}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def _to_json(obj: Any) -> Any:
    """A copy of ``obj`` made of JSON types only, with every non-finite float replaced by None."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return _to_json(obj.item())
    if isinstance(obj, np.ndarray):
        return _to_json(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _to_json(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # torch tensors, without importing torch here
        return _to_json(obj.tolist())
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON: {obj!r}")


# --------------------------------------------------------------------------------------------- reading


def load_metrics(path: Path | str) -> dict[str, Any]:
    """Read a ``metrics.json`` written by :func:`write_outputs` and check its layout.

    Args:
        path: The file, or the folder holding it.

    Returns:
        The parsed document; non-finite values appear as ``None``.

    Raises:
        ValueError: If the file is not strict JSON, has no or another ``schema_version``, or lacks a
            required key (top level: ``experiment, setting, config, domains, metric, runs, summary``;
            each run: ``method, seed, steps, error, final_error``). The message names what is missing.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE

    def reject_constant(name: str) -> None:
        raise ValueError(f"{path}: {name} is not valid JSON (write_outputs writes non-finite values as null)")

    try:
        document = json.loads(path.read_text(encoding="utf-8"), parse_constant=reject_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(document).__name__}")
    if "schema_version" not in document:
        raise ValueError(f"{path} has no 'schema_version'; is it a domainmix metrics.json?")
    if document["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema_version {document['schema_version']!r}; this domainmix reads {SCHEMA_VERSION}"
        )
    missing = [key for key in _TOP_KEYS if key not in document]
    if missing:
        raise ValueError(f"{path} is missing the required key(s) {missing}")
    if not isinstance(document["runs"], list) or not isinstance(document["summary"], dict):
        raise ValueError(f"{path}: 'runs' must be a list and 'summary' an object")
    for i, run in enumerate(document["runs"]):
        lacking = [key for key in _LOADED_RUN_KEYS if not isinstance(run, dict) or key not in run]
        if lacking:
            raise ValueError(f"{path}: runs[{i}] is missing the required key(s) {lacking}")
    return document


# ------------------------------------------------------------------------------------------------ table


def format_table(
    summary: Mapping[str, Mapping[str, Any]], *, domains: Sequence[str], checkpoints: Sequence[int]
) -> str:
    """A fixed-width table of a summary, one method a row, in the summary's order.

    Columns: method; mean error at each checkpoint; final error mean ± std over seeds; loss share and
    sampling share of the first domain; mean wall time in seconds. Missing or non-finite values
    print as ``-``.

    Args:
        summary: As returned by :func:`write_outputs` or found under ``"summary"`` in ``metrics.json``.
        domains: Domain names; the first one's shares are shown.
        checkpoints: The checkpoint steps to show (those without a value print ``-``).

    Returns:
        The table, lines joined by newlines, with a header and a rule and no trailing newline.
    """
    first = domains[0]
    header = (
        f"{'method':<14}"
        + "".join(f"{'@' + str(c):>10}" for c in checkpoints)
        + f"{'final (mean ± std)':>22}{'loss ' + first:>14}{'batch ' + first:>14}{'sec':>8}"
    )
    lines = [header, "-" * len(header)]
    for method, row in summary.items():
        final = row.get("final_error", {})
        final_text = f"{_num(final.get('mean'))} ± {_num(final.get('std'), '.2g')}"
        lines.append(
            f"{method:<14}"
            + "".join(f"{_num(row.get('error_at', {}).get(str(c))):>10}" for c in checkpoints)
            + f"{final_text:>22}"
            + f"{_num(row.get('loss_share', {}).get(first), '.3f'):>14}"
            + f"{_num(row.get('sampling_share', {}).get(first), '.3f'):>14}"
            + f"{_num(row.get('wall_time_s'), '.1f'):>8}"
        )
    return "\n".join(lines)


def _num(value: Any, spec: str = ".4g") -> str:
    if value is None or not math.isfinite(float(value)):
        return "-"
    return format(float(value), spec)


# ----------------------------------------------------------------------------------------------- figure


def method_colour(method: str) -> str:
    """A colour for ``method`` that is the same in every figure and every process."""
    return (
        _METHOD_COLOURS.get(method) or _FALLBACK_COLOURS[zlib.crc32(method.encode()) % len(_FALLBACK_COLOURS)]
    )


def plot_figure(
    out_dir: Path,
    *,
    title: str,
    domains: Sequence[str],
    metric_name: str,
    runs: Sequence[Mapping[str, Any]],
    log_y: bool = True,
) -> Path:
    """Draw the paper's three panels (Fig. 1 layout) into ``out_dir/figure.png``, atomically.

    (a) the error metric against the step: mean over seeds, shaded between the seeds' min and max;
    (b) the loss-weight share of the first domain over the weight updates; (c) its sampling share.
    One colour per method (:func:`method_colour`). A method with no weight updates (uniform) is drawn
    in (b) and (c) as a flat line at its final share, which is what its weights were throughout.

    Args:
        out_dir: Folder for ``figure.png``; created if missing.
        title: Figure title.
        domains: Domain names; the first one's shares are plotted.
        metric_name: Label of the error axis.
        runs: Run dicts as for :func:`write_outputs` (runs read back by :func:`load_metrics` work too).
        log_y: Log scale for the error axis, as in the paper.

    Returns:
        The path of the written PNG.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plot_figure needs matplotlib; install the extra with: pip install 'domainmix[experiments]'"
        ) from exc

    # A bare Figure on an Agg canvas, not pyplot: no global backend switch, no figure registry to leak.
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_err, ax_loss, ax_samp = fig.subplots(1, 3)
    first = domains[0]
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for run in _sorted_runs(runs):
        by_method.setdefault(run["method"], []).append(run)
    for method, group in by_method.items():
        colour = method_colour(method)
        steps, err = _aligned([(run["steps"], run["error"]) for run in group])
        _band(ax_err, steps, err, colour, f"{method} ({len(group)} seeds)")
        end = max((run["steps"][-1] for run in group if len(run["steps"])), default=0)
        for ax, key in ((ax_loss, "loss_share"), (ax_samp, "sampling_share")):
            # Trajectory rows list the shares in the order of ``domains``; the first is plotted.
            curves = [
                (run["trajectory"]["steps"], [row[0] for row in run["trajectory"][key]])
                for run in group
                if (run.get("trajectory") or {}).get("steps")
            ]
            if curves:
                _band(ax, *_aligned(curves), colour, method)
            else:
                share = _mean(run[key][first] for run in group)
                ax.plot([0, end], [share, share], color=colour, label=method)
    if log_y:
        ax_err.set_yscale("log")
    ax_err.set(xlabel="step", ylabel=metric_name, title=f"(a) {metric_name}")
    ax_loss.set(xlabel="step", ylabel=f"loss-weight share of {first}", title="(b) loss weight", ylim=(0, 1))
    ax_samp.set(xlabel="step", ylabel=f"sampling share of {first}", title="(c) sampling weight", ylim=(0, 1))
    ax_err.legend(fontsize="small")
    for ax in (ax_err, ax_loss, ax_samp):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FIGURE_FILE
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=120)
    return path


def _aligned(curves: list[tuple[Sequence[int], Sequence[Any]]]) -> tuple[np.ndarray, np.ndarray]:
    """Steps common to all seeds and the (seeds, steps) values there; None (a written NaN) becomes NaN."""
    common = sorted(set.intersection(*(set(steps) for steps, _ in curves)))
    values = np.array(
        [[_float(dict(zip(steps, vals, strict=True))[s]) for s in common] for steps, vals in curves],
        dtype=float,
    ).reshape(len(curves), len(common))
    return np.asarray(common), values


def _band(ax: Any, steps: np.ndarray, values: np.ndarray, colour: str, label: str) -> None:
    if steps.size == 0:
        return
    ax.plot(steps, values.mean(axis=0), color=colour, label=label)
    if len(values) > 1:
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.2, linewidth=0)
