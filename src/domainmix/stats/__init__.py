"""Per-domain statistics collected over update windows."""

from domainmix.stats._collector import StatsCollector as StatsCollector

__all__ = ["StatsCollector"]
assert sorted(__all__) == __all__
