"""Carve a per-domain estimation split that never reaches a training batch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple, cast

import numpy as np

from domainmix._validation import ConfigError, Interval, check_param, param_error
from domainmix.sampling._streams import as_domain_index, check_disjoint

__all__ = ["HeldoutSplit", "split_heldout"]

_SPLIT_TAG = 2  # seeds of the split permutations: (seed, 2, domain)


class HeldoutSplit(NamedTuple):
    """Training and estimation indices per domain, disjoint within every domain.

    Attributes:
        train: domain name -> int64 indices for the training sampler (in the order given).
        heldout: domain name -> int64 indices for estimation only (FGLS, ERMA statistics).
    """

    train: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]


def split_heldout(
    domains: Mapping[str, object],
    fraction: float | Mapping[str, float] | None = None,
    *,
    count: int | Mapping[str, int] | None = None,
    seed: int = 0,
) -> HeldoutSplit:
    """Split each domain's indices into a training part and a held-out estimation part.

    One-shot FGLS and ERMA estimate each domain's loss statistics on data the model has not been
    trained on (Salmani et al. 2025, arXiv:2511.06913, §3): residuals on training examples are biased
    low (by about 1 − d/n for a converged least squares fit), and residuals on the current batch are
    correlated with θ_t (``docs/design.md``, "Held-out estimates"). Give ``split.train`` to the
    :class:`DomainBatchSampler` and evaluate ``split.heldout`` for ``StatsCollector.observe(...,
    source="heldout")``; no held-out index can then appear in a training batch.

    The held-out part of domain i is ``round(fraction · n_i)`` (or ``count``) indices chosen uniformly
    at random by a permutation seeded with ``(seed, i)``, so the split is a pure function of its
    arguments and of each domain's position, and adding examples to one domain never reshuffles
    another. At least one example stays in training.

    Args:
        domains: domain name -> indices (the same forms :class:`DomainBatchSampler` accepts).
        fraction: held-out share in [0, 1), one for all domains or by name; give this or ``count``.
        count: held-out examples per domain (an int ≥ 0, or by name).
        seed: an int ≥ 0.

    Returns:
        A :class:`HeldoutSplit`, with domains in the order given.

    Raises:
        ValueError: naming the parameter, for bad fractions or counts, unknown or missing names, a
            domain that is empty or lists an index twice, or a split that would leave a domain without
            training examples (all problems at once).
    """
    caller = "split_heldout"
    if not isinstance(domains, Mapping) or not domains:
        raise param_error(caller, "domains", "a non-empty mapping of domain name -> indices", domains)
    if (fraction is None) == (count is None):
        raise param_error(caller, "fraction", "given exactly when 'count' is not", fraction)
    seed = check_param(caller, "seed", seed, Interval(int, 0, None))
    names = list(domains)
    errors: list[str] = []
    param, given = ("fraction", fraction) if count is None else ("count", count)
    per_domain = _by_name(caller, param, given, names, errors)
    train: dict[str, np.ndarray] = {}
    heldout: dict[str, np.ndarray] = {}
    indices = [as_domain_index(caller, name, domains[name]) for name in names]
    check_disjoint(caller, names, indices)  # else a held-out example could be another domain's training one
    for i, name in enumerate(names):
        index = np.asarray(indices[i], dtype=np.int64)
        n = len(index)
        value = per_domain.get(name)
        if value is None:
            continue
        if n == 0:  # (check_disjoint refused an index listed twice: it could land on both sides)
            errors.append(
                f"split_heldout: domain {name!r} has no examples; a held-out split needs at least one."
            )
            continue
        if count is None:
            if not Interval(float, 0.0, 1.0, closed="left").accepts(value):
                errors.append(
                    f"The 'fraction' parameter of {caller} must be a float in the range [0, 1) for domain "
                    f"{name!r}. Got {value!r} instead."
                )
                continue
            m = int(math.floor(cast(float, value) * n + 0.5))
        else:
            if not Interval(int, 0, None).accepts(value):
                errors.append(
                    f"The 'count' parameter of {caller} must be an int in the range [0, inf) for domain "
                    f"{name!r}. Got {value!r} instead."
                )
                continue
            m = int(cast(int, value))
        if m > 0 and m >= n:
            errors.append(
                f"split_heldout: domain {name!r} has {n} examples; holding out {m} would leave none to "
                "train on."
            )
            continue
        rng = np.random.default_rng([seed, _SPLIT_TAG, i])
        chosen = np.zeros(n, dtype=bool)
        chosen[rng.permutation(n)[:m]] = True
        train[name], heldout[name] = index[~chosen], index[chosen]
    if errors:
        raise ConfigError(errors)
    return HeldoutSplit(train, heldout)


def _by_name(
    caller: str, param: str, value: object, names: list[str], errors: list[str]
) -> dict[str, object]:
    if not isinstance(value, Mapping):
        return dict.fromkeys(names, value)
    unknown = sorted(set(value) - set(names))
    missing = [n for n in names if n not in value]
    if unknown or missing:
        errors.append(
            f"The {param!r} parameter of {caller} must give a value for exactly the domains {names}. "
            f"Got unknown {unknown} and missing {missing} instead."
        )
        return {}
    return dict(value)
