"""Per-domain loss reduction and importance-corrected loss weighting."""

from domainmix.losses._aggregate import DomainLosses as DomainLosses
from domainmix.losses._aggregate import domain_losses as domain_losses
from domainmix.losses._aggregate import weighted_loss as weighted_loss

__all__ = ["DomainLosses", "domain_losses", "weighted_loss"]
assert sorted(__all__) == __all__
