"""DRUG_RESPONSE: the module's command, filled in as Nextflow would, scores an embedded sample with a real model.

The model comes from `scfm drug adapt` on synthetic bulk lines and the sample's own cells (obsm['X_scfm']), so
the whole path the optional pipeline step takes runs here: staged model directory, --drugs, obs columns out.
"""

from __future__ import annotations

import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from nf_scripts import REPO, module_process, render_command


@pytest.mark.slow  # three CLI subprocesses
@pytest.mark.parametrize("drugs", [None, "drugB"])
def test_drug_response_module_scores_every_cell(tmp_path, drugs):
    rng = np.random.default_rng(0)
    embedding = {"checkpoint_sha256": "abc", "pool": "all", "input_type": "singlecell", "target_depth": "t4"}
    cells = ad.AnnData(np.zeros((80, 3), dtype=np.float32), obs=pd.DataFrame(index=[f"c{i}" for i in range(80)]))
    cells.obsm["X_scfm"] = rng.normal(size=(80, 12)).astype(np.float32)
    cells.uns["scfm"] = {"embed": embedding}
    cells.write_h5ad(tmp_path / "s1.annotated.h5ad")
    lines = ad.AnnData(np.zeros((60, 3), dtype=np.float32), obs=pd.DataFrame(index=[f"L{i}" for i in range(60)]))
    lines.obsm["X_scfm"] = rng.normal(size=(60, 12)).astype(np.float32)
    lines.uns["scfm"] = {"embed": {**embedding, "input_type": "bulk", "target_depth": "T=S"}}
    lines.write_h5ad(tmp_path / "lines.h5ad")
    response = pd.concat([pd.DataFrame({"cell_line": lines.obs_names, "drug": d,
                                        "ln_ic50": lines.obsm["X_scfm"][:, k] + 0.1 * rng.normal(size=60)})
                          for k, d in enumerate(("drugA", "drugB"))])
    response.to_csv(tmp_path / "response.tsv", sep="\t", index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    model = tmp_path / "model"
    subprocess.run([sys.executable, str(REPO / "bin" / "scfm-drug"), "adapt", str(tmp_path / "lines.h5ad"),
                    "--response", str(tmp_path / "response.tsv"), "--target", str(tmp_path / "s1.annotated.h5ad"),
                    "--drugs", "drugA,drugB", "-o", str(model), "--epochs", "2", "--quiet"], check=True, env=env)

    task = tmp_path / "task"
    (task / "drug_model").mkdir(parents=True)
    (task / "drug_model" / "model").symlink_to(model)  # stageAs: 'drug_model/*'
    (task / "s1.annotated.h5ad").symlink_to(tmp_path / "s1.annotated.h5ad")
    command = render_command(module_process("drug_response"), {
        "h5ad": "s1.annotated.h5ad", "prefix": "s1", "drug_model": "drug_model/model",
        "drugs": f"--drugs '{drugs}'" if drugs else "", "args": ""}, {"seed": 0, "drugs": drugs})
    assert command[0] == "scfm-drug" and command[1] == "score"
    proc = subprocess.run([sys.executable, str(REPO / "bin" / command[0]), *command[1:]], cwd=task, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    scored = ad.read_h5ad(task / "s1.drug.h5ad")
    expected = ["drugB"] if drugs else ["drugA", "drugB"]
    assert [c for c in scored.obs.columns if c.endswith("_sensitivity")] == [f"scfm_{d}_sensitivity" for d in expected]
    assert scored.n_obs == 80 and scored.obs[f"scfm_{expected[0]}_sensitivity"].between(0, 1).all()
