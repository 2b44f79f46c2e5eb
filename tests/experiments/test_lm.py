"""The two-stage language-model pipeline on the committed fixture corpus, with a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from domainmix.experiments import lm

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"
TINY = lm.LmConfig(
    corpus=str(FIXTURE), block_size=32, batch_size=12, proxy_steps=6, base_steps=6, proxy_width=32,
    base_width=32, base_layers=2, eval_windows=4,
)  # fmt: skip


def test_windows_cover_every_domain() -> None:
    windows = lm.load_windows(TINY, "train")
    assert len(windows.names) == 6
    assert windows.tokens.shape[1] == 33
    for i, name in enumerate(windows.names):
        r = windows.ranges[name]
        assert len(r) > 0 and bool((windows.domain[r.start : r.stop] == i).all())


def test_reference_proxy_base(tmp_path: Path) -> None:
    ref = lm.stage_reference(TINY, tmp_path / "ref")
    cache = np.load(tmp_path / "ref" / "reference_losses.npy")
    assert cache.shape == (sum(ref["weights"].values()), TINY.block_size) and np.isfinite(cache).all()
    for name in ("doremi", "doge"):
        result = lm.stage_proxy(TINY, tmp_path / name, name, tmp_path / "ref")
        written = json.loads((tmp_path / name / "weights.json").read_text())
        assert written["averaged"] == result["averaged"]
        for key in ("final", "averaged"):
            assert math.isclose(sum(written[key].values()), 1.0, abs_tol=1e-9)
        assert written["averaged"] != dict.fromkeys(written["averaged"], 1 / 6)  # the weights moved
    assert "tok.weight" not in result["doge_subset"]  # DoGE's subset skips the tied embedding
    base = lm.stage_base(TINY, tmp_path / "base", str(tmp_path / "doge" / "weights.json"))
    metrics = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert set(metrics["test_perplexity"]) == set(metrics["validation_perplexity"]) == set(ref["weights"])
    assert metrics["worst_test_perplexity"] == max(metrics["test_perplexity"].values())
    assert metrics["tokens_seen"] == TINY.base_steps * TINY.batch_size * TINY.block_size
    assert 1 < metrics["average_test_perplexity"] < 256  # byte level: between perfect and uniform
    assert base["sampling"] == pytest.approx(written["averaged"])


def test_doremi_without_reference_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --reference"):
        lm.stage_proxy(TINY, tmp_path, "doremi", None)
    assert (
        lm.main(
            ["--stage", "proxy", "--strategy", "doremi", "--out", str(tmp_path), "--corpus", str(FIXTURE)]
        )
        == 2
    )
