"""bin/scfm-qc → bin/scfm-vocab build → bin/scfm-align as the pipeline runs them (subprocesses, real data)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from scfm.data.shards import ShardDataset, read_manifest
from scfm.data.vocab import Vocabulary


@pytest.mark.slow
def test_qc_then_vocab_then_align_on_pbmc(tmp_path, pbmc_counts, scfm_bin):
    raw = tmp_path / "pbmc.h5ad"
    pbmc_counts.write_h5ad(raw)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    scfm_bin("qc", raw, "-o", tmp_path / "pbmc.qc.h5ad", "--sample", "pbmc", "--min-genes", 50, "--quiet", env=env)
    qc = ad.read_h5ad(tmp_path / "pbmc.qc.h5ad")
    assert 0 < qc.n_obs <= pbmc_counts.n_obs

    scfm_bin("vocab", "build", tmp_path / "pbmc.qc.h5ad", "-o", tmp_path / "vocab.tsv", "--min-cells", 20,
             "--quiet", env=env)
    vocab = Vocabulary.load(tmp_path / "vocab.tsv")
    detected = np.asarray((qc.X > 0).sum(axis=0)).ravel()
    assert set(vocab.genes) == {g for g, n in zip(qc.var_names, detected) if n >= 20}

    scfm_bin("align", tmp_path / "pbmc.qc.h5ad", "-o", tmp_path / "pbmc.aligned.h5ad", "--vocab",
             tmp_path / "vocab.tsv", "--shards-dir", tmp_path / "pbmc.shards", "--cells-per-shard", 256,
             "--chunk-size", 200, "--quiet", env=env)
    aligned = ad.read_h5ad(tmp_path / "pbmc.aligned.h5ad")
    assert list(aligned.obs_names) == list(qc.obs_names)
    assert all(name.startswith("pbmc_") for name in aligned.obs_names)
    assert list(aligned.var_names) == vocab.genes
    assert {"sample", "batch", "n_genes_by_counts", "total_counts"} <= set(aligned.obs.columns)
    columns = [qc.var_names.get_loc(g) for g in vocab.genes]
    np.testing.assert_array_equal(aligned.X.toarray(), qc.X[:, columns].toarray())
    scfm = aligned.uns["scfm"]
    assert scfm["vocab_sha256"] == vocab.sha256
    assert "qc" in scfm  # the QC summary travels on
    coverage = json.loads((tmp_path / "pbmc.aligned.coverage.json").read_text())
    assert coverage["fraction_counts_kept"] == pytest.approx(qc.X[:, columns].sum() / qc.X.sum(), rel=1e-6)

    manifest = read_manifest(tmp_path / "pbmc.shards")
    assert manifest["n_cells"] == qc.n_obs and manifest["vocab_sha256"] == vocab.sha256
    assert manifest["obs_columns"] == ["sample", "batch"]
    cells = list(ShardDataset(tmp_path / "pbmc.shards", seed=1, loop=False, obs_columns=["sample"]))
    assert sorted(c["cell_id"] for c in cells) == sorted(qc.obs_names)
    assert {c["sample"] for c in cells} == {"pbmc"}
    by_id = {c["cell_id"]: c for c in cells}
    row = aligned.X[3]
    np.testing.assert_array_equal(by_id[aligned.obs_names[3]]["counts"], row.data)
