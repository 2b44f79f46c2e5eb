"""Slow: the strategy-overhead benchmark runs and reports what the issue asks (timings are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "strategy_overhead.py"
LEGACY_VARIANTS = {
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
VARIANTS = LEGACY_VARIANTS | {"doge_leave_one_out"}
DOGE = {name for name in VARIANTS if name.startswith("doge")}
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--batch", "12"]


def _run(*extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--steps", "3", "--repeats", "1", "--warmup", "1", *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("strategy_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _check_common(report: dict[str, Any], variants: set[str]) -> None:
    assert report["benchmark"] == "strategy_overhead"
    assert isinstance(report["torch"], str)
    config = report["config"]
    assert config["threads"] >= 1 and config["steps"] == 3 and config["repeats"] == 1
    assert config["model"]["n_layer"] == 2 and config["batch_sequences"] == 12
    assert config["overrides"]["n_embd"] == 32 and config["overrides"]["batch"] == 12
    k = config["domains"]
    assert sum(config["domain_counts"]) == 12 and min(config["domain_counts"]) >= 1

    results = report["results"]
    assert set(results) == variants
    assert results["plain"]["ratio_vs_plain"] == 1.0
    for name, row in results.items():
        assert len(row["all"]) == 1
        assert math.isfinite(row["seconds_per_step"]) and row["seconds_per_step"] > 0
        assert math.isfinite(row["ratio_vs_plain"]) and row["ratio_vs_plain"] > 0
        if name in DOGE:  # the tapped subset's share, next to the ratio it explains
            assert row["subset_fraction"] == report["doge_subsets"][name]["fraction"]
            assert row["doge_target"] == report["doge_subsets"][name]["target"]
        else:
            assert "subset_fraction" not in row

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
    assert set(memory["step_peak_bytes"]) == variants

    assert report["targets"] == {"doge_subset_max_ratio": 1.5, "doremi_cached_max_ratio": 1.05}
    assert report["targets_evaluated_on"] == config["name"]
    assert {"doge_subset", "doremi_cached"} <= set(report["meets_targets"])
    assert all(isinstance(v, bool) for v in report["meets_targets"].values())
    # The tap (one backward) computes the same products as domain_gradient_products (k backwards).
    assert report["doge_subset_tap_vs_autograd"]["max_rel_error_grad_dot"] < 1e-5


@pytest.mark.slow
def test_benchmark_experiment_config_json_layout_and_invariants() -> None:
    report = _run(*TINY)  # --config experiment is the default
    _check_common(report, VARIANTS)
    config = report["config"]
    assert config["name"] == "experiment" and config["lm_config"]["doge_target"] == "universal"
    assert config["doge"]["target"] == "universal" and config["doge"]["target_batch"]
    lm = config["lm_config"]  # LmConfig()'s: the tokenizer's vocabulary, the run's gradient clipping
    assert config["model"]["vocab_size"] == (256 if lm["tokenizer"] == "bytes" else lm["bpe_vocab"])
    assert config["optimizer"]["grad_clip"] == lm["grad_clip"]
    subsets = report["doge_subsets"]
    # The experiment's DoGE: a uniformly mixed target batch of the batch's size every step...
    for name in DOGE - {"doge_leave_one_out"}:
        assert subsets[name]["target"] == "universal", name
        assert subsets[name]["target_batch_sequences"] == 12, name
    # ... and its leave-one-out mode on the same subset, without one.
    loo = subsets["doge_leave_one_out"]
    assert loo["target"] == "leave_one_out" and loo["target_batch_sequences"] == 0
    assert loo["names"] == subsets["doge_subset"]["names"]
    assert {"doge_subset", "doge_leave_one_out"} <= set(report["meets_targets"])
    # The tap's target products agree with domain_gradient_products' too.
    assert report["doge_subset_tap_vs_autograd"]["max_rel_error_target_grad_dot"] < 1e-5


@pytest.mark.slow
def test_benchmark_legacy_config_keeps_the_earlier_variants() -> None:
    report = _run("--config", "legacy", *TINY)
    _check_common(report, LEGACY_VARIANTS)
    assert report["config"]["name"] == "legacy" and report["config"]["lm_config"] is None
    assert report["config"]["optimizer"]["lr"] == 5e-4 and report["config"]["optimizer"]["grad_clip"] == 0
    assert report["config"]["model"]["vocab_size"] == 256
    assert all(s["target"] == "leave_one_out" for s in report["doge_subsets"].values())
    assert "max_rel_error_target_grad_dot" not in report["doge_subset_tap_vs_autograd"]


@pytest.mark.slow
def test_experiment_config_is_the_run_lm_proxy() -> None:
    """Without overrides the benchmark's model, batch and DoGE settings are LmConfig()'s proxy's."""
    import dataclasses

    from domainmix.experiments.config import LmConfig
    from domainmix.experiments.gpt import GPT
    from domainmix.experiments.lm import model_for

    bench = _load_script()
    setup = bench.resolve(bench.parse_args([]))
    lm = LmConfig()
    assert setup.name == "experiment" and setup.overrides == {}
    # run lm's proxy; its vocabulary is the tokenizer's (model_for reads it from the corpus's BPE file).
    vocab = 256 if lm.tokenizer == "bytes" else lm.bpe_vocab
    proxy = model_for(dataclasses.replace(lm, tokenizer="bytes"), "proxy").cfg
    assert setup.model == dataclasses.replace(proxy, vocab_size=vocab)
    assert (setup.model.n_layer, setup.model.n_embd) == (lm.proxy_layers, lm.proxy_width)
    assert (setup.batch, setup.lr, setup.grad_clip) == (lm.batch_size, lm.lr, lm.grad_clip)
    assert (setup.doge_mu, setup.doge_max_norm, setup.doge_target) == (
        lm.doge_mu,
        lm.doge_max_norm,
        lm.doge_target,
    )
    # The tapped subset (last block + final LayerNorm) is what run lm's DoGE taps by default.
    model = GPT(setup.model)
    tap = bench.GradientProductTap(*bench.subset_modules(model, "doge_subset"))
    chosen = {id(p) for p in tap.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in chosen]
    assert {n.split(".")[0] for n in names} == {"blocks", "ln"}
    assert all(n.startswith(f"blocks.{lm.proxy_layers - 1}.") or n.startswith("ln.") for n in names)


def test_dids_round_is_opt_in_and_reported() -> None:
    """Fast: one timed step of plain and dids_round on the tiny model, in this process."""
    import torch

    bench = _load_script()
    assert "dids_round" not in bench.VARIANTS and "dids_round" not in bench.LEGACY_VARIANTS  # opt-in
    threads = torch.get_num_threads()
    try:
        args = bench.parse_args(
            [*TINY, "--variants", "dids_round", "--steps", "1", "--repeats", "1", "--warmup", "0"]
            + ["--no-memory", "--dids-examples", "1"]
        )
        report = bench.run(args)
    finally:
        torch.set_num_threads(threads)
    assert set(report["results"]) == {"plain", "dids_round"}
    dids = report["dids"]
    clusters = bench.LmConfig().dids_clusters
    assert dids["groups"] == 6 * clusters and dids["tasks"] == 6 and dids["examples_per_group_and_task"] == 1
    assert dids["round_windows"] == 6 * clusters + 6
    assert dids["amortised_ratio"] == pytest.approx(
        1 + (report["results"]["dids_round"]["ratio_vs_plain"] - 1) / bench.LmConfig().dids_round_steps
    )
