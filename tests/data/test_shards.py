"""Parquet shards: exact round trip, manifest validation, rank × worker split, mixing, epochs, resume."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from scfm.data.shards import ShardDataset, ShardWriter, read_manifest
from scfm.data.vocab import Vocabulary
from scfm.errors import ScfmError

N_GENES = 40


def make_cells(n, seed=0, prefix="c"):
    rng = np.random.default_rng(seed)
    csr = sp.random(n, N_GENES, density=0.2, format="csr", random_state=seed, dtype=np.float32)
    csr.data = rng.integers(1, 50, csr.nnz).astype(np.float32) + np.float32(0.25)  # not only integers
    ids = [f"{prefix}{i}" for i in range(n)]
    obs = pd.DataFrame(
        {"sample": pd.Categorical(["s1" if i % 3 else "s2" for i in range(n)]), "n_genes": csr.getnnz(axis=1)},
        index=ids,
    )
    return ids, csr, obs


def write_shards(path, n=103, chunk=17, seed=0, prefix="c", vocab=None, **kw):
    vocab = vocab or Vocabulary([f"G{i}" for i in range(N_GENES)])
    ids, csr, obs = make_cells(n, seed, prefix)
    kw.setdefault("cells_per_shard", 40)
    kw.setdefault("row_group_size", 8)
    with ShardWriter(path, vocab, obs_columns=["sample", "n_genes"], **kw) as writer:
        for start in range(0, n, chunk):
            writer.write(ids[start : start + chunk], csr[start : start + chunk], obs.iloc[start : start + chunk])
    return ids, csr, obs


def test_round_trip_exact_values_and_manifest(tmp_path):
    ids, csr, obs = write_shards(tmp_path / "s")
    manifest = read_manifest(tmp_path / "s")
    assert manifest["n_cells"] == 103 and manifest["n_genes"] == N_GENES
    assert [s["n_cells"] for s in manifest["shards"]] == [40, 40, 23]
    assert manifest["obs_columns"] == ["sample", "n_genes"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not list(tmp_path.glob(".*"))  # no temporary directory left
    row_groups = [pq.ParquetFile(tmp_path / "s" / s["path"]).metadata.row_group(0).num_rows for s in manifest["shards"]]
    assert row_groups == [8, 8, 8]
    table = pq.read_table(tmp_path / "s" / "part-00000.parquet")
    assert str(table.schema.field("gene_ids").type) == "list<element: int32>"
    assert str(table.schema.field("counts").type) == "list<element: float>"

    manifest_file = tmp_path / "s" / "manifest.json"  # a directory or its manifest file both work
    ds = ShardDataset(manifest_file, shuffle=False, loop=False, obs_columns=["sample", "n_genes"])
    cells = list(ds)
    assert [c["cell_id"] for c in cells] == ids
    for i, cell in enumerate(cells):
        row = csr[i]
        assert cell["gene_ids"].dtype == np.int32 and cell["counts"].dtype == np.float32
        np.testing.assert_array_equal(cell["gene_ids"], row.indices)  # ascending, as written
        np.testing.assert_array_equal(cell["counts"], row.data)
        assert cell["total_counts"] == pytest.approx(float(row.data.sum()), rel=1e-6)
        assert cell["sample"] == obs["sample"].iloc[i] and cell["n_genes"] == obs["n_genes"].iloc[i]


def test_writer_failure_leaves_nothing(tmp_path):
    vocab = Vocabulary([f"G{i}" for i in range(N_GENES)])
    ids, csr, obs = make_cells(10)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "s", vocab, cells_per_shard=4, row_group_size=2) as writer:
            writer.write(ids, csr, obs)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ScfmError, match="obs column\\(s\\) batch not found"):
        with ShardWriter(tmp_path / "s", vocab, obs_columns=["batch"]) as writer:
            writer.write(ids, csr, obs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("vocab_sha256"), "'vocab_sha256' is missing"),
        (lambda m: m.update(schema_version=99), "unsupported shard schema_version 99"),
        (lambda m: m.update(n_cells=5), "shards hold 103 cells but the manifest says n_cells=5"),
        (lambda m: m["shards"].append({"path": "part-09999.parquet", "n_cells": 0}), "does not exist"),
    ],
)
def test_read_manifest_validates(tmp_path, edit, message):
    write_shards(tmp_path / "s")
    file = tmp_path / "s" / "manifest.json"
    manifest = json.loads(file.read_text())
    edit(manifest)
    file.write_text(json.dumps(manifest))
    with pytest.raises(ScfmError, match=message) as info:
        read_manifest(tmp_path / "s")
    assert info.value.path == str(file)


def test_read_manifest_missing_and_not_json(tmp_path):
    with pytest.raises(ScfmError, match="no shard manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ScfmError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_mismatched_vocab_hashes_error(tmp_path):
    write_shards(tmp_path / "a")
    other = Vocabulary([f"H{i}" for i in range(N_GENES)])
    write_shards(tmp_path / "b", vocab=other)
    with pytest.raises(ScfmError, match="different vocabulary") as info:
        ShardDataset([tmp_path / "a", tmp_path / "b"])
    assert info.value.path == str(tmp_path / "b")


def consume(dataset, workers):
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return [cell["cell_id"] for cell in loader]


def test_ranks_times_workers_split_is_complete_and_disjoint(tmp_path):
    ids_a, _, _ = write_shards(tmp_path / "a", n=103, prefix="a")
    ids_b, _, _ = write_shards(tmp_path / "b", n=57, seed=1, prefix="b")
    seen = []
    for rank in range(2):
        ds = ShardDataset([tmp_path / "a", tmp_path / "b"], rank=rank, world_size=2, seed=3, mix_row_groups=3, loop=False)
        part = consume(ds, workers=2)
        assert len(part) > 0
        seen.append(part)
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything))  # disjoint
    assert sorted(everything) == sorted(ids_a + ids_b)  # complete


def test_shuffle_is_seeded_and_differs_by_epoch(tmp_path):
    ids, _, _ = write_shards(tmp_path / "s")

    def epoch_order(seed, epoch):
        ds = ShardDataset(tmp_path / "s", seed=seed, mix_row_groups=4, loop=False)
        ds.set_epoch(epoch)
        return [c["cell_id"] for c in ds]

    first = epoch_order(0, 0)
    assert sorted(first) == sorted(ids) and first != ids
    assert epoch_order(0, 0) == first
    assert epoch_order(0, 1) != first and sorted(epoch_order(0, 1)) == sorted(ids)
    assert epoch_order(1, 0) != first


def test_loop_runs_into_next_epoch(tmp_path):
    ids, _, _ = write_shards(tmp_path / "s")
    ds = ShardDataset(tmp_path / "s", seed=5, mix_row_groups=3)
    two_epochs = [c["cell_id"] for c in itertools.islice(iter(ds), 2 * len(ids))]
    assert sorted(two_epochs[: len(ids)]) == sorted(ids) == sorted(two_epochs[len(ids) :])
    assert two_epochs[: len(ids)] != two_epochs[len(ids) :]
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["position"] == len(ids)


@pytest.mark.parametrize("stop", [0, 1, 9, 10, 11, 55, 103, 150])
def test_resume_yields_exactly_the_remaining_sequence(tmp_path, stop):
    write_shards(tmp_path / "s")

    def fresh():  # rank 1 of 2 holds ~52 cells an epoch, in rounds of 5 pieces of 2 cells
        return ShardDataset(tmp_path / "s", seed=7, mix_row_groups=5, row_group_slices=4, rank=1, world_size=2)

    reference = [c["cell_id"] for c in itertools.islice(iter(fresh()), 200)]
    interrupted = fresh()
    it = iter(interrupted)
    head = [next(it)["cell_id"] for _ in range(stop)]
    state = json.loads(json.dumps(interrupted.state_dict()))  # as stored in a checkpoint
    resumed = fresh()
    resumed.load_state_dict(state)
    tail = [c["cell_id"] for c in itertools.islice(iter(resumed), 200 - stop)]
    assert head + tail == reference


def test_resume_through_a_dataloader_with_batches(tmp_path):
    write_shards(tmp_path / "s")
    identity = lambda batch: [c["cell_id"] for c in batch]  # noqa: E731
    reference_ds = ShardDataset(tmp_path / "s", seed=2, mix_row_groups=4)
    reference = list(itertools.islice(torch.utils.data.DataLoader(reference_ds, batch_size=6, collate_fn=identity), 30))
    ds = ShardDataset(tmp_path / "s", seed=2, mix_row_groups=4)
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=6, collate_fn=identity))
    head = [next(loader) for _ in range(11)]
    state = ds.state_dict()
    resumed = ShardDataset(tmp_path / "s", seed=2, mix_row_groups=4)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(torch.utils.data.DataLoader(resumed, batch_size=6, collate_fn=identity), 19))
    assert head + tail == reference


def test_state_from_another_configuration_is_refused(tmp_path):
    write_shards(tmp_path / "s")
    state = ShardDataset(tmp_path / "s", seed=1).state_dict()
    with pytest.raises(ScfmError, match="loader state is for seed=1"):
        ShardDataset(tmp_path / "s", seed=2).load_state_dict(state)
    with pytest.raises(ScfmError, match="loader state is for mix_row_groups=256"):
        ShardDataset(tmp_path / "s", seed=1, mix_row_groups=8).load_state_dict(state)


# ------------------------------------------------------------------------------------- mixing
ROW_GROUP = 1024
WINDOW = 1024


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """48 shard files ("samples") of 4 row groups of 1,024 cells: consecutive cells share a sample."""
    root = tmp_path_factory.mktemp("mixing")
    vocab = Vocabulary([f"G{i}" for i in range(8)])
    dirs = []
    for sample in range(12):
        n = 4 * 4 * ROW_GROUP  # 4 files of 4 row groups
        csr = sp.csr_matrix((np.ones(n, np.float32), np.zeros(n, np.int32), np.arange(n + 1)), shape=(n, 8))
        ids = [f"s{sample}_{i}" for i in range(n)]
        with ShardWriter(root / f"s{sample}", vocab, cells_per_shard=4 * ROW_GROUP, row_group_size=ROW_GROUP) as w:
            w.write(ids, csr)
        dirs.append(root / f"s{sample}")
    return dirs


def _sources(cell_id: str) -> tuple[str, int]:
    """(file, row group) of a cell written by ``many_shards``: 4,096 cells per file, 1,024 per row group."""
    sample, index = cell_id[1:].split("_")
    return f"{sample}/{int(index) // (4 * ROW_GROUP)}", int(index) // ROW_GROUP


def window_diversity(cell_ids: list[str]) -> tuple[float, float]:
    """Mean distinct (files, row groups) over consecutive windows of WINDOW cells."""
    files, groups = [], []
    for start in range(0, len(cell_ids) - WINDOW + 1, WINDOW):
        sources = [_sources(c) for c in cell_ids[start : start + WINDOW]]
        files.append(len({f for f, _ in sources}))
        groups.append(len({(f, g) for f, g in sources}))
    return float(np.mean(files)), float(np.mean(groups))


def uniform_expectation(n_units: int, draws: int = WINDOW) -> float:
    """Expected distinct units among ``draws`` cells of a uniform shuffle over equally large units."""
    return n_units * (1 - (1 - 1 / n_units) ** draws)


def test_windows_mix_many_row_groups_and_files(many_shards):
    """A 1,024-cell window: what a uniform shuffle of all cells holds, what the default mixing holds."""
    n_files, n_groups = 12 * 4, 12 * 4 * 4

    def diversity(**mixing):
        return window_diversity([c["cell_id"] for c in ShardDataset(many_shards, seed=0, loop=False, **mixing)])

    files, groups = diversity()  # the defaults: rounds of 256 pieces, a quarter row group each
    ideal_files, ideal_groups = uniform_expectation(n_files), uniform_expectation(n_groups)  # ~48, ~191
    assert diversity(mix_row_groups=1, row_group_slices=1)[1] < 2.1  # one row group, like a 1,024-cell buffer
    assert files > 0.95 * ideal_files and 0.7 * ideal_groups < groups <= ideal_groups
    assert diversity(mix_row_groups=64, row_group_slices=4)[1] < 0.5 * groups  # a quarter of the memory


def test_memory_is_one_round(many_shards):
    ds = ShardDataset(many_shards, seed=0, mix_row_groups=32, row_group_slices=4, loop=False)
    assert sum(1 for _ in ds) == 12 * 16 * ROW_GROUP
    assert ds.peak_cells_held == 32 * ROW_GROUP // 4  # one round of 32 quarter row groups
