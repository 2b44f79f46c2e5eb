"""Regroup each domain's examples by their gradient features: DIDS's repartition, a data-preparation step.

Shi et al. (2025), arXiv:2504.13227, §3 ("gradient-based domain repartition"): examples of one source
that move the model alike belong together, so each source is split by k-means on its examples'
gradient sketches (:func:`~domainmix.stats.gradient_sketch`) and the clusters become the domains.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor

from domainmix._atomic import atomic_write_json
from domainmix._validation import Interval, Options, check_param, param_error
from domainmix.sampling._streams import as_domain_index

Metric = Literal["cosine", "euclidean"]
_FORMAT = 1  # version of the cache file's layout


@dataclass(frozen=True, eq=False)
class Partition:
    """Groups of example indices, each inside one source domain, with deterministic names and a digest.

    Attributes:
        names: group names ``"<source>/<cluster>"``, clusters numbered 0, 1, … in the order of their
            smallest example index (so the names do not depend on k-means' label order).
        parents: the source domain of each group.
        members: the sorted example indices of each group (int64 arrays).
        digest: SHA-256 (hex) of the names, parents and members: two partitions with the same digest
            group the same examples under the same names.
    """

    names: tuple[str, ...]
    parents: tuple[str, ...]
    members: tuple[np.ndarray, ...]
    digest: str

    @classmethod
    def create(
        cls, names: Sequence[str], parents: Sequence[str], members: Sequence[Sequence[int] | np.ndarray]
    ) -> Partition:
        """Build a partition and compute its digest.

        Raises:
            ValueError: for mismatched lengths, duplicate names, empty groups or a shared example.
        """
        caller = "Partition.create"
        if not names:
            raise param_error(caller, "names", "a non-empty sequence of group names", names)
        for name, given in (("parents", parents), ("members", members)):
            if len(given) != len(names):
                wanted = f"one entry per name ({len(names)} names)"
                raise param_error(caller, name, wanted, f"{len(given)} entries")
        for name, given in (("names", names), ("parents", parents)):
            if not all(isinstance(x, str) and x for x in given):
                raise param_error(caller, name, "non-empty strings", list(given))
        if len(set(names)) != len(names):
            raise param_error(caller, "names", "unique group names", list(names))
        raw = [np.asarray(m).reshape(-1) for m in members]
        if any(a.size and (a.dtype.kind not in "iu" or int(a.min()) < 0) for a in raw):
            raise param_error(
                caller, "members", "groups of non-negative integer indices", [str(a.dtype) for a in raw]
            )
        arrays = tuple(np.sort(a.astype(np.int64)) for a in raw)
        if any(a.size == 0 for a in arrays):
            raise param_error(caller, "members", "non-empty groups", [a.size for a in arrays])
        joined = np.concatenate(arrays)
        if np.unique(joined).size != joined.size:
            raise param_error(
                caller, "members", "disjoint groups (an example is in two)", "overlapping groups"
            )
        return cls(tuple(names), tuple(parents), arrays, _digest(names, parents, arrays))

    def __eq__(self, other: object) -> bool:
        # The digest covers names, parents and members; arrays have no single truth value.
        return isinstance(other, Partition) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    @property
    def num_groups(self) -> int:
        """The number of groups."""
        return len(self.names)

    def sizes(self) -> dict[str, int]:
        """Examples per group, by name."""
        return {n: int(m.size) for n, m in zip(self.names, self.members, strict=True)}

    def domains(self) -> dict[str, np.ndarray]:
        """Group name → example indices, the ``domains`` argument of a ``DomainBatchSampler``.

        The sampler's fingerprint holds the domain names and sizes, so a sampler state saved under a
        partition with other groups or other group sizes refuses to load; a partition with the same
        names and sizes but other members is not detected by the sampler: compare :attr:`digest`
        (``dids(partition=...)`` does).
        """
        return {n: m.copy() for n, m in zip(self.names, self.members, strict=True)}

    def carry_weights(self, weights: Mapping[str, float]) -> dict[str, float]:
        """Sampling weights of the source domains carried over to the groups.

        A source's weight is split over its groups in proportion to their sizes, so the groups of one
        source together keep the source's mass, and sampling inside the source is unchanged.

        Args:
            weights: source domain name → weight, for every parent of this partition.

        Raises:
            ValueError: when a parent has no weight, or a weight is negative or not finite.
        """
        missing = sorted(set(self.parents) - set(weights))
        if missing:
            sources = sorted(set(self.parents))
            raise param_error(
                "Partition.carry_weights", "weights", f"a weight for every source {sources}", missing
            )
        bad = {
            k: v
            for k, v in weights.items()
            if isinstance(v, bool) or not isinstance(v, Real) or not (math.isfinite(v) and v >= 0)
        }
        if bad:
            raise param_error("Partition.carry_weights", "weights", "finite and non-negative", bad)
        totals: dict[str, int] = {}
        for parent, m in zip(self.parents, self.members, strict=True):
            totals[parent] = totals.get(parent, 0) + int(m.size)
        return {
            n: float(weights[p]) * m.size / totals[p]
            for n, p, m in zip(self.names, self.parents, self.members, strict=True)
        }

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (``{"format", "names", "parents", "members", "digest"}``)."""
        return {
            "format": _FORMAT,
            "names": list(self.names),
            "parents": list(self.parents),
            "members": [m.tolist() for m in self.members],
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Partition:
        """Inverse of :meth:`to_json`; the digest is recomputed and must match.

        Raises:
            ValueError: for another layout or a digest that does not match the content.
        """
        if not isinstance(data, Mapping):
            raise param_error(
                "Partition.from_json", "data", "a mapping (a partition's JSON)", type(data).__name__
            )
        if data.get("format") != _FORMAT:
            got = f"format {data.get('format')!r}"
            raise param_error("Partition.from_json", "data", f"a partition of format {_FORMAT}", got)
        missing = [key for key in ("names", "parents", "members", "digest") if key not in data]
        if missing:
            raise param_error(
                "Partition.from_json",
                "data",
                "a partition with names, parents, members and digest",
                f"missing {missing}",
            )
        made = cls.create(data["names"], data["parents"], data["members"])
        if made.digest != data.get("digest"):
            raise param_error(
                "Partition.from_json",
                "data",
                f"content matching its digest {made.digest}",
                data.get("digest"),
            )
        return made

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the partition as JSON, atomically."""
        atomic_write_json(path, self.to_json())


def load_partition(path: str | os.PathLike[str]) -> Partition:
    """Read a partition written by :meth:`Partition.save` (the digest is checked).

    Raises:
        ValueError: naming the file, when it is not JSON or not a partition.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"load_partition: {str(path)!r} is not a JSON file ({error}).") from None
    return Partition.from_json(data)


def repartition(
    features: np.ndarray | Tensor,
    domains: Mapping[str, Sequence[int] | range | np.ndarray | Tensor],
    clusters: int | Mapping[str, int],
    *,
    metric: Metric = "cosine",
    seed: int = 0,
    n_init: int = 10,
    cache: str | os.PathLike[str] | None = None,
) -> Partition:
    r"""Split every domain into clusters of its examples' features with k-means.

    ``features[x]`` is example x's feature row (a gradient sketch from
    :func:`~domainmix.stats.gradient_sketch`); ``domains`` maps each source domain to its example
    indices (rows of ``features``), as a ``DomainBatchSampler`` takes them. Inside each domain,
    ``sklearn.cluster.KMeans(n_clusters, n_init=n_init, random_state=seed)`` runs on

    * ``"cosine"`` (default): the L2-normalised rows, so clusters follow the direction of the
      gradients (what the examples teach) rather than their norm (how large their loss is);
    * ``"euclidean"``: the raw rows, as the reference code does.

    A domain with one cluster is kept whole (``"<source>/0"``): DIDS without repartition.

    Args:
        features: (N, d) finite features.
        domains: source name → example indices.
        clusters: clusters per domain (an int ≥ 1), or a mapping source → int.
        metric: ``"cosine"`` or ``"euclidean"``.
        seed: k-means' ``random_state``, an int ≥ 0.
        n_init: k-means restarts, ≥ 1 (reference: 10).
        cache: optional JSON file: when it holds a partition made from the same inputs and settings it is
            loaded instead of clustering again; otherwise the new partition is written there (atomically).

    Returns:
        The :class:`Partition`.

    Raises:
        ValueError: for NaN or infinite features, more clusters than a domain's examples, indices out of
            range or shared between domains, or another bad argument.
        ImportError: when scikit-learn is missing (``pip install 'domainmix[experiments]'``).
    """
    caller = "repartition"
    x = _check_features(caller, features)
    check_param(caller, "metric", metric, Options(("cosine", "euclidean")))
    seed = check_param(caller, "seed", seed, Interval(int, 0, None))
    n_init = check_param(caller, "n_init", n_init, Interval(int, 1, None))
    index = _check_domains(caller, domains, x.shape[0])
    counts = _check_clusters(caller, clusters, index)
    key = _cache_key(x, index, counts, metric, seed, n_init)
    if cache is not None and Path(cache).exists():
        try:  # an unreadable or foreign cache is a miss: it is clustered again and replaced
            saved = json.loads(Path(cache).read_text(encoding="utf-8"))
            if isinstance(saved, Mapping) and saved.get("key") == key:
                return Partition.from_json(saved["partition"])
        except (OSError, ValueError, KeyError):  # JSONDecodeError is a ValueError
            pass
    names: list[str] = []
    parents: list[str] = []
    members: list[np.ndarray] = []
    for source, rows in index.items():
        labels = _cluster(x[rows], counts[source], metric, seed, n_init)
        found = np.unique(labels)
        if found.size < counts[source]:  # k-means left clusters empty: fewer distinct feature rows than k
            raise ValueError(
                f"repartition: domain {source!r} has {found.size} clusters, not the {counts[source]} asked: "
                f"its features have fewer distinct directions than that. Ask for at most {found.size}."
            )
        groups = [np.sort(rows[labels == c]) for c in found]
        groups.sort(key=lambda g: int(g[0]))
        for c, group in enumerate(groups):
            names.append(f"{source}/{c}")
            parents.append(source)
            members.append(group)
    made = Partition.create(names, parents, members)
    if cache is not None:
        atomic_write_json(cache, {"key": key, "partition": made.to_json()})
    return made


def _cluster(x: np.ndarray, k: int, metric: str, seed: int, n_init: int) -> np.ndarray:
    """k-means labels of the rows of ``x`` (all 0 for k = 1)."""
    if k == 1:
        return np.zeros(x.shape[0], dtype=np.int64)
    try:
        from sklearn.cluster import KMeans  # type: ignore[import-untyped]
    except ImportError as error:  # pragma: no cover - scikit-learn is in the test extra
        raise ImportError("repartition needs scikit-learn: pip install 'domainmix[experiments]'.") from error
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    model = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    return np.asarray(model.fit_predict(x), dtype=np.int64)


def _check_features(caller: str, features: np.ndarray | Tensor) -> np.ndarray:
    # in float64 first: numpy has no bfloat16
    x = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.number) or x.dtype.kind == "c":
        raise param_error(
            caller, "features", "a real-valued (N, d) array", f"shape {x.shape}, dtype {x.dtype}"
        )
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise param_error(
            caller, "features", "finite (no NaN or inf)", f"non-finite rows {bad[:10].tolist()}"
        )
    return x.astype(np.float64)


def _check_domains(
    caller: str, domains: Mapping[str, Sequence[int] | range | np.ndarray | Tensor], n: int
) -> dict[str, np.ndarray]:
    if not isinstance(domains, Mapping) or not domains:
        raise param_error(
            caller, "domains", "a non-empty mapping from domain name to example indices", domains
        )
    index: dict[str, np.ndarray] = {}
    for name, rows in domains.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise param_error(caller, "domains", "keyed by non-empty names without '/'", name)
        values = np.asarray(as_domain_index(caller, name, rows), dtype=np.int64)  # ints, as a sampler takes
        if values.size and (values.min() < 0 or values.max() >= n):
            outside = values[(values < 0) | (values >= n)]
            raise param_error(
                caller, "domains", f"indices of feature rows in [0, {n - 1}]",
                f"domain {name!r} holds {int(outside[0])}",
            )  # fmt: skip
        index[name] = values
    joined = np.concatenate(list(index.values()))
    values, counts = np.unique(joined, return_counts=True)
    if values.size != joined.size:
        twice = int(values[np.argmax(counts > 1)])
        holders = [name for name, rows in index.items() if twice in rows]
        got = f"index {twice} in {holders}" + (" twice" if len(holders) == 1 else "")
        raise param_error(caller, "domains", "disjoint index sets", got)
    return index


def _check_clusters(
    caller: str, clusters: int | Mapping[str, int], index: Mapping[str, np.ndarray]
) -> dict[str, int]:
    wanted = clusters if isinstance(clusters, Mapping) else {name: clusters for name in index}
    if set(wanted) != set(index):
        raise param_error(caller, "clusters", f"an int or a mapping over the domains {list(index)}", clusters)
    counts = {}
    for name, rows in index.items():
        k = check_param(caller, "clusters", wanted[name], Interval(int, 1, None))
        if rows.size == 0:
            raise param_error(
                caller, "domains", "domains with at least one example each", f"{name!r} is empty"
            )
        if k > rows.size:
            raise param_error(
                caller, "clusters", f"at most the number of examples of {name!r} ({rows.size})", k
            )
        counts[name] = k
    return counts


def _digest(names: Sequence[str], parents: Sequence[str], members: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(names), list(parents)]).encode())
    for m in members:
        h.update(np.int64(m.size).tobytes())
        h.update(np.ascontiguousarray(m, dtype="<i8").tobytes())
    return h.hexdigest()


def _cache_key(
    x: np.ndarray,
    index: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    metric: str,
    seed: int,
    n_init: int,
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_FORMAT, list(x.shape), metric, seed, n_init, dict(counts), list(index)]).encode())
    h.update(np.ascontiguousarray(x, dtype="<f8").tobytes())
    for rows in index.values():
        h.update(np.int64(rows.size).tobytes())
        h.update(np.ascontiguousarray(rows, dtype="<i8").tobytes())
    return h.hexdigest()
