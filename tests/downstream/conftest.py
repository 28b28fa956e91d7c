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
def report_run(embedded_pbmc, tmp_path_factory):
    """One full report: annotated query cells with labels, two batches, a QC JSON and a linked training run.

    Returns a dict of paths and the objects the report was built from, for the report tests to check.
    """
    import anndata as ad

    from scfm import tracking

    root = tmp_path_factory.mktemp("report")
    _, adata = embedded_pbmc
    ref_path, query_path = root / "ref.h5ad", root / "query.h5ad"
    adata[::2].copy().write_h5ad(ref_path)
    adata[1::2].copy().write_h5ad(query_path)
    annotated = root / "query.annotated.h5ad"
    uri = f"sqlite:///{root}/mlflow.db"
    run_scfm("annotate", query_path, "-o", annotated, "--reference", ref_path, "--label-key", LABEL_KEY,
             "--mlflow-uri", uri, "--quiet")

    with tracking.step_run("pretrain", uri=uri, params={"steps": 12}) as training:
        for step in range(12):
            training.log_metrics({"train/loss": 2.0 / (step + 1), "train/lr": 1e-3}, step=step)
    qc_json = root / "sample.qc.json"
    qc_json.write_text(json.dumps({"sample": "pbmc", "cells_in": 750, "cells_out": 700,
                                   "removed": {"min_genes": 30, "max_pct_mt": 20}}))
    html = root / "out" / "report.html"
    run_scfm("report", annotated, "-o", html, "--label-key", LABEL_KEY, "--batch-key", "batch",
             "--qc-json", qc_json, "--run-id", training.run_id, "--mlflow-uri", uri, "--seed", 3, "--quiet")
    return {
        "html": html, "metrics_json": root / "out" / "report.metrics.json", "uri": uri, "seed": 3,
        "annotated": ad.read_h5ad(annotated), "training_run_id": training.run_id, "root": root,
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
