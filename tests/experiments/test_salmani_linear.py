"""Checks B.1-B.9 of docs/reproduction.md on the linear-regression protocol (5 seeds, 10,000 steps): slow.

Targets and tolerances are those of docs/reproduction.md, "Acceptance checks"; two checks differ in form
(explained there, under "What the linear runs show").
Sampling shares are read as the mean over the second half of training (and over seeds): VA
re-estimates v_i from 64 examples per domain every 100 steps, so a single window's share jitters by a
slot or two of 32 around its converged value.

* check B.8 ("FGLS+VA ≤ 0.65 × uniform and ≤ min(FGLS, VA) at step 2000 in fig1def") is checked on 20
  seeds (to step 2000 only): seeds 0-4 gave 0.653 under the former step order and give 0.660 under the
  one of docs/design.md ("One step"), with per-seed ratios from 0.54 to 0.81, so five seeds cannot tell
  SIM's 0.61 from 0.65; twenty gave 0.603, and FGLS+VA within 1 % of FGLS alone.
* check B.7's "final error with VA within ±10 % of its twin": in fig4abc VA ends 12 % *lower*, closer to
  the closed-form error floor both share (uniform has not reached it by step 10,000; at 30,000
  steps the two end within 1 %). Asserted: VA is
  never more than 10 % worse than its twin and never below 0.9 × the twin's closed-form floor, i.e.
  sampling changes how fast the floor is approached, not the floor.
"""

from __future__ import annotations

import math
from statistics import mean
from typing import Any

import pytest

from domainmix.experiments.config import LINEAR_SETTINGS, LinearConfig, load_config
from domainmix.experiments.run import run_jobs

pytestmark = pytest.mark.slow

METHODS = ("uniform", "oracle_gls", "fgls", "va", "fgls+va")
# check B.3: VA's analytic share of domain 1 with v_i² ∝ C_i σ_i², for w = 1 and for the FGLS weights.
VA_TARGETS = {
    "fig1abc": {"va": 0.69, "fgls+va": 0.978},
    "fig1def": {"va": 1 / 32, "fgls+va": 0.309},
    "fig4abc": {"va": 0.909, "fgls+va": 0.909},
    "fig4def": {"va": 0.183, "fgls+va": 0.817},
}


def run_setting(setting: str, **overrides: Any) -> dict[str, list[dict[str, Any]]]:
    settings = {**LINEAR_SETTINGS[setting], "methods": list(METHODS), "workers": 1, **overrides}
    cfg = load_config(LinearConfig, None, settings)
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in run_jobs("linear", cfg, progress=False):
        by_method.setdefault(run["method"], []).append(run)
    return by_method


def final(runs: dict[str, list[dict[str, Any]]], method: str) -> float:
    return mean(r["final_error"] for r in runs[method])


def at_step(runs: dict[str, list[dict[str, Any]]], method: str, step: int) -> float:
    return mean(r["error"][r["steps"].index(step)] for r in runs[method])


def loss_share(runs: dict[str, list[dict[str, Any]]], method: str) -> float:
    return mean(r["loss_share"]["d1"] for r in runs[method])


def late_sampling_share(runs: dict[str, list[dict[str, Any]]], method: str) -> float:
    values = []
    for r in runs[method]:
        t = r["trajectory"]
        half = t["steps"][-1] / 2
        values += [q[0] for s, q in zip(t["steps"], t["sampling_share"], strict=True) if s >= half]
    return mean(values)


def floors(cfg: LinearConfig) -> dict[str, float]:
    """Closed-form √E‖θ̂ − θ_gt‖² of the OLS and GLS estimators for ``cfg`` (docs/algorithms.md §3.2)."""
    n, d = cfg.train_per_domain, cfg.dim
    pairs = list(zip(cfg.input_scales, cfg.noise_variances, strict=True))
    ols = d * sum(n * c * s for c, s in pairs) / sum(n * c for c, _ in pairs) ** 2
    gls = d / sum(n * c / s for c, s in pairs)
    return {"uniform": math.sqrt(ols), "fgls": math.sqrt(gls)}


def check_common(setting: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    for method, target in VA_TARGETS[setting].items():
        share = late_sampling_share(runs, method)
        assert abs(share - target) <= 0.03, f"{setting} {method}: VA share {share:.3f}, target {target:.3f}"
    floor = floors(load_config(LinearConfig, None, dict(LINEAR_SETTINGS[setting])))
    for va, twin in (("va", "uniform"), ("fgls+va", "fgls")):
        ratio = final(runs, va) / final(runs, twin)
        assert ratio <= 1.1, f"{setting}: final error {va}/{twin} = {ratio:.3f}"
        assert final(runs, va) >= 0.9 * floor[twin], (
            f"{setting}: {va} below the {twin} floor {floor[twin]:.4f}"
        )


@pytest.mark.parametrize("setting", ["fig1abc", "fig1def", "fig4def"])
def test_noise_differs(setting: str) -> None:
    runs = run_setting(setting)
    share = loss_share(runs, "fgls")
    # check B.1: FGLS's weight ratio w1/w2 within ±10 % of σ2²/σ1² = 20, i.e. a share in [0.947, 0.957].
    assert 0.947 <= share <= 0.957, f"{setting}: FGLS loss share {share:.4f}"
    # check B.4: FGLS reaches the oracle GLS error floor (within 5 %).
    ratio = final(runs, "fgls") / final(runs, "oracle_gls")
    assert ratio <= 1.05, f"{setting}: FGLS / oracle final error {ratio:.3f}"
    check_common(setting, runs)
    if setting == "fig1def":
        # check B.9: loss and sampling weights move in opposite directions.
        assert loss_share(runs, "fgls+va") > 0.9 and late_sampling_share(runs, "fgls+va") < 0.35
        # check B.6: VA speeds up.
        assert at_step(runs, "va", 2000) <= 0.93 * at_step(runs, "uniform", 2000)


def test_equal_noise_fig4abc() -> None:
    runs = run_setting("fig4abc")
    share = loss_share(runs, "fgls")
    assert abs(share - 0.5) <= 0.03, f"fig4abc: FGLS loss share {share:.4f}"  # check B.1, σ² equal
    # check B.5: with equal noise loss weights change nothing (within 3 %);
    # check B.6: VA is faster at step 2000.
    assert abs(final(runs, "fgls") / final(runs, "uniform") - 1) <= 0.03
    assert at_step(runs, "va", 2000) <= 0.90 * at_step(runs, "uniform", 2000)
    check_common("fig4abc", runs)


def test_combination_fig1def_on_twenty_seeds() -> None:
    """check B.8: FGLS+VA ≤ 0.65 × uniform at step 2000, and as fast as the faster of FGLS and VA."""
    runs = run_setting(
        "fig1def", steps=2000, seeds=list(range(20)), methods=["uniform", "fgls", "va", "fgls+va"]
    )
    combined = at_step(runs, "fgls+va", 2000)
    assert combined <= 0.65 * at_step(runs, "uniform", 2000)
    # Measured 0.0429 vs FGLS 0.0432: equal within 1 %; 2 % leaves room for floating-point differences.
    assert combined <= 1.02 * min(at_step(runs, "fgls", 2000), at_step(runs, "va", 2000))
