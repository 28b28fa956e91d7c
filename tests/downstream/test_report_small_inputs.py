"""scfm report on inputs too small or too broken for some analyses: what cannot be computed is left out
and named in the report; what cannot be reported at all is refused in one line before any work."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from scfm.cli import cli

LABEL_KEY = "bulk_labels"


def run(*args, store):
    result = CliRunner().invoke(cli, [str(a) for a in args] + ["--mlflow-uri", store, "--quiet"],
                                catch_exceptions=False)
    return result.exit_code, result.output


def section(text: str, key: str) -> str:
    return re.search(rf'<section id="section-{key}">(.*?)</section>', text, flags=re.S).group(1)


def _cells(embedded_pbmc, tmp_path, rows, name="small.h5ad"):
    _, adata = embedded_pbmc
    path = tmp_path / name
    adata[rows].copy().write_h5ad(path)
    return path


def test_three_cells_give_a_report_that_says_what_it_left_out(embedded_pbmc, tmp_path, shared_store):
    _, adata = embedded_pbmc
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    first_of = {label: int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)[:2]}
    rows = sorted([*first_of.values(), int(np.flatnonzero(labels == next(iter(first_of)))[1])])  # 2 + 1 cells
    path = _cells(embedded_pbmc, tmp_path, rows)
    out = tmp_path / "small.html"
    code, output = run("report", path, "-o", out, "--label-key", LABEL_KEY, "--batch-key", "batch",
                       store=shared_store)
    assert code == 0, output
    text = out.read_text()
    assert "No UMAPs: only 3 cells" in section(text, "umap")
    assert "No Leiden clusters: only 3 cells" in section(text, "leiden")
    metrics_html = section(text, "metrics")
    assert "Not computed: Leiden clusters, ARI, NMI and UMAPs" in metrics_html
    assert "Not computed: kNN accuracy" in metrics_html
    metrics = json.loads((tmp_path / "small.metrics.json").read_text())
    assert metrics["n_cells"] == 3 and len(metrics["skipped"]) == 2
    scfm = metrics["embeddings"]["scfm"]
    assert "ari" not in scfm and "n_leiden_clusters" not in scfm
    assert 0.0 <= scfm["silhouette"] <= 1.0  # two classes among three cells: defined, so computed


def test_a_few_dozen_cells_get_every_metric(embedded_pbmc, tmp_path, shared_store):
    _, adata = embedded_pbmc
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    two = [label for label in np.unique(labels) if (labels == label).sum() >= 10][:2]
    rows = sorted(np.concatenate([np.flatnonzero(labels == label)[:10] for label in two]).tolist())
    path = _cells(embedded_pbmc, tmp_path, rows, "twenty.h5ad")
    out = tmp_path / "twenty.html"
    code, output = run("report", path, "-o", out, "--label-key", LABEL_KEY, store=shared_store)
    assert code == 0, output
    metrics = json.loads((tmp_path / "twenty.metrics.json").read_text())
    assert metrics["skipped"] == []
    for name in ("knn_accuracy", "ari", "nmi", "silhouette", "n_leiden_clusters"):
        assert metrics["embeddings"]["scfm"][name] is not None, name


def test_fewer_than_three_cells_are_refused_before_any_work(embedded_pbmc, tmp_path):
    path = _cells(embedded_pbmc, tmp_path, [0, 1])
    out = tmp_path / "r.html"
    store = tmp_path / "store" / "mlflow.db"
    code, output = run("report", path, "-o", out, store=f"sqlite:///{store}")
    assert code == 1
    assert output.strip().splitlines() == [
        f"error: {path}: 2 cells x 765 genes: a report needs at least 3 of each (the PCA baseline has at least "
        "two components)"]
    assert not out.exists() and not store.exists()


def test_nan_in_the_embedding_is_one_line(embedded_pbmc, tmp_path, shared_store):
    _, adata = embedded_pbmc
    broken = adata[:50].copy()
    broken.obsm["X_scfm"][[4, 9]] = np.inf
    path = tmp_path / "inf.h5ad"
    broken.write_h5ad(path)
    out = tmp_path / "r.html"
    code, output = run("report", path, "-o", out, store=shared_store)
    assert code == 1
    assert output.strip().splitlines() == [
        f"error: {path}: obsm['X_scfm'] holds NaN or infinite values in 2 of 50 cells (first: row 4); "
        "re-embed the file"]
    assert not out.exists()
