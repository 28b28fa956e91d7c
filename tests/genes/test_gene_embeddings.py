"""Streamed mean gene embeddings equal the brute-force mean of every cell's decoder embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scfm.model.config import ModelConfig
from scfm.model.xtrimogene import XTrimoGene
from scfm.tasks.embed import H5adRows, gene_embeddings
from scfm.tasks.genes import embeddings as E


@pytest.fixture(scope="module")
def small_model_and_counts():
    config = ModelConfig.preset("tiny", n_genes=40)
    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.uniform(0.05, 2.0, size=40), size=(23, 40)).astype(np.float32)
    counts[:, 0] += 1  # every cell has a count
    return XTrimoGene(config, seed=1), sp.csr_matrix(counts)


def test_streamed_means_match_the_brute_force_mean(small_model_and_counts):
    model, counts = small_model_and_counts
    every_cell = gene_embeddings(model, counts, batch_size=4)  # cells x genes x dims, the whole tensor
    genes = np.array([0, 3, 7, 8, 20, 39])
    groups = np.array([0, 1, 2, -1] * 5 + [1, 1, 0])
    means = E.mean_gene_embeddings(model, counts, genes, groups=groups, n_groups=3, batch_size=3, chunk_size=5)
    np.testing.assert_allclose(means.overall, every_cell[:, genes].mean(axis=0), rtol=1e-5, atol=1e-6)
    for code in range(3):
        expected = every_cell[groups == code][:, genes].mean(axis=0)
        np.testing.assert_allclose(means.per_group[code], expected, rtol=1e-5, atol=1e-6)
    assert means.n_cells == 23 and means.n_cells_per_group.tolist() == [6, 7, 5]


def test_batch_size_does_not_change_the_result(small_model_and_counts):
    model, counts = small_model_and_counts
    genes = np.arange(40)
    one = E.mean_gene_embeddings(model, counts, genes, batch_size=1).overall
    many = E.mean_gene_embeddings(model, counts, genes, batch_size=64).overall
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-6)


def test_a_group_without_cells_is_nan_not_zero(small_model_and_counts):
    model, counts = small_model_and_counts
    means = E.mean_gene_embeddings(model, counts[:4], np.arange(5), groups=np.zeros(4, int), n_groups=2)
    assert np.isfinite(means.per_group[0]).all() and np.isnan(means.per_group[1]).all()


def test_gene_statistics_match_a_dense_computation():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(0.7, size=(57, 11)).astype(np.float32) + np.eye(57, 11, dtype=np.float32))
    stats = E.gene_statistics(counts, chunk_size=10)
    dense = counts.toarray().astype(np.float64)
    normalised = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    assert stats.n_cells == 57
    np.testing.assert_array_equal(stats.n_cells_detected, (dense > 0).sum(axis=0))
    np.testing.assert_allclose(stats.mean_expression, normalised.mean(axis=0), rtol=1e-6)
    stats.n_cells_detected[:] = np.arange(11)
    assert E.select_genes(stats, 8).tolist() == [8, 9, 10]
    assert len(E.select_genes(stats, 0)) == 11


def test_sample_cells_caps_each_group_and_is_seeded():
    groups = np.array([0] * 50 + [1] * 5 + [-1] * 30)
    chosen = E.sample_cells(groups, 10, seed=1)
    assert np.all(np.diff(chosen) > 0)
    assert np.bincount(groups[chosen] + 1).tolist() == [10, 10, 5]
    assert np.array_equal(chosen, E.sample_cells(groups, 10, seed=1))
    assert not np.array_equal(chosen, E.sample_cells(groups, 10, seed=2))
    assert len(E.sample_cells(groups, None)) == len(groups)


@pytest.mark.parametrize("max_span", [1, 3, 4096])
def test_row_subset_reads_the_chosen_rows_from_a_file(tmp_path, max_span):
    import anndata as ad
    import h5py

    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(1.0, size=(30, 6)).astype(np.float32))
    ad.AnnData(X=counts).write_h5ad(tmp_path / "x.h5ad")
    index = np.array([1, 2, 9, 17, 29])
    with h5py.File(tmp_path / "x.h5ad") as handle:
        subset = E.RowSubset(H5adRows(handle["X"], tmp_path / "x.h5ad"), index, max_span=max_span)
        assert subset.shape == (5, 6)
        np.testing.assert_array_equal(subset[1:4].toarray(), counts[index[1:4]].toarray())
        np.testing.assert_array_equal(subset[0:5].toarray(), counts[index].toarray())
        assert subset[5:9].shape == (0, 6)
    with pytest.raises(ValueError):
        E.RowSubset(counts, np.array([3, 1]))


def test_default_batch_size_keeps_decoder_memory_bounded():
    assert E.default_batch_size(ModelConfig.preset("base-100m")) == 3
    assert E.default_batch_size(ModelConfig.preset("tiny", n_genes=765)) == 64
