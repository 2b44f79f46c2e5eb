"""Slow: the strategy-overhead benchmark runs and reports what the issue asks (timings are not asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "strategy_overhead.py"
VARIANTS = {
    "plain",
    "uniform",
    "doremi_cached",
    "doremi_reference_forward",
    "doge_subset",
    "doge_last_mlp",
    "doge_last_mlp_out",
    "doge_all_blocks",
    "doge_subset_autograd",
}
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--batch", "12"]


@pytest.mark.slow
def test_benchmark_json_layout_and_invariants() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--steps", "3", "--repeats", "1", "--warmup", "1", *TINY],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["benchmark"] == "strategy_overhead"
    assert isinstance(report["torch"], str)
    config = report["config"]
    assert config["threads"] >= 1 and config["steps"] == 3 and config["repeats"] == 1
    assert config["model"]["n_layer"] == 2 and config["batch_sequences"] == 12
    k = config["domains"]
    assert sum(config["domain_counts"]) == 12 and min(config["domain_counts"]) >= 1

    results = report["results"]
    assert set(results) == VARIANTS
    assert results["plain"]["ratio_vs_plain"] == 1.0
    for row in results.values():
        assert len(row["all"]) == 1
        assert math.isfinite(row["seconds_per_step"]) and row["seconds_per_step"] > 0
        assert math.isfinite(row["ratio_vs_plain"]) and row["ratio_vs_plain"] > 0

    subset = report["doge_subset"]
    assert subset == report["doge_subsets"]["doge_subset"]
    assert "tok.weight" not in subset["names"] and "head.weight" not in subset["names"]
    assert {"ln.weight", "ln.bias"} <= set(subset["names"])
    assert all(n.startswith("blocks.1.") or n.startswith("ln.") for n in subset["names"])
    assert subset["parameters"] > 0 and 0 < subset["fraction"] < 1
    for name, info in report["doge_subsets"].items():
        assert "tok.weight" not in info["names"], name
    assert report["doge_subsets"]["doge_last_mlp_out"]["names"] == [
        "blocks.1.mlp.2.weight",
        "blocks.1.mlp.2.bias",
    ]
    assert report["doge_subsets"]["doge_last_mlp"]["parameters"] < subset["parameters"]
    assert report["doge_subsets"]["doge_all_blocks"]["parameters"] > subset["parameters"]
    assert report["doge_subsets"]["doge_subset_autograd"] == subset

    memory = report["gradient_statistics_memory_bytes"]
    assert memory["doge_subset"]["matrix_bytes"] == (k + 1) * subset["parameters"] * 8
    assert memory["doge_subset"]["parameters"] == subset["parameters"]
    peak = memory["doge_subset"]["call_peak_bytes"]
    assert peak is None or peak >= memory["doge_subset"]["matrix_bytes"]
    assert set(memory["step_peak_bytes"]) == VARIANTS

    assert report["targets"] == {"doge_subset_max_ratio": 1.5, "doremi_cached_max_ratio": 1.05}
    assert {"doge_subset", "doremi_cached"} <= set(report["meets_targets"])
    assert all(isinstance(v, bool) for v in report["meets_targets"].values())
    # The tap (one backward) computes the same products as domain_gradient_products (k backwards).
    assert report["doge_subset_tap_vs_autograd"]["max_rel_error_grad_dot"] < 1e-5
