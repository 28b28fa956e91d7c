"""Gene modules: planted structure is recovered; per-cell scores are scanpy's score_genes, streamed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from planted import planted_counts, planted_embeddings
from scfm.errors import ScfmError
from scfm.tasks.genes import embeddings as E
from scfm.tasks.genes import modules as M


def assert_planted_groups_recovered(labels: np.ndarray, truth: np.ndarray) -> None:
    """Each planted group lies in one module of its own."""
    planted = sorted(set(truth[truth >= 0]))
    modules = [set(labels[truth == group]) for group in planted]
    assert all(len(m) == 1 and -1 not in m for m in modules), modules
    assert len(set.union(*modules)) == len(planted)


def test_genes_sharing_a_latent_factor_form_one_module():
    vectors, truth = planted_embeddings(n_modules=5, genes_per_module=30, n_free=0, seed=0)
    found = M.find_modules(vectors, n_neighbors=10, resolution=0.5, min_module_size=5, seed=0)
    assert_planted_groups_recovered(found.labels, truth)
    assert found.module_ids == list(range(5))


def test_centring_removes_the_common_direction_decoder_outputs_share():
    """With a large shared offset every raw cosine is near 1; centred, planted genes are still found."""
    vectors, truth = planted_embeddings(n_modules=4, genes_per_module=25, offset=30.0, seed=1)
    assert np.median(M.cosine_similarity(vectors)) > 0.95
    found = M.find_modules(vectors, n_neighbors=10, resolution=0.5, seed=0)
    assert_planted_groups_recovered(found.labels, truth)


def test_random_embeddings_give_no_planted_structure():
    """The negative control: the same procedure on Gaussian vectors recovers nothing planted."""
    _, truth = planted_embeddings(n_modules=4, genes_per_module=25, seed=2)
    found = M.find_modules(M.random_gene_embeddings(len(truth), 32, seed=0), n_neighbors=10, resolution=0.5)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, found.labels) < 0.2


def test_pca_loadings_of_planted_counts_recover_the_programmes():
    """The expression side of the pipeline: counts with co-varying programmes -> gene statistics ->
    PCA-loading gene embeddings -> modules."""
    programmes = {k: np.arange(k * 15, (k + 1) * 15) for k in range(3)}
    counts = planted_counts(600, 80, programmes, seed=0)
    truth = np.full(80, -1)
    for k, genes in programmes.items():
        truth[genes] = k
    normalised = E.log_normalised(counts).toarray()
    found = M.find_modules(M.pca_gene_embeddings(normalised, n_comps=10), n_neighbors=8, resolution=0.5,
                           min_module_size=5)
    assert_planted_groups_recovered(found.labels, truth)


def test_modules_are_numbered_by_size_and_small_ones_unassigned():
    labels = M.relabel_by_size(np.array([7, 7, 3, 3, 3, 9, 7, 3, 5]), min_module_size=2)
    assert labels.tolist() == [1, 1, 0, 0, 0, -1, 1, 0, -1]
    tie = M.relabel_by_size(np.array([4, 4, 2, 2]), min_module_size=1)
    assert tie.tolist() == [0, 0, 1, 1]  # equal sizes: the community seen first comes first


def test_hub_score_is_the_weight_to_the_own_module():
    graph = sp.csr_matrix(np.array([[0, .5, .2, 0], [.5, 0, 0, .9], [.2, 0, 0, .3], [0, .9, .3, 0]]))
    labels = np.array([0, 0, 1, -1])
    assert M.intramodular_connectivity(graph, labels).tolist() == [0.5, 0.5, 0.0, 0.0]


def test_too_few_genes_or_a_bad_resolution_are_refused():
    with pytest.raises(ScfmError, match="too few"):
        M.find_modules(np.ones((2, 4)))
    with pytest.raises(ScfmError, match="resolution"):
        M.find_modules(np.random.default_rng(0).random((20, 4)), resolution=0)


def test_module_scores_equal_scanpy_score_genes():
    """With control sets as large as the expression bins, sampling takes whole bins, so our streamed
    scores must equal scanpy's own on the same cells exactly."""
    import anndata as ad
    import scanpy as sc

    programmes = {0: np.arange(0, 12), 1: np.arange(30, 36)}
    counts = planted_counts(300, 90, programmes, seed=4)
    adata = ad.AnnData(X=counts.copy())
    adata.var_names = [f"g{i}" for i in range(90)]
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    stats = E.gene_statistics(counts, chunk_size=64)
    controls = M.control_genes(stats.mean_expression, programmes, ctrl_size=10_000, rng=np.random.default_rng(0))
    ours = M.module_scores(counts, M.score_weights(programmes, controls, 90), chunk_size=70)
    for column, genes in programmes.items():
        sc.tl.score_genes(adata, [f"g{i}" for i in genes], ctrl_size=10_000, score_name="s")
        np.testing.assert_allclose(ours[:, column], adata.obs["s"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_controls_come_from_the_module_genes_expression_bins():
    mean = np.linspace(0, 5, 100)
    module = np.array([10, 50, 51])
    controls = M.control_genes(mean, {0: module}, ctrl_size=3, rng=np.random.default_rng(0))
    bins = M.expression_bins(mean)
    assert set(bins[controls[0]]) <= set(bins[module]) and not set(controls[0]) & set(module)
    assert 0 < len(controls[0]) <= 3 * len(set(bins[module]))  # 3 per bin touched, module genes removed
    # a module that fills its only bin has nothing to compare with
    with pytest.raises(ScfmError, match="no control genes"):
        M.control_genes(mean, {0: np.array([0, 1, 2])}, ctrl_size=3, rng=np.random.default_rng(0))
