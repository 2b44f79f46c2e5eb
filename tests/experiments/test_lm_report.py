"""docs/language-models.md's result tables are those made from docs/results/*.json (lm_report.markdown)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domainmix.experiments import lm_report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
SETTINGS = ("universal", "out-of-domain-drama")
# Each table set: the command that makes its runs, and whether it has the DIDS section's rows.
SOURCES = {
    "lm-cpu": ("domainmix run lm --compare", True),
    "lm-gpu-h100": ("python benchmarks/lm_gpu.py", False),
}
TABLES = [(source, setting) for source in SOURCES for setting in SETTINGS]


def test_every_result_file_is_a_table_set_of_the_page() -> None:
    made = {p.stem for p in RESULTS.glob("lm-*-*.json") if p.stem.endswith(SETTINGS)}
    assert made == {f"{source}-{setting}" for source, setting in TABLES}


@pytest.mark.parametrize(("source", "setting"), TABLES, ids=[f"{a}-{b}" for a, b in TABLES])
def test_the_docs_carry_the_tables_made_from_the_json(source: str, setting: str) -> None:
    path = RESULTS / f"{source}-{setting}.json"
    summary = json.loads(path.read_text())
    tables = lm_report.markdown(summary)
    assert path.with_suffix(".md").read_text() == tables
    assert tables in (ROOT / "docs" / "language-models.md").read_text(), f"re-paste {path.with_suffix('.md')}"
    command, with_dids = SOURCES[source]
    assert len(summary["seeds"]) >= 3 and summary["command"].startswith(command)
    assert (ROOT / "docs" / "images" / f"{path.stem}.png").is_file()
    if with_dids:
        assert set(summary["dids"]) == {"dids", "dids-flat", "dids-inverted"}  # the DIDS section's rows
        assert (ROOT / "docs" / "images" / f"{path.stem}-dids.png").is_file()
    else:  # the GPU recipe: bfloat16 autocast on CUDA
        assert summary["config"]["device"] == "cuda" and summary["config"]["amp"]


def test_the_gpu_run_names_its_device_and_both_settings() -> None:
    run = json.loads((RESULTS / "lm-gpu-h100.json").read_text())
    assert run["device"].startswith("NVIDIA H100")
    assert set(run["settings"]) == {"universal", "out_of_domain_drama"}
    for label, setting in run["settings"].items():
        setting_summary = json.loads((RESULTS / f"lm-gpu-h100-{label.replace('_', '-')}.json").read_text())
        paired = setting_summary["paired"]
        for method, row in setting["log_perplexity_minus_uniform"].items():
            assert row["average"]["mean"] == pytest.approx(paired[method]["average"]["mean"])


def test_replayed_shares_of_a_stratified_run_show_its_rounding() -> None:
    names = ["code", "docs", "drama", "scripture", "legal", "math"]
    config = {"train_windows": 64, "batch_size": 32, "base_steps": 10}
    shares = lm_report.replayed_shares(config, dict.fromkeys(names, 1 / 6))
    assert shares == {"code": 6 / 32, "docs": 6 / 32, **dict.fromkeys(names[2:], 5 / 32)}  # every step
