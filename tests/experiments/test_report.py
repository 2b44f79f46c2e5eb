"""The experiment outputs: metrics.json round trip, weights.jsonl, the figure and the table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from domainmix.experiments._report import (
    FIGURE_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    format_table,
    load_metrics,
    method_colour,
    plot_figure,
    write_outputs,
)

DOMAINS = ["d1", "d2"]
STEPS = [0, 1000, 1500, 2500, 4000, 6000]


def make_run(method: str, seed: int, scale: float, *, updates: int = 4) -> dict[str, Any]:
    """A hand-built run whose numbers are easy to average by hand."""
    error = [scale * (10 - i) + seed for i in range(len(STEPS))]
    share = 0.5 + 0.1 * seed
    return {
        "method": method,
        "seed": seed,
        "steps": list(STEPS),
        "error": error,
        "final_error": error[-1],
        "metrics": {"accuracy": [0.5] * len(STEPS)},
        "final_metrics": {"accuracy": 0.9 + 0.01 * seed},
        "loss_share": {"d1": share, "d2": 1 - share},
        "sampling_share": {"d1": 1 - share, "d2": share},
        "trajectory": {
            "steps": [500 * (u + 1) for u in range(updates)],
            "loss_share": [[share, 1 - share]] * updates,
            "sampling_share": [[1 - share, share]] * updates,
        },
        "wall_time_s": 1.0 + seed,
    }


def make_runs() -> list[dict[str, Any]]:
    # Interleaved and out of seed order on purpose: the file must sort them.
    runs = []
    for seed in (2, 0, 1):
        runs.append(make_run("uniform", seed, 1.0))
        runs.append(make_run("fgls+va", seed, 0.5, updates=3))
    return runs


def write(tmp_path: Path, runs: list[dict[str, Any]] | None = None, **kwargs: Any) -> dict[str, Any]:
    return write_outputs(
        tmp_path,
        experiment="linear",
        setting="fig1abc",
        config={"lr": 4e-3, "path": tmp_path, "dims": (20,), "arr": np.arange(2)},
        domains=DOMAINS,
        metric_name="‖θ−θ_gt‖",
        runs=make_runs() if runs is None else runs,
        **kwargs,
    )


def test_round_trip_and_summary(tmp_path: Path) -> None:
    summary = write(tmp_path)
    doc = load_metrics(tmp_path / METRICS_FILE)
    assert doc["schema_version"] == 1
    assert (doc["experiment"], doc["setting"], doc["metric"], doc["domains"]) == (
        "linear",
        "fig1abc",
        "‖θ−θ_gt‖",
        DOMAINS,
    )
    assert doc["config"] == {"lr": 4e-3, "path": str(tmp_path), "dims": [20], "arr": [0, 1]}
    assert doc["summary"] == summary
    # Method order of first appearance, then seed.
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [
        ("uniform", 0),
        ("uniform", 1),
        ("uniform", 2),
        ("fgls+va", 0),
        ("fgls+va", 1),
        ("fgls+va", 2),
    ]
    assert list(summary) == ["uniform", "fgls+va"]

    uni = summary["uniform"]
    finals = np.array([1.0 * 5 + s for s in (0, 1, 2)])  # error[-1] = scale * (10 - 5) + seed
    assert uni["seeds"] == 3
    assert uni["final_error"]["mean"] == pytest.approx(finals.mean())
    assert uni["final_error"]["std"] == pytest.approx(finals.std())  # population std, ddof=0
    assert (uni["final_error"]["min"], uni["final_error"]["max"]) == (5.0, 7.0)
    assert uni["loss_share"] == pytest.approx({"d1": 0.6, "d2": 0.4})
    assert uni["sampling_share"] == pytest.approx({"d1": 0.4, "d2": 0.6})
    assert uni["final_metrics"] == pytest.approx({"accuracy": 0.91})
    assert uni["wall_time_s"] == pytest.approx(2.0)
    assert summary["fgls+va"]["final_error"]["mean"] == pytest.approx(0.5 * 5 + 1)


def test_a_checkpoint_reports_the_evaluation_at_that_step_only(tmp_path: Path) -> None:
    """An earlier evaluation stood in for a checkpoint that was not evaluated (with eval_every=2100,
    "@2000" showed step 0's error); a checkpoint now needs an evaluation at that very step."""
    summary = write(tmp_path, checkpoints=(1000, 2000, 5000, 6000, 7000))
    error_at = summary["uniform"]["error_at"]
    # STEPS index: 1000 -> 1, 6000 -> 5; 2000, 5000 and 7000 were not evaluation steps
    assert error_at == {"1000": pytest.approx(10.0), "6000": pytest.approx(6.0)}  # 10 - index + mean seed 1
    runs = [make_run("uniform", 0, 1.0)]
    runs[0]["steps"] = [s + 100 for s in STEPS]
    assert write(tmp_path, runs=runs, checkpoints=(50, 1100))["uniform"]["error_at"] == {
        "1100": pytest.approx(9.0)
    }


def test_nan_and_inf_are_written_as_null(tmp_path: Path) -> None:
    runs = make_runs()
    runs[0]["final_error"] = math.nan
    runs[0]["error"][3] = math.inf
    runs[0]["loss_share"]["d1"] = np.float32("nan")
    summary = write(tmp_path, runs=runs)
    text = (tmp_path / METRICS_FILE).read_text(encoding="utf-8")

    def reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(text, parse_constant=reject)
    diverged = next(r for r in doc["runs"] if (r["method"], r["seed"]) == ("uniform", 2))
    assert diverged["final_error"] is None
    assert diverged["error"][3] is None
    # A NaN seed makes the mean visible as null rather than averaging it away; other methods are intact.
    assert summary["uniform"]["final_error"]["mean"] is None
    assert summary["uniform"]["loss_share"]["d1"] is None
    assert summary["fgls+va"]["final_error"]["mean"] is not None
    # Reading it back and writing again (the nulls are NaN again) still works.
    write_outputs(
        tmp_path / "again",
        experiment="linear",
        setting="fig1abc",
        config={},
        domains=DOMAINS,
        metric_name="e",
        runs=doc["runs"],
    )
    assert load_metrics(tmp_path / "again")["summary"]["uniform"]["final_error"]["mean"] is None


def test_weights_jsonl_has_one_line_per_update(tmp_path: Path) -> None:
    write(tmp_path)
    lines = (tmp_path / WEIGHTS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 * 4 + 3 * 3  # uniform: 4 updates x 3 seeds; fgls+va: 3 x 3
    first = json.loads(lines[0])
    assert first == {
        "method": "uniform",
        "seed": 0,
        "step": 500,
        "loss_share": {"d1": 0.5, "d2": 0.5},
        "sampling_share": {"d1": 0.5, "d2": 0.5},
    }
    assert {json.loads(line)["method"] for line in lines[12:]} == {"fgls+va"}


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    write(tmp_path)
    write(tmp_path)  # replacing existing files too
    plot_figure(tmp_path, title="t", domains=DOMAINS, metric_name="e", runs=make_runs())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([METRICS_FILE, WEIGHTS_FILE, FIGURE_FILE])


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    write(tmp_path)
    before = (tmp_path / METRICS_FILE).read_bytes()
    runs = make_runs()
    runs[0]["config_object"] = object()  # not JSON-serialisable: fails before anything is replaced
    with pytest.raises(TypeError, match="cannot write a object"):
        write(tmp_path, runs=runs)
    assert (tmp_path / METRICS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([METRICS_FILE, WEIGHTS_FILE])


def test_malformed_runs_are_all_reported(tmp_path: Path) -> None:
    runs = make_runs()
    del runs[0]["final_error"]
    runs[1]["error"] = runs[1]["error"][:-1]
    runs[2]["loss_share"] = {"d1": 1.0}
    runs.append(make_run("uniform", 0, 1.0))
    with pytest.raises(ValueError) as info:
        write(tmp_path, runs=runs)
    message = str(info.value)
    assert "missing ['final_error']" in message
    assert "6 steps but 5 error values" in message
    assert "loss_share keys ['d1']" in message
    assert "repeats a (method, seed) pair" in message
    assert not (tmp_path / METRICS_FILE).exists()


def test_load_metrics_rejects_missing_keys_and_versions(tmp_path: Path) -> None:
    write(tmp_path)
    doc = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))
    bad = tmp_path / "bad.json"

    del doc["runs"]
    bad.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing the required key\(s\) \['runs'\]"):
        load_metrics(bad)

    bad.write_text(json.dumps({**doc, "runs": [{"method": "m"}], "schema_version": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"runs\[0\] is missing .*'seed'"):
        load_metrics(bad)

    bad.write_text(json.dumps({**doc, "runs": [], "schema_version": 2}), encoding="utf-8")
    with pytest.raises(ValueError, match="schema_version 2"):
        load_metrics(bad)

    bad.write_text(json.dumps({"runs": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="no 'schema_version'"):
        load_metrics(bad)

    bad.write_text('{"schema_version": NaN}', encoding="utf-8")
    with pytest.raises(ValueError, match="NaN is not valid JSON"):
        load_metrics(bad)

    bad.write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_metrics(bad)


def test_figure_is_a_png(tmp_path: Path) -> None:
    runs = make_runs()
    runs.append({**make_run("erma", 0, 0.3), "trajectory": {}})  # no updates: drawn as a flat share
    runs[0]["error"][2] = math.nan  # a gap in one seed must not break the plot
    path = plot_figure(tmp_path / "fig", title="fig1abc", domains=DOMAINS, metric_name="‖θ−θ_gt‖", runs=runs)
    assert path == tmp_path / "fig" / FIGURE_FILE
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_accepts_runs_read_back_from_metrics_json(tmp_path: Path) -> None:
    runs = make_runs()
    runs[0]["error"][1] = math.inf
    write(tmp_path, runs=runs)
    doc = load_metrics(tmp_path)
    path = plot_figure(
        tmp_path, title="t", domains=doc["domains"], metric_name=doc["metric"], runs=doc["runs"]
    )
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_method_colours_are_stable() -> None:
    """Listed methods have their own colours; any other name gets the same colour in every process
    (not from ``hash()``, which string hashing randomises per process)."""
    assert method_colour("fgls") != method_colour("erma")
    names = ["my-new-method", "dro", "x"]
    code = (
        "from domainmix.experiments._report import method_colour; "
        f"print([method_colour(n) for n in {names!r}])"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }  # fmt: skip
    assert seen == {str([method_colour(n) for n in names])}


def test_format_table(tmp_path: Path) -> None:
    runs = make_runs()
    runs[0]["final_error"] = math.nan
    summary = write(tmp_path, runs=runs, checkpoints=(1000, 6000, 9000))
    table = format_table(summary, domains=DOMAINS, checkpoints=(1000, 6000, 9000))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["method", "@1000", "@6000", "@9000"]
    assert set(lines[1]) == {"-"}
    assert len({len(line) for line in lines}) == 1  # fixed width
    fgls = lines[3]
    assert fgls.startswith("fgls+va")
    # fgls+va: error_at 1000 -> index 1 -> 0.5 * 9 + 1 = 5.5, 6000 -> 3.5; final 3.5 ± std; shares .6 / .4.
    assert fgls.split()[1:3] == ["5.5", "3.5"]
    assert "3.5 ± 0.82" in fgls
    assert fgls.split()[-3:] == ["0.600", "0.400", "2.0"]
    assert fgls.split()[3] == "-"  # no evaluation reaches 9000
    assert " - ± " in lines[2]  # the NaN final error of uniform
