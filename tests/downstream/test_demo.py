"""scfm demo --quick: every step's output exists, all runs sit in one MLflow store, the report is complete."""

from __future__ import annotations

import json

import anndata as ad
import pytest

from scfm.report.html import SECTIONS

pytestmark = pytest.mark.slow


def test_every_step_leaves_its_output(demo_run):
    out = demo_run["out"]
    for sample in ("pbmc_a", "pbmc_b"):
        for path in (f"qc/{sample}.qc.h5ad", f"qc/{sample}.qc.json", f"aligned/{sample}.aligned.h5ad",
                     f"shards/{sample}/manifest.json", f"embedded/{sample}.embedded.h5ad",
                     f"annotated/{sample}.annotated.h5ad"):
            assert (out / path).exists(), path
    for path in ("vocab.tsv", "pretrain/model/model.safetensors", "pretrain/metrics.json", "classifier/labels.json",
                 "classifier/head.safetensors", "classifier/metrics.json", "annotated/pbmc_b.knn.h5ad",
                 "enhanced/pbmc_b.enhanced.h5ad", "report/demo.report.html", "report/demo.report.metrics.json",
                 "mlflow.db", "demo_summary.json"):
        assert (out / path).exists(), path
    annotated = ad.read_h5ad(out / "annotated" / "pbmc_b.annotated.h5ad")
    assert {"scfm_cell_type", "scfm_confidence", "bulk_labels", "batch"} <= set(annotated.obs.columns)
    assert annotated.obsm["scfm_probabilities"].shape[1] == len(annotated.uns["scfm"]["annotate"]["classes"])
    enhanced = ad.read_h5ad(out / "enhanced" / "pbmc_b.enhanced.h5ad")
    assert enhanced.layers["scfm_enhanced"].shape == enhanced.shape
    assert not list(out.rglob(".*.tmp")), "no temporary left behind"


def test_the_demo_tells_where_to_look(demo_run):
    out = demo_run["out"]
    assert f"report:       {out / 'report' / 'demo.report.html'}" in demo_run["stdout"]
    assert f"MLflow store: sqlite:///{out / 'mlflow.db'}" in demo_run["stdout"]
    assert "kNN accuracy  scfm" in demo_run["stdout"]


def test_all_steps_log_under_one_parent_run(demo_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(demo_run["uri"])
    runs = client.search_runs(["1"])
    parent = demo_run["summary"]["mlflow_parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    steps = sorted(r.data.tags["scfm.step"] for r in children)
    assert steps == sorted(["qc", "qc", "vocab", "align", "align", "pretrain", "finetune", "embed", "embed",
                            "annotate", "annotate", "annotate", "enhance", "report"])
    assert all(r.info.status == "FINISHED" for r in runs)
    parent_run = client.get_run(parent)
    assert parent_run.data.metrics["scfm_knn_accuracy"] == pytest.approx(
        demo_run["summary"]["embedding"]["scfm"]["knn_accuracy"])


def test_the_pretraining_run_used_the_demo_settings(demo_run):
    from mlflow.tracking import MlflowClient

    settings = demo_run["summary"]["settings"]
    client = MlflowClient(demo_run["uri"])
    [run] = [r for r in client.search_runs(["1"]) if r.data.tags.get("scfm.step") == "pretrain"]
    assert int(run.data.params["max_steps"]) == settings["pretrain_steps"]
    assert int(run.data.params["micro_batch_size"]) == settings["micro_batch_size"]
    assert float(run.data.params["lr"]) == pytest.approx(settings["lr"])
    assert demo_run["summary"]["pretrain"]["final_loss"] < demo_run["summary"]["pretrain"]["first_loss"]


def test_the_full_demo_pretrains_longer_than_the_quick_one():
    from scfm.demo import DemoSettings

    quick, full = DemoSettings.for_mode(True), DemoSettings.for_mode(False)
    assert full.pretrain_steps * full.micro_batch_size > 10 * quick.pretrain_steps * quick.micro_batch_size
    assert full.enhance_cells is None and quick.enhance_cells is not None


def test_the_summary_compares_with_the_baseline(demo_run):
    summary = demo_run["summary"]
    metrics = json.loads((demo_run["out"] / "report" / "demo.report.metrics.json").read_text())
    for name in ("scfm", "PCA"):
        for key in ("knn_accuracy", "ari"):
            assert summary["embedding"][name][key] == metrics["embeddings"][name][key]
            assert 0 <= metrics["embeddings"][name]["knn_accuracy"] <= 1
    assert summary["pretrain"]["steps"] == summary["settings"]["pretrain_steps"]
    assert summary["annotation_pbmc_b"]["classifier"]["n_cells"] == 350
    html = (demo_run["out"] / "report" / "demo.report.html").read_text()
    for key, _ in SECTIONS:
        assert f'<section id="section-{key}">' in html


def test_a_foreign_non_empty_directory_is_refused(tmp_path, scfm_bin):
    (tmp_path / "notes.txt").write_text("mine")
    proc = scfm_bin("demo", "-o", tmp_path, "--quick", check=False)
    assert proc.returncode == 1
    assert f"error: {tmp_path}: exists, is not empty and holds no previous demo" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
