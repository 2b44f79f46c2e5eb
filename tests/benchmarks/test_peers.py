"""The peer benchmark at toy size (timings are not asserted); the page generated from its committed JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
CORE = [
    "torch_wrs",
    "torchdata_mnws",
    "hf_interleave",
    "domainmix_stratified",
    "domainmix_low_discrepancy",
    "domainmix_iid",
    "domainmix_stratified_weight_change",
    "domainmix_low_discrepancy_weight_change",
    "domainmix_keyed_permutation",
    "list_floor",
    "permutation_floor",
    "randperm_floor",
]


def _load(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # peers.py imports the setting of sampler_throughput.py
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    return _load("peers")


@pytest.fixture(scope="module")
def report_module() -> ModuleType:
    return _load("peers_report")


def _check_report(report: dict[str, Any], systems: list[str], repeats: int) -> None:
    assert report["benchmark"] == "peers" and report["baseline"] == "torch_wrs"
    assert report["date_utc"].endswith("Z")
    machine = report["machine"]
    assert {"platform", "processor", "cpu_count", "python"} <= set(machine)
    assert machine["cpu_count"] >= 1
    versions = report["versions"]
    assert {"python", "torch", "numpy", "torchdata", "datasets", "lhotse", "megatron-core"} <= set(versions)
    assert versions["torch"] and versions["numpy"]
    config = report["config"]
    assert config["repeats"] == repeats and config["statistic"] == "median"
    assert config["total_examples"] == sum(config["domain_sizes"])
    assert config["large_domain_size"] > config["materialize_limit"]
    assert config["hf_stopping_strategy"] in {"first_exhausted", "all_exhausted"}
    assert list(report["systems"]) == systems  # the baseline first, then in the benchmark's order
    base = report["systems"]["torch_wrs"]["per_repeat_indices_per_s"]
    for name, entry in report["systems"].items():
        caps = entry["capabilities"]
        for key in ("online_weight_change", "exact_resume", "rank_consistent_plan"):
            assert caps[key]["answer"] in {"yes", "no", "partial"} and caps[key]["how"]
        assert caps["plan"] and caps["sources"]
        assert entry["label"] and entry["batches_per_repeat"] == config["batches_per_repeat"][name]
        if not entry["available"]:
            assert entry["reason"] and "indices_per_s" not in entry
            continue
        rates, ratios = entry["per_repeat_indices_per_s"], entry["per_repeat_ratio_vs_torch_wrs"]
        assert len(rates) == len(ratios) == repeats
        assert all(r > 0 and math.isfinite(r) for r in rates + ratios)
        assert entry["indices_per_s"] == statistics.median(rates)
        assert entry["ratio_vs_torch_wrs"] == statistics.median(ratios)
        for rate, ratio, b in zip(rates, ratios, base, strict=True):
            assert ratio == pytest.approx(rate / b)
        assert entry["indices_per_repeat"] == entry["batches_per_repeat"] * config["batch_size"]
        assert sum(entry["warmup_shares"]) == pytest.approx(1.0)
        assert sum(entry["target_shares"]) == pytest.approx(1.0)
        assert 0 <= entry["max_share_error"] <= 1
    assert report["systems"]["torch_wrs"]["ratio_vs_torch_wrs"] == 1.0


def test_quick_run_of_the_core_systems(peers: ModuleType) -> None:
    report = peers.measure(peers.quick_config(), CORE)
    _check_report(report, CORE, repeats=2)
    assert all(entry["available"] for entry in report["systems"].values())
    # deterministic mixers hit their shares closely even over 4 batches of 256
    assert report["systems"]["domainmix_low_discrepancy"]["max_share_error"] < 0.01
    json.dumps(report, allow_nan=False)


def test_quick_run_of_lhotse(peers: ModuleType) -> None:
    pytest.importorskip("lhotse.lazy")
    report = peers.measure(peers.quick_config(), ["torch_wrs", "lhotse_mux"])
    _check_report(report, ["torch_wrs", "lhotse_mux"], repeats=2)
    assert report["systems"]["lhotse_mux"]["available"]


def test_quick_run_of_megatron(peers: ModuleType) -> None:
    pytest.importorskip("megatron.core.datasets.helpers_cpp")
    report = peers.measure(peers.quick_config(), ["torch_wrs", "megatron_blend"])
    _check_report(report, ["torch_wrs", "megatron_blend"], repeats=2)
    megatron = report["systems"]["megatron_blend"]
    assert megatron["available"] and megatron["max_share_error"] < 0.01  # the greedy largest-error index


@pytest.mark.parametrize(
    ("system", "modules", "named"),
    [
        ("lhotse_mux", ["lhotse", "lhotse.lazy"], "lhotse"),
        ("megatron_blend", ["megatron", "megatron.core.datasets.helpers_cpp"], "helpers_cpp"),
        ("torchdata_mnws", ["torchdata", "torchdata.nodes"], "torchdata"),
    ],
)
def test_a_missing_package_is_reported_unavailable_not_measured(
    peers: ModuleType, monkeypatch: pytest.MonkeyPatch, system: str, modules: list[str], named: str
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    report = peers.measure(peers.quick_config(), [system])
    _check_report(report, ["torch_wrs", system], repeats=2)
    entry = report["systems"][system]
    assert entry["available"] is False and named in entry["reason"] and "domainmix[peers]" in entry["reason"]


def test_the_floors_budget_the_aims(report_module: ModuleType, peers: ModuleType) -> None:
    """The page turns the floors into what each aim leaves per index: torch's time / aim, minus the
    permutation floor (arrays), minus it and the list floor (lists), and minus the list floor and
    torch.randperm's permutations; and it gives what lists cost over arrays, measured both ways."""
    pairs = ["domainmix_stratified_weight_change", "domainmix_stratified_weight_change_numpy"]
    floors = ["list_floor", "permutation_floor", "randperm_floor"]
    report = peers.measure(peers.quick_config(), ["torch_wrs", *floors, *pairs])
    ns = dict(zip(floors + pairs, [10.0, 10.0, 5.0, 45.0, 30.0], strict=True))
    ns["torch_wrs"] = 400.0
    for name, per_index in ns.items():
        report["systems"][name]["indices_per_s"] = 1e9 / per_index
    page = report_module.render(report)
    assert "| 5× | 80.0 ns | 70.0 ns | 60.0 ns | 65.0 ns |" in page
    assert "| 10× | 40.0 ns | 30.0 ns | 20.0 ns | 25.0 ns |" in page
    assert "yielding lists instead of arrays costs 15.0 ns (domainmix stratified, alternating" in page
    del report["systems"]["randperm_floor"]
    assert "| 10× | 40.0 ns | 30.0 ns | 20.0 ns |\n" in report_module.render(report)
    del report["systems"]["list_floor"]
    assert "Floors, from" not in report_module.render(report)


def test_unknown_system_is_refused(peers: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown systems"):
        peers.measure(peers.quick_config(), ["torch_wrs", "nope"])


def test_cli_writes_the_json_atomically(
    peers: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "peers.json"
    argv = ["--quick", "--json", "--out", str(out), "--repeats", "1", "--systems", "domainmix_stratified"]
    assert peers.main(argv) == 0
    assert [p.name for p in out.parent.iterdir()] == ["peers.json"]  # no temporary file left behind
    report = json.loads(out.read_text())
    _check_report(report, ["torch_wrs", "domainmix_stratified"], repeats=1)
    assert "domainmix_stratified" in capsys.readouterr().out


def test_docs_page_is_generated_from_the_committed_json(report_module: ModuleType) -> None:
    report = json.loads((ROOT / "benchmarks" / "results" / "peers.json").read_text(encoding="utf-8"))
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert page == report_module.render(report), "run: python benchmarks/peers_report.py"


def test_committed_json_is_a_full_run(report_module: ModuleType, peers: ModuleType) -> None:
    report = json.loads((ROOT / "benchmarks" / "results" / "peers.json").read_text(encoding="utf-8"))
    systems = report["systems"]
    assert report["config"]["repeats"] >= 5 and list(systems) == list(peers.SYSTEMS)
    for name, entry in systems.items():
        assert entry["available"] or entry["reason"], name


def test_page_shows_unavailable_systems_with_their_reason(
    report_module: ModuleType, peers: ModuleType
) -> None:
    report = peers.measure(peers.quick_config(), ["torch_wrs"])
    report["systems"]["lhotse_mux"] = {
        "label": "lhotse `LazyIteratorMultiplexer`",
        "batches_per_repeat": 4,
        "available": False,
        "reason": "cannot import lhotse.lazy (ModuleNotFoundError)",
        "capabilities": peers.CAPABILITIES["lhotse_mux"],
    }
    page = report_module.render(report)
    assert "| lhotse `LazyIteratorMultiplexer` | unavailable (see below) |" in page
    assert "- lhotse `LazyIteratorMultiplexer`: cannot import lhotse.lazy (ModuleNotFoundError)" in page
    assert "make bench-peers" in page
