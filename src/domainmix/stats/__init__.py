"""Per-domain statistics: their table, the collector of update windows, the probes that observe them.

Gradient statistics for Variance-Aware sampling, DoGE and DIDS live here too. The statistics a strategy can
read are declared once (:class:`Statistic`, :func:`statistics`, :func:`register_statistic`); a probe
(:class:`Probe` and its subclasses) observes the statistics of its sources into a
:class:`StatsCollector`.
"""

from domainmix._statistics import Statistic as Statistic
from domainmix._statistics import register_statistic as register_statistic
from domainmix._statistics import statistics as statistics
from domainmix.stats._cancellation import CancellationScores as CancellationScores
from domainmix.stats._collector import StatsCollector as StatsCollector
from domainmix.stats._fisher import FisherProductProbe as FisherProductProbe
from domainmix.stats._fisher import FisherProducts as FisherProducts
from domainmix.stats._fisher import fisher_products as fisher_products
from domainmix.stats._gradients import DomainGradients as DomainGradients
from domainmix.stats._gradients import gradient_variance as gradient_variance
from domainmix.stats._gradients import micro_batch_gradients as micro_batch_gradients
from domainmix.stats._gradients import per_example_gradients as per_example_gradients
from domainmix.stats._probes import GradientProductProbe as GradientProductProbe
from domainmix.stats._probes import GradientVarianceProbe as GradientVarianceProbe
from domainmix.stats._probes import HeldoutLossProbe as HeldoutLossProbe
from domainmix.stats._probes import Probe as Probe
from domainmix.stats._probes import ReferenceLossProbe as ReferenceLossProbe
from domainmix.stats._probes import StepLosses as StepLosses
from domainmix.stats._products import GradientProducts as GradientProducts
from domainmix.stats._products import domain_gradient_products as domain_gradient_products
from domainmix.stats._sketch import gradient_sketch as gradient_sketch
from domainmix.stats._sketch import last_parameters as last_parameters
from domainmix.stats._tap import GradientProductTap as GradientProductTap

__all__ = [
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
assert sorted(__all__) == __all__
