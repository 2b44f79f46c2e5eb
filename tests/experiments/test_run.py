"""``domainmix run``: configuration, the training loop and the documented output layout, on tiny runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from domainmix._validation import ConfigError
from domainmix.experiments import linear, logistic
from domainmix.experiments._report import load_metrics
from domainmix.experiments.config import LinearConfig, MlpConfig, load_config
from domainmix.experiments.loop import make_method, train
from domainmix.experiments.methods import parse_method
from domainmix.experiments.run import build_config, main

TINY = ["--steps", "300", "--seeds", "0", "--workers", "1", "--quiet", "--set", "update_every=50"]


def test_parse_method() -> None:
    assert parse_method("fgls+va") == ("fgls", "va")
    assert parse_method("va") == ("uniform", "va")
    assert parse_method("erma") == ("erma", "uniform")
    with pytest.raises(ValueError, match="Unknown method 'doremi'"):
        parse_method("doremi")


def test_config_errors_are_collected_and_raised_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(LinearConfig, None, {"stepz": 3, "lr": "fast", "batch_size": 0, "methods": ["x"]})
    errors = info.value.errors
    assert any("unknown setting 'stepz'" in e for e in errors)
    assert any("'lr' must be a finite number. Got 'fast'" in e for e in errors)
    # The value checks of the settings that type-checked come in the same round.
    assert any("'batch_size' must be an int >= 1. Got 0" in e for e in errors)
    assert any("Unknown method 'x'" in e for e in errors)
    with pytest.raises(ConfigError) as info:
        load_config(LinearConfig, None, {"batch_size": 0, "methods": ["x"], "noise_variances": [1.0]})
    text = str(info.value)
    assert "'batch_size' must be an int >= 1. Got 0" in text
    assert "Unknown method 'x'" in text
    assert "one entry per domain" in text
    path = tmp_path / "c.yaml"
    path.write_text(
        "steps: 123\nwarmup_steps: 100\nseeds: [3, 4]\ninput_scales: [1, 2, 3]\nnoise_variances: [1, 1, 5]\n"
    )
    cfg = load_config(LinearConfig, path)
    assert (cfg.steps, cfg.seeds, cfg.input_scales) == (123, (3, 4), (1.0, 2.0, 3.0))
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(LinearConfig, path)


def test_every_command_line_error_is_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A bad setting, bad seeds or a malformed --set hid every later problem of the command line."""
    argv = ["linear", "--out", str(tmp_path), "--setting", "nope", "--seeds", "a", "--set", "foo",
            "--set", "stpes=1", "--set", "lr=1", "--set", "lr=x"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    problems = [
        "unknown setting 'nope' for linear", "--seeds must be", "--set expects key=value, got 'foo'",
        "unknown setting 'stpes'", "--set lr: given twice", "'lr' must be a finite number",
    ]  # fmt: skip
    for problem in problems:
        assert problem in err, (problem, err)


def test_setting_then_file_then_overrides(tmp_path: Path) -> None:
    cfg = build_config("linear", "fig1abc", None, {})
    assert cfg.input_scales == (100.0, 1.0) and cfg.noise_variances == (1.0, 20.0)
    path = tmp_path / "c.yaml"
    path.write_text("noise_variances: [2, 3]\nsteps: 50\nwarmup_steps: 10\nupdate_every: 10\n")
    cfg = build_config("linear", "fig1abc", str(path), {"steps": 60})
    assert cfg.input_scales == (100.0, 1.0) and cfg.noise_variances == (2.0, 3.0) and cfg.steps == 60
    with pytest.raises(ConfigError, match="unknown setting 'fig9'"):
        build_config("linear", "fig9", None, {})


def test_methods_are_independent_loss_and_sampling_choices() -> None:
    cfg = LinearConfig()
    task = linear.make_task(LinearConfig(train_per_domain=40, heldout_per_domain=10), seed=0)
    assert make_method("uniform", cfg, task).requires == frozenset()
    assert make_method("va", cfg, task).requires == {"grad_var"}
    assert make_method("fgls", cfg, task).requires == {"heldout_loss", "heldout_count"}
    assert make_method("erma+va", cfg, task).requires == {
        "heldout_loss",
        "heldout_loss_var",
        "heldout_count",
        "grad_var",
    }
    no_truth = logistic.make_task(load_config(logistic.CONFIG, None, {"train_per_domain": 40}), seed=0)
    with pytest.raises(ValueError, match="needs the true noise variances"):
        make_method("oracle_gls", cfg, no_truth)


def test_linear_data_follows_the_setting() -> None:
    cfg = LinearConfig(input_scales=(1.0, 100.0, 4.0), noise_variances=(1.0, 20.0, 2.0), dim=5)
    task = linear.make_task(cfg, seed=1)
    assert task.names == ("d1", "d2", "d3")
    assert [len(task.split.train[n]) for n in task.names] == [2000] * 3
    assert [len(task.split.heldout[n]) for n in task.names] == [500] * 3
    for i, scale in enumerate(cfg.input_scales):
        x = task.inputs[task.domains == i]
        assert abs(float(x.var()) / scale - 1) < 0.1
    again = linear.make_task(cfg, seed=1)
    assert torch.equal(again.inputs, task.inputs) and torch.equal(again.targets, task.targets)


def test_tiny_linear_run_writes_the_documented_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    methods = "uniform,oracle_gls,fgls,erma,va,fgls+va,erma+va"
    code = main(["linear", "--setting", "fig1def", "--out", str(tmp_path), "--methods", methods, *TINY,
                 "--set", "warmup_steps=100"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "fgls+va" in out and "metrics.json" in out
    metrics = load_metrics(tmp_path / "metrics.json")
    assert metrics["experiment"] == "linear" and metrics["setting"] == "fig1def"
    assert metrics["domains"] == ["d1", "d2"]
    assert metrics["config"]["input_scales"] == [1.0, 100.0]
    runs = {r["method"]: r for r in metrics["runs"]}
    assert list(runs) == methods.split(",")
    for run in runs.values():
        assert run["steps"][0] == 0 and run["steps"][-1] == 300 and len(run["error"]) == len(run["steps"])
        assert run["final_error"] == run["error"][-1] < run["error"][0] == 1.0  # θ starts at 0, |θ_gt| = 1
        assert set(run["loss_share"]) == set(run["sampling_share"]) == {"d1", "d2"}
        assert run["wall_time_s"] > 0
    # Loss rules move α towards the quiet domain d1 (σ² = 1 vs 20); VA moves q towards the loud one.
    assert runs["uniform"]["loss_share"]["d1"] == 0.5 and runs["uniform"]["sampling_share"]["d1"] == 0.5
    assert runs["oracle_gls"]["loss_share"]["d1"] == pytest.approx(20 / 21)
    assert runs["fgls"]["loss_share"]["d1"] > 0.8 and runs["fgls"]["sampling_share"]["d1"] == 0.5
    assert runs["erma"]["loss_share"]["d1"] > 0.52  # EG steps: slower than FGLS's jump
    assert runs["va"]["loss_share"]["d1"] == 0.5 and runs["va"]["sampling_share"]["d1"] == 1 / 32
    assert 1 / 32 < runs["fgls+va"]["sampling_share"]["d1"] < 0.5
    lines = (tmp_path / "weights.jsonl").read_text().splitlines()
    assert len(lines) == sum(len(r["trajectory"]["steps"]) for r in runs.values())
    first = json.loads(lines[0])
    assert set(first) == {"method", "seed", "step", "loss_share", "sampling_share"}
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_custom_domains_from_the_command_line(tmp_path: Path) -> None:
    code = main(["linear", "--setting", "custom", "--out", str(tmp_path), "--methods", "fgls+va", *TINY,
                 "--set", "input_scales=[1, 10, 100]", "--set", "noise_variances=[1, 5, 20]",
                 "--set", "warmup_steps=100", "--no-plot"])  # fmt: skip
    assert code == 0
    metrics = load_metrics(tmp_path)
    assert metrics["domains"] == ["d1", "d2", "d3"]
    share = metrics["runs"][0]["loss_share"]
    assert share["d1"] > share["d2"] > share["d3"]
    assert not (tmp_path / "figure.png").exists()


def test_invalid_command_line_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["linear", "--out", str(tmp_path), "--set", "lr=-1", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "'lr' must be a float > 0" in err and "'steps' must be an int >= 1" in err


def test_logistic_and_mlp_run(tmp_path: Path) -> None:
    assert main(["logistic", "--out", str(tmp_path / "lg"), "--methods", "uniform,erma+va", *TINY,
                 "--set", "warmup_steps=100", "--no-plot"]) == 0  # fmt: skip
    runs = load_metrics(tmp_path / "lg")["runs"]
    assert all(0 <= r["final_metrics"]["accuracy"] <= 1 for r in runs)
    assert runs[1]["loss_share"]["d1"] < 0.5  # d1 has 30 % flipped labels
    assert main(["mlp", "--out", str(tmp_path / "mlp"), "--methods", "uniform,erma+va", "--steps", "60",
                 "--seeds", "0", "--workers", "1", "--quiet", "--no-plot",
                 "--set", "source=sklearn", "--set", "update_every=10", "--set", "warmup_steps=20",
                 "--set", "batch_size=32", "--set", "hidden=[32]"]) == 0  # fmt: skip
    metrics = load_metrics(tmp_path / "mlp")
    assert metrics["domains"] == ["clean", "noisy"]
    accuracy = metrics["runs"][0]["final_metrics"]["accuracy"]
    assert accuracy > 0.5  # 8×8 digits, 60 steps: far above chance (0.1)


def test_parallel_workers_match_in_process(tmp_path: Path) -> None:
    cfg = load_config(LinearConfig, None, {"steps": 200, "seeds": [0, 1], "update_every": 50,
                                           "methods": ["fgls+va"], "warmup_steps": 100})  # fmt: skip
    from domainmix.experiments.run import run_jobs

    parallel = run_jobs("linear", cfg.__class__(**{**cfg.__dict__, "workers": 2}), progress=False)
    serial = [train(linear.make_task(cfg, s), "fgls+va", cfg, s) for s in cfg.seeds]
    for p, s in zip(parallel, serial, strict=True):
        assert (p["method"], p["seed"]) == (s["method"], s["seed"])
        assert p["error"] == s["error"] and p["trajectory"] == s["trajectory"]


def test_a_diverged_run_stops_and_reports_null_without_aborting_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = load_config(
        LinearConfig, None, {"steps": 200, "lr": 10.0, "methods": ["uniform"], "eval_every": 50}
    )
    run = train(linear.make_task(cfg, 0), "uniform", cfg, 0)
    assert run["diverged_at"] is not None and run["steps"] == [0, 50, 100, 150, 200]
    assert all(e != e for e, s in zip(run["error"], run["steps"], strict=True) if s > run["diverged_at"])
    assert len(run["trajectory"]["loss_share"]) == len(run["steps"])
    args = ["linear", "--out", str(tmp_path), "--steps", "200", "--seeds", "0", "--workers", "1", "--quiet",
            "--methods", "uniform", "--set", "lr=10", "--no-plot"]  # fmt: skip
    assert main(args) == 0
    assert "uniform (seed 0) diverged at step" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (
        metrics["runs"][0]["final_error"] is None
        and metrics["summary"]["uniform"]["final_error"]["mean"] is None
    )


def test_mlp_config_defaults_are_valid() -> None:
    assert MlpConfig().problems() == []


# --- the command line's rough edges ---------------------------------------------------------------------
def test_config_file_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1, 2\nlr: 0.1\n")
    for path, fragment in ((broken, "YAML syntax error at line"), (tmp_path / "none.yaml", "cannot read")):
        assert main(["linear", "--out", str(tmp_path), "--config", str(path), *TINY]) == 2
        err = capsys.readouterr().err
        assert fragment in err and str(path) in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_seeds_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["linear", "--out", str(tmp_path), "--seeds", "a,b"]) == 2
    assert (
        "--seeds must be distinct comma-separated ints >= 0, e.g. 0,1,2. Got 'a,b' instead."
        in capsys.readouterr().err
    )


def test_runs_in_which_a_method_would_never_act_are_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"'steps' must reach a window that closes at or after 'warmup_steps'"
    ):
        load_config(LinearConfig, None, {"steps": 50, "update_every": 10, "methods": ["uniform", "fgls+va"]})
    # past the warm-up, but the last window closes at 500 < 560
    with pytest.raises(ConfigError, match=r"the last window closes at step 500"):
        load_config(LinearConfig, None, {"steps": 590, "warmup_steps": 560, "methods": ["fgls"]})
    assert (
        load_config(LinearConfig, None, {"steps": 600, "warmup_steps": 560, "methods": ["fgls"]}).steps == 600
    )
    with pytest.raises(
        ConfigError, match=r"'steps' must be at least 'update_every' \(100\) when a method moves"
    ):
        load_config(LinearConfig, None, {"steps": 99, "methods": ["uniform", "va"]})
    assert load_config(LinearConfig, None, {"steps": 99, "methods": ["uniform", "oracle_gls"]}).steps == 99
    # VA needs two gradients per domain: one example (or one micro-batch of 8) skipped every window
    with pytest.raises(ConfigError, match=r"'va_samples' must be at least 2 with va_estimator='per_example'"):
        load_config(LinearConfig, None, {"va_samples": 1, "methods": ["va"]})
    with pytest.raises(
        ConfigError, match=r"'va_samples' must be at least 16 with va_estimator='micro_batch'"
    ):
        load_config(LinearConfig, None, {"va_samples": 15, "va_estimator": "micro_batch", "methods": ["va"]})
    assert load_config(LinearConfig, None, {"va_samples": 1, "methods": ["fgls"]}).va_samples == 1


def test_settings_that_would_fail_later_are_refused_now(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cases = [
        ({"methods": ["uniform", "uniform"]}, "'methods' must name each method once"),
        ({"batch_size": 1}, "'batch_size' must be at least the number of domains (2)"),
        ({"lr": float("inf")}, "'lr' must be a finite number"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(LinearConfig, None, overrides)
    with pytest.raises(ConfigError, match="oracle_gls needs the true noise variances"):
        load_config(MlpConfig, None, {"methods": ["uniform", "oracle_gls"]})
    with pytest.raises(
        ConfigError, match=re.escape("'batch_size' must be at least the number of domains (2)")
    ):
        load_config(MlpConfig, None, {"batch_size": 1})  # crashed in a worker
    # YAML 1.1 reads 1e-3 as a string: it is the number it looks like, in --set and in files alike
    assert load_config(LinearConfig, None, {"lr": "1e-3", "input_scales": [1, "1e2"]}).lr == 1e-3
    path = tmp_path / "twice.yaml"
    path.write_text("steps: 20\nsteps: 30\n")
    with pytest.raises(ConfigError, match="the key 'steps' is given twice"):
        load_config(LinearConfig, path)
    assert main(["linear", "--out", str(tmp_path), "--set", "seeds=[0,1"]) == 2
    err = capsys.readouterr().err
    assert "--set seeds: the value '[0,1' is not valid YAML" in err and "Traceback" not in err


def test_run_help_has_no_rst_markup(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_top_level_command_line(capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys

    from domainmix.experiments.__main__ import main as top

    assert top(["--version"]) == 0 and capsys.readouterr().out.startswith("domainmix ")
    assert top(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("lm", "verify", "train-bpe", "build-corpus"))
    done = subprocess.run([sys.executable, "-m", "domainmix", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "commands:" in done.stdout


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc (Linux)")
def test_ctrl_c_stops_a_parallel_run_at_once_leaving_no_worker(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group. It used to interrupt the workers too (a pool then waits
    forever for the task a dead worker took) or, pressed twice, the pool's own shutdown: 2 of 9 tries
    hung. The workers ignore it, the parent terminates them and exits 130."""
    cmd = [sys.executable, "-m", "domainmix.experiments", "run", "linear", "--methods", "uniform,fgls",
           "--seeds", "0,1", "--steps", "100000", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stderr is not None
    seen = ""
    while "linear runs" not in seen:  # the progress bar: the workers are starting or running
        line = proc.stderr.read(1)
        assert line, f"the run ended before it started: {seen}"
        seen += line
    time.sleep(1.0)
    for _ in range(2):  # a terminal's Ctrl-C, pressed twice
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
    rest = proc.communicate(timeout=60)[1]
    # 130; or, when the second press lands after the cleanup, Python's own exit on SIGINT
    assert proc.returncode in (130, -signal.SIGINT), seen + rest
    assert "interrupted; nothing written" in rest, rest
    assert _live_members(proc.pid) == [], "a worker outlived the run"


def _live_members(group: int) -> list[int]:
    """The processes of a process group that still run (zombies excluded: reaping them is up to init)."""
    live = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it ended meanwhile
            if int(fields[2]) == group and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
                live.append(int(entry.name))
    return live
