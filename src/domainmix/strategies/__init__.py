"""Weighting strategies: ``Strategy(init, update)`` factories, their primitives and combinators."""

from domainmix.strategies._base import ChainState as ChainState
from domainmix.strategies._base import CombineState as CombineState
from domainmix.strategies._base import EmptyState as EmptyState
from domainmix.strategies._base import Strategy as Strategy
from domainmix.strategies._base import chain as chain
from domainmix.strategies._base import combine as combine
from domainmix.strategies._base import make_strategy as make_strategy
from domainmix.strategies._base import stateless as stateless
from domainmix.strategies._dids import DidsState as DidsState
from domainmix.strategies._dids import dids as dids
from domainmix.strategies._doge import doge as doge
from domainmix.strategies._doremi import doremi as doremi
from domainmix.strategies._erma import ErmaState as ErmaState
from domainmix.strategies._erma import erma as erma
from domainmix.strategies._fgls import FglsState as FglsState
from domainmix.strategies._fgls import fgls as fgls
from domainmix.strategies._fgls import oracle_gls as oracle_gls
from domainmix.strategies._primitives import AverageState as AverageState
from domainmix.strategies._primitives import EmaState as EmaState
from domainmix.strategies._primitives import ExponentiatedGradientState as ExponentiatedGradientState
from domainmix.strategies._primitives import delay as delay
from domainmix.strategies._primitives import ema as ema
from domainmix.strategies._primitives import exponentiated_gradient as exponentiated_gradient
from domainmix.strategies._primitives import floor as floor
from domainmix.strategies._primitives import follow_mixture as follow_mixture
from domainmix.strategies._primitives import mix_uniform as mix_uniform
from domainmix.strategies._primitives import normalize as normalize
from domainmix.strategies._primitives import track_average as track_average
from domainmix.strategies._static import ScheduleState as ScheduleState
from domainmix.strategies._static import StaticState as StaticState
from domainmix.strategies._static import fixed as fixed
from domainmix.strategies._static import proportional as proportional
from domainmix.strategies._static import schedule as schedule
from domainmix.strategies._static import temperature as temperature
from domainmix.strategies._static import uniform as uniform
from domainmix.strategies._variance_aware import variance_aware as variance_aware

__all__ = [
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
assert sorted(__all__) == __all__
