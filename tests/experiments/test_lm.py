"""The two-stage language-model pipeline on the committed fixture corpus, with a tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from domainmix._validation import ConfigError
from domainmix.experiments import lm
from domainmix.experiments.config import load_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"
TINY = lm.LmConfig(
    tokenizer="bytes",
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
    pool = lm.load_windows(replace(TINY, train_windows=3), "train", 3)
    assert [len(r) for r in pool.ranges.values()] == [3] * 6
    assert pool.sizes == {n: len(r) for n, r in windows.ranges.items()}  # proportional uses the real sizes
    assert pool.tokens[0].tolist() == windows.tokens[0].tolist()  # evenly spaced from the first window


def test_reference_proxy_base(tmp_path: Path) -> None:
    ref = lm.stage_reference(TINY, tmp_path / "ref")
    cache = np.load(tmp_path / "ref" / "reference_losses.npy")
    assert cache.shape == (sum(ref["weights"].values()), TINY.block_size) and np.isfinite(cache).all()
    assert ref["train_seconds"] > 0 and ref["cache_seconds"] > 0  # whole-stage costs (docs)
    for name in ("doremi", "doge"):
        result = lm.stage_proxy(TINY, tmp_path / name, name, tmp_path / "ref")
        written = json.loads((tmp_path / name / "weights.json").read_text())
        assert written["averaged"] == result["averaged"]
        for key in ("final", "averaged"):
            assert math.isclose(sum(written[key].values()), 1.0, abs_tol=1e-9)
        assert written["averaged"] != dict.fromkeys(written["averaged"], 1 / 6)  # the weights moved
        trajectory = written["trajectory"]
        assert trajectory["step"][-1] == TINY.proxy_steps
        assert {n: v[-1] for n, v in trajectory["mixture"].items()} == pytest.approx(written["final"])
        assert (tmp_path / name / "weights.png").stat().st_size > 0
        scores = written[
            "scores"
        ]  # λ (DoReMi's excess loss) or W (DoGE's alignment), every domain, every step
        assert scores["step"] == list(range(1, TINY.proxy_steps + 1))
        logged = "excess_loss" if name == "doremi" else "target_grad_dot"
        assert set(scores[logged]) == set(written["final"])
        assert all(len(v) == TINY.proxy_steps for v in scores[logged].values())
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


def test_doge_with_cancellation_selection(tmp_path: Path) -> None:
    cfg = replace(TINY, doge_selection=3, doge_selection_steps=3)
    result = lm.stage_proxy(cfg, tmp_path, "doge", None)
    selection = result["doge_selection"]
    assert selection["steps"] == 3 and len(selection["selected"]) == 3 and selection["seconds"] > 0
    assert result["doge_subset"] == sorted(selection["selected"], key=list(selection["scores"]).index)
    ranked = sorted(selection["scores"].values())
    assert sorted(selection["scores"][n] for n in selection["selected"]) == ranked[:3]  # the smallest
    assert all(n.startswith(("blocks.", "ln.")) for n in selection["scores"])  # never an embedding


def test_config_file_and_overrides_with_every_error_at_once(tmp_path: Path) -> None:
    path = tmp_path / "lm.yaml"
    path.write_text("proxy_steps: 7\nlr: 0.01\n")
    cfg = load_config(lm.LmConfig, path, {"doge_selection": -2, "doge_selection_steps": 5})
    assert (cfg.proxy_steps, cfg.lr, cfg.doge_selection) == (7, 0.01, -2)
    with pytest.raises(ConfigError) as error:
        load_config(lm.LmConfig, None, {"base_width": 30, "lr": -1.0, "bogus": 1})
    assert "bogus" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(
            lm.LmConfig,
            None,
            {"base_width": 30, "lr": -1.0, "doge_selection": 5, "doge_selection_steps": 400},
        )
    message = str(error.value)
    assert "'base_width' must be divisible by 4" in message and "'lr' must be a finite number > 0" in message
    assert "'doge_selection_steps' must be <= proxy_steps (300)" in message
    code = lm.main(["--stage", "base", "--weights", "uniform", "--out", str(tmp_path), "--set", "lr=-1"])
    assert code == 2


def test_doremi_guards_are_selectable_and_recorded(tmp_path: Path) -> None:
    lm.stage_reference(TINY, tmp_path / "ref")
    cfg = replace(TINY, doremi_delay=4, doremi_step_size=0.5)
    lm.stage_proxy(cfg, tmp_path / "p", "doremi", tmp_path / "ref")
    written = json.loads((tmp_path / "p" / "weights.json").read_text())
    assert (written["config"]["doremi_delay"], written["config"]["doremi_step_size"]) == (4, 0.5)
    assert lm.LmConfig().doremi_step_size == 0.1  # the default guard (docs/language-models.md)
    assert written["final"] != pytest.approx(dict.fromkeys(written["final"], 1 / 6))  # moved from step 4
    assert len(written["scores"]["step"]) == TINY.proxy_steps  # λ is logged during the delay too
    never = lm.stage_proxy(
        replace(cfg, doremi_delay=TINY.proxy_steps + 1), tmp_path / "n", "doremi", tmp_path / "ref"
    )
    assert never["final"] == pytest.approx(dict.fromkeys(never["final"], 1 / 6))  # held the whole run


def test_doge_leave_one_out_needs_no_target_batch(tmp_path: Path) -> None:
    cfg = replace(TINY, doge_target="leave_one_out")
    written = lm.stage_proxy(cfg, tmp_path, "doge", None)
    assert set(written["scores"]) == {"step", "grad_sq_norm"}  # W here is a row of the (k, k) grad_dot
    with pytest.raises(ConfigError, match="'doge_target'"):
        load_config(lm.LmConfig, None, {"doge_target": "mix"})


def test_target_domain_is_held_out_of_every_training_batch(tmp_path: Path) -> None:
    cfg = replace(TINY, target_domain="drama")
    pool = lm.training_pool(cfg)
    assert "drama" not in pool.names and len(pool.names) == 5
    target_rows = {bytes(r.numpy()) for r in lm.load_windows(cfg, "train", None, ("drama",)).tokens}
    assert not any(bytes(r.numpy()) in target_rows for r in pool.tokens)  # no target token in training
    assert lm.target_pool(cfg).names == ("drama",)
    lm.stage_reference(cfg, tmp_path / "ref")
    doge = lm.stage_proxy(cfg, tmp_path / "doge", "doge", None)
    assert set(doge["final"]) == set(pool.names)  # weights over the training domains only
    assert set(doge["scores"]["target_grad_dot"]) == set(pool.names)  # W_i = ⟨g_i, g_drama⟩
    base = lm.stage_base(cfg, tmp_path / "base", str(tmp_path / "doge" / "weights.json"))
    assert (
        base["target_domain"] == "drama"
        and base["target_test_perplexity"] == base["test_perplexity"]["drama"]
    )
    trained = [v for n, v in base["test_perplexity"].items() if n != "drama"]
    assert base["worst_test_perplexity"] == max(trained)
    with pytest.raises(ValueError, match="target_domain 'poetry'"):
        lm.training_pool(replace(TINY, target_domain="poetry"))


def test_recipe_bpe_warmup_clip_and_whole_split_log_perplexity(tmp_path: Path) -> None:
    import shutil

    from domainmix.data import train_bpe

    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURE, corpus)
    cfg = replace(TINY, corpus=str(corpus), tokenizer="bpe", bpe_vocab=300, warmup_steps=3, eval_windows=0)
    with pytest.raises(FileNotFoundError, match="domainmix data train-bpe"):
        lm.training_pool(cfg)
    train_bpe(corpus, 300)
    assert lm.vocab_size(cfg) == 300 and lm.model_for(cfg, "base").cfg.vocab_size == 300
    pool = lm.training_pool(cfg)
    assert int(pool.tokens.max()) < 300 and int(pool.tokens.max()) > 255  # BPE ids, not bytes
    cosine = [0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    factors = [lm.lr_factor(t, 10, 3) for t in range(10)]
    assert factors == pytest.approx([1 / 3 * cosine[0], 2 / 3 * cosine[1], *cosine[2:]])  # warm-up, cosine
    base = lm.stage_base(cfg, tmp_path / "base", "uniform")
    whole = lm.load_windows(cfg, "test", None)
    assert len(whole.domain) == sum(len(r) for r in whole.ranges.values())  # every test window
    assert base["test_log_perplexity"] == pytest.approx(
        {n: math.log(v) for n, v in base["test_perplexity"].items()}
    )
    assert base["worst_test_log_perplexity"] == max(base["test_log_perplexity"].values())


def test_device_choice() -> None:
    import torch

    assert lm.device_for(replace(TINY, device="cpu")).type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert lm.device_for(replace(TINY, device="auto")).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            lm.device_for(replace(TINY, device="cuda"))
    assert lm.precision(TINY, torch.device("cpu")).__class__.__name__ == "nullcontext"  # AMP on CUDA only
    with pytest.raises(ConfigError, match="'device'"):
        load_config(lm.LmConfig, None, {"device": "tpu"})


def test_doge_target_batch_size_is_selectable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = replace(TINY, doge_target_batch=6)  # one window per domain
    sizes: list[int] = []
    real = lm.per_token_loss

    def spy(logits, targets):  # type: ignore[no-untyped-def]
        sizes.append(int(logits.shape[0]))
        return real(logits, targets)

    monkeypatch.setattr(lm, "per_token_loss", spy)
    lm.stage_proxy(cfg, tmp_path, "doge", None)
    # every step: the training batch (12 windows) and the target batch (6)
    assert sizes.count(6) == TINY.proxy_steps and sizes.count(TINY.batch_size) == TINY.proxy_steps
    with pytest.raises(ConfigError, match="'doge_target_batch'"):
        load_config(lm.LmConfig, None, {"doge_target_batch": -1})
