"""The methods registry: the CLI choices, the config checks and the builders all read it."""

from __future__ import annotations

import pytest

import domainmix.experiments.methods as methods
from domainmix import strategies
from domainmix.experiments import lm
from domainmix.experiments.config import LinearConfig, LmConfig, load_config
from domainmix.experiments.methods import MethodContext, Rule, build_method, build_proxy, parse_method


def test_every_rule_builds_a_strategy() -> None:
    cfg = LinearConfig()
    ctx = MethodContext((100, 50), noise_variances=(1.0, 4.0), learning_rate=lambda t: 1e-3)
    for loss in methods.LOSS_RULES:
        for sampling in methods.SAMPLING_RULES:
            assert isinstance(build_method(f"{loss}+{sampling}", cfg, ctx), strategies.Strategy)
    for name in methods.PROXY_METHODS:
        assert isinstance(build_proxy(name, LmConfig(), ctx), strategies.Strategy)


@pytest.mark.parametrize(
    ("method", "name", "requires"),
    [
        ("uniform", "combine(loss=uniform, sampling=uniform)", set()),
        ("oracle_gls", "combine(loss=oracle_gls, sampling=uniform)", set()),
        ("fgls", "combine(loss=delay(fgls, 500), sampling=uniform)", {"heldout_loss", "heldout_count"}),
        ("va", "combine(loss=uniform, sampling=variance_aware)", {"grad_var"}),
        (
            "fgls+va",
            "combine(loss=delay(fgls, 500), sampling=variance_aware)",
            {"grad_var", "heldout_loss", "heldout_count"},
        ),
        (
            "erma+va",
            "combine(loss=delay(erma, 500), sampling=variance_aware)",
            {"grad_var", "heldout_loss", "heldout_count", "heldout_loss_var"},
        ),
    ],
)
def test_each_method_is_wired_to_its_rules(method: str, name: str, requires: set[str]) -> None:
    """A method name builds the loss rule and the sampling rule it names (warm-up 500 of LinearConfig),
    reading exactly their statistics; a sampling rule alone keeps the uniform loss rule."""
    ctx = MethodContext((100, 50), noise_variances=(1.0, 4.0), learning_rate=lambda t: 1e-3)
    strategy = build_method(method, LinearConfig(), ctx)
    assert strategy.name == name and strategy.requires == requires


def test_builders_say_what_a_task_lacks() -> None:
    with pytest.raises(ValueError, match="oracle_gls.*noise variances"):
        build_method("oracle_gls", LinearConfig(), MethodContext((10, 10)))
    with pytest.raises(ValueError, match="doge.*learning-rate"):
        build_proxy("doge", LmConfig(), MethodContext((10, 10)))
    with pytest.raises(ValueError, match="Unknown proxy method 'dro'"):
        build_proxy("dro", LmConfig(), MethodContext((10, 10)))


def test_lm_cli_choices_come_from_the_registry() -> None:
    with pytest.raises(SystemExit):
        lm.main(["--stage", "proxy", "--strategy", "not-a-method", "--out", "unused"])
    # The proxy methods are exactly the registry's: the parser accepts each (and fails later, on data).
    for name in methods.PROXY_METHODS:
        args = ["--stage", "proxy", "--strategy", name, "--out", "unused", "--corpus", "nowhere"]
        assert lm.main(args) == 2


def test_a_new_rule_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = Rule("half", "α fixed at (1/3, 2/3)", lambda cfg, ctx: strategies.fixed([1.0, 2.0]))
    monkeypatch.setattr(methods, "LOSS_RULES", {**methods.LOSS_RULES, "half": rule})
    assert parse_method("half+va") == ("half", "va")
    cfg = load_config(LinearConfig, overrides={"methods": ["half", "half+va"]})  # config checks accept it
    built = build_method("half", cfg, MethodContext((10, 10)))
    w = strategies.combine(loss=strategies.fixed([1.0, 2.0]), sampling=strategies.uniform())
    assert built.requires == w.requires == frozenset()


def test_online_methods_build_dids_over_a_partition() -> None:
    from domainmix.partition import Partition

    part = Partition.create(["a/0", "a/1", "b/0"], ["a", "a", "b"], [[0], [1], [2]])
    ctx = MethodContext((1, 1, 1), num_tasks=2, partition=part)
    built = {name: rule.build(LmConfig(), ctx) for name, rule in methods.ONLINE_METHODS.items()}
    assert set(built) == {"dids", "dids-flat", "dids-inverted"} and methods.UNCLUSTERED < set(built)
    assert all(part.digest[:12] in s.name and "m=2" in s.name for s in built.values())
    assert built["dids-inverted"].name.startswith("dids(inverted") and built["dids"].name.startswith(
        "dids(kl"
    )
