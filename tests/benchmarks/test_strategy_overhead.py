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
SUBSETS = ["last_mlp_out", "last_mlp", "subset", "all_blocks"]  # smallest first
VA = [f"va_{s}" for s in SUBSETS]
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
    assert config["device"] == "cpu" and config["device_name"] == "cpu"  # the default device
    assert report["command"].startswith("python benchmarks/strategy_overhead.py --json")
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

    # The DoGE subset table: the four subsets run, smallest first; VA's is empty (not in these sets).
    table = report["subset_cost"]["doge"]
    assert [row["subset"] for row in table] == SUBSETS and report["subset_cost"]["va"] == []
    for row in table:
        assert row["parameters"] == report["doge_subsets"][row["variant"]]["parameters"]
        assert row["ratio_vs_plain"] == results[row["variant"]]["ratio_vs_plain"]

    memory = report["gradient_statistics_memory_bytes"]
    assert memory["memory_kind"] == "cpu_profiler_tensor_bytes"
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


def _run_in_process(argv: list[str]) -> dict[str, Any]:
    """``run`` in this process (the thread count restored after it); warnings recorded, not shown."""
    import warnings

    import torch

    bench = _load_script()
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report: dict[str, Any] = bench.run(bench.parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    # Every VA window had a finite variance: no update was skipped.
    assert not [w for w in caught if "skipping the weight update" in str(w.message)]
    return report


def test_va_variants_report_the_subset_tables() -> None:
    """Fast: the four VA and four DoGE subset variants, one timed step each, on the tiny model."""
    doge = [f"doge_{s}" for s in SUBSETS]
    report = _run_in_process(
        [*TINY, "--variants", ",".join(VA + doge), "--steps", "1", "--repeats", "1", "--warmup", "1"]
    )
    json.dumps(report, allow_nan=False)  # the report is plain JSON
    assert set(report["results"]) == {"plain", *VA, *doge}
    total = report["config"]["model"]["parameters"]
    tables = report["subset_cost"]
    assert set(tables) == {"doge", "va"}
    for method in ("doge", "va"):
        rows = tables[method]
        assert [row["subset"] for row in rows] == SUBSETS
        assert [row["variant"] for row in rows] == [f"{method}_{s}" for s in SUBSETS]
        sizes = [row["parameters"] for row in rows]
        assert sizes == sorted(set(sizes)) and sizes[0] > 0  # strictly increasing with the subset
        for row in rows:
            assert row["fraction"] == pytest.approx(row["parameters"] / total) and 0 < row["fraction"] < 1
            assert math.isfinite(row["seconds_per_step"]) and row["seconds_per_step"] > 0
            assert math.isfinite(row["ratio_vs_plain"]) and row["ratio_vs_plain"] > 0
            assert row["ratio_vs_plain"] == report["results"][row["variant"]]["ratio_vs_plain"]
    # VA estimates on the same parameters as DoGE taps, subset by subset.
    for name in VA:
        info = report["va_subsets"][name]
        assert info["names"] == report["doge_subsets"][name.replace("va_", "doge_")]["names"]
        assert report["results"][name]["subset_fraction"] == info["fraction"]
        assert "tok.weight" not in info["names"]
        q = info["final_sampling"]  # VA's q after its last update: stratified counts, >= 2 per domain
        assert sum(q) == pytest.approx(1.0) and min(q) >= 2 / 12 - 1e-12
    assert report["va_subsets"]["va_last_mlp_out"]["names"] == [
        "blocks.1.mlp.2.weight",
        "blocks.1.mlp.2.bias",
    ]
    memory = report["gradient_statistics_memory_bytes"]
    for name in VA:
        entry = memory[name]
        assert entry["matrix_bytes"] == 6 * entry["parameters"] * 8
        assert entry["chunk_bytes"] == 12 * entry["parameters"] * 4
        assert entry["call_peak_bytes"] is None or entry["call_peak_bytes"] > 0
    assert report["config"]["va"]["update_every"] == 1


def test_va_variants_need_two_examples_per_domain(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY[:-1], "8", "--variants", "va_subset"])
    assert "--batch >= 2 x --domains" in capsys.readouterr().err


def test_device_helpers_on_cpu() -> None:
    import torch

    bench = _load_script()
    assert bench.parse_args([]).device == "cpu"  # the CPU path stays the default
    cpu = bench.resolve_device("cpu")
    assert cpu == torch.device("cpu")
    assert bench.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    bench.synchronize(cpu)  # nothing to wait for on the CPU
    calls: list[int] = []
    seconds = bench.timed(lambda: calls.append(1), cpu)
    assert calls == [1] and 0 <= seconds < 1
    peak = bench.peak_tensor_bytes(lambda: torch.zeros(1 << 16), cpu)  # 256 KiB of float32
    assert peak is None or peak >= 4 << 16
    with pytest.raises(ValueError, match="--device"):
        bench.resolve_device("tpu")


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="needs a machine where torch sees no CUDA device"
)
def test_device_cuda_without_cuda_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_script()
    with pytest.raises(ValueError, match="--device cuda: .*sees no CUDA device"):
        bench.resolve_device("cuda")
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err


def test_gpt100m_config_resolves_to_at_least_100m_parameters() -> None:
    """The configuration only: built on the CPU (about 0.45 GB), no step run."""
    from domainmix.experiments.config import LmConfig
    from domainmix.experiments.gpt import GPT

    bench = _load_script()
    args = bench.parse_args(["--config", "gpt100m"])
    setup = bench.resolve(args)
    cfg = setup.model
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.block_size) == (12, 768, 12, 32768, 512)
    assert (setup.batch, setup.lr, setup.grad_clip) == (16, 3e-4, 1.0)
    lm = LmConfig()  # DoGE as the experiment runs it
    assert (setup.doge_mu, setup.doge_max_norm, setup.doge_target) == (
        lm.doge_mu,
        lm.doge_max_norm,
        lm.doge_target,
    )
    assert setup.universal("doge_subset")
    d, v, t, n = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    per_block = 12 * d * d + 13 * d  # qkv, proj, two-layer MLP (weights and biases), two LayerNorms
    analytic = v * d + t * d + n * per_block + 2 * d  # tied embedding counted once, final LayerNorm
    assert analytic == 110_615_040
    assert GPT(cfg).num_parameters() == analytic >= 100_000_000
    assert args.variants == [
        "plain",
        "uniform",
        "doremi_cached",
        "doge_subset",
        "doge_last_mlp",
        "doge_last_mlp_out",
        "doge_all_blocks",
        *VA,
    ]


def test_the_gpt100m_cuda_table_in_the_docs_is_the_committed_json() -> None:
    """docs/language-models.md's 110 M-parameter table: one row per subset, from the JSON it names."""
    root = SCRIPT.parents[1]
    report = json.loads((root / "benchmarks" / "results" / "strategy_overhead_gpt100m_cuda.json").read_text())
    assert report["config"]["device"] == "cuda" and report["config"]["model"]["parameters"] >= 100_000_000
    labels = {
        "last_mlp_out": "last MLP's output projection",
        "last_mlp": "last MLP",
        "subset": "last block + final LN",
        "all_blocks": "all blocks + final LN",
    }
    peaks = report["gradient_statistics_memory_bytes"]["step_peak_bytes"]
    page = (root / "docs" / "language-models.md").read_text()
    for doge, va in zip(report["subset_cost"]["doge"], report["subset_cost"]["va"], strict=True):
        assert doge["subset"] == va["subset"]
        row = (
            f"| {labels[doge['subset']]} | {doge['parameters']:,} ({doge['fraction']:.1%}".replace("%", " %")
            + f") | {doge['ratio_vs_plain']:.2f} | {va['ratio_vs_plain']:.2f} | "
            f"{peaks[doge['variant']] / 2**20:,.0f} / {peaks[va['variant']] / 2**20:,.0f} |"
        )
        assert row in page, row
    results = report["results"]
    assert f"A plain step took {results['plain']['seconds_per_step'] * 1000:.1f} ms" in page
    assert f"cached reference losses {results['doremi_cached']['ratio_vs_plain']:.3f}×" in page
