"""The report's drug-sensitivity section: scored cells get tables and UMAPs, unscored inputs a note."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
from click.testing import CliRunner

from scfm.cli import cli
from scfm.report.drug import drug_section, sensitivity_columns


def _section(text: str) -> str:
    return re.search(r'<section id="section-drug">(.*?)</section>', text, flags=re.S).group(1)


def test_scored_cells_get_a_drug_section(embedded_pbmc, tmp_path):
    _, adata = embedded_pbmc
    scored = adata.copy()
    rng = np.random.default_rng(0)
    scored.obs["scfm_drugA_sensitivity"] = rng.random(scored.n_obs).astype(np.float32)
    scored.obs["scfm_5-FU_sensitivity"] = np.where(scored.obs["bulk_labels"] == "CD14+ Monocyte", 0.9, 0.1)
    scored.uns["scfm"]["drug"] = {"thresholds": {"drugA": 1.25, "5-FU": 0.5}}
    path = tmp_path / "scored.h5ad"
    scored.write_h5ad(path)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", str(path), "-o", str(out), "--label-key", "bulk_labels", "--quiet",
                                      "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    section = _section(out.read_text())
    assert "<td>drugA</td>" in section and "<td>1.250</td>" in section
    assert "Mean score per bulk_labels" in section and section.count("<img") == 3  # histograms + 2 UMAP rows
    metrics = json.loads((tmp_path / "report.metrics.json").read_text())["drug_sensitivity"]
    assert metrics["5-FU"]["by_group"]["CD14+ Monocyte"] == 0.9
    expected = float((scored.obs["scfm_5-FU_sensitivity"] > 0.5).mean())
    assert abs(metrics["5-FU"]["fraction_sensitive"] - expected) < 1e-9


def test_unscored_cells_get_a_note():
    import anndata as ad

    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32), obs=pd.DataFrame(index=["a", "b", "c"]))
    assert sensitivity_columns(adata) == {}
    body, metrics = drug_section(adata, {})
    assert "scfm drug score" in body and metrics == {}
