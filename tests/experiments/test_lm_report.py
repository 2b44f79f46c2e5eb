"""docs/language-models.md's result tables are those made from docs/results/*.json (lm_report.markdown)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domainmix.experiments import lm_report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "docs" / "results").glob("lm-cpu-*.json"))


def test_both_settings_have_results() -> None:
    assert {p.stem for p in RESULTS} == {"lm-cpu-universal", "lm-cpu-out-of-domain-drama"}


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_the_docs_carry_the_tables_made_from_the_json(path: Path) -> None:
    summary = json.loads(path.read_text())
    tables = lm_report.markdown(summary)
    assert path.with_suffix(".md").read_text() == tables
    assert tables in (ROOT / "docs" / "language-models.md").read_text(), f"re-paste {path.with_suffix('.md')}"
    assert len(summary["seeds"]) >= 3 and summary["command"].startswith("domainmix run lm --compare")
    assert (ROOT / "docs" / "images" / f"{path.stem}.png").is_file()
    assert set(summary["dids"]) == {"dids", "dids-flat", "dids-inverted"}  # the DIDS section's rows
    assert (ROOT / "docs" / "images" / f"{path.stem}-dids.png").is_file()


GPU_RESULTS = [
    ROOT / "docs" / "results" / f"lm-gpu-h100-{name}.json" for name in ("universal", "out-of-domain-drama")
]


@pytest.mark.parametrize("path", GPU_RESULTS, ids=[p.stem for p in GPU_RESULTS])
def test_the_docs_carry_the_gpu_tables_made_from_the_json(path: Path) -> None:
    summary = json.loads(path.read_text())
    tables = lm_report.markdown(summary)
    assert path.with_suffix(".md").read_text() == tables
    assert tables in (ROOT / "docs" / "language-models.md").read_text(), f"re-paste {path.with_suffix('.md')}"
    assert len(summary["seeds"]) >= 3 and summary["command"].startswith("python benchmarks/lm_gpu.py")
    assert summary["config"]["device"] == "cuda" and summary["config"]["amp"]
    assert (ROOT / "docs" / "images" / f"{path.stem}.png").is_file()


def test_the_gpu_run_names_its_device_and_both_settings() -> None:
    run = json.loads((ROOT / "docs" / "results" / "lm-gpu-h100.json").read_text())
    assert run["device"].startswith("NVIDIA H100")
    assert set(run["settings"]) == {"universal", "out_of_domain_drama"}
    for label, setting in run["settings"].items():
        setting_summary = json.loads(
            (ROOT / "docs" / "results" / f"lm-gpu-h100-{label.replace('_', '-')}.json").read_text()
        )
        paired = setting_summary["paired"]
        for method, row in setting["log_perplexity_minus_uniform"].items():
            assert row["average"]["mean"] == pytest.approx(paired[method]["average"]["mean"])


def test_replayed_shares_of_a_stratified_run_show_its_rounding() -> None:
    names = ["code", "docs", "drama", "scripture", "legal", "math"]
    config = {"train_windows": 64, "batch_size": 32, "base_steps": 10}
    shares = lm_report.replayed_shares(config, dict.fromkeys(names, 1 / 6))
    assert shares == {"code": 6 / 32, "docs": 6 / 32, **dict.fromkeys(names[2:], 5 / 32)}  # every step
