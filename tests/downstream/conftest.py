"""Fixtures of the downstream tests: embedded PBMCs and one report built from them, shared across files."""

from __future__ import annotations

import json

import numpy as np
import pytest

LABEL_KEY = "bulk_labels"


def embed_with_pca(adata, n_comps: int = 20, seed: int = 0):
    """A real embedding of real cells (PCA of log1p CP10k) under obsm['X_scfm']."""
    import scanpy as sc

    work = adata.copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.pp.pca(work, n_comps=n_comps, random_state=seed)
    adata.obsm["X_scfm"] = work.obsm["X_pca"].astype(np.float32)
    adata.uns["scfm"] = {"embed": {"checkpoint_sha256": "pca-stand-in", "pool": "all", "target_depth": "f1"}}
    return adata


@pytest.fixture(scope="session")
def embedded_pbmc(pbmc_counts, tmp_path_factory):
    """(path, AnnData): the 700 PBMCs with an embedding, two batches and a QC summary in uns."""
    adata = embed_with_pca(pbmc_counts.copy())
    adata.obs["batch"] = np.where((np.arange(adata.n_obs) // 2) % 2 == 0, "sample_a", "sample_b")
    adata.uns["scfm"]["qc"] = {"cells_in": 750, "cells_out": int(adata.n_obs), "filters": {"min_genes": 200}}
    path = tmp_path_factory.mktemp("embedded") / "pbmc.embedded.h5ad"
    adata.write_h5ad(path)
    return path, adata


def run_scfm(*args) -> None:
    """Run ``bin/scfm-<step>`` as the pipeline does (a subprocess of this interpreter)."""
    import subprocess
    import sys
    from pathlib import Path

    step, *rest = args
    exe = Path(__file__).resolve().parents[2] / "bin" / f"scfm-{step}"
    proc = subprocess.run([sys.executable, str(exe), *map(str, rest)], capture_output=True, text=True)
    assert proc.returncode == 0, f"scfm-{step} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``scfm-demo --quick`` run once, end to end, as a user would; returns its paths and summary."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("demo") / "demo_out"
    exe = Path(__file__).resolve().parents[2] / "bin" / "scfm-demo"
    env = {**os.environ, "SCFM_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, str(exe), "-o", str(out), "--quick"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, f"scfm-demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr,
            "summary": json.loads((out / "demo_summary.json").read_text()), "uri": f"sqlite:///{out}/mlflow.db"}


@pytest.fixture(scope="session")
def report_run(demo_run):
    """The demo's combined report (real tiny-model embeddings, classifier annotation, linked training runs)."""
    from mlflow.tracking import MlflowClient

    from scfm.report.html import read_inputs

    out = demo_run["out"]
    annotated = [out / "annotated" / "pbmc_a.annotated.h5ad", out / "annotated" / "pbmc_b.annotated.h5ad"]
    combined, _ = read_inputs(annotated, "X_scfm")
    client = MlflowClient(demo_run["uri"])
    pretrain = [r for r in client.search_runs(["1"]) if r.data.tags.get("scfm.step") == "pretrain"]
    return {
        "html": out / "report" / "demo.report.html", "metrics_json": out / "report" / "demo.report.metrics.json",
        "uri": demo_run["uri"], "seed": 0, "annotated": combined, "training_run_id": pretrain[0].info.run_id,
        "root": out,
    }


@pytest.fixture(scope="session")
def tiny_model(pbmc_counts, tmp_path_factory):
    """A real (untrained, seeded) tiny XTrimoGene checkpoint over the PBMC genes, and 40 aligned cells.

    Returns (checkpoint dir, aligned h5ad path, aligned AnnData).
    """
    import torch

    from scfm.data.align import align_adata
    from scfm.data.vocab import Vocabulary
    from scfm.model.checkpoint import save_checkpoint
    from scfm.model.config import ModelConfig
    from scfm.model.xtrimogene import XTrimoGene

    root = tmp_path_factory.mktemp("tiny_model")
    vocab = Vocabulary([str(g) for g in pbmc_counts.var_names])
    config = ModelConfig.preset("tiny", n_genes=len(vocab))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = XTrimoGene(config)
    checkpoint = save_checkpoint(root / "tiny_ckpt", model, config, vocab)
    aligned, _ = align_adata(pbmc_counts[:40].copy(), vocab)
    path = root / "cells.aligned.h5ad"
    aligned.write_h5ad(path)
    return checkpoint, path, aligned


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory):
    """One MLflow store for the error-path tests: creating a fresh SQLite store per test costs seconds."""
    from scfm import tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    tracking.ensure_store(uri)
    return uri
