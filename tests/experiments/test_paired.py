"""Paired differences with a Student-t interval, by hand; the LM comparison over seeds (slow)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from domainmix.experiments import lm, lm_report
from domainmix.experiments.paired import paired_difference, paired_to_uniform

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"


def test_interval_by_hand() -> None:
    d = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{2, 0.975} · s_d / √n, s_d = 1
    assert (d.mean, d.n) == (2.0, 3)
    assert (d.low, d.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert not d.distinguishable  # [-0.48, 4.48] contains 0
    tight = paired_difference([1.0, 1.1, 0.9, 1.0], [0.0, 0.1, -0.1, 0.0])  # every pair differs by 1
    assert tight.distinguishable and tight.low == pytest.approx(1.0) == tight.high


def test_paired_to_uniform_pairs_rows_of_the_same_seed() -> None:
    tables = [
        {"uniform": {"log_average": 3.0, "log_worst": 4.0}, "doge": {"log_average": 2.9, "log_worst": 4.2}},
        {"uniform": {"log_average": 3.5, "log_worst": 4.5}, "doge": {"log_average": 3.4, "log_worst": 4.6}},
    ]
    paired = paired_to_uniform(tables, ("average", "worst"))
    assert set(paired) == {"doge"}  # uniform is the baseline
    assert paired["doge"]["average"] == paired_difference([2.9, 3.4], [3.0, 3.5]).as_dict()
    assert paired["doge"]["average"]["mean"] == pytest.approx(-0.1)  # the seeds' 0.5 offset cancels
    assert paired["doge"]["worst"]["mean"] == pytest.approx(0.15)


def test_bad_input_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="'b'"):
        paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match="'b'"):
        paired_difference([1.0, 2.0], [2.0])
    with pytest.raises(ValueError, match="'confidence'"):
        paired_difference([1.0, 2.0], [2.0, 3.0], confidence=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["", "drama"], ids=["universal", "out_of_domain_drama"])
def test_smoke_comparison_over_two_seeds(tmp_path: Path, target: str) -> None:
    cfg = lm.LmConfig(
        corpus=str(FIXTURE), tokenizer="bytes", block_size=32, batch_size=12, proxy_steps=6, base_steps=6,
        proxy_width=32,
        base_width=32, base_layers=2, eval_windows=4, target_domain=target,
    )  # fmt: skip
    result = lm.compare_seeds(cfg, tmp_path, [0, 1])
    written = json.loads((tmp_path / "paired.json").read_text())
    assert written["seeds"] == [0, 1] and set(written["tables"]) == {"0", "1"}
    paired = result["log_perplexity_minus_uniform"]
    assert set(paired) == {"proportional", "doremi", "doge"}
    assert set(paired["doge"]) == ({"average", "worst", "target"} if target else {"average", "worst"})
    assert all(row[m]["n"] == 2 for row in paired.values() for m in row)
    assert "vs uniform" in lm.format_paired(result)
    with pytest.raises(ValueError, match="two or more distinct seeds"):
        lm.compare_seeds(replace(cfg), tmp_path, [0])
    # The docs' results: JSON, tables made from it alone, the figure.
    argv = [str(tmp_path), "--name", "x", "--results", str(tmp_path / "r"), "--images", str(tmp_path / "i")]
    assert lm_report.main([*argv, "--command", "domainmix run lm ..."]) == 0
    summary = json.loads((tmp_path / "r" / "x.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["target_domain"] == (target or None)
    assert "drama" not in summary["domains"] if target else "drama" in summary["domains"]
    assert summary["paired"] == json.loads(json.dumps(paired))
    assert len(summary["mixtures"]["doremi"]["max_averaged"]) == 2
    assert (
        set(summary["scores"]["doremi"]) == {"excess_loss"} and "target_grad_dot" in summary["scores"]["doge"]
    )
    assert all(len(v) == 2 for v in summary["costs"].values())
    assert (tmp_path / "r" / "x.md").read_text() == lm_report.markdown(summary)
    assert (tmp_path / "i" / "x.png").stat().st_size > 0
    assert lm_report.main([str(tmp_path / "nothing"), "--name", "x"]) == 2
