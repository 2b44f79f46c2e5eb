"""Pin the curated public surface: names, order, importability, docstrings."""

from __future__ import annotations

import inspect

import pytest

import domainmix
import domainmix.partition
import domainmix.sampling
import domainmix.stats
import domainmix.strategies

TOP_LEVEL = [
    "DomainLosses",
    "DomainStats",
    "DomainWeights",
    "StatsCollector",
    "Strategy",
    "WeightingController",
    "domain_losses",
    "strategies",
    "weighted_loss",
]

STRATEGIES = [
    "AverageState",
    "ChainState",
    "CombineState",
    "DidsState",
    "EmaState",
    "EmptyState",
    "ErmaState",
    "ExponentiatedGradientState",
    "FglsState",
    "ScheduleState",
    "StaticState",
    "Strategy",
    "chain",
    "combine",
    "delay",
    "dids",
    "doge",
    "doremi",
    "ema",
    "erma",
    "exponentiated_gradient",
    "fgls",
    "fixed",
    "floor",
    "follow_mixture",
    "make_strategy",
    "mix_uniform",
    "normalize",
    "oracle_gls",
    "proportional",
    "schedule",
    "stateless",
    "temperature",
    "track_average",
    "uniform",
    "variance_aware",
]

SAMPLING = [
    "DomainBatchSampler",
    "DomainMixingIterable",
    "HeldoutSplit",
    "Mode",
    "StopRule",
    "allocate_counts",
    "split_heldout",
]

STATS = [
    "CancellationScores",
    "DomainGradients",
    "FisherProductProbe",
    "FisherProducts",
    "GradientProductProbe",
    "GradientProductTap",
    "GradientProducts",
    "GradientVarianceProbe",
    "HeldoutLossProbe",
    "Probe",
    "ReferenceLossProbe",
    "Statistic",
    "StatsCollector",
    "StepLosses",
    "domain_gradient_products",
    "fisher_products",
    "gradient_sketch",
    "gradient_variance",
    "last_parameters",
    "micro_batch_gradients",
    "per_example_gradients",
    "register_statistic",
    "statistics",
]

MODULES = [
    pytest.param(domainmix, TOP_LEVEL, id="domainmix"),
    pytest.param(domainmix.strategies, STRATEGIES, id="strategies"),
    pytest.param(domainmix.sampling, SAMPLING, id="sampling"),
    pytest.param(domainmix.stats, STATS, id="stats"),
    pytest.param(domainmix.partition, ["Partition", "load_partition", "repartition"], id="partition"),
]


@pytest.mark.parametrize(("module", "expected"), MODULES)
def test_all_is_pinned_and_sorted(module, expected) -> None:
    assert module.__all__ == expected
    assert sorted(module.__all__) == module.__all__


@pytest.mark.parametrize(("module", "expected"), MODULES)
def test_every_name_importable_and_documented(module, expected) -> None:
    assert module.__doc__ and module.__doc__.strip()
    for name in expected:
        obj = getattr(module, name)
        doc = inspect.getdoc(obj)
        assert doc and doc.strip(), f"{module.__name__}.{name} has no docstring"
        namespace: dict = {}
        exec(f"from {module.__name__} import {name}", namespace)  # the import form users write
        assert namespace[name] is obj


@pytest.mark.parametrize("name", [n for n in TOP_LEVEL if n != "strategies"])
def test_public_methods_documented(name) -> None:
    obj = getattr(domainmix, name)
    if not inspect.isclass(obj):
        return
    for attr, value in vars(obj).items():
        if attr.startswith("_") or not (
            inspect.isfunction(value) or isinstance(value, (property, classmethod))
        ):
            continue
        target = value.__func__ if isinstance(value, classmethod) else value
        assert inspect.getdoc(target), f"{name}.{attr} has no docstring"


def test_version_and_no_experiments_or_frameworks_import() -> None:
    import subprocess
    import sys

    assert isinstance(domainmix.__version__, str)
    lazy = (
        "domainmix.experiments",
        "domainmix.integrations.",
        "torchdata",
        "datasets",
        "accelerate",
        "lightning",
    )
    imported = "[m for m in sys.modules if m.startswith(lazy)]"
    code = f"import sys, domainmix, domainmix.integrations; lazy = {lazy}; assert not {imported}, {imported}"
    subprocess.run([sys.executable, "-c", code], check=True)
