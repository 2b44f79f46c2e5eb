"""The GPU recipe's code path, at toy size on the CPU (slow: two settings × two seeds of the pipeline)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_recipe_runs_both_settings_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("lm_gpu", ROOT / "benchmarks" / "lm_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_gpu"] = module
    spec.loader.exec_module(module)
    corpus = ROOT / "tests" / "fixtures" / "corpus"
    argv = ["--corpus", str(corpus), "--out", str(tmp_path), "--device", "cpu", "--smoke", "--seeds", "0,1"]
    assert module.main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"] == "cpu" and summary["seeds"] == [0, 1]
    assert summary["torch"] == torch.__version__ and summary["python"] and summary["date"]
    assert set(summary["settings"]) == {"universal", "out_of_domain_drama"}
    target = summary["settings"]["out_of_domain_drama"]["log_perplexity_minus_uniform"]["doge"]
    assert set(target) == {"average", "worst", "target"}
    assert (tmp_path / "universal" / "paired.json").is_file()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary  # written as each setting ends
    written = json.loads((tmp_path / "out_of_domain_drama.json").read_text())
    assert written["target_domain"] == "drama" and written["seeds"] == [0, 1]
