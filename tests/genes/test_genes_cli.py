"""`scfm genes modules` and `scfm genes network` end to end (bin/scfm-genes, real MLflow store), and every
bad input: one line, non-zero exit, nothing written."""

from __future__ import annotations

import json
import sqlite3

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scfm.cli import cli

LABEL_KEY = "bulk_labels"


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_fails(result, *fragments, output):
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}*")), "no temporary left behind"
    assert not list(output.parent.glob(".scfm-genes-*")), "no scratch left behind"


def tiny_checkpoint(path, genes):
    from scfm.data.vocab import Vocabulary
    from scfm.model.checkpoint import save_checkpoint
    from scfm.model.config import ModelConfig
    from scfm.model.xtrimogene import XTrimoGene

    vocab = Vocabulary(list(genes))
    config = ModelConfig.preset("tiny", n_genes=len(vocab))
    save_checkpoint(path, XTrimoGene(config, seed=0), config, vocab)
    return path


@pytest.fixture(scope="module")
def small(pbmc_counts, tmp_path_factory):
    """60 real PBMCs x 40 real genes, a grouping with a 3-cell group, and a tiny random checkpoint."""
    root = tmp_path_factory.mktemp("genes_small")
    counts = pbmc_counts.X[:60].toarray()
    top = np.argsort(-(counts > 0).sum(axis=0))[:40]
    adata = ad.AnnData(X=sp.csr_matrix(counts[:, np.sort(top)]), obs=pbmc_counts.obs.iloc[:60].copy())
    adata.var_names = pbmc_counts.var_names[np.sort(top)]
    adata.obs["grp"] = ["a"] * 30 + ["b"] * 27 + ["c"] * 3
    adata.write_h5ad(root / "cells.h5ad")
    tiny_checkpoint(root / "model", adata.var_names)
    (root / "tfs.txt").write_text("NOT_A_TF\nALSO_NOT\n")
    return {"root": root, "cells": root / "cells.h5ad", "model": root / "model", "adata": adata,
            "no_tfs": root / "tfs.txt"}


@pytest.fixture(scope="module")
def modules_run(train_data, go_dir, scfm_bin, tmp_path_factory):
    """One real `scfm-genes modules` run on the 700 PBMCs (tiny random model, GO enrichment, PCA baseline)."""
    root = tmp_path_factory.mktemp("genes_modules")
    out = root / "pbmc.genes"
    store = f"sqlite:///{root / 'mlflow.db'}"
    proc = scfm_bin("genes", "modules", train_data["aligned"], "-o", out, "--checkpoint", train_data["checkpoint"],
                   "--groupby", LABEL_KEY, "--max-cells-per-group", 20, "--go-db", go_dir, "--seed", 0, "--quiet",
                   "--mlflow-uri", store)
    return {"out": out, "store": root / "mlflow.db", "proc": proc, "aligned": train_data["aligned"]}


def test_modules_writes_consistent_outputs(modules_run, pbmc_counts):
    out = modules_run["out"]
    table = pd.read_csv(out / "gene_modules.tsv", sep="\t")
    detected = np.asarray((pbmc_counts.X > 0).sum(axis=0)).ravel()
    assert set(table["gene"]) == set(pbmc_counts.var_names[detected >= 10])
    genes = ad.read_h5ad(out / "gene_embeddings.h5ad")
    assert genes.n_obs == len(table) and genes.n_vars == 32  # genes are observations, decoder dims variables
    assert (genes.obs.loc[table["gene"], "module"].to_numpy() == table["module"].to_numpy()).all()
    info = genes.uns["scfm"]["genes"]
    assert len(info["groups"]["name"]) == 10 and all(n <= 20 for n in info["groups"]["n_cells"])
    assert np.isfinite(genes.layers["group_0"]).all() and "connectivities" in genes.obsp
    assert genes.obsm["X_umap"].shape == (genes.n_obs, 2)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cells"] == 700 and summary["n_cells_embedded"] == sum(info["groups"]["n_cells"])
    assert summary["precision"] == "fp32" and summary["precision_reason"]  # decided once, recorded
    assert summary["n_modules"] == table.loc[table.module >= 0, "module"].nunique()
    assert sorted(summary["module_sizes"], key=int) == [str(m) for m in range(summary["n_modules"])]

    scores = pd.read_csv(out / "module_scores.tsv", sep="\t", index_col=0)
    cells = ad.read_h5ad(out / "cells.h5ad")
    assert list(scores.index) == list(cells.obs_names) and cells.n_vars == 765
    columns = [f"gene_module_{m}" for m in range(summary["n_modules"])]
    assert list(scores.columns) == columns
    np.testing.assert_allclose(cells.obs[columns].to_numpy(), scores.to_numpy())
    by_group = pd.read_csv(out / "module_scores_by_group.tsv", sep="\t", index_col=0)
    expected = scores.groupby(cells.obs[LABEL_KEY].astype(str).to_numpy()).mean()
    np.testing.assert_allclose(by_group.loc[expected.index].to_numpy(), expected.to_numpy())
    for name in ("gene_modules.html", "plots/gene_umap.png", "plots/module_scores_heatmap.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "Gene modules" in (out / "gene_modules.html").read_text()


def test_enrichment_tables_agree(modules_run):
    out = modules_run["out"]
    table = pd.read_csv(out / "enrichment.tsv", sep="\t")
    summary = json.loads((out / "enrichment.json").read_text())
    assert ((table.q_value >= table.p_value - 1e-12) & (table.q_value <= 1)).all()
    significant = table[table.q_value < summary["enrichment"]["alpha"]]
    assert summary["enrichment"]["n_modules_enriched"] == significant["module"].nunique()
    assert summary["baseline"]["n_modules"] >= 1 and 0 <= summary["baseline"]["fraction_modules_enriched"] <= 1
    assert summary["go"]["go_source_date"] == "2022-07-01"


def test_modules_run_is_logged_to_mlflow(modules_run):
    with sqlite3.connect(modules_run["store"]) as con:
        (run_id, status), = con.execute("select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                                        "where t.key = 'scfm.step' and t.value = 'genes-modules'").fetchall()
        metrics = dict(con.execute("select key, value from metrics where run_uuid = ?", (run_id,)).fetchall())
        params = dict(con.execute("select key, value from params where run_uuid = ?", (run_id,)).fetchall())
    assert status == "FINISHED" and params["groupby"] == LABEL_KEY and params["resolution"] == "1.0"
    summary = json.loads((modules_run["out"] / "summary.json").read_text())
    assert metrics["n_modules"] == summary["n_modules"]
    assert metrics["enrichment.fraction_modules_enriched"] == summary["enrichment"]["fraction_modules_enriched"]
    artifacts = modules_run["store"].parent / "mlartifacts"
    logged = {p.name for p in artifacts.rglob("*") if p.is_file()}
    assert {"gene_modules.tsv", "summary.json", "gene_modules.html", "gene_umap.png"} <= logged


def test_report_embeds_the_gene_modules_section(modules_run, scfm_bin, tmp_path):
    cells = ad.read_h5ad(modules_run["aligned"])
    cells.obsm["X_scfm"] = np.random.default_rng(0).standard_normal((cells.n_obs, 8)).astype(np.float32)
    cells.write_h5ad(tmp_path / "embedded.h5ad")
    report = tmp_path / "report.html"
    scfm_bin("report", tmp_path / "embedded.h5ad", "-o", report, "--label-key", LABEL_KEY, "--gene-modules",
            modules_run["out"], "--seed", 0, "--quiet", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    text = report.read_text()
    assert 'id="section-gene-modules"' in text and "top GO BP terms" in text
    metrics = json.loads((tmp_path / "report.metrics.json").read_text())
    [headline] = metrics["gene_modules"]
    assert headline["n_modules"] == json.loads((modules_run["out"] / "summary.json").read_text())["n_modules"]


def test_network_from_the_gene_embeddings(modules_run, shared_data, scfm_bin, tmp_path):
    from scfm.tasks.genes.network import load_tf_list

    genes = modules_run["out"] / "gene_embeddings.h5ad"
    edges_path = tmp_path / "adjacencies.tsv"
    scfm_bin("genes", "network", genes, "-o", edges_path, "--tf-list", shared_data / "lambert2018_human_tfs.txt",
            "--top-targets", 5, "--seed", 0, "--quiet", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    edges = pd.read_csv(edges_path, sep="\t")
    assert list(edges.columns) == ["TF", "target", "importance"]
    names = set(ad.read_h5ad(genes).obs_names)
    tfs = set(load_tf_list(shared_data / "lambert2018_human_tfs.txt")) & names
    assert set(edges.TF) <= tfs and len(set(edges.TF)) >= 10 and set(edges.target) <= names
    assert (edges.groupby("TF").size() <= 5).all() and (edges.importance > 0).all()
    assert (np.diff(edges.importance.to_numpy()) <= 0).all() and not (edges.TF == edges.target).any()

    group_edges = tmp_path / "dc.tsv"
    scfm_bin("genes", "network", genes, "-o", group_edges, "--tf-list", shared_data / "lambert2018_human_tfs.txt",
            "--group", "CD14+ Monocyte", "--format", "decoupler", "--top-targets", 0, "--quiet",
            "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    decoupler = pd.read_csv(group_edges, sep="\t")
    assert list(decoupler.columns) == ["source", "target", "weight"]
    assert (decoupler.weight < 0).any() and len(decoupler) == len(set(decoupler.source)) * (len(names) - 1)


def test_network_from_cells_of_one_group(small, tmp_path):
    out = tmp_path / "edges.tsv"
    tfs = tmp_path / "tfs.txt"
    tfs.write_text("\n".join(small["adata"].var_names[:3]) + "\n")
    result = run_cli("genes", "network", small["cells"], "-o", out, "--tf-list", tfs, "--checkpoint", small["model"],
                     "--groupby", "grp", "--group", "b", "--min-cells", 1, "--quiet",
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert result.exit_code == 0, result.output
    edges = pd.read_csv(out, sep="\t")
    assert set(edges.TF) <= set(small["adata"].var_names[:3]) and len(edges) > 0


def test_modules_without_enrichment_needs_no_go_database(small, tmp_path):
    out = tmp_path / "genes"
    result = run_cli("genes", "modules", small["cells"], "-o", out, "--checkpoint", small["model"], "--min-cells", 1,
                     "--no-enrichment", "--n-neighbors", 5, "--min-module-size", 2, "--quiet",
                     "--go-db", tmp_path / "nowhere", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert result.exit_code == 0, result.output
    assert not (out / "enrichment.tsv").exists() and "not run" in (out / "gene_modules.html").read_text()
    assert not (out / "module_scores_by_group.tsv").exists()  # no --groupby, no heatmap


# ----------------------------------------------------------------------------------------- bad input
def test_no_tf_of_the_list_in_the_data(small, tmp_path):
    out = tmp_path / "edges.tsv"
    result = run_cli("genes", "network", small["cells"], "-o", out, "--tf-list", small["no_tfs"],
                     "--checkpoint", small["model"], "--min-cells", 1, "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert_fails(result, f"error: {small['no_tfs']}: none of the 2 TFs of tfs.txt is among the 40 genes", output=out)


def test_too_few_cells_for_a_group(small, tmp_path):
    out = tmp_path / "genes"
    result = run_cli("genes", "modules", small["cells"], "-o", out, "--checkpoint", small["model"], "--groupby", "grp",
                     "--no-enrichment", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert_fails(result, f"error: {small['cells']}: --groupby 'grp': 1 group(s) have fewer than 5 cells", "c (3)",
                 output=out)


def test_unknown_groupby(small, tmp_path):
    out = tmp_path / "genes"
    result = run_cli("genes", "modules", small["cells"], "-o", out, "--checkpoint", small["model"],
                     "--groupby", "cell_kind", "--no-enrichment", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert_fails(result, f"error: {small['cells']}: --groupby 'cell_kind' is not an obs column", "bulk_labels",
                 output=out)


def test_genes_without_symbols_cannot_be_mapped_to_go(small, go_dir, tmp_path):
    adata = small["adata"].copy()
    adata.var_names = [f"gene_{i:04d}" for i in range(adata.n_vars)]
    path = tmp_path / "anonymous.h5ad"
    adata.write_h5ad(path)
    model = tiny_checkpoint(tmp_path / "model", adata.var_names)
    out = tmp_path / "genes"
    result = run_cli("genes", "modules", path, "-o", out, "--checkpoint", model, "--min-cells", 1, "--go-db", go_dir,
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert_fails(result, f"error: {path}: only 0 of 40 genes map to a GO-annotated human gene", "--no-enrichment",
                 output=out)


def test_ensembl_ids_are_mapped_to_go_through_org_hs(small, go_dir, tmp_path):
    from scfm.data.go import ORG_DB

    with sqlite3.connect(go_dir / ORG_DB) as con:
        rows = con.execute("select i.symbol, e.ensembl_id from ensembl e join gene_info i on i._id = e._id").fetchall()
    to_ensembl = {}
    for symbol, ensembl in rows:
        to_ensembl.setdefault(symbol, []).append(ensembl)
    adata = small["adata"].copy()
    keep = [g for g in adata.var_names if len(to_ensembl.get(g, [])) == 1]
    adata = adata[:, keep].copy()
    adata.var_names = [to_ensembl[g][0] for g in keep]
    path = tmp_path / "ensembl.h5ad"
    adata.write_h5ad(path)
    model = tiny_checkpoint(tmp_path / "model", adata.var_names)
    out = tmp_path / "genes"
    result = run_cli("genes", "modules", path, "-o", out, "--checkpoint", model, "--min-cells", 1, "--go-db", go_dir,
                     "--n-neighbors", 5, "--min-module-size", 2, "--baseline", "none", "--quiet",
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(keep) >= 30 and summary["enrichment"]["n_genes_annotated"] >= 0.9 * summary["n_genes"]
    assert "baseline" not in summary


def test_missing_go_database(small, tmp_path):
    out = tmp_path / "genes"
    result = run_cli("genes", "modules", small["cells"], "-o", out, "--checkpoint", small["model"], "--min-cells", 1,
                     "--go-db", tmp_path / "nowhere", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert_fails(result, f"error: {tmp_path / 'nowhere'}: no GO database here", "make go", output=out)


def test_network_needs_a_checkpoint_for_cells(small, tmp_path):
    out = tmp_path / "edges.tsv"
    result = run_cli("genes", "network", small["cells"], "-o", out, "--tf-list", small["no_tfs"],
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert result.exit_code == 2 and "needs --checkpoint" in result.output and not out.exists()


def test_unknown_group_of_a_gene_embeddings_file(modules_run, shared_data, tmp_path):
    out = tmp_path / "edges.tsv"
    genes = modules_run["out"] / "gene_embeddings.h5ad"
    result = run_cli("genes", "network", genes, "-o", out, "--tf-list", shared_data / "lambert2018_human_tfs.txt",
                     "--group", "Neutrophil", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert_fails(result, f"error: {genes}: --group 'Neutrophil' is not a group of this file", "CD14+ Monocyte",
                 output=out)


def test_report_refuses_a_directory_that_is_no_genes_output(tmp_path):
    from scfm.errors import ScfmError
    from scfm.report.genes import report_section

    with pytest.raises(ScfmError, match="not a `scfm genes modules` output directory"):
        report_section(tmp_path)
