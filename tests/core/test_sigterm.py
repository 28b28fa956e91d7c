"""SIGTERM (what Slurm, Nextflow and `timeout` send) sent to a running step: it stops, exits 143 with one
error line, and leaves nothing behind (no <out>.<pid>.tmp, no .shards.<pid>.tmp, no scratch folder).
Pretraining saves a checkpoint instead and exits 75 (tests/train/test_rerun.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(__file__).resolve().parents[2] / "bin"
TERMINATED = 143
LINE = "error: terminated by SIGTERM; partial outputs were removed"

pytestmark = pytest.mark.slow  # each case is a subprocess doing real work for a few seconds


@pytest.fixture(scope="module")
def inputs(train_data, tmp_path_factory):
    """7,000 real PBMC profiles (the 700 cells ten times over, so that every step runs for a while)."""
    import anndata as ad

    from scfm.data.align import align_adata

    root = tmp_path_factory.mktemp("sigterm")
    cells = ad.read_h5ad(train_data["aligned"])
    many = ad.concat([cells] * 10, index_unique="-", keys=[str(i) for i in range(10)])
    many.uns["scfm"] = dict(cells.uns["scfm"])
    del many.obs["bulk_labels"]
    many.obs["bulk_labels"] = list(cells.obs["bulk_labels"]) * 10
    raw = many[:, ::-1].copy()  # another gene order: not aligned
    raw.write_h5ad(root / "raw.h5ad")
    aligned, _ = align_adata(raw, train_data["vocab_obj"])
    aligned.obs["bulk_labels"] = many.obs["bulk_labels"].to_numpy()
    aligned.write_h5ad(root / "aligned.h5ad")
    embedded = aligned.copy()  # an embedding to report on: PCA of the log-normalised cells
    import scanpy as sc

    work = embedded.copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.pp.pca(work, n_comps=20, random_state=0)
    embedded.obsm["X_scfm"] = work.obsm["X_pca"]
    embedded.write_h5ad(root / "embedded.h5ad")
    from scfm import tracking

    store = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    tracking.ensure_store(store)
    return {"root": root, "raw": root / "raw.h5ad", "aligned": root / "aligned.h5ad", "store": store,
            "embedded": root / "embedded.h5ad", "cells": train_data["aligned"],
            "vocab": train_data["vocab"], "checkpoint": train_data["checkpoint"]}


@pytest.fixture
def terminate_when(stop_when_ready, tmp_path):
    def start_and_stop(argv, ready, store: str):
        """Start ``bin/scfm-<step> ARGV``; SIGTERM as soon as ``ready()``; return (exit code, stderr)."""
        log = tmp_path / "stderr.txt"
        with open(log, "w") as stderr:
            proc = subprocess.Popen([sys.executable, str(BIN / f"scfm-{argv[0]}"), *map(str, argv[1:]),
                                     "--mlflow-uri", store], stdout=subprocess.DEVNULL, stderr=stderr,
                                    env={**os.environ, "SCFM_PROGRESS": "1"})
        code = stop_when_ready(proc, ready, timeout=300, what=lambda: log.read_text()[-3000:])
        text = log.read_text()
        log.unlink()
        return code, text

    return start_and_stop


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def hidden_tmp(folder: Path) -> bool:
    return any(p.name.endswith(".tmp") or p.name.startswith(".scfm-embed") for p in folder.iterdir())


def assert_stopped_cleanly(code, stderr, out_dir):
    assert code == TERMINATED, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == [LINE], stderr[-3000:]
    assert "Traceback" not in stderr
    assert leftovers(out_dir) == []


def test_qc(inputs, tmp_path, terminate_when):
    out = tmp_path / "out"
    out.mkdir()
    code, stderr = terminate_when(["qc", inputs["raw"], "-o", out / "s.qc.h5ad", "--min-genes", 5,
                                   "--chunk-size", 20, "--plots-dir", out / "plots"],
                                  lambda: hidden_tmp(out), inputs["store"])
    assert_stopped_cleanly(code, stderr, out)


def test_align_with_shards(inputs, tmp_path, terminate_when):
    out = tmp_path / "out"
    out.mkdir()
    code, stderr = terminate_when(["align", inputs["raw"], "-o", out / "s.aligned.h5ad", "--shards-dir",
                                   out / "s.shards", "--vocab", inputs["vocab"], "--chunk-size", 20,
                                   "--cells-per-shard", 500],
                                  lambda: any(p.name.startswith(".s.shards.") for p in out.iterdir()),
                                  inputs["store"])
    assert_stopped_cleanly(code, stderr, out)


def test_embed_with_its_scratch_folder(inputs, tmp_path, terminate_when):
    out = tmp_path / "out"
    out.mkdir()

    def embedding():  # aligned into the scratch folder, and the output started
        scratch = [p for p in out.iterdir() if p.name.startswith(".scfm-embed")]
        return bool(scratch) and (scratch[0] / "aligned.h5ad").exists() and any(
            p.name.startswith(".s.npy.") for p in out.iterdir())

    code, stderr = terminate_when(["embed", inputs["raw"], "-o", out / "s.npy", "--checkpoint",
                                   inputs["checkpoint"], "--batch-size", 1],
                                  embedding, inputs["store"])
    assert_stopped_cleanly(code, stderr, out)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(inputs["store"])
    runs = client.search_runs([client.get_experiment_by_name("scfm").experiment_id],
                              filter_string="tags.`scfm.step` = 'embed'")
    assert [r.info.status for r in runs] == ["KILLED"]  # stopped from outside, not failed


def test_enhance(inputs, tmp_path, terminate_when):
    out = tmp_path / "out"
    out.mkdir()
    code, stderr = terminate_when(["enhance", inputs["aligned"], "-o", out / "s.enhanced.h5ad", "--checkpoint",
                                   inputs["checkpoint"], "--no-evaluate", "--batch-size", 1],
                                  lambda: hidden_tmp(out), inputs["store"])
    assert_stopped_cleanly(code, stderr, out)


def test_finetune(inputs, tmp_path, terminate_when):
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "stderr.txt"
    code, stderr = terminate_when(["finetune", inputs["cells"], "-o", out / "classifier", "--checkpoint",
                                   inputs["checkpoint"], "--label-key", "bulk_labels", "--epochs", 1000,
                                   "--patience", 1000],
                                  lambda: "finetune:" in log.read_text(), inputs["store"])
    assert_stopped_cleanly(code, stderr, out)


def test_report(inputs, tmp_path, terminate_when):
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "stderr.txt"
    code, stderr = terminate_when(["report", inputs["embedded"], "-o", out / "report.html"],
                                  lambda: "report:" in log.read_text(), inputs["store"])
    assert_stopped_cleanly(code, stderr, out)


def test_genes_modules_with_its_scratch_folder(inputs, tmp_path, terminate_when):
    out = tmp_path / "out"
    out.mkdir()

    def embedding():  # the input aligned into the scratch folder beside the output, gene embeddings under way
        log = tmp_path / "stderr.txt"
        return any(p.name.startswith(".scfm-genes-") for p in out.iterdir()) and "gene embeddings" in log.read_text()

    code, stderr = terminate_when(["genes", "modules", inputs["raw"], "-o", out / "s.genes", "--checkpoint",
                                   inputs["checkpoint"], "--no-enrichment", "--batch-size", 1],
                                  embedding, inputs["store"])
    assert_stopped_cleanly(code, stderr, out)
