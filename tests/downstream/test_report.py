"""scfm report: every section present; metrics equal the same quantities computed independently."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import scanpy as sc
from click.testing import CliRunner
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    confusion_matrix,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from scfm.cli import cli
from scfm.report.html import SECTIONS, read_inputs

LABEL_KEY = "bulk_labels"


def section_html(text: str, key: str) -> str:
    match = re.search(rf'<section id="section-{key}">(.*?)</section>', text, flags=re.S)
    assert match, f"section {key} missing"
    return match.group(1)


@pytest.mark.slow
def test_every_section_is_present_and_filled(report_run):
    text = report_run["html"].read_text()
    for key, title in SECTIONS:
        assert title in section_html(text, key)
    qc = section_html(text, "qc")
    for fragment in ("pbmc_a", "pbmc_b", "cells_out", "removed by min_cells", "pct_counts_mt"):
        assert fragment in qc, fragment
    umaps = section_html(text, "umap")
    for colour in (LABEL_KEY, "scfm_cell_type", "batch", "total_counts"):
        assert f"coloured by {colour}" in umaps
    assert umaps.count("<img") >= 4
    assert section_html(text, "leiden").count("<img") == 2
    assert section_html(text, "annotation").count("<img") == 1  # the confusion matrix
    training = section_html(text, "training")
    assert "<img" in training and report_run["training_run_id"][:8] in training
    provenance = section_html(text, "provenance")
    for package in ("scfm", "torch", "scanpy", "scikit-learn"):
        assert f"<td>{package}</td>" in provenance
    for fragment in ('"embed"', '"annotate"', '"vocab_sha256"', '"target_depth"'):  # uns['scfm'] of the inputs
        assert html.escape(fragment) in provenance, fragment
    metrics = section_html(text, "metrics")
    for name in ("knn_accuracy", "ari", "nmi", "silhouette", "batch_asw"):
        assert f"<td>{name}</td>" in metrics
    assert "src=\"http" not in text and "<script" not in text, "self-contained: nothing fetched"


def _leiden(adata, key, seed):
    sc.pp.neighbors(adata, n_neighbors=15, use_rep=key, random_state=seed)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, resolution=1.0, random_state=seed, key_added="check")
    return adata.obs["check"].astype(str).to_numpy()


def _knn_accuracy(x, y, seed):
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    values, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, values[counts >= 5])
    return cross_val_score(KNeighborsClassifier(n_neighbors=15), x[keep], y[keep], cv=folds).mean()


def _batch_asw(x, batches, labels):
    per_label = []
    for label in np.unique(labels):
        mask = labels == label
        if len(np.unique(batches[mask])) > 1 and mask.sum() >= 3:
            per_label.append(np.mean(1 - np.abs(silhouette_samples(x[mask], batches[mask]))))
    return np.mean(per_label)


def _expected(adata, key, seed):
    x = np.asarray(adata.obsm[key], dtype=np.float64)
    y = adata.obs[LABEL_KEY].astype(str).to_numpy()
    clusters = _leiden(adata, key, seed)
    return {
        "ari": adjusted_rand_score(y, clusters),
        "nmi": normalized_mutual_info_score(y, clusters),
        "silhouette": (silhouette_score(x, y) + 1) / 2,
        "knn_accuracy": _knn_accuracy(x, y, seed),
        "batch_asw": _batch_asw(x, adata.obs["batch"].astype(str).to_numpy(), y),
        "n_leiden_clusters": len(np.unique(clusters)),
    }


@pytest.mark.slow
def test_metrics_json_equals_independent_computation(report_run):
    result = json.loads(report_run["metrics_json"].read_text())
    adata = report_run["annotated"].copy()
    seed = report_run["seed"]
    assert result["n_cells"] == adata.n_obs

    scfm = result["embeddings"]["scfm"]
    for name, value in _expected(adata, "X_scfm", seed).items():
        assert scfm[name] == pytest.approx(value, abs=1e-9), name

    # the PCA baseline, redone from the counts with scanpy's standard recipe
    baseline = adata.copy()
    sc.pp.normalize_total(baseline, target_sum=1e4)
    sc.pp.log1p(baseline)
    sc.pp.pca(baseline, n_comps=50, random_state=seed)
    pca = result["embeddings"]["PCA"]
    expected = _expected(baseline, "X_pca", seed)
    for name in ("knn_accuracy", "silhouette", "batch_asw"):
        assert pca[name] == pytest.approx(expected[name], abs=1e-4), name
    assert pca["ari"] == pytest.approx(expected["ari"], abs=0.05)  # Leiden on a numerically near-equal graph

    truth = adata.obs[LABEL_KEY].astype(str).to_numpy()
    predicted = adata.obs["scfm_cell_type"].astype(str).to_numpy()
    annotation = result["annotation"]
    assert annotation["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert annotation["confusion"] == confusion_matrix(truth, predicted, labels=annotation["classes"]).tolist()
    assert annotation["unknown_fraction"] == pytest.approx(np.mean(predicted == "unknown"))


@pytest.mark.slow
def test_metrics_are_logged_to_mlflow(report_run):
    from mlflow.tracking import MlflowClient

    result = json.loads(report_run["metrics_json"].read_text())
    client = MlflowClient(report_run["uri"])
    runs = [r for r in client.search_runs(["1"]) if r.data.tags.get("scfm.step") == "report"]
    assert len(runs) == 1
    logged = runs[0].data.metrics
    assert logged["scfm.knn_accuracy"] == pytest.approx(result["embeddings"]["scfm"]["knn_accuracy"])
    assert logged["pca.ari"] == pytest.approx(result["embeddings"]["PCA"]["ari"])
    assert logged["annotation.accuracy"] == pytest.approx(result["annotation"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"demo.report.html", "demo.report.metrics.json"} <= artifacts


def test_several_inputs_are_combined(embedded_pbmc, tmp_path):
    _, adata = embedded_pbmc
    first, second = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    adata[:300].copy().write_h5ad(first)
    adata[300:].copy().write_h5ad(second)
    combined, uns_list = read_inputs([first, second], "X_scfm")
    assert combined.n_obs == adata.n_obs
    assert combined.obsm["X_scfm"].shape == adata.obsm["X_scfm"].shape
    assert sorted(combined.obs["input"].unique()) == ["a.h5ad", "b.h5ad"]
    assert len(uns_list) == 2


def _fails_cleanly(shared_store, tmp_path, *args, message):
    out = tmp_path / "out" / "report.html"
    result = CliRunner().invoke(
        cli, ["report", *map(str, args), "-o", str(out), "--mlflow-uri", shared_store],
        catch_exceptions=False,
    )
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not out.exists() and not (out.parent / "report.metrics.json").exists()
    assert not list(out.parent.glob(".report*")), "no temporary left behind"


def test_missing_embedding_is_refused(embedded_pbmc, tmp_path, shared_store):
    _, adata = embedded_pbmc
    bare = adata.copy()
    del bare.obsm["X_scfm"]
    path = tmp_path / "bare.h5ad"
    bare.write_h5ad(path)
    _fails_cleanly(shared_store, tmp_path, path, message=f"error: {path}: no embedding obsm['X_scfm']")


def test_unknown_label_or_batch_key_is_refused(embedded_pbmc, tmp_path, shared_store):
    path, _ = embedded_pbmc
    _fails_cleanly(shared_store, tmp_path, path, "--label-key", "celltype",
                   message=f"error: {path}: --label-key 'celltype' is not an obs column")
    _fails_cleanly(shared_store, tmp_path, path, "--batch-key", "donor",
                   message=f"error: {path}: --batch-key 'donor' is not an obs column")


def test_broken_qc_json_is_refused(embedded_pbmc, tmp_path, shared_store):
    path, _ = embedded_pbmc
    broken = tmp_path / "qc.json"
    broken.write_text("{not json")
    _fails_cleanly(shared_store, tmp_path, path, "--qc-json", broken, message=f"error: {broken}: cannot read QC JSON")


def test_label_metrics_use_labelled_cells_only(embedded_pbmc):
    from scfm.report.metrics import embedding_metrics

    _, adata = embedded_pbmc
    adata = adata.copy()
    labels = adata.obs[LABEL_KEY].astype(object)
    labels.iloc[::3] = np.nan  # a third of the cells come from an unlabelled sample
    adata.obs[LABEL_KEY] = labels
    result, clusters = embedding_metrics(adata, "X_scfm", label_key=LABEL_KEY, batch_key="batch", seed=1)
    known = adata.obs[LABEL_KEY].notna().to_numpy()
    y = adata.obs[LABEL_KEY][known].astype(str).to_numpy()
    assert result["n_labelled_cells"] == known.sum()
    assert result["ari"] == pytest.approx(adjusted_rand_score(y, clusters[known]))
    assert result["silhouette"] == pytest.approx((silhouette_score(adata.obsm["X_scfm"][known], y) + 1) / 2)
    assert "nan" not in set(y)


def test_large_inputs_are_subsampled_with_the_seed(embedded_pbmc):
    from scfm.report.html import subsample_cells

    _, adata = embedded_pbmc
    subset, total = subsample_cells(adata, 200, seed=4)
    again, _ = subsample_cells(adata, 200, seed=4)
    assert total == adata.n_obs and subset.n_obs == 200
    assert list(subset.obs_names) == list(again.obs_names)
    assert set(subset.obs_names) <= set(adata.obs_names)
    whole, _ = subsample_cells(adata, 10_000, seed=4)
    assert whole.n_obs == adata.n_obs


def _two_samples(embedded_pbmc, tmp_path, *, labelled_second: bool):
    """Two small inputs as a pipeline batch would give them: the first has no label column."""
    _, adata = embedded_pbmc
    first, second = adata[:150].copy(), adata[150:300].copy()
    del first.obs[LABEL_KEY]
    if not labelled_second:
        del second.obs[LABEL_KEY]
    paths = tmp_path / "pbmc_a.h5ad", tmp_path / "pbmc_b.h5ad"
    first.write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    return paths, second


def _report(shared_store, out, *args):
    return CliRunner().invoke(cli, ["report", *map(str, args), "-o", str(out), "--mlflow-uri", shared_store,
                                    "--quiet"], catch_exceptions=False)


def test_partly_labelled_inputs_score_the_labelled_cells(embedded_pbmc, tmp_path, shared_store):
    (a, b), labelled = _two_samples(embedded_pbmc, tmp_path, labelled_second=True)
    out = tmp_path / "report.html"
    result = _report(shared_store, out, a, b, "--label-key", LABEL_KEY, "--batch-key", "batch")
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.with_name("report.metrics.json").read_text())
    assert metrics["labels"] == {"key": LABEL_KEY, "n_scored_cells": labelled.n_obs, "n_cells": 300,
                                 "inputs_without_labels": ["pbmc_a.h5ad"]}
    assert metrics["embeddings"]["scfm"]["n_labelled_cells"] == labelled.n_obs
    assert "knn_accuracy" in metrics["embeddings"]["scfm"] and "annotation" not in metrics
    text = html.unescape(section_html(out.read_text(), "metrics"))
    assert f"score the {labelled.n_obs} of 300 cells that have a label in obs['{LABEL_KEY}']" in text
    assert "Inputs without labels: pbmc_a.h5ad." in text


def test_no_labelled_cell_is_refused_naming_the_inputs(embedded_pbmc, tmp_path, shared_store):
    (a, b), _ = _two_samples(embedded_pbmc, tmp_path, labelled_second=False)
    _fails_cleanly(shared_store, tmp_path, a, b, "--label-key", LABEL_KEY,
                   message=f"error: {a}: --label-key '{LABEL_KEY}' is not an obs column of any input "
                           "(inputs: pbmc_a.h5ad, pbmc_b.h5ad)")
    _, adata = embedded_pbmc
    missing = adata[:150].copy()
    missing.obs[LABEL_KEY] = np.nan  # the column is there, every value is missing
    path = tmp_path / "all_missing.h5ad"
    missing.write_h5ad(path)
    _fails_cleanly(shared_store, tmp_path, path, "--label-key", LABEL_KEY,
                   message=f"error: {path}: --label-key '{LABEL_KEY}': no cell has a label (inputs: all_missing.h5ad)")


def test_labels_optional_reports_unlabelled_inputs_without_label_metrics(embedded_pbmc, tmp_path, shared_store):
    (a, _), _ = _two_samples(embedded_pbmc, tmp_path, labelled_second=False)
    out = tmp_path / "report.html"
    result = _report(shared_store, out, a, "--label-key", LABEL_KEY, "--labels-optional")
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.with_name("report.metrics.json").read_text())
    assert metrics["labels"]["n_scored_cells"] == 0 and metrics["labels"]["inputs_without_labels"] == ["pbmc_a.h5ad"]
    assert "ari" not in metrics["embeddings"]["scfm"] and "n_leiden_clusters" in metrics["embeddings"]["scfm"]
    assert f"No cell has a label in obs['{LABEL_KEY}']" in html.unescape(section_html(out.read_text(), "metrics"))
