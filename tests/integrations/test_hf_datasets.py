"""Hugging Face datasets: domains from a column (map-style) and streaming sources with exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("datasets")

import torch  # noqa: E402
from datasets import ClassLabel, Dataset, Features, Value  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from domainmix import domain_losses  # noqa: E402
from domainmix.integrations.hf_datasets import domains_from_column, streaming_sources  # noqa: E402
from domainmix.sampling import DomainBatchSampler, DomainMixingIterable  # noqa: E402


def table() -> Dataset:
    source = ["web", "code", "web", "books", "code", "web", "web", "books"]
    return Dataset.from_dict({"x": [float(i) for i in range(8)], "source": source})


def test_string_column_groups_rows_and_ids_match_the_sampler_order() -> None:
    ds, domains = domains_from_column(table(), "source")
    assert list(domains) == ["books", "code", "web"]
    assert {n: ix.tolist() for n, ix in domains.items()} == {
        "books": [3, 7], "code": [1, 4], "web": [0, 2, 5, 6],
    }  # fmt: skip
    assert ds["domain_id"] == [2, 1, 2, 0, 1, 2, 2, 0]
    # end to end: the sampler's batches, the torch-formatted columns, per-domain losses
    sampler = DomainBatchSampler(domains, 4, mode="stratified", num_batches=3)
    loader = DataLoader(ds.with_format("torch", columns=["x", "domain_id"]), batch_sampler=sampler)
    for batch in loader:
        losses = domain_losses(batch["x"], batch["domain_id"], len(domains))
        assert losses.count.tolist() == sampler.batch_counts.tolist()
        assert torch.equal(batch["domain_id"], torch.tensor([ds["domain_id"][int(x)] for x in batch["x"]]))


@pytest.mark.parametrize(
    "reorder",
    [
        lambda ds: ds.shuffle(seed=1),
        lambda ds: ds.select([7, 1, 4, 0]),
        lambda ds: ds.filter(lambda row: row["source"] != "code"),
        lambda ds: ds.train_test_split(test_size=3, seed=0)["train"],
    ],
    ids=["shuffle", "select", "filter", "split"],
)
def test_rows_are_read_through_the_index_mapping(reorder) -> None:
    # shuffle / select / filter / splits keep the stored table and add an index mapping over it
    ds = reorder(table())
    out, domains = domains_from_column(ds, "source")
    assert sum(len(ix) for ix in domains.values()) == len(ds)
    for name, ix in domains.items():
        assert [ds[int(i)]["source"] for i in ix] == [name] * len(ix)
    assert [list(domains)[i] for i in out["domain_id"]] == list(ds["source"])


def test_class_label_column_keeps_label_order() -> None:
    features = Features({"x": Value("int64"), "label": ClassLabel(names=["clean", "noisy", "unused"])})
    ds = Dataset.from_dict({"x": [0, 1, 2], "label": [1, 0, 1]}, features=features)
    ds, domains = domains_from_column(ds, "label", id_column="d")
    assert {n: ix.tolist() for n, ix in domains.items()} == {"clean": [1], "noisy": [0, 2], "unused": []}
    assert ds["d"] == [1, 0, 1]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"column": "nope"}, "column"), ({"column": "source", "id_column": "x"}, "id_column")],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}' parameter of domains_from_column"):
        domains_from_column(table(), **kwargs)


def streams(num_shards: int = 1) -> dict:
    sizes = {"web": 7, "code": 11, "books": 5}
    return {
        n: Dataset.from_dict({"text": [f"{n}-{i}" for i in range(s)]}).to_iterable_dataset(
            num_shards=num_shards
        )
        for n, s in sizes.items()
    }


def take(mixer: DomainMixingIterable, n: int) -> list[str]:
    return [item["text"] for _, (_, item) in zip(range(n), mixer, strict=False)]


@pytest.mark.parametrize("save_at", [3, 10, 26])
def test_streaming_resume_is_exact_across_pass_boundaries(save_at: int) -> None:
    def make() -> DomainMixingIterable:
        return DomainMixingIterable(streaming_sources(streams()), [0.5, 0.3, 0.2], batch_size=4, seed=1)

    full = take(make(), 80)  # every source begins several new passes
    assert full.count("books-0") >= 3
    first = make()
    assert take(first, save_at) == full[:save_at]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert take(resumed, 80 - save_at) == full[save_at:]


def test_streaming_sources_shard_by_rank() -> None:
    shards = [streaming_sources(streams(num_shards=2), rank=r, world_size=2) for r in (0, 1)]
    for name in ("web", "code", "books"):
        texts = [[row["text"] for row in s[name]] for s in shards]
        assert not set(texts[0]) & set(texts[1])
        assert len(texts[0]) + len(texts[1]) == {"web": 7, "code": 11, "books": 5}[name]
    with pytest.raises(ValueError, match="'sources' parameter of streaming_sources"):
        streaming_sources({"web": [1, 2]}, rank=0, world_size=2)


def test_workers_read_their_own_shards() -> None:
    mixer = DomainMixingIterable(streams(num_shards=2), batch_size=4, num_batches=6)
    loader = DataLoader(mixer, batch_size=4, num_workers=2, collate_fn=list)
    got = [[item["text"] for _, item in batch] for batch in loader]
    assert len(got) == 6  # num_batches counts the rank's batches, dealt to its workers
    # Worker w follows the plan of rank w of 2 on shard w of every source (alternating, 3 batches each).
    per_worker = []
    for w in (0, 1):
        alone = DomainMixingIterable(streaming_sources(streams(num_shards=2), rank=w, world_size=2),
                                     batch_size=4, num_batches=3, rank=w, world_size=2)  # fmt: skip
        items = [item["text"] for _, item in alone]
        per_worker.append([items[j : j + 4] for j in range(0, 12, 4)])
    assert got == [per_worker[b % 2][b // 2] for b in range(6)]
    assert len({t for batch in got for t in batch if t.startswith("web")}) == 7  # both web shards read


def test_fewer_shards_than_workers_is_refused() -> None:
    mixer = DomainMixingIterable(streams(num_shards=1), batch_size=2, num_batches=2)
    with pytest.raises(ValueError, match="num_shards"):
        list(DataLoader(mixer, batch_size=2, num_workers=2, collate_fn=list))


def test_the_streaming_example_trains_on_stratified_batches(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "examples" / "hf_streaming_train.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--steps", "30"], capture_output=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert len(result["domains"]) == 30
    # two workers, each a rank of 2 in the plan: every pair of consecutive batches is one global batch
    for a, b in zip(result["domains"][::2], result["domains"][1::2], strict=True):
        assert sorted(Counter(a + b).values()) == [10, 11, 11]
    assert result["mixture"][1] > result["mixture"][0]  # the noisiest domain's loss weight grew
