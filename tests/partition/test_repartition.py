"""DIDS's repartition: planted gradient groups recovered exactly, names, digest, weights carried over,
the cache, the sampler's fingerprint, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import domainmix.partition
from domainmix.partition import Partition, load_partition, repartition
from domainmix.sampling import DomainBatchSampler


def planted(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], list[set[int]]]:
    """Two domains; "web" holds two direction groups at very different norms, "code" holds three."""
    rng = np.random.default_rng(seed)
    directions = np.eye(8)
    rows, truth, domains = [], [], {"web": [], "code": []}
    index = 0
    for source, groups in (("web", (0, 1)), ("code", (2, 3, 4))):
        for g in groups:
            members = set()
            for _ in range(6):
                norm = rng.choice([0.1, 10.0])  # loss level varies within a group
                rows.append(norm * (directions[g] + 0.05 * rng.standard_normal(8)))
                domains[source].append(index)
                members.add(index)
                index += 1
            truth.append(members)
    order = rng.permutation(index)  # interleave the examples in the dataset
    inverse = np.argsort(order)
    features = np.asarray(rows)[order]
    return (
        features,
        {s: np.sort(inverse[np.asarray(ix)]) for s, ix in domains.items()},
        [{int(inverse[i]) for i in m} for m in truth],
    )


def test_planted_groups_recovered_exactly_with_cosine() -> None:
    features, domains, truth = planted()
    part = repartition(features, domains, {"web": 2, "code": 3})
    assert part.names == ("web/0", "web/1", "code/0", "code/1", "code/2")
    assert part.parents == ("web", "web", "code", "code", "code")
    assert sorted(map(sorted, (set(m.tolist()) for m in part.members))) == sorted(map(sorted, truth))
    # Names follow the smallest member, not k-means' labels.
    firsts = [int(m[0]) for m in part.members]
    assert firsts[:2] == sorted(firsts[:2]) and firsts[2:] == sorted(firsts[2:])
    # Raw Euclidean (the reference code's) splits by norm instead of by direction here.
    raw = repartition(features, domains, {"web": 2, "code": 3}, metric="euclidean")
    assert {frozenset(m.tolist()) for m in raw.members} != {frozenset(m) for m in truth}


def test_digest_is_deterministic_and_content_sensitive() -> None:
    features, domains, _ = planted()
    a = repartition(features, domains, 2)
    b = repartition(features.copy(), {k: v.copy() for k, v in domains.items()}, 2)
    assert a.digest == b.digest and len(a.digest) == 64
    swapped = list(a.members)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert Partition.create(a.names, a.parents, swapped).digest != a.digest
    whole = repartition(features, domains, 1)  # DIDS without repartition: one group per source
    assert whole.names == ("web/0", "code/0") and whole.digest != a.digest


def test_carry_weights_split_by_group_size() -> None:
    part = Partition.create(["a/0", "a/1", "b/0"], ["a", "a", "b"], [[0, 1, 2], [3], [4, 5]])
    assert part.carry_weights({"a": 0.8, "b": 0.2}) == pytest.approx({"a/0": 0.6, "a/1": 0.2, "b/0": 0.2})
    assert part.sizes() == {"a/0": 3, "a/1": 1, "b/0": 2}
    with pytest.raises(ValueError, match="'weights' parameter of Partition.carry_weights"):
        part.carry_weights({"a": 1.0})
    with pytest.raises(ValueError, match="finite and non-negative"):
        part.carry_weights({"a": 1.0, "b": float("nan")})


def test_cached_to_disk_and_reloaded(tmp_path, monkeypatch) -> None:
    features, domains, _ = planted()
    path = tmp_path / "partition.json"
    made = repartition(features, domains, 2, cache=path)
    assert path.exists() and not list(tmp_path.glob(".*.tmp*"))  # written atomically

    def fail(*args, **kwargs):
        raise AssertionError("k-means must not run again")

    monkeypatch.setattr("domainmix.partition._repartition._cluster", fail)
    assert repartition(features, domains, 2, cache=path) == made
    with pytest.raises(AssertionError, match="must not run again"):  # other settings: recomputed
        repartition(features, domains, 2, seed=1, cache=path)
    plain = tmp_path / "plain.json"
    made.save(plain)
    assert load_partition(plain) == made
    tampered = json.loads(plain.read_text())
    tampered["members"][0], tampered["members"][1] = tampered["members"][1], tampered["members"][0]
    plain.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="content matching its digest"):
        load_partition(plain)
    del tampered["digest"]
    plain.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match=r"from_json must be a partition with names, parents"):
        load_partition(plain)
    # A cache cut short by a crash (or any unreadable one) is a miss: clustered again and replaced.
    monkeypatch.undo()
    path.write_text(path.read_text()[:50])
    assert repartition(features, domains, 2, cache=path) == made
    assert json.loads(path.read_text())["partition"]["digest"] == made.digest


def test_sampler_state_of_another_partition_refused() -> None:
    features, domains, _ = planted()
    two = repartition(features, domains, 2)
    three = repartition(features, domains, {"web": 2, "code": 3})
    sampler = DomainBatchSampler(two.domains(), 4, seed=0)
    next(iter(sampler))
    with pytest.raises(ValueError, match="state was saved with another configuration|saved"):
        DomainBatchSampler(three.domains(), 4, seed=0).load_state_dict(sampler.state_dict())
    # Same names, other sizes: refused through the fingerprint's sizes.
    moved = list(two.members)
    moved[0], moved[1] = np.append(moved[0], moved[1][:1]), moved[1][1:]
    other = Partition.create(two.names, two.parents, moved)
    with pytest.raises(ValueError, match="sizes"):
        DomainBatchSampler(other.domains(), 4, seed=0).load_state_dict(sampler.state_dict())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"clusters": 7}, r"'clusters' parameter of repartition must be at most the number of examples"),
        ({"clusters": 0}, r"'clusters' parameter of repartition must be an int in the range \[1, inf\)"),
        ({"nan": True}, r"'features' parameter of repartition must be finite \(no NaN or inf\)"),
        ({"metric": "manhattan"}, "'metric' parameter of repartition must be one of"),
        ({"overlap": True}, "'domains' parameter of repartition must be disjoint"),
        ({"clusters": {"web": 2}}, "'clusters' parameter of repartition must be an int or a mapping"),
        (
            {"float_index": True},
            r"'domains' parameter of repartition must be integer indices \(domain 'web'\)",
        ),
        ({"same_rows": True}, r"domain 'web' has 1 clusters, not the 2 asked"),  # sklearn warns too
    ],
)
@pytest.mark.filterwarnings("ignore:Number of distinct clusters:sklearn.exceptions.ConvergenceWarning")
def test_bad_inputs_rejected(change: dict, match: str) -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((12, 4))
    domains = {"web": np.arange(6), "code": np.arange(6, 12)}
    if change.pop("nan", False):
        features[3, 1] = np.nan
    if change.pop("overlap", False):
        domains["code"] = np.arange(5, 12)
    if change.pop("float_index", False):
        domains["web"] = [0.2, 1.9, 2.5, 3.7, 4.0, 5.0]  # would have been truncated to 0..5
    if change.pop("same_rows", False):
        features[:6] = features[0]  # k-means cannot make two clusters of one point
    kwargs = {"clusters": 2, **change}
    with pytest.raises(ValueError, match=match):
        repartition(features, domains, **kwargs)


def test_public_names() -> None:
    assert domainmix.partition.__all__ == ["Partition", "load_partition", "repartition"]
    for name in domainmix.partition.__all__:
        assert getattr(domainmix.partition, name).__doc__


def test_partition_members_must_be_non_negative_integers() -> None:
    with pytest.raises(
        ValueError, match="'members' parameter of Partition.create must be groups of non-negative"
    ):
        Partition.create(["a/0", "a/1"], ["a", "a"], [[-3, -1], [0, 1]])
    with pytest.raises(
        ValueError, match="'members' parameter of Partition.create must be groups of non-negative"
    ):
        Partition.create(["a/0"], ["a"], [[0.5, 1.5]])


_P = Partition.create(["a/0", "a/1", "b/0"], ["a", "a", "b"], [[0, 2], [1], [3, 4, 5]])
_X = np.random.default_rng(0).normal(size=(10, 4))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: Partition.create(["a/0", "a/1"], ["a"] * 3, [[0], [1]]),
            r"'parents' .* \(2 names\). Got '3 entries'",
        ),
        (lambda: Partition.create(["a/0"], [None], [[0]]), r"'parents' .* non-empty strings"),
        (lambda: Partition.from_json({"format": 2}), r"format 1. Got 'format 2'"),
        (lambda: Partition.from_json([1, 2]), r"a mapping \(a partition's JSON\). Got 'list'"),
        (lambda: _P.carry_weights({"a": "0.5", "b": 0.5}), r"'weights' .* finite and non-negative"),
        (lambda: _P.carry_weights({"a": True, "b": 0.5}), r"'weights' .* finite and non-negative"),
        (lambda: repartition(_X, {"a": [0, 1, 20], "b": [3]}, 1), r"\[0, 9\]. Got \"domain 'a' holds 20\""),
        (lambda: repartition(_X, {"a": [0, 1, 2], "b": [2, 3]}, 1), r"index 2 in \['a', 'b'\]"),
        (
            lambda: repartition(_X, {"a": [], "b": [3, 4]}, 1),
            r"at least one example each. Got \"'a' is empty\"",
        ),
        (lambda: repartition(_X * 1j, {"a": [0, 1], "b": [3, 4]}, 1), r"'features' .* real-valued"),
    ],
)
def test_bad_partition_arguments_are_named(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_bfloat16_features_and_a_file_that_is_not_json(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    features = torch.tensor(_X, dtype=torch.bfloat16)
    assert repartition(features, {"a": range(5), "b": range(5, 10)}, 2).num_groups == 4
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"load_partition: '.*p.json' is not a JSON file"):
        load_partition(path)
