"""The demo: its claim holds when it is actually run (slow), and bad flags exit 2."""

from __future__ import annotations

import pytest

from domainmix.experiments import demo
from domainmix.experiments.demo import DemoConfig, method_strategies, train


@pytest.mark.slow
def test_demo_loss_weights_move_the_error() -> None:
    cfg = DemoConfig()
    methods = method_strategies()
    results = {name: train(cfg, methods[name]) for name in ("uniform", "group_dro", "inverse_loss")}
    uniform, dro, inverse = (results[n]["error"] for n in ("uniform", "group_dro", "inverse_loss"))
    # Down-weighting the noisy domains must beat uniform clearly; up-weighting them must hurt.
    assert inverse < 0.5 * uniform
    assert dro > uniform
    # The noisiest domain gets the smallest loss weight, sampling stays uniform for inverse_loss.
    mixture = results["inverse_loss"]["mixture"]
    assert mixture[2] < mixture[1] < mixture[0]
    assert results["inverse_loss"]["sampling"] == pytest.approx([1 / 3] * 3, abs=0.02)


@pytest.mark.parametrize("args", [["--steps", "-5"], ["--seed", "-1"]])
def test_bad_flags_exit_2(args: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        demo.main(args)
    assert stop.value.code == 2 and "--steps must be >= 1 and --seed >= 0" in capsys.readouterr().err
