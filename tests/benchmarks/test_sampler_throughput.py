"""Slow: the throughput benchmark runs and reports what the README promises (timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sampler_throughput.py"


@pytest.mark.slow
def test_benchmark_json_layout_and_discrepancy() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--json",
            "--batches",
            "300",
            "--repeats",
            "1",
            "--online-batches",
            "1100",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report["modes"]) == {"stratified", "low_discrepancy", "iid", "stratified_carried"}
    assert report["ratio_vs_torch_wrs"] == report["modes"]["stratified"]["ratio_vs_torch_wrs"] > 0
    assert report["modes"]["low_discrepancy"]["max_prefix_deviation"] <= 1.0
    assert report["modes"]["stratified"]["max_prefix_deviation_vs_effective"] <= 256
    # the carried remainders: within one example of q·b·B at every batch end, so within B inside a batch
    assert report["modes"]["stratified_carried"]["max_prefix_deviation"] <= 256
    assert (
        report["modes"]["stratified_carried"]["max_prefix_deviation"]
        < (report["modes"]["stratified"]["max_prefix_deviation"])
    )
    # weights set before every batch: 2200 changes, yet the history holds at most snapshot_history + 2
    # entries (with the one in force at the oldest state's last batch) and the saved state only the
    # entries in force at the saved batch and the one before (a few hundred bytes per domain vector)
    for row in report["online"].values():
        assert row["weight_changes"] == 2200 and row["history_entries"] <= 1026
        assert row["state_bytes"] < 2000 and row["us_per_batch"] > 0
    assert set(report["loader"]) == {"torch_wrs", "stratified", "stratified_as_numpy"}
    assert all(row["batches_per_s"] > 0 for row in report["loader"].values())
