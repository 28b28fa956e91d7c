"""Alignment rules, coverage report and the in-memory/chunked alignment functions."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm.data.align import (
    GeneAligner,
    align_adata,
    align_matrix,
    gene_identifiers,
    load_aliases,
    map_genes,
    open_chunked,
    strip_version,
)
from scfm.data.vocab import Vocabulary
from scfm.errors import ScfmError

VOCAB = Vocabulary(
    ["TP53", "CD3E", "MS4A1", "Actb", "GAPDH", "NKG7"],
    ["ENSG00000141510", "ENSG00000198851", "ENSG00000156738", "", "ENSG00000111640", ""],
)


def var(names, **columns):
    return pd.DataFrame(columns, index=pd.Index(names))


def test_strip_version():
    assert strip_version("ENSG00000141510.12") == "ENSG00000141510"
    assert strip_version("ENSMUSG00000029580.14") == "ENSMUSG00000029580"
    assert strip_version("TP53") == ""


def test_gene_identifiers_from_ids_as_index_and_from_columns():
    symbols, ens = gene_identifiers(var(["ENSG00000141510.3", "ENSG00000198851"], gene_symbols=["TP53", "CD3E"]))
    assert list(symbols) == ["TP53", "CD3E"] and list(ens) == ["ENSG00000141510", "ENSG00000198851"]
    symbols, ens = gene_identifiers(var(["TP53", "CD3E"], gene_ids=["ENSG00000141510.1", "ENSG00000198851.2"]))
    assert list(symbols) == ["TP53", "CD3E"] and list(ens) == ["ENSG00000141510", "ENSG00000198851"]
    assert gene_identifiers(var(["TP53"]))[1] is None


def test_ensembl_rule_with_versions():
    ids_first = var(
        ["ENSG00000141510.12", "ENSG00000198851.5", "ENSG00000000000.1"],
        gene_symbols=["OLDNAME", "CD3E", "GAPDH"],
    )
    m = map_genes(ids_first, VOCAB)
    assert list(m.token) == [0, 1, -1]
    assert list(m.rule) == ["ensembl", "ensembl", ""]


def test_symbol_case_and_alias_rules():
    genes = var(["CD3E", "actb", "nkg7", "CD20", "UNKNOWN1"])
    m = map_genes(genes, VOCAB, aliases={"CD20": "MS4A1"})
    assert list(m.token) == [1, 3, 5, 2, -1]
    assert list(m.rule) == ["symbol", "symbol_ci", "symbol_ci", "alias", ""]


def test_symbol_not_used_when_both_sides_have_different_ids():
    # same symbol, different Ensembl ids: a different gene, not matched by symbol
    genes = var(["GAPDH", "CD3E"], gene_ids=["ENSG00000999999", ""])
    m = map_genes(genes, VOCAB)
    assert list(m.token) == [-1, 1]


def test_ambiguous_case_insensitive_spelling_is_not_used():
    vocab = Vocabulary(["Abc", "ABC", "X"])
    assert list(map_genes(var(["abc", "X"]), vocab).token) == [-1, 2]


def test_align_matrix_sums_duplicates_zero_fills_and_drops():
    counts = np.array(
        [
            [1, 2, 3, 4, 5],
            [0, 7, 0, 0, 1],
        ],
        dtype=np.float32,
    )
    genes = var(["CD3E", "cd3e", "NKG7", "DROPME", "TP53"])
    aligned, cov = align_matrix(sp.csr_matrix(counts), genes, VOCAB)
    expected = np.zeros((2, len(VOCAB)), dtype=np.float32)
    expected[:, 1] = counts[:, 0] + counts[:, 1]  # CD3E + cd3e summed
    expected[:, 5] = counts[:, 2]
    expected[:, 0] = counts[:, 4]
    assert aligned.dtype == np.float32 and aligned.shape == (2, 6)
    np.testing.assert_array_equal(aligned.toarray(), expected)
    assert aligned.has_sorted_indices
    # coverage against an independent count
    total = counts.sum()
    kept = total - counts[:, 3].sum()
    assert cov["fraction_counts_kept"] == pytest.approx(kept / total)
    assert cov["total_counts"] == pytest.approx(total)
    assert cov["vocab_genes_present"] == 3
    assert cov["fraction_vocab_genes_present"] == pytest.approx(3 / 6)
    assert cov["input_genes_matched"] == 4
    assert cov["input_genes_summed_into_shared_token"] == 1
    assert cov["matched_by_rule"] == {"ensembl": 0, "symbol": 3, "symbol_ci": 1, "alias": 0}
    assert cov["unmatched_examples"] == ["DROPME"]


def test_chunks_give_same_result_as_whole():
    rng = np.random.default_rng(0)
    counts = sp.random(50, 8, density=0.4, format="csr", random_state=1, data_rvs=lambda n: rng.integers(1, 9, n))
    genes = var(["TP53", "X1", "CD3E", "gapdh", "X2", "MS4A1", "NKG7", "TP53"])
    whole, cov = align_matrix(counts, genes, VOCAB)
    aligner = GeneAligner(genes, VOCAB)
    parts = sp.vstack([aligner.apply(counts[i : i + 7]) for i in range(0, 50, 7)])
    np.testing.assert_array_equal(parts.toarray(), whole.toarray())
    assert aligner.coverage() == cov


def test_min_coverage_failure_message():
    counts = sp.csr_matrix(np.array([[1, 9], [1, 9]], dtype=np.float32))
    aligner = GeneAligner(var(["CD3E", "MT-CO1"]), VOCAB)
    aligner.apply(counts)
    with pytest.raises(ScfmError, match=r"coverage 0\.100 is below --min-coverage 0\.3.*MT-CO1.*species"):
        aligner.check(0.3, "in.h5ad")
    assert aligner.check(0.05)["fraction_counts_kept"] == pytest.approx(0.1)


def test_zero_overlap_is_its_own_error():
    aligner = GeneAligner(var(["ENSMUSG00000029580", "ENSMUSG00000000001"]), VOCAB)
    aligner.apply(sp.csr_matrix(np.ones((2, 2), dtype=np.float32)))
    with pytest.raises(ScfmError, match="no gene overlaps the vocabulary.*Ensembl ids vs symbols") as info:
        aligner.check(0.0, "mouse.h5ad")
    assert info.value.path == "mouse.h5ad"


def test_align_adata_layout(pbmc_counts):
    adata = pbmc_counts.copy()
    vocab = Vocabulary(["NOT_THERE"] + list(adata.var_names[::2]))
    adata.uns["scfm"] = {"qc": {"cells_in": 700}}
    aligned, cov = align_adata(adata, vocab, counts_source="X")
    assert aligned.shape == (adata.n_obs, len(vocab))
    assert list(aligned.var_names) == vocab.genes
    assert sp.isspmatrix_csr(aligned.X) and aligned.X.dtype == np.float32
    assert aligned.obs.equals(adata.obs)
    assert aligned.uns["scfm"]["vocab_sha256"] == vocab.sha256
    assert aligned.uns["scfm"]["qc"] == {"cells_in": 700}
    assert aligned.uns["scfm"]["coverage"] == cov
    dense_in = adata.X.toarray()
    np.testing.assert_array_equal(aligned.X[:, 1:].toarray(), dense_in[:, ::2])
    assert aligned.X[:, 0].nnz == 0
    assert cov["fraction_counts_kept"] == pytest.approx(dense_in[:, ::2].sum() / dense_in.sum(), rel=1e-6)


def test_load_aliases(tmp_path):
    good = tmp_path / "a.tsv"
    good.write_text("alias\tgene_name\nCD20\tMS4A1\n")
    assert load_aliases(good) == {"CD20": "MS4A1"}
    bad = tmp_path / "b.tsv"
    bad.write_text("from\tto\nCD20\tMS4A1\n")
    with pytest.raises(ScfmError, match="missing column"):
        load_aliases(bad)


def _write(path, X, layers=None, raw=None):
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]),
                       var=pd.DataFrame(index=[f"G{j}" for j in range(X.shape[1])]))
    for k, v in (layers or {}).items():
        adata.layers[k] = v
    if raw is not None:
        adata.raw = ad.AnnData(X=raw, obs=adata.obs, var=adata.var)
    adata.write_h5ad(path)
    return path


def test_open_chunked_reads_sparse_dense_layers_and_raw(tmp_path):
    counts = sp.random(23, 5, density=0.5, format="csr", random_state=3, dtype=np.float32)
    counts.data = np.ceil(counts.data * 10)
    logged = counts.copy()
    logged.data = np.log1p(logged.data)
    for X, layer, kw in [
        (counts, None, {}),
        (counts.toarray(), None, {}),
        (logged, "counts", {"layers": {"counts": counts}}),
        (logged, "raw", {"raw": counts}),
        (logged, None, {"raw": counts}),  # .raw holding counts is chosen by default
    ]:
        path = _write(tmp_path / "x.h5ad", X, **kw)
        src = open_chunked(path, chunk_size=10, layer=layer)
        blocks = list(src.chunks)
        assert [b[1].shape[0] for b in blocks] == [10, 10, 3]
        np.testing.assert_array_equal(sp.vstack([b[1] for b in blocks]).toarray(), counts.toarray())
        assert list(blocks[2][0].index) == ["c20", "c21", "c22"]


@pytest.mark.parametrize(
    "values, message",
    [(-1.0, "negative values"), (np.nan, "NaN values"), (np.inf, "infinite values"), (0.5, "non-integer values")],
)
def test_open_chunked_rejects_non_counts(tmp_path, values, message):
    X = np.ones((4, 3), dtype=np.float32)
    X[2, 1] = values
    path = _write(tmp_path / "x.h5ad", sp.csr_matrix(X))
    with pytest.raises(ScfmError, match=message):
        list(open_chunked(path, chunk_size=2).chunks)


def test_open_chunked_bad_files(tmp_path):
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    with pytest.raises(ScfmError, match="not an HDF5 file"):
        open_chunked(junk)
    with pytest.raises(ScfmError, match="not found"):
        open_chunked(tmp_path / "missing.h5ad")
    path = _write(tmp_path / "x.h5ad", sp.csr_matrix(np.ones((2, 2), dtype=np.float32)))
    with pytest.raises(ScfmError, match="layer 'counts' not found"):
        open_chunked(path, layer="counts")


def test_empty_rows_and_rows_without_matched_genes():
    counts = sp.csr_matrix(np.array([[0, 0, 0], [0, 4, 0], [2, 0, 3], [0, 5, 0], [0, 0, 0]], dtype=np.float32))
    aligned, cov = align_matrix(counts, var(["NKG7", "UNKNOWN", "TP53"]), VOCAB)
    expected = np.zeros((5, len(VOCAB)), dtype=np.float32)
    expected[2, 5], expected[2, 0] = 2, 3
    np.testing.assert_array_equal(aligned.toarray(), expected)
    assert aligned.has_sorted_indices and list(aligned.indices) == [0, 5]
    assert cov["fraction_counts_kept"] == pytest.approx(5 / 14)


@pytest.mark.parametrize("int32_limit", [None, 10])
def test_aligned_h5ad_writer_blocks_read_back(tmp_path, int32_limit):
    from scfm.data.align import AlignedH5adWriter

    counts = sp.random(30, len(VOCAB), density=0.4, format="csr", random_state=0, dtype=np.float32)
    obs = pd.DataFrame({"sample": pd.Categorical(["a"] * 30)}, index=[f"c{i}" for i in range(30)])
    writer = AlignedH5adWriter(tmp_path / "x.h5ad", VOCAB)
    if int32_limit is not None:
        writer.int32_limit = int32_limit  # take the >2^31-values path on a small matrix
    for start in range(0, 30, 7):
        writer.append(counts[start : start + 7], obs.iloc[start : start + 7])
    writer.finish({"vocab_sha256": VOCAB.sha256})
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    np.testing.assert_array_equal(back.X.toarray(), counts.toarray())
    assert back.X.indices.dtype == back.X.indptr.dtype == (np.int32 if int32_limit is None else np.int64)
    back.X.eliminate_zeros()  # needs one index dtype
    assert list(back.var_names) == VOCAB.genes and list(back.var["ensembl_id"]) == VOCAB.ensembl_ids
    assert back.obs.equals(obs) and back.uns["scfm"]["vocab_sha256"] == VOCAB.sha256
