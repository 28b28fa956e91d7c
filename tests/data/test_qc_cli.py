"""``scfm qc`` end to end: outputs, the MLflow run read back from SQLite, and every error path."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm.cli import main


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("scfm")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow  # a subprocess importing scanpy and MLflow: ~15 s alone, more on a busy machine
def test_cli_writes_h5ad_summary_plots_and_one_mlflow_run(pbmc_counts, tmp_path, scfm_bin):
    pbmc_counts.write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "res" / "donor1.qc.h5ad"
    proc = scfm_bin("qc", tmp_path / "in.h5ad", "-o", out, "--sample", "donor1", "--batch", "run7",
                    "--condition", "ctrl", "--min-genes", "220", "--min-cells", "5",
                    "--plots-dir", tmp_path / "res" / "plots", "--seed", "1")
    assert "donor1:" in proc.stderr and "passed QC" in proc.stderr

    summary = json.loads((tmp_path / "res" / "donor1.qc.json").read_text())  # default summary path
    n_genes = (pbmc_counts.X.toarray() > 0).sum(1)
    assert summary["filters"]["min_genes"]["removed"] == int(np.sum(n_genes < 220))
    written = ad.read_h5ad(out)
    assert written.n_obs == summary["cells_out"] == int(np.sum(n_genes >= 220))
    assert set(written.obs["batch"]) == {"run7"} and set(written.obs["condition"]) == {"ctrl"}
    assert written.obs_names.str.startswith("donor1_").all()
    assert written.uns["scfm"]["qc"]["filters"]["min_genes"]["removed"] == summary["filters"]["min_genes"]["removed"]

    # the default store sits next to the output
    client, runs = _runs(f"sqlite:///{tmp_path / 'res' / 'mlflow.db'}")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["scfm.step"] == "qc"
    assert run.data.params["min_genes"] == "220" and run.data.params["sample"] == "donor1"
    assert run.data.metrics["qc.cells_out"] == summary["cells_out"]
    assert run.data.metrics["qc.removed.min_genes"] == summary["filters"]["min_genes"]["removed"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "donor1.qc.json" in artifacts
    assert plots == {"plots/donor1.qc_violin.png", "plots/donor1.qc_hist.png"}


# ------------------------------------------------------------------------------------------ error paths


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _small(tmp_path, name="in.h5ad", mutate=None) -> str:
    rng = np.random.default_rng(0)
    dense = rng.poisson(2.0, size=(60, 30)).astype(np.float32)
    adata = ad.AnnData(dense, obs=pd.DataFrame(index=[f"c{i}" for i in range(60)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(30)]))
    if mutate:
        adata = mutate(adata)
    adata.X = sp.csr_matrix(adata.X)
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _set(value):
    def mutate(adata):
        adata.X[1, 2] = value
        return adata
    return mutate


def _bytes(name, data):
    def make(tmp_path):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return make


def _truncated(tmp_path):
    full = _small(tmp_path, "full.h5ad")
    data = full.read_bytes()
    full.unlink()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 3])
    return tmp_path / "cut.h5ad"


def _duplicates(adata):
    adata.obs_names = ["dup"] * 2 + list(adata.obs_names[2:])
    return adata


CASES = {
    "missing": (lambda tmp: tmp / "absent.h5ad", [], "file not found"),
    "empty": (_bytes("in.h5ad", b""), [], "file is empty"),
    "not-hdf5": (_bytes("in.h5ad", b"PK\x03\x04 zip, not hdf5"), [], "not an HDF5 file"),
    "truncated": (_truncated, [], "truncated"),
    "extension": (_bytes("in.xlsx", b"x"), [], "unknown input format"),
    "negative": (lambda tmp: _small(tmp, mutate=_set(-3)), [], "negative values"),
    "nan": (lambda tmp: _small(tmp, mutate=_set(np.nan)), [], "NaN values"),
    "inf": (lambda tmp: _small(tmp, mutate=_set(np.inf)), [], "infinite values"),
    "non-integer": (lambda tmp: _small(tmp, mutate=_set(0.5)), [], "non-integer values where raw counts"),
    "zero-cells": (lambda tmp: _small(tmp, mutate=lambda a: a[:0].copy()), [], "zero cells"),
    "zero-genes": (lambda tmp: _small(tmp, mutate=lambda a: a[:, :0].copy()), [], "zero genes"),
    "duplicate-barcodes": (lambda tmp: _small(tmp, mutate=_duplicates), [], "duplicate cell barcodes"),
    "missing-layer": (_small, ["--layer", "spliced"], "layer 'spliced' not found"),
    "empty-result": (_small, ["--min-genes", "1000"], "QC filter 'min_genes' (threshold 1000) removed all"),
    "mito-empties": (lambda tmp: _small(tmp, mutate=lambda a: ad.AnnData(
        a.X, obs=a.obs, var=pd.DataFrame(index=[f"MT-{i}" for i in range(30)]))), ["--min-genes", "1"],
        "QC filter 'max_pct_mito'"),
    "streamed-negative": (lambda tmp: _small(tmp, mutate=_set(-1)), ["--chunk-size", "16"], "negative values"),
    "transpose-h5ad": (_small, ["--transpose"], "transpose applies to csv/tsv"),
    "doublets-too-few": (lambda tmp: _small(tmp, mutate=lambda a: a[:20].copy()), ["--min-genes", "1", "--doublets"],
                         "doublet detection needs at least 30 cells"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_1_with_one_line_and_leaves_no_output(tmp_path, capsys, store, case):
    make, flags, message = CASES[case]
    path = make(tmp_path)
    out_dir = tmp_path / "out"
    code = main(["qc", str(path), "-o", str(out_dir / "x.qc.h5ad"), "--plots-dir", str(out_dir / "plots"),
                 "--min-genes", "5", "--min-cells", "1", *flags, "--mlflow-uri", store, "--quiet"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: ") and message in errors[0]
    leftovers = [p for p in out_dir.rglob("*") if p.is_file()] if out_dir.exists() else []
    assert leftovers == []


def test_failed_step_is_recorded_as_a_failed_mlflow_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["qc", str(_small(tmp_path)), "-o", str(tmp_path / "o.h5ad"), "--min-genes", "1000",
                 "--mlflow-uri", uri]) == 1
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FAILED"]
