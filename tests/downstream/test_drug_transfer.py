"""`scfm drug adapt` / `scfm drug score` on synthetic data whose answer is known.

A sensitivity program (genes 0-9) sets each bulk line's ln IC50 and marks which single cells are sensitive.
The single cells are shifted from the lines: every gene has another offset and scale, the noise is larger and
a program of their own (genes 20-29) that the lines do not have adds variance. No labelled single-cell drug
response data set is available offline, so this is the evidence that the transfer works.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from scfm.cli import cli
from scfm.tasks.drug.transfer import obs_key

N_GENES = 50


def _domains(seed: int = 0):
    rng = np.random.default_rng(seed)
    program = np.zeros(N_GENES)
    program[:10] = 1.0
    other = np.zeros(N_GENES)
    other[30:40] = 1.0
    lines = rng.normal(size=200)
    bulk = np.outer(lines, program) + np.outer(rng.normal(size=200), other) + 0.5 * rng.normal(size=(200, N_GENES))
    ln_ic50 = 2.0 - 1.5 * lines + 0.4 * rng.normal(size=200)

    cells = rng.normal(size=600)
    own = np.zeros(N_GENES)
    own[20:30] = 1.0
    shift, scale = rng.normal(3.0, 1.0, size=N_GENES), rng.uniform(0.3, 2.0, size=N_GENES)
    single = (np.outer(cells, program) + np.outer(rng.normal(size=600), other)
              + 1.5 * np.outer(rng.normal(size=600), own) + 0.8 * rng.normal(size=(600, N_GENES))) * scale + shift
    return bulk, ln_ic50, single, cells > 0


def _write(tmp_path, bulk, ln_ic50, single, drug="drugA"):
    genes = [f"G{i}" for i in range(N_GENES)]
    lines = ad.AnnData(bulk.astype(np.float32), obs=pd.DataFrame(index=[f"L{i}" for i in range(len(bulk))]))
    lines.var_names = genes
    lines.write_h5ad(tmp_path / "lines.h5ad")
    cells = ad.AnnData(single.astype(np.float32), obs=pd.DataFrame(index=[f"c{i}" for i in range(len(single))]))
    cells.var_names = genes[::-1]  # another gene order: matched by name
    cells.X = cells.X[:, ::-1]
    cells.write_h5ad(tmp_path / "cells.h5ad")
    pd.DataFrame({"cell_line": lines.obs_names, "drug": drug, "ln_ic50": ln_ic50}).to_csv(
        tmp_path / "response.tsv", sep="\t", index=False)


def _invoke(store, *args):
    result = CliRunner().invoke(cli, [str(a) for a in args] + ["--quiet", "--mlflow-uri",
                                                               f"sqlite:///{store / 'mlflow.db'}"])
    return result.exit_code, result.output


def _adapt_and_score(tmp_path, *extra):
    code, output = _invoke(tmp_path, "drug", "adapt", tmp_path / "lines.h5ad", "--response", tmp_path / "response.tsv",
                           "--target", tmp_path / "cells.h5ad", "--drugs", "drugA", "-o", tmp_path / "model",
                           "--representation", "expression", "--epochs", 15, *extra)
    assert code == 0, output
    code, output = _invoke(tmp_path, "drug", "score", tmp_path / "cells.h5ad", "-o", tmp_path / "scored.h5ad",
                           "--model", tmp_path / "model")
    assert code == 0, output
    return ad.read_h5ad(tmp_path / "scored.h5ad"), json.loads((tmp_path / "model" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    bulk, ln_ic50, single, sensitive = _domains()
    _write(root, bulk, ln_ic50, single)
    scored, metrics = _adapt_and_score(root)
    return root, scored, metrics, sensitive


def test_planted_sensitivity_is_recovered_in_single_cells(adapted):
    root, scored, metrics, sensitive = adapted
    scores = scored.obs[obs_key("drugA")].to_numpy()
    assert scored.obs_names[0] == "c0" and np.all((scores >= 0) & (scores <= 1))
    assert roc_auc_score(sensitive, scores) > 0.85
    per_drug = metrics["per_drug"]["drugA"]
    assert per_drug["source_val_auroc"] > 0.85 and per_drug["n_sensitive"] == 100
    assert scored.uns["scfm"]["drug"]["columns"] == ["scfm_drugA_sensitivity"]
    assert (root / "model" / "plots" / "training_curves.png").stat().st_size > 1000


def test_shuffled_labels_recover_nothing(tmp_path):
    """The control: the same data with the bulk responses permuted carries no signal to transfer."""
    bulk, ln_ic50, single, sensitive = _domains()
    _write(tmp_path, bulk, np.random.default_rng(5).permutation(ln_ic50), single)
    scored, _ = _adapt_and_score(tmp_path)
    assert abs(roc_auc_score(sensitive, scored.obs[obs_key("drugA")]) - 0.5) < 0.15


@pytest.mark.parametrize("case", ["absent drug at scoring", "drug without response", "no shared genes"])
def test_bad_input_is_one_line_and_writes_nothing(adapted, tmp_path, case):
    root = adapted[0]
    out = tmp_path / "out"
    if case == "absent drug at scoring":
        args = ["score", root / "cells.h5ad", "-o", out, "--model", root / "model", "--drugs", "drugB"]
        message = "drug 'drugB' is not in the model"
    elif case == "drug without response":
        args = ["adapt", root / "lines.h5ad", "--response", root / "response.tsv", "--target", root / "cells.h5ad",
                "--drugs", "drugA,drugB", "-o", out, "--representation", "expression", "--epochs", 1]
        message = "drug 'drugB' has no response values"
    else:
        other = ad.read_h5ad(root / "cells.h5ad")
        other.var_names = [f"X{i}" for i in range(other.n_vars)]
        other.write_h5ad(tmp_path / "other.h5ad")
        args = ["adapt", root / "lines.h5ad", "--response", root / "response.tsv", "--target", tmp_path / "other.h5ad",
                "--drugs", "drugA", "-o", out, "--representation", "expression"]
        message = "share no gene"
    code, output = _invoke(root, "drug", *args)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], output
    assert not out.exists()
