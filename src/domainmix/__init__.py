"""domainmix: sampling weights and loss weights for multi-domain training, in any PyTorch loop.

Two decisions, kept apart (Salmani et al. 2025): the **sampling distribution** q (how often each domain
is drawn) and the **objective mixture** α (how much each domain's loss counts). A strategy moves them;
the :class:`WeightingController` runs it on a schedule, pushes q to the :class:`DomainBatchSampler` and
hands the loop the loss multipliers α/q for :func:`weighted_loss`.
"""

from domainmix import strategies as strategies
from domainmix.controller import WeightingController as WeightingController
from domainmix.losses import DomainLosses as DomainLosses
from domainmix.losses import domain_losses as domain_losses
from domainmix.losses import weighted_loss as weighted_loss
from domainmix.stats import StatsCollector as StatsCollector
from domainmix.strategies import Strategy as Strategy
from domainmix.types import DomainStats as DomainStats
from domainmix.types import DomainWeights as DomainWeights

__version__ = "0.1.0"

__all__ = [
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
assert sorted(__all__) == __all__
