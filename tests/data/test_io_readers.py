"""Each reader writes a small file with the real library, reads it back through scfm.data.io."""

from __future__ import annotations

import gzip

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from scfm.data import io
from scfm.errors import ScfmError

N_CELLS, N_GENES = 40, 25


@pytest.fixture
def counts():
    """Cells x genes integer counts with a realistic mix of zeros, plus names and Ensembl ids."""
    rng = np.random.default_rng(7)
    dense = rng.poisson(0.8, size=(N_CELLS, N_GENES)).astype(np.float32)
    dense[:, 3] = 0  # one gene never detected
    symbols = [f"GENE{i}" for i in range(N_GENES)]
    symbols[0], symbols[1] = "MT-CO1", "RPL3"
    ensembl = [f"ENSG{i:011d}" for i in range(N_GENES)]
    barcodes = [f"AAAC{i:04d}-1" for i in range(N_CELLS)]
    return dense, symbols, ensembl, barcodes


def _adata(counts) -> ad.AnnData:
    dense, symbols, ensembl, barcodes = counts
    return ad.AnnData(
        X=sp.csr_matrix(dense),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame({"gene_ids": ensembl}, index=symbols),
    )


def _assert_matches(result, counts, *, ensembl=True):
    dense, symbols, ens, barcodes = counts
    adata = result.adata
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), dense)
    assert list(adata.var_names) == symbols
    assert list(adata.obs_names) == barcodes
    if ensembl:
        assert list(adata.var["ensembl_id"]) == ens
    else:
        assert "ensembl_id" not in adata.var
    assert result.is_counts


def write_10x_h5(path, dense, symbols, ensembl, barcodes):
    """10x Cell Ranger v3 layout: CSC over genes x cells, i.e. CSR arrays of cells x genes."""
    csr = sp.csr_matrix(dense)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=csr.data.astype(np.int32))
        m.create_dataset("indices", data=csr.indices.astype(np.int64))
        m.create_dataset("indptr", data=csr.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([dense.shape[1], dense.shape[0]], dtype=np.int32))
        feats = m.create_group("features")
        feats.create_dataset("id", data=np.array(ensembl, dtype="S"))
        feats.create_dataset("name", data=np.array(symbols, dtype="S"))
        feats.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(symbols), dtype="S"))
        feats.create_dataset("genome", data=np.array(["GRCh38"] * len(symbols), dtype="S"))
        feats.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))


def write_10x_mtx(directory, dense, symbols, ids, barcodes):
    directory.mkdir()
    with gzip.open(directory / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(dense.T.astype(np.int64)), field="integer")
    with gzip.open(directory / "features.tsv.gz", "wt") as f:
        for gid, sym in zip(ids, symbols):
            f.write(f"{gid}\t{sym}\tGene Expression\n")
    with gzip.open(directory / "barcodes.tsv.gz", "wt") as f:
        f.write("\n".join(barcodes) + "\n")


# ------------------------------------------------------------------------------------------ readers


def test_h5ad_reader_keeps_values_and_moves_gene_ids_to_ensembl_column(tmp_path, counts):
    path = tmp_path / "s.h5ad"
    _adata(counts).write_h5ad(path)
    result = io.read_input(path)
    _assert_matches(result, counts)
    assert result.counts_source == "X"


def test_h5ad_with_ensembl_var_names_switches_to_symbols(tmp_path, counts):
    dense, symbols, ensembl, barcodes = counts
    adata = ad.AnnData(sp.csr_matrix(dense), obs=pd.DataFrame(index=barcodes),
                       var=pd.DataFrame({"feature_name": symbols}, index=ensembl))
    adata.write_h5ad(tmp_path / "cxg.h5ad")
    _assert_matches(io.read_input(tmp_path / "cxg.h5ad"), counts)


def test_h5ad_with_int64_indptr_and_int32_indices(tmp_path, counts):
    path = tmp_path / "mixed.h5ad"
    _adata(counts).write_h5ad(path)
    with h5py.File(path, "a") as f:  # as written by tools that size indptr for > 2**31 stored values
        indptr = f["X/indptr"][:]
        del f["X/indptr"]
        f["X"].create_dataset("indptr", data=indptr.astype(np.int64))
        f["X/indices"][...] = f["X/indices"][:].astype(np.int32)
        assert f["X/indices"].dtype == np.int32
    _assert_matches(io.read_input(path), counts)


def test_h5ad_backed_reports_source_without_loading(tmp_path, counts):
    adata = _adata(counts)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0.5  # halves: not integers
    adata.write_h5ad(tmp_path / "b.h5ad")
    result = io.read_input(tmp_path / "b.h5ad", backed=True)
    assert result.adata.isbacked
    assert result.counts_source == "layers['counts']" and result.is_counts
    result.adata.file.close()


def test_10x_h5_reader(tmp_path, counts):
    write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", *counts)
    _assert_matches(io.read_input(tmp_path / "filtered_feature_bc_matrix.h5"), counts)


def test_10x_mtx_reader_with_ensembl_ids(tmp_path, counts):
    write_10x_mtx(tmp_path / "mtx", *counts)
    _assert_matches(io.read_input(tmp_path / "mtx"), counts)


def test_10x_mtx_reader_with_symbols_in_both_columns_has_no_ensembl_ids(tmp_path, counts):
    dense, symbols, _, barcodes = counts
    write_10x_mtx(tmp_path / "mtx", dense, symbols, symbols, barcodes)
    _assert_matches(io.read_input(tmp_path / "mtx"), counts, ensembl=False)


def test_loom_reader_takes_accession_as_ensembl(tmp_path, counts):
    import loompy

    dense, symbols, ensembl, barcodes = counts
    loompy.create(
        str(tmp_path / "s.loom"),
        sp.coo_matrix(dense.T),
        row_attrs={"Gene": np.array(symbols), "Accession": np.array(ensembl)},
        col_attrs={"CellID": np.array(barcodes)},
    )
    _assert_matches(io.read_input(tmp_path / "s.loom"), counts)


def test_csv_reader_cells_by_genes(tmp_path, counts):
    dense, symbols, _, barcodes = counts
    pd.DataFrame(dense.astype(int), index=barcodes, columns=symbols).to_csv(tmp_path / "s.csv")
    _assert_matches(io.read_input(tmp_path / "s.csv"), counts, ensembl=False)


def test_tsv_reader_transposed_genes_by_cells(tmp_path, counts):
    dense, symbols, _, barcodes = counts
    pd.DataFrame(dense.T.astype(int), index=symbols, columns=barcodes).to_csv(tmp_path / "s.tsv.gz", sep="\t")
    _assert_matches(io.read_input(tmp_path / "s.tsv.gz", transpose=True), counts, ensembl=False)


def test_sample_prefixes_barcodes_and_sets_obs(tmp_path, counts):
    _adata(counts).write_h5ad(tmp_path / "s.h5ad")
    adata = io.read_input(tmp_path / "s.h5ad", sample="donor1").adata
    assert adata.obs_names[0] == f"donor1_{counts[3][0]}"
    assert set(adata.obs["sample"]) == {"donor1"} and set(adata.obs["batch"]) == {"donor1"}


# ------------------------------------------------------------------------------------------ counts detection


def test_raw_with_counts_wins_over_normalized_x(tmp_path, counts):
    adata = _adata(counts)
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "s.h5ad")
    result = io.read_input(tmp_path / "s.h5ad")
    assert result.counts_source == "raw.X"
    _assert_matches(result, counts)


def test_normalized_raw_is_skipped_for_counts_in_x(tmp_path, counts):
    adata = _adata(counts)
    adata.raw = ad.AnnData(sp.csr_matrix(np.log1p(adata.X.toarray())), var=adata.var)
    adata.write_h5ad(tmp_path / "s.h5ad")
    result = io.read_input(tmp_path / "s.h5ad")
    assert result.counts_source == "X"
    _assert_matches(result, counts)


def test_explicit_layer_and_counts_layer_fallback(tmp_path, counts):
    adata = _adata(counts)
    adata.layers["umi"] = adata.X.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.X.toarray() / 3.0)
    adata.write_h5ad(tmp_path / "s.h5ad")
    assert io.read_input(tmp_path / "s.h5ad", layer="umi").counts_source == "layers['umi']"
    fallback = io.read_input(tmp_path / "s.h5ad")
    assert fallback.counts_source == "layers['counts']"
    _assert_matches(fallback, counts)
    normalized = io.read_input(tmp_path / "s.h5ad", layer="X")
    assert normalized.counts_source == "X" and not normalized.is_counts


def test_normalized_only_input_is_flagged_and_refused_when_counts_required(tmp_path, counts):
    adata = _adata(counts)
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "norm.h5ad")
    result = io.read_input(tmp_path / "norm.h5ad")
    assert result.counts_source == "X" and not result.is_counts
    with pytest.raises(ScfmError, match="norm.h5ad.*non-integer"):
        io.read_input(tmp_path / "norm.h5ad", require_counts=True)


# ------------------------------------------------------------------------------------------ chunks


@pytest.mark.parametrize("dense_x", [False, True])
def test_iter_chunks_reassembles_the_matrix(tmp_path, counts, dense_x):
    adata = _adata(counts)
    if dense_x:
        adata.X = adata.X.toarray()
    adata.obs["donor"] = ["a", "b"] * (N_CELLS // 2)
    adata.write_h5ad(tmp_path / "s.h5ad")
    blocks = list(io.iter_chunks(tmp_path / "s.h5ad", 15))
    assert [b[1].shape[0] for b in blocks] == [15, 15, 10]
    for obs, block, var in blocks:
        assert sp.isspmatrix_csr(block) and block.dtype == np.float32
        assert list(var["ensembl_id"]) == counts[2]
    np.testing.assert_array_equal(sp.vstack([b[1] for b in blocks]).toarray(), counts[0])
    assert list(pd.concat([b[0] for b in blocks])["donor"]) == list(adata.obs["donor"])


def test_iter_chunks_reads_the_chosen_layer(tmp_path, counts):
    adata = _adata(counts)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.X.toarray() * 0.25)
    adata.write_h5ad(tmp_path / "s.h5ad")
    info = io.inspect_h5ad(tmp_path / "s.h5ad")
    assert (info.n_obs, info.n_vars, info.counts_source) == (N_CELLS, N_GENES, "layers['counts']")
    got = sp.vstack([b for _, b, _ in io.iter_chunks(tmp_path / "s.h5ad", 7, layer="counts")])
    np.testing.assert_array_equal(got.toarray(), counts[0])
    with pytest.raises(ScfmError, match="non-integer"):
        list(io.iter_chunks(tmp_path / "s.h5ad", 7, layer="X", require_counts=True))


def test_iter_chunks_rejects_negative_values_in_a_later_block(tmp_path, counts):
    adata = _adata(counts)
    dense = adata.X.toarray()
    dense[-1, 0] = -2
    adata.X = sp.csr_matrix(dense)
    adata.write_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(ScfmError, match="neg.h5ad.*negative"):
        list(io.iter_chunks(tmp_path / "neg.h5ad", 10))


# ------------------------------------------------------------------------------------------ errors


def _bad_value(value):
    def write(tmp_path, counts):
        dense = counts[0].copy()
        dense[2, 4] = value
        adata = _adata(counts)
        adata.X = sp.csr_matrix(dense)
        path = tmp_path / "bad.h5ad"
        adata.write_h5ad(path)
        return path
    return write


def _write_text(name, text):
    def write(tmp_path, counts):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


def _truncated(tmp_path, counts):
    full = tmp_path / "full.h5ad"
    _adata(counts).write_h5ad(full)
    data = full.read_bytes()
    path = tmp_path / "bad.h5ad"
    path.write_bytes(data[: len(data) // 2])
    return path


def _zero(axis):
    def write(tmp_path, counts):
        adata = _adata(counts)
        adata = adata[:0] if axis == "cells" else adata[:, :0]
        path = tmp_path / "bad.h5ad"
        adata.copy().write_h5ad(path)
        return path
    return write


def _duplicate_barcodes(tmp_path, counts):
    adata = _adata(counts)
    adata.obs_names = ["AAAC-1"] * 2 + list(adata.obs_names[2:])
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp, c: tmp / "absent.h5ad", "file not found"),
        (_write_text("bad.h5ad", ""), "file is empty"),
        (_write_text("bad.h5ad", "not hdf5 at all"), "not an HDF5 file"),
        (_truncated, "truncated"),
        (_write_text("bad.xlsx", "x"), "unknown input format"),
        (_bad_value(-1.0), "negative values"),
        (_bad_value(np.nan), "NaN values"),
        (_bad_value(np.inf), "infinite values"),
        (_zero("cells"), "zero cells"),
        (_zero("genes"), "zero genes"),
        (_duplicate_barcodes, "duplicate cell barcodes"),
        (_write_text("bad.csv", "cell,g1,g2\nc1,1,x\n"), "non-numeric"),
    ],
    ids=["missing", "empty", "not-hdf5", "truncated", "extension", "negative", "nan", "inf",
         "zero-cells", "zero-genes", "duplicate-barcodes", "csv-text"],
)
def test_bad_input_raises_one_line_naming_the_file(tmp_path, counts, make, message):
    path = make(tmp_path, counts)
    with pytest.raises(ScfmError) as info:
        io.read_input(path)
    assert message in info.value.message
    assert info.value.path == str(path)
    assert "\n" not in str(info.value)


def test_missing_layer_and_incomplete_mtx_directory(tmp_path, counts):
    _adata(counts).write_h5ad(tmp_path / "s.h5ad")
    with pytest.raises(ScfmError, match="layer 'spliced' not found"):
        io.read_input(tmp_path / "s.h5ad", layer="spliced")
    (tmp_path / "mtx").mkdir()
    with pytest.raises(ScfmError, match="not a 10x matrix directory"):
        io.read_input(tmp_path / "mtx")
