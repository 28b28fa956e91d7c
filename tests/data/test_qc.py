"""QC filters against an independent numpy computation, in memory and streamed."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scfm.data import qc
from scfm.errors import ScfmError


@pytest.fixture
def pbmc(pbmc_counts, tmp_path):
    """The 700 real PBMCs as an .h5ad; thresholds are taken from the data's own quantiles."""
    path = tmp_path / "pbmc.h5ad"
    pbmc_counts.write_h5ad(path)
    return path, pbmc_counts


def _between(values: np.ndarray, q: float) -> float:
    """A threshold halfway between two observed values near quantile ``q`` (no float ties at the cut)."""
    distinct = np.unique(values)
    i = max(1, int(np.searchsorted(distinct, np.quantile(values, q))))
    return float((distinct[i - 1] + distinct[i]) / 2)


def _thresholds(adata: ad.AnnData) -> dict:
    X = adata.X.toarray().astype(np.float64)
    n_genes, totals = (X > 0).sum(1), X.sum(1)
    mito, _ = qc.gene_groups(adata.var_names)
    pct_mt = 100 * X[:, mito].sum(1) / totals
    assert pct_mt.max() > 0  # the data has mitochondrial counts, so that filter is exercised
    return dict(
        min_genes=int(np.quantile(n_genes, 0.1)),
        min_counts=_between(totals, 0.15),
        max_counts=_between(totals, 0.9),
        max_pct_mito=_between(pct_mt[pct_mt > 0], 0.5),
        min_cells=40,
    )


def _expected(adata: ad.AnnData, t: dict):
    """Sequential filters computed directly from the matrix → (removed per filter, cell mask, gene mask)."""
    X = adata.X.toarray().astype(np.float64)
    n_genes, totals = (X > 0).sum(1), X.sum(1)
    mito, _ = qc.gene_groups(adata.var_names)
    pct_mt = 100 * X[:, mito].sum(1) / totals
    keep = np.ones(adata.n_obs, bool)
    removed = {}
    for name, fails in (
        ("min_genes", n_genes < t["min_genes"]),
        ("min_counts", totals < t["min_counts"]),
        ("max_counts", totals > t["max_counts"]),
        ("max_pct_mito", pct_mt > t["max_pct_mito"]),
    ):
        removed[name] = int(np.sum(keep & fails))
        keep &= ~fails
    genes = (X[keep] > 0).sum(0) >= t["min_cells"]
    removed["min_cells"] = int(np.sum(~genes))
    return removed, keep, genes


@pytest.mark.parametrize("chunk_size", [None, 97], ids=["in-memory", "streamed"])
def test_each_filter_removes_what_an_independent_computation_removes(pbmc, tmp_path, chunk_size):
    path, adata = pbmc
    t = _thresholds(adata)
    removed, keep, genes = _expected(adata, t)
    assert all(n > 0 for n in removed.values())  # every filter is exercised
    out = tmp_path / "out.h5ad"
    summary = qc.run_qc(path, out, sample="s1", summary=tmp_path / "s.json", chunk_size=chunk_size, **t)

    assert summary["filter_order"] == ["min_genes", "min_counts", "max_counts", "max_pct_mito", "min_cells"]
    assert {name: step["removed"] for name, step in summary["filters"].items()} == removed
    cells = adata.n_obs
    for name in ("min_genes", "min_counts", "max_counts", "max_pct_mito"):
        step = summary["filters"][name]
        assert (step["cells_in"], step["cells_out"]) == (cells, cells - removed[name])
        cells -= removed[name]
    assert (summary["cells_out"], summary["genes_out"]) == (int(keep.sum()), int(genes.sum()))
    assert summary["per_sample"]["s1"]["cells_out"] == int(keep.sum())
    assert json.loads((tmp_path / "s.json").read_text())["filters"] == summary["filters"]

    written = ad.read_h5ad(out)
    assert sp.isspmatrix_csr(written.X) and written.X.dtype == np.float32
    np.testing.assert_array_equal(written.X.toarray(), adata.X.toarray()[keep][:, genes])
    assert list(written.obs_names) == [f"s1_{b}" for b in adata.obs_names[keep]]
    assert list(written.var_names) == list(adata.var_names[genes])
    np.testing.assert_allclose(written.obs["total_counts"], adata.X.toarray()[keep].sum(1), rtol=1e-6)
    assert set(written.obs["sample"]) == {"s1"} and set(written.obs["batch"]) == {"s1"}
    assert list(written.obs["bulk_labels"]) == list(adata.obs["bulk_labels"][keep])  # input obs is kept
    assert written.uns["scfm"]["qc"]["cells_out"] == int(keep.sum())


def test_streamed_and_in_memory_outputs_are_identical(pbmc, tmp_path):
    path, adata = pbmc
    t = _thresholds(adata)
    a = qc.run_qc(path, tmp_path / "a.h5ad", chunk_size=None, batch="b1", **t)
    b = qc.run_qc(path, tmp_path / "b.h5ad", chunk_size=64, batch="b1", **t)
    assert a["filters"] == b["filters"] and a["per_sample"] == b["per_sample"]
    x, y = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert (x.X != y.X).nnz == 0
    assert x.obs.equals(y.obs.astype(x.obs.dtypes.to_dict()))
    assert set(y.obs["batch"]) == {"b1"}


@pytest.mark.parametrize("chunk_size", [None, 200], ids=["in-memory", "streamed"])
@pytest.mark.parametrize(
    "flags, name",
    [({"min_genes": 10_000}, "min_genes"), ({"max_counts": 1}, "max_counts"), ({"min_cells": 100_000}, "min_cells")],
)
def test_empty_result_is_refused_naming_the_filter_and_nothing_is_written(pbmc, tmp_path, flags, name, chunk_size):
    path, _ = pbmc
    out, summary, plots = tmp_path / "o" / "out.h5ad", tmp_path / "o" / "s.json", tmp_path / "o" / "plots"
    with pytest.raises(ScfmError) as info:
        qc.run_qc(path, out, summary=summary, plots_dir=plots, chunk_size=chunk_size, **flags)
    assert f"QC filter '{name}'" in info.value.message and "removed all" in info.value.message
    assert info.value.path == str(path)
    assert not out.exists() and not summary.exists()
    assert not list((tmp_path / "o").rglob("*.png")) and not list((tmp_path / "o").glob(".*"))  # no tmp or scratch


def test_normalized_input_is_refused(pbmc, tmp_path):
    _, adata = pbmc
    norm = adata.copy()
    norm.X = sp.csr_matrix(np.log1p(norm.X.toarray()))
    norm.write_h5ad(tmp_path / "norm.h5ad")
    for chunk_size in (None, 100):
        with pytest.raises(ScfmError, match="non-integer values where raw counts are required"):
            qc.run_qc(tmp_path / "norm.h5ad", tmp_path / "out.h5ad", chunk_size=chunk_size)
        assert not (tmp_path / "out.h5ad").exists()


def test_doublets_are_seeded_and_removed(pbmc, tmp_path):
    path, adata = pbmc
    # in memory and streamed (where scrublet sees all 700 cells in one batch too) with one seed: same calls
    memory = qc.run_qc(path, tmp_path / "m.h5ad", min_genes=50, doublets=True, seed=3)
    streamed = qc.run_qc(path, tmp_path / "s.h5ad", min_genes=50, doublets=True, seed=3, chunk_size=100)
    assert memory["filters"] == streamed["filters"]
    step = memory["filters"]["doublets"]
    assert step["removed"] > 0
    written = ad.read_h5ad(tmp_path / "m.h5ad")
    assert step["cells_out"] == written.n_obs == step["cells_in"] - step["removed"]
    assert not written.obs["predicted_doublet"].any()
    assert written.obs["doublet_score"].between(0, 1).all()
    assert memory["doublet_rate"] == pytest.approx(step["removed"] / step["cells_in"])
    assert list(ad.read_h5ad(tmp_path / "s.h5ad").obs_names) == list(written.obs_names)


def test_samples_already_in_obs_are_summarised_separately(pbmc, tmp_path):
    _, adata = pbmc
    two = adata.copy()
    two.obs["sample"] = np.where(np.arange(two.n_obs) % 3 == 0, "donorA", "donorB")
    two.write_h5ad(tmp_path / "two.h5ad")
    summary = qc.run_qc(tmp_path / "two.h5ad", tmp_path / "out.h5ad", min_genes=240)
    fails = (adata.X.toarray() > 0).sum(1) < 240
    for donor, mask in (("donorA", two.obs["sample"] == "donorA"), ("donorB", two.obs["sample"] == "donorB")):
        entry = summary["per_sample"][donor]
        assert entry["cells_in"] == int(mask.sum())
        assert entry["removed"]["min_genes"] == int(np.sum(fails & mask.to_numpy()))
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.obs_names[0] in set(adata.obs_names)  # existing sample labels: barcodes left as they are


def test_gene_groups_and_otsu_threshold():
    mito, ribo = qc.gene_groups(["MT-CO1", "mt-Nd1", "RPL3", "Rps6", "CD3E", "MTOR"])
    assert list(mito) == [True, True, False, False, False, False]
    assert list(ribo) == [False, False, True, True, False, False]
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.03, 500), rng.normal(0.7, 0.05, 200)])
    assert 0.25 < qc.otsu_threshold(values) < 0.55


def test_plots_are_pngs_and_summary_path_defaults_next_to_output(pbmc, tmp_path):
    path, _ = pbmc
    summary = qc.run_qc(path, tmp_path / "x.qc.h5ad", min_genes=50, plots_dir=tmp_path / "plots")
    for kind in ("violin", "hist"):
        png = tmp_path / "plots" / f"pbmc.qc_{kind}.png"
        assert summary["plots"][kind] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert qc.default_summary_path(tmp_path / "x.qc.h5ad") == tmp_path / "x.qc.json"
    assert qc.default_summary_path("y.h5ad").name == "y.qc.json"


def test_plots_survive_constant_metrics(tmp_path):
    rng = np.random.default_rng(1)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(3.0, size=(50, 40)).astype(np.float32)))
    adata.var_names = [f"G{i}" for i in range(40)]  # no mitochondrial genes: pct_counts_mt is all 0
    adata.obs_names = [f"c{i}" for i in range(50)]
    adata.write_h5ad(tmp_path / "flat.h5ad")
    summary = qc.run_qc(tmp_path / "flat.h5ad", tmp_path / "out.h5ad", min_genes=5, plots_dir=tmp_path / "p")
    assert summary["cells_out"] == 50
    assert all((tmp_path / "p" / f"flat.qc_{kind}.png").stat().st_size > 0 for kind in ("violin", "hist"))


def test_cell_metrics_equal_scanpys_exactly(pbmc_counts):
    """The vectorised metrics are scanpy's calculate_qc_metrics, bit for bit (explicit zeros included)."""
    import pandas as pd
    import scanpy as sc

    counts = sp.csr_matrix(pbmc_counts.X, dtype=np.float32, copy=True)  # the fixture is shared: never edit it
    counts.data[::50] = 0  # explicit zeros: scanpy drops them before counting genes
    mito, ribo = qc.gene_groups(pbmc_counts.var_names)
    assert mito.any() and ribo.any()
    block = ad.AnnData(X=counts.copy(), var=pd.DataFrame({"mt": mito, "ribo": ribo}, index=pbmc_counts.var_names))
    expected, _ = sc.pp.calculate_qc_metrics(block, qc_vars=["mt", "ribo"], percent_top=None, log1p=False,
                                             inplace=False)
    ours = qc.cell_metrics(counts.copy(), mito, ribo, index=pbmc_counts.obs_names)
    assert (ours["n_genes_by_counts"].to_numpy() == expected["n_genes_by_counts"].to_numpy()).all()
    for column in qc.METRIC_COLUMNS[1:]:
        np.testing.assert_array_equal(ours[column].to_numpy(),
                                      expected[column].astype(np.float32).fillna(0.0).to_numpy())


@pytest.mark.parametrize("min_cells", [25, None], ids=["genes-dropped", "no-gene-filter"])
@pytest.mark.parametrize("chunk_size", [None, 128], ids=["in-memory", "streamed"])
def test_same_cells_and_genes_as_scanpys_own_filters(pbmc, tmp_path, chunk_size, min_cells):
    import scanpy as sc

    path, adata = pbmc
    ref = adata.copy()
    ref.var["mt"] = qc.gene_groups(ref.var_names)[0]
    sc.pp.calculate_qc_metrics(ref, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    ref = ref[(ref.obs["n_genes_by_counts"] >= 300) & (ref.obs["pct_counts_mt"] <= 2.0)].copy()
    if min_cells is not None:
        sc.pp.filter_genes(ref, min_cells=min_cells)
        assert 0 < ref.n_vars < adata.n_vars  # the gene filter bites
    assert 0 < ref.n_obs < adata.n_obs  # the cell filters bite

    out = tmp_path / "out.h5ad"
    qc.run_qc(path, out, sample="s1", min_genes=300, max_pct_mito=2.0, min_cells=min_cells, chunk_size=chunk_size)
    written = ad.read_h5ad(out)
    assert list(written.obs_names) == [f"s1_{b}" for b in ref.obs_names]
    assert list(written.var_names) == list(ref.var_names)
    assert (written.X != sp.csr_matrix(ref.X, dtype=np.float32)).nnz == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch file left behind
