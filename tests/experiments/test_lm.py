"""The two-stage language-model pipeline on the committed fixture corpus, with a tiny model."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from domainmix import strategies
from domainmix._validation import ConfigError
from domainmix.experiments import lm
from domainmix.experiments.config import load_config
from domainmix.experiments.gpt import per_token_loss

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


# DIDS online on the base model (experiments/lm_dids.py): tiny rounds, few windows per group and task.
DIDS = replace(
    TINY, base_steps=8, dids_round_steps=2, dids_examples=2, dids_clusters=2, dids_sketch_dim=32,
    train_windows=24,
)  # fmt: skip


def test_reference_model_round_trips(tmp_path: Path) -> None:
    import torch

    lm.stage_reference(DIDS, tmp_path)
    model = lm.load_model(tmp_path / lm.REFERENCE_MODEL)
    assert model.cfg == lm.model_for(DIDS, "reference").cfg and not model.training
    lm.save_model(model, tmp_path / "again.pt")
    again = lm.load_model(tmp_path / "again.pt")
    x = lm.training_pool(DIDS).tokens[:3, :-1].long()
    assert torch.equal(model(x), again(x))
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind
    with pytest.raises(FileNotFoundError, match="--stage reference"):
        lm.load_model(tmp_path / "missing.pt")


def test_dids_moves_the_sampling_of_gradient_clusters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from domainmix.experiments import lm_dids

    lm.stage_reference(DIDS, tmp_path / "ref")
    result = lm.stage_base(DIDS, tmp_path / "dids", "dids", tmp_path / "ref")
    written = json.loads((tmp_path / "dids" / "metrics.json").read_text())
    dids, costs = written["dids"], written["dids_costs"]
    domains = list(lm.training_pool(DIDS).names)
    assert dids["tasks"] == domains  # universal: every training domain's validation split, m = 6
    assert len(dids["groups"]) == 2 * len(domains) and set(dids["parents"]) == set(domains)
    assert dids["groups"][:2] == ["code/0", "code/1"]
    rounds = dids["rounds"]
    assert rounds["step"] == [2, 4, 6, 8] and len(rounds["seconds"]) == costs["rounds"] == 4
    final = {g: v[-1] for g, v in rounds["sampling"].items()}
    assert sum(final.values()) == pytest.approx(1.0)
    assert final != pytest.approx(dids["initial"])  # the weights moved
    assert dids["initial"] == pytest.approx(
        {g: 1 / 6 * n / 24 for g, n in dids["group_sizes"].items()}
    )  # uniform over the domains, split by group size
    for r in range(4):  # each task's impact column is a distribution over the groups
        for task in domains:
            assert sum(dids["rounds"]["impact"][g][task][r] for g in dids["groups"]) == pytest.approx(1.0)
    assert all(v[0] == 1.0 for v in rounds["gain"].values())  # the first round: the impact alone
    parents = rounds["parent_sampling"]
    assert dids["min_parent_sampling"] <= min(min(v) for v in parents.values())
    assert sum(result["sampling"].values()) == pytest.approx(1.0) and set(result["sampling"]) == set(domains)
    trajectory = written["trajectory"]
    assert all(sum(v[t] for v in trajectory["parents"].values()) == pytest.approx(1.0) for t in range(1))
    assert set(written["scores"]) >= {"step", "impact", "fisher_domain_sq"}
    assert costs["features_seconds"] > 0 and costs["clustering_seconds"] > 0 and not costs["partition_cached"]
    assert 0 < costs["rounds_share_of_training"] < 1 and costs["train_seconds"] == written["train_seconds"]
    # The partition is cached next to the run; a second run reads it and computes no features.
    assert (tmp_path / "dids" / "partition.json").is_file()

    def no_features(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached partition should have been used")

    monkeypatch.setattr(lm_dids, "gradient_sketch", no_features)
    again = lm.stage_base(
        DIDS, tmp_path / "again", "dids", tmp_path / "ref", tmp_path / "dids" / "partition.json"
    )
    assert (
        again["dids_costs"]["partition_cached"]
        and again["dids"]["partition_digest"] == dids["partition_digest"]
    )
    assert again["dids"]["rounds"]["sampling"] == rounds["sampling"]  # deterministic rounds
    inverted = lm.stage_base(
        DIDS, tmp_path / "inv", "dids-inverted", tmp_path / "ref", tmp_path / "dids" / "partition.json"
    )
    assert inverted["dids"]["impact_form"] == "inverted" and inverted["dids_costs"]["partition_cached"]
    # Another clustering setting is another key: the cache is not reused (features are needed again).
    with pytest.raises(AssertionError, match="cached partition"):
        lm.stage_base(
            replace(DIDS, dids_clusters=3),
            tmp_path / "k3",
            "dids",
            tmp_path / "ref",
            tmp_path / "dids" / "partition.json",
        )
    with pytest.raises(ValueError, match="need --reference"):
        lm.stage_base(DIDS, tmp_path / "none", "dids", None)


def test_dids_flat_out_of_domain_has_one_task_and_never_trains_on_it(tmp_path: Path) -> None:
    from domainmix.experiments import lm_dids

    cfg = replace(DIDS, target_domain="drama", dids_parent_floor=0.1)
    result = lm.stage_base(cfg, tmp_path, "dids-flat", None)  # no repartition: no reference needed
    dids = result["dids"]
    trained = [d for d in lm.training_pool(DIDS).names if d != "drama"]
    assert dids["tasks"] == ["drama"]  # m = 1: drama's validation split
    assert dids["groups"] == [f"{d}/0" for d in trained] and dids["parents"] == trained
    assert all(list(rows) == ["drama"] for rows in dids["rounds"]["impact"].values())
    assert dids["min_parent_sampling"] >= 0.1 - 1e-9  # the floor on each domain's total
    assert result["dids_costs"]["features_seconds"] == 0 and not (tmp_path / "partition.json").exists()
    assert set(result["sampling"]) == set(trained) and result["target_test_perplexity"] > 1
    # The rounds' draws: groups from the training pool only, drama only as the task; a function of the step.
    pool = lm.training_pool(cfg)
    groups = lm_dids.grouped(pool, lm_dids.flat_partition(pool))
    tasks = lm_dids.task_pool(cfg)
    draw = lm_dids.draw_for(groups, tasks, 2, 0, lm.device_for(cfg))
    x, _, ids = draw(4)
    whole = lm.load_windows(cfg, "validation", None, ("drama",)).tokens
    drama = {bytes(r.numpy()) for r in whole[:, :-1]}
    assert all(
        (bytes(row.numpy()) in drama) == (int(i) == len(trained))
        for row, i in zip(x.to(whole.dtype), ids, strict=True)
    )
    assert ids.tolist() == sorted(ids.tolist()) and ids.bincount().tolist() == [2] * (len(trained) + 1)
    assert all(bool((a == b).all()) for a, b in zip(draw(4), draw(4), strict=True))
    assert not bool((draw(4)[0] == draw(6)[0]).all())


def test_dids_config_is_checked() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(
            lm.LmConfig,
            None,
            {
                "dids_round_steps": 400, "dids_examples": 0, "dids_clusters": 3000, "dids_sketch_dim": 0,
                "dids_metric": "manhattan", "dids_initial": "oracle", "dids_decay": 1.0,
                "dids_parent_floor": -0.1, "compare_dids": True,
            },
        )  # fmt: skip
    message = str(error.value)
    for expected in (
        "'dids_round_steps' must be <= base_steps (300)",
        "'dids_examples' must be an int >= 1",
        "'dids_clusters' must be <= train_windows (2048)",
        "'dids_sketch_dim' must be an int >= 1",
        "'dids_metric' must be one of ['cosine', 'euclidean']",
        "'dids_initial' must be one of ['uniform', 'proportional']",
        "'dids_decay' must be in [0, 1)",
        "'dids_parent_floor' must be in [0, 1)",
    ):
        assert expected in message
    # Without a DIDS row the DIDS-only limits do not hold the other stages back; a DIDS base run checks them.
    lax = load_config(lm.LmConfig, None, {"dids_round_steps": 400})
    from domainmix.experiments import lm_dids

    with pytest.raises(ConfigError, match=r"'dids_round_steps' must be <= base_steps \(300\)"):
        lm_dids.train_dids(lax, "dids-flat", None, Path("unused"))
    with pytest.raises(ConfigError, match="'compare_dids' must be true or false"):
        load_config(lm.LmConfig, None, {"compare_dids": "yes"})
    assert load_config(lm.LmConfig, None, {"compare_dids": True}).compare_dids
    with pytest.raises(ValueError, match="'parent_floor' parameter of dids must be at most 1/6"):
        from domainmix.experiments import lm_dids

        lm_dids.train_dids(replace(DIDS, dids_parent_floor=0.5), "dids-flat", None, Path("unused"))


def test_compare_adds_the_dids_rows_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, object]] = []

    def base(
        cfg: lm.LmConfig, out: Path, weights: str, reference: object = None, cache: object = None
    ) -> dict:
        calls.append((out.name, weights, cache))
        row = {k: 1.0 for k in ("average_test_perplexity", "worst_test_perplexity", "train_seconds")}
        logs = {f"{k}_test_log_perplexity": 0.0 for k in ("average", "worst")}
        return {
            **row, **logs, "sampling": {}, "achieved": {}, "test_perplexity": {},
            "target_test_perplexity": None, "target_test_log_perplexity": None, "tokens_seen": 1,
        }  # fmt: skip

    monkeypatch.setattr(lm, "stage_reference", lambda cfg, out: {"train_seconds": 0.0, "cache_seconds": 0.0})
    monkeypatch.setattr(lm, "stage_proxy", lambda *a: {"train_seconds": 0.0, "averaged": {}})
    monkeypatch.setattr(lm, "stage_base", base)
    monkeypatch.setattr(lm, "plot_trajectories", lambda *a: None)
    assert list(lm.compare(TINY, tmp_path)) == ["uniform", "proportional", "doremi", "doge"]  # unchanged
    calls.clear()
    table = lm.compare(replace(TINY, compare_dids=True), tmp_path)
    assert list(table) == ["uniform", "proportional", "doremi", "doge", "dids", "dids-flat", "dids-inverted"]
    assert {c for _, w, c in calls if w.startswith("dids")} == {tmp_path / "partition.json"}  # one per seed


def test_compare_reuse_trains_only_the_missing_or_changed_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = replace(TINY, dids_round_steps=3)  # DIDS must get rounds within the 6 base steps
    first = lm.compare(tiny, tmp_path)
    trained: list[str] = []
    real_base = lm.stage_base

    def refuse(*args: object) -> dict:
        raise AssertionError("a finished stage was trained again")

    def base(cfg: lm.LmConfig, out: Path, *args: object) -> dict:
        trained.append(out.name)
        return real_base(cfg, out, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(lm, "stage_reference", refuse)
    monkeypatch.setattr(lm, "stage_proxy", refuse)
    monkeypatch.setattr(lm, "stage_base", base)
    more = lm.compare(replace(tiny, compare_dids=True), tmp_path, reuse=True)  # compare_dids: not a stage's
    assert trained == ["base-dids", "base-dids-flat", "base-dids-inverted"]
    assert {k: more[k] for k in first} == first  # the finished rows, read back as they were
    assert lm.finished_stage(tmp_path / "base-uniform" / "metrics.json", replace(tiny, lr=0.01)) is None
    assert lm.finished_stage(tmp_path / "reference" / "reference.json", tiny, "missing.pt") is None
    trained.clear()
    (tmp_path / "base-proportional" / "metrics.json").unlink()  # as if stopped part-way
    lm.compare(tiny, tmp_path, reuse=True)
    assert trained == ["base-proportional"]
    # The same path with other contents is another corpus: nothing is reused from it.
    moved = tmp_path / "corpus"
    shutil.copytree(FIXTURE, moved)
    here = replace(tiny, corpus=str(moved))
    record = tmp_path / "base-uniform" / "metrics.json"
    assert lm.finished_stage(record, here) is None  # another path: another config
    payload = json.loads(record.read_text())
    payload["config"]["corpus"] = str(moved)  # as if the run had used this path
    record.write_text(json.dumps(payload))
    assert lm.finished_stage(record, here) is not None
    with (moved / "drama" / "train.txt").open("a") as f:
        f.write("one more line\n")
    assert lm.finished_stage(record, here) is None
    with pytest.raises(SystemExit):
        lm.main(["--stage", "base", "--weights", "uniform", "--reuse", "--out", str(tmp_path)])


def test_bad_weights_and_threads_are_refused_naming_what_is_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo, a folder or a metrics.json as --weights, and --threads 0, ended in tracebacks."""
    for argv, message in [
        (
            ["--weights", "unifrom"],
            "--weights must be a weights.json file or one of ['uniform', 'proportional'",
        ),
        (["--weights", str(tmp_path)], "got '" + str(tmp_path)),
        (["--weights", "uniform", "--threads", "0"], "--threads must be an int >= 1; got 0"),
    ]:
        with pytest.raises(SystemExit) as stop:
            lm.main(["--stage", "base", *argv, "--out", str(tmp_path / "out")])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"final": {"a": 1}}')
    assert lm.main(["--stage", "base", "--weights", str(metrics), "--out", str(tmp_path / "out")]) == 2
    assert "not a proxy stage's weights.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a proxy stage's weights.json"):
        lm.read_weights(metrics)
    with pytest.raises(ValueError, match="cannot read it"):
        lm.read_weights(tmp_path / "missing.json")


@pytest.mark.slow
def test_compare_seeds_with_the_dids_rows(tmp_path: Path) -> None:
    from domainmix.experiments import lm_report

    cfg = replace(DIDS, target_domain="drama", compare_dids=True, proxy_steps=4)
    result = lm.compare_seeds(cfg, tmp_path, [0, 1])
    paired = result["log_perplexity_minus_uniform"]
    assert set(paired) == {"proportional", "doremi", "doge", "dids", "dids-flat", "dids-inverted"}
    assert set(paired["dids"]) == {"average", "worst", "target"}
    assert (tmp_path / "seed-1" / "partition.json").is_file()
    summary = lm_report.summarize(tmp_path)
    assert {"dids", "dids-flat", "dids-inverted"} <= set(summary["base"]) and "base dids" in summary["costs"]
    assert "dids-inverted" in lm_report.markdown(summary)
    dids = summary["dids"]
    assert list(dids) == ["dids", "dids-flat", "dids-inverted"]
    assert (
        dids["dids-flat"]["groups_per_domain"] == 1 and dids["dids"]["groups_per_domain"] == cfg.dids_clusters
    )
    assert dids["dids-inverted"]["partition_cached"] == [True, True]  # the features of dids, reused
    for row in dids.values():
        assert len(row["min_parent_sampling"]) == 2 and 0 < min(row["min_parent_sampling"]) <= 1 / 5
        shares = [
            sum(row["averaged_parent_sampling"][d][i] for d in row["averaged_parent_sampling"])
            for i in (0, 1)
        ]
        assert shares == pytest.approx([1.0, 1.0])
    assert "DIDS costs" in lm_report.markdown(summary)
    assert set(summary["dids_ablation"]) == {"average", "worst", "target"}  # inverted minus KL, paired
    assert summary["dids_ablation"]["target"]["n"] == 2
    lm_report.plot_dids(tmp_path / "seed-0", list(dids), tmp_path / "dids.png")
    assert (tmp_path / "dids.png").stat().st_size > 0


def test_domain_balance_makes_the_target_batch_a_uniform_mix_of_its_domains() -> None:
    ids = torch.tensor([0, 0, 1, 2, 2, 2])  # 2, 1 and 3 rows: what a stratified rounding can give
    rows = lm.domain_balance(ids, 4)  # domain 3 absent: the mix is over the 3 present
    assert rows.tolist() == pytest.approx([1.0, 1.0, 2.0, 2 / 3, 2 / 3, 2 / 3])
    losses = torch.tensor([1.0, 3.0, 5.0, 0.0, 3.0, 6.0])
    assert float((losses * rows).mean()) == pytest.approx((2.0 + 5.0 + 3.0) / 3)  # mean of domain means


def test_base_batches_realise_the_weights(tmp_path: Path) -> None:
    # low_discrepancy: uniform over 6 domains in 12-window batches is exactly 1/6 each over 6 steps,
    # where a stratified batch would round the same way every step.
    result = lm.stage_base(TINY, tmp_path / "u", "uniform")
    assert result["achieved"] == pytest.approx(dict.fromkeys(result["achieved"], 1 / 6))
    result = lm.stage_base(TINY, tmp_path / "p", "proportional")
    windows = TINY.base_steps * TINY.batch_size
    for name, share in result["achieved"].items():
        assert abs(share - result["sampling"][name]) <= 1.0 / windows + 1e-12


@pytest.mark.parametrize("check_every", [2, 50])
def test_a_non_finite_loss_stops_the_stage_naming_its_first_step(
    monkeypatch: pytest.MonkeyPatch, check_every: int
) -> None:
    calls = 0

    def poisoned(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = per_token_loss(logits, targets)
        return loss * float("nan") if calls in (3, 5) else loss

    monkeypatch.setattr(lm, "per_token_loss", poisoned)
    monkeypatch.setattr(lm, "FINITE_CHECK_EVERY", check_every)
    windows = lm.training_pool(TINY)
    with pytest.raises(RuntimeError, match=r"base: the training loss is not finite at step 3 \(of 6\)"):
        lm.train(TINY, "base", strategies.uniform(), windows, 6)
    assert calls == (4 if check_every == 2 else 6)  # the flag is read every `check_every` steps


def test_the_report_pools_only_the_seeds_and_rows_of_one_configuration(tmp_path: Path) -> None:
    from domainmix.experiments import lm_report

    run = tmp_path / "run"
    lm.compare_seeds(TINY, run, [0, 1])
    out = {"results": tmp_path / "results", "images": tmp_path / "images"}
    flags = ["--results", str(out["results"]), "--images", str(out["images"])]
    # --figure-seed of a seed that did not run: refused before anything is written
    assert lm_report.main([str(run), "--name", "x", "--figure-seed", "7", *flags]) == 2
    assert not out["results"].exists()
    # a row that only some seeds have yet (a --reuse run adding rows) is left out, not a KeyError
    table = json.loads((run / "seed-1" / "comparison.json").read_text())
    del table["doge"]
    (run / "seed-1" / "comparison.json").write_text(json.dumps(table))
    assert "doge" not in lm_report.summarize(run, "cmd")["base"]
    # seeds run with other settings are not pooled under seed 0's config
    record = run / "seed-1" / "reference" / "reference.json"
    payload = json.loads(record.read_text())
    payload["config"]["lr"] = 0.02
    record.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"seeds \[1\] ran with other settings than seed 0 \(\['lr'\]\)"):
        lm_report.summarize(run, "cmd")


def test_encoded_splits_are_kept_beside_the_corpus_and_keyed_by_split_and_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from domainmix.data import load_corpus, train_bpe

    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURE, corpus)
    cfg = replace(TINY, corpus=str(corpus), tokenizer="bpe", bpe_vocab=300)
    tokenizer = train_bpe(corpus, 300)
    lm._tokens.cache_clear()
    first = lm.load_windows(cfg, "test")
    kept = sorted((corpus / lm.TOKEN_CACHE).glob("*.test.*.npy"))
    assert len(kept) == len(load_corpus(corpus).domains)
    assert (
        load_corpus(corpus).tokens("drama", "test", tokenizer).tolist()
        == np.load(next(p for p in kept if p.name.startswith("drama."))).tolist()
    )

    def no_encoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoded again")

    lm._tokens.cache_clear()  # a new process: the split is read from the folder, not encoded
    monkeypatch.setattr("domainmix.data._tokenize.encode", no_encoding)
    again = lm.load_windows(cfg, "test")
    assert torch.equal(first.tokens, again.tokens)

    train_bpe(corpus, 280, out=tokenizer)  # another tokenizer in the same file: a new key, encoded again
    lm._tokens.cache_clear()
    with pytest.raises(AssertionError, match="encoded again"):
        lm.load_windows(cfg, "test")
    monkeypatch.undo()
    train_bpe(corpus, 300, out=tokenizer)
    for broken in (b"not an array", b""):  # an unreadable or empty file is encoded again and replaced
        kept[0].write_bytes(broken)
        lm._tokens.cache_clear()
        assert torch.equal(lm.load_windows(cfg, "test").tokens, first.tokens)
        assert np.load(kept[0]).dtype == np.int32
    lm._tokens.cache_clear()
