"""`scfm drug train` / `scfm drug predict`: a planted cell-drug interaction is learnt; bad input is refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from drug_data import SMILES, make_cell_lines, write_inputs
from scfm.cli import cli
from scfm.errors import ScfmError
from scfm.tasks.drug.fingerprints import morgan_fingerprints
from scfm.tasks.drug.regression import assign_split, load_drug_model, regression_metrics

STORE = {}


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args] + ["--mlflow-uri", STORE["uri"], "--quiet"])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("drug")
    STORE["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    adata, response, _ = make_cell_lines()
    paths = write_inputs(root, adata, response)
    code, output = run("drug", "train", paths["cells"], "--response", paths["response"], "--smiles", paths["smiles"],
                       "-o", root / "model", "--representation", "expression", "--max-epochs", 40, "--patience", 8,
                       "--batch-size", 64)
    assert code == 0, output
    return root, paths, adata, response


def test_model_learns_the_cell_specific_part_beyond_drug_means(trained):
    root, *_ = trained
    metrics = json.loads((root / "model" / "metrics.json").read_text())
    test = metrics["test"]
    assert test["model"]["n_pairs"] == 15 * len(SMILES)  # 10 % of 150 lines, all drugs: unseen lines only
    # within a drug, only the cell line's program explains the response: drug means score nothing there
    assert test["model"]["per_drug_median_pearson"] > 0.8
    assert test["model"]["pearson"] > test["drug_mean_baseline"]["pearson"] + 0.05
    assert test["model"]["rmse"] < test["drug_mean_baseline"]["rmse"]
    assert metrics["dropped"]["drugs_with_unparsable_smiles"] == []


def test_model_directory_is_safetensors_and_json(trained):
    root, *_ = trained
    files = {p.name for p in (root / "model").iterdir()}
    assert {"config.json", "model.safetensors", "predictions.tsv", "metrics.json", "plots"} <= files
    assert not [p for p in (root / "model").rglob("*") if p.suffix in (".pt", ".pkl", ".pickle", ".ckpt")]
    assert {p.name for p in (root / "model" / "plots").iterdir()} == {
        "training_curve.png", "observed_vs_predicted.png", "per_drug_pearson.png"}
    predictions = pd.read_csv(root / "model" / "predictions.tsv", sep="\t")
    test_lines = set(predictions.loc[predictions["split"] == "test", "cell_line"])
    assert not test_lines & set(predictions.loc[predictions["split"] != "test", "cell_line"])


def test_predict_reproduces_the_training_predictions(trained, tmp_path):
    root, paths, *_ = trained
    out = tmp_path / "pred.tsv"
    code, output = run("drug", "predict", paths["cells"], "--model", root / "model", "-o", out,
                       "--drugs", "aspirin,caffeine", "--response", paths["response"])
    assert code == 0, output
    predicted = pd.read_csv(out, sep="\t")
    assert set(predicted["drug"]) == {"aspirin", "caffeine"} and len(predicted) == 300
    at_training = pd.read_csv(root / "model" / "predictions.tsv", sep="\t")
    merged = predicted.merge(at_training, on=["cell_line", "drug"])
    np.testing.assert_allclose(merged["predicted_ln_ic50_x"], merged["predicted_ln_ic50_y"], atol=1e-3)
    metrics = json.loads((tmp_path / "pred.metrics.json").read_text())
    assert metrics["metrics"]["n_pairs"] == 300


def test_predict_scores_a_new_drug_given_its_smiles(trained, tmp_path):
    root, paths, *_ = trained
    (tmp_path / "new.tsv").write_text("drug\tsmiles\nnaproxen\tCOC1=CC2=C(C=C1)C=C(C=C2)C(C)C(=O)O\n")
    code, output = run("drug", "predict", paths["cells"], "--model", root / "model", "-o", tmp_path / "p.tsv",
                       "--drugs", "naproxen,aspirin", "--smiles", tmp_path / "new.tsv")
    assert code == 0, output
    predicted = pd.read_csv(tmp_path / "p.tsv", sep="\t")
    assert predicted.groupby("drug")["drug_in_training"].first().to_dict() == {"aspirin": True, "naproxen": False}
    assert np.isfinite(predicted["predicted_ln_ic50"]).all()


def test_unparsable_smiles_are_listed_and_skipped(tmp_path):
    adata, response, _ = make_cell_lines(n_lines=60, seed=1)
    smiles = {**SMILES, "broken": "C1CC(", "empty": ""}
    response = pd.concat([response, pd.DataFrame({"cell_line": adata.obs_names[:30], "drug": "broken",
                                                  "ln_ic50": 1.0})])
    paths = write_inputs(tmp_path, adata, response, smiles)
    STORE.setdefault("uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(cli, ["drug", "train", str(paths["cells"]), "--response", str(paths["response"]),
                                      "--smiles", str(paths["smiles"]), "-o", str(tmp_path / "m"), "--representation",
                                      "pca", "--pca-components", "5", "--max-epochs", "2", "--quiet",
                                      "--mlflow-uri", STORE["uri"]])
    assert result.exit_code == 0, result.output
    assert "warning: 1 drug(s) skipped, RDKit cannot parse their SMILES: broken" in result.output
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["dropped"]["drugs_with_unparsable_smiles"] == ["broken"]
    assert "broken" not in load_drug_model(tmp_path / "m").fingerprints.drugs
    assert morgan_fingerprints({"empty": ""}).unparsable == ["empty"]


@pytest.mark.parametrize("case", ["no shared lines", "no usable drug", "unknown drug", "bad value", "not a model",
                                  "missing genes"])
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, case):
    root, paths, adata, response = trained
    out = tmp_path / "out"
    if case == "no shared lines":
        renamed = response.assign(cell_line="OTHER" + response["cell_line"])
        renamed.to_csv(tmp_path / "r.tsv", sep="\t", index=False)
        args = ["train", paths["cells"], "--response", tmp_path / "r.tsv", "--smiles", paths["smiles"], "-o", out]
        message = "no cell line of the response table is in"
    elif case == "no usable drug":
        (tmp_path / "s.csv").write_text("drug,smiles\nsomething_else,CCO\n")
        args = ["train", paths["cells"], "--response", paths["response"], "--smiles", tmp_path / "s.csv", "-o", out]
        message = "no drug of the response table has a usable SMILES"
    elif case == "unknown drug":
        args = ["predict", paths["cells"], "--model", root / "model", "-o", out, "--drugs", "aspirin,notadrug"]
        message = "drug 'notadrug' is not in the model"
    elif case == "bad value":
        (tmp_path / "r.tsv").write_text("cell_line\tdrug\tln_ic50\nLINE000\taspirin\thigh\n")
        args = ["train", paths["cells"], "--response", tmp_path / "r.tsv", "--smiles", paths["smiles"], "-o", out]
        message = "ln_ic50 is not a number in 1 row(s)"
    elif case == "not a model":
        (tmp_path / "fake").mkdir()
        args = ["predict", paths["cells"], "--model", tmp_path / "fake", "-o", out]
        message = "not a drug response model directory"
    else:
        adata[:, :50].copy().write_h5ad(tmp_path / "few.h5ad")
        args = ["predict", tmp_path / "few.h5ad", "--model", root / "model", "-o", out]
        message = "the input lacks 10 of the model's 60 genes"
    if args[0] == "train":
        args += ["--representation", "expression"]
    code, output = run("drug", *args)
    assert code == 1
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_split_units_keep_groups_apart():
    pairs = pd.DataFrame({"cell_line": np.repeat([f"L{i}" for i in range(20)], 5),
                          "drug": np.tile([f"D{i}" for i in range(5)], 20)})
    for unit in ("cell_line", "drug"):
        split = assign_split(pairs, unit, 0.2, 0.2, seed=3)
        roles = pd.Series(split).groupby(pairs[unit].to_numpy()).nunique()
        assert (roles == 1).all() and set(split) == {"train", "val", "test"}
    with pytest.raises(ScfmError, match="too few"):
        assign_split(pairs.iloc[:10], "cell_line", 0.4, 0.4, seed=0)


def test_metrics_by_hand():
    observed = np.array([1.0, 2.0, 3.0, 4.0] * 5)
    predicted = observed * 2 + 1
    m = regression_metrics(observed, predicted, ["a"] * 10 + ["b"] * 10)
    assert m["pearson"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((observed + 1) ** 2)))
    assert m["per_drug_median_pearson"] == pytest.approx(1.0) and m["n_drugs_scored"] == 2


def test_scfm_embeddings_must_come_from_the_same_weights(tmp_path):
    """The scfm representation: trained on obsm['X_scfm']; an input embedded with other weights is refused."""
    adata, response, programs = make_cell_lines(n_lines=80, seed=2)
    adata.obsm["X_scfm"] = np.hstack([programs, np.random.default_rng(0).normal(size=(80, 6))]).astype(np.float32)
    adata.uns["scfm"] = {"embed": {"checkpoint_sha256": "aaa", "pool": "all", "input_type": "bulk",
                                   "target_depth": "T=S", "n_genes": np.int64(60)}}
    paths = write_inputs(tmp_path, adata, response)
    STORE.setdefault("uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, output = run("drug", "train", paths["cells"], "--response", paths["response"], "--smiles", paths["smiles"],
                       "-o", tmp_path / "m", "--max-epochs", 3)
    assert code == 0, output
    assert load_drug_model(tmp_path / "m").embed_settings["checkpoint_sha256"] == "aaa"
    code, output = run("drug", "predict", paths["cells"], "--model", tmp_path / "m", "-o", tmp_path / "ok.tsv")
    assert code == 0, output
    adata.uns["scfm"]["embed"]["checkpoint_sha256"] = "bbb"
    adata.write_h5ad(tmp_path / "other.h5ad")
    code, output = run("drug", "predict", tmp_path / "other.h5ad", "--model", tmp_path / "m", "-o", tmp_path / "p.tsv")
    assert code == 1 and "embedded differently from the model's training data (checkpoint_sha256" in output
    assert not (tmp_path / "p.tsv").exists()
