"""Per-domain statistics over update windows, and gradient statistics for Variance-Aware sampling and DoGE."""

from domainmix.stats._cancellation import CancellationScores as CancellationScores
from domainmix.stats._collector import StatsCollector as StatsCollector
from domainmix.stats._gradients import DomainGradients as DomainGradients
from domainmix.stats._gradients import gradient_variance as gradient_variance
from domainmix.stats._gradients import micro_batch_gradients as micro_batch_gradients
from domainmix.stats._gradients import per_example_gradients as per_example_gradients
from domainmix.stats._products import GradientProducts as GradientProducts
from domainmix.stats._products import domain_gradient_products as domain_gradient_products
from domainmix.stats._tap import GradientProductTap as GradientProductTap

__all__ = [
    "CancellationScores",
    "DomainGradients",
    "GradientProductTap",
    "GradientProducts",
    "StatsCollector",
    "domain_gradient_products",
    "gradient_variance",
    "micro_batch_gradients",
    "per_example_gradients",
]
assert sorted(__all__) == __all__
