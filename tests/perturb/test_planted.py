"""The predictor on synthetic screens with planted effects: what it must recover, reproducibly."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from perturb_data import CONTROL, GENES, PLANTED, PROGRAM, synthetic_screen
from scfm.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def train_args(inputs, out, *extra):
    return ["perturb", "train", *inputs, "-o", out, "--perturbation-key", "guide", "--target-key", "gene",
            "--control", CONTROL, "--mlflow-uri", f"sqlite:///{out.parent}/mlflow.db", "--quiet", *extra]


@pytest.fixture(scope="module")
def held_out_guide(tmp_path_factory, tiny_checkpoint):
    """Train with scfm gene features on every guide but PLANTED's second; predict the full screen."""
    root = tmp_path_factory.mktemp("planted")
    screen = synthetic_screen(seed=1)
    screen.write_h5ad(root / "full.h5ad")
    screen[screen.obs["guide"].astype(str) != f"{PLANTED}_g2"].copy().write_h5ad(root / "train.h5ad")
    run(*train_args([root / "train.h5ad"], root / "predictor", "--checkpoint", tiny_checkpoint,
                    "--gene-features", "scfm", "--folds", "0", "--epochs", "200", "--seed", "3"))
    run("perturb", "predict", root / "predictor", "-o", root / "predicted.h5ad", "--input", root / "full.h5ad",
        "--perturbation-key", "guide", "--target-key", "gene", "--control", CONTROL, "--mlflow-uri",
        f"sqlite:///{root}/mlflow.db")
    return root, ad.read_h5ad(root / "predicted.h5ad"), json.loads((root / "predicted.evaluation.json").read_text())


def test_planted_program_is_recovered_for_a_held_out_guide_of_the_same_target(held_out_guide):
    _, predicted, evaluation = held_out_guide
    guide = f"{PLANTED}_g2"
    assert not predicted.obs.loc[guide, "trained"] and predicted.obs.loc[guide, "n_targets_seen"] == 1
    change = predicted[guide].layers["predicted_change"].ravel()
    observed = predicted[guide].layers["observed_change"].ravel()
    program = [GENES.index(g) for g in PROGRAM]
    others = [i for i, g in enumerate(GENES) if g not in PROGRAM and g != PLANTED]
    assert change[program].min() > 0.7
    # the program takes a large share of each cell's counts, so per 10k every other gene falls: also predicted
    assert np.abs(change[others] - observed[others]).mean() < 0.3
    top = np.argsort(-change)[: len(PROGRAM)]
    assert len(set(top) & set(program)) >= len(PROGRAM) - 1
    assert change[GENES.index(PLANTED)] < -0.5                      # the knocked-down target itself
    metrics = evaluation["perturbations"][guide]["metrics"]["predictor"]
    assert metrics["pearson"] > 0.85 and metrics["direction_top"] >= 0.8
    # a guide of another target gets no program
    other = predicted["G04_g2"].layers["predicted_change"].ravel()
    assert np.abs(other[program]).mean() < 0.3


def test_prediction_file_layout(held_out_guide):
    root, predicted, _ = held_out_guide
    screen = ad.read_h5ad(root / "full.h5ad")
    assert list(predicted.var_names) == GENES
    counts = sp.csr_matrix(screen.X).toarray()
    logged = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    guide = screen.obs["guide"].astype(str).to_numpy()
    control = logged[guide == CONTROL].mean(axis=0)
    observed = logged[guide == f"{PLANTED}_g2"].mean(axis=0) - control
    np.testing.assert_allclose(predicted[f"{PLANTED}_g2"].layers["observed_change"].ravel(), observed, atol=1e-4)
    np.testing.assert_allclose(predicted.X, predicted.var["control_mean"].to_numpy() + predicted.layers[
        "predicted_change"], atol=1e-5)
    top = predicted.uns["top_changed_genes"]
    first = top[top["perturbation"] == f"{PLANTED}_g2"].sort_values("rank")
    assert len(first) == 20 and first["gene"].iloc[0] == GENES[int(np.argmax(np.abs(observed)))]
    assert predicted.uns["scfm"]["perturb"]["gene_features"] == "scfm"
    trained = json.loads((root / "predictor" / "predictor.json").read_text())["settings"]
    assert trained["precision"] == "fp32" and trained["precision_reason"]  # decided once for the tiny model


def test_unseen_combination_is_predicted_from_its_singles(tmp_path):
    screen = synthetic_screen(seed=2, combos={"G01+G02": 80, "G03+G04": 80})
    screen.obs["label"] = screen.obs["gene"]
    keep = screen.obs["gene"].astype(str) != "G01+G02"
    screen[keep].copy().write_h5ad(tmp_path / "train.h5ad")
    run("perturb", "train", tmp_path / "train.h5ad", "-o", tmp_path / "predictor", "--perturbation-key", "label",
        "--control", CONTROL, "--gene-features", "learned", "--folds", "0", "--epochs", "200",
        "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db", "--quiet")
    run("perturb", "predict", tmp_path / "predictor", "-o", tmp_path / "combo.h5ad", "--perturbation", "G02+G01",
        "--perturbation", "G05", "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db")
    predicted = ad.read_h5ad(tmp_path / "combo.h5ad")
    assert predicted.obs.loc["G02+G01", "targets"] == "G01+G02"
    assert predicted.obs.loc["G02+G01", "n_targets_seen"] == 2 and not predicted.obs.loc["G02+G01", "trained"]
    change = predicted["G02+G01"].layers["predicted_change"].ravel()
    program = [GENES.index(g) for g in PROGRAM]
    # both singles' effects: the program of G01 and the knock-down of each target
    assert change[program].mean() > 0.8
    assert change[GENES.index("G01")] < -0.5 and change[GENES.index("G02")] < -0.5
    single = predicted["G05"].layers["predicted_change"].ravel()
    assert single[GENES.index("G05")] < -0.5 and np.abs(single[program]).mean() < 0.3
    assert "observed" not in predicted.layers


def test_training_is_reproducible_with_a_seed(screen_path, tmp_path):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run(*train_args([screen_path], out, "--gene-features", "random", "--folds", "2", "--epochs", "20",
                        "--seed", "7"))
        outputs.append(out)
    a, b = outputs
    assert (a / "predictor.safetensors").read_bytes() == (b / "predictor.safetensors").read_bytes()
    assert json.loads((a / "evaluation.json").read_text()) == json.loads((b / "evaluation.json").read_text())
    run(*train_args([screen_path], tmp_path / "c", "--gene-features", "random", "--folds", "2", "--epochs", "20",
                    "--seed", "8"))
    assert (a / "predictor.safetensors").read_bytes() != (tmp_path / "c" / "predictor.safetensors").read_bytes()


def test_scfm_features_are_the_decoder_states_averaged_over_control_cells(tiny_checkpoint):
    from scfm.model.checkpoint import load_checkpoint
    from scfm.tasks.embed import gene_embeddings
    from scfm.tasks.perturb.features import scfm_gene_features

    screen = synthetic_screen(seed=0, n_control=12)
    controls = sp.csr_matrix(screen[screen.obs["guide"].astype(str) == CONTROL].X)
    model = load_checkpoint(tiny_checkpoint).model
    positions = np.array([5, 0, 39])
    streamed = scfm_gene_features(model, controls, positions, max_cells=100, batch_size=5, device="cpu", quiet=True)
    full = gene_embeddings(model, controls, batch_size=5, device="cpu")     # cells x genes x dims
    np.testing.assert_allclose(streamed, full.mean(axis=0)[positions], rtol=1e-5, atol=1e-6)
    subset = scfm_gene_features(model, controls, positions, max_cells=4, seed=1, device="cpu", quiet=True)
    rows = np.sort(np.random.default_rng(1).choice(controls.shape[0], size=4, replace=False))
    np.testing.assert_allclose(subset, full[rows].mean(axis=0)[positions], rtol=1e-5, atol=1e-6)


def test_cross_validation_holds_out_whole_targets(screen_path, tmp_path):
    out = tmp_path / "cv"
    run(*train_args([screen_path], out, "--gene-features", "learned", "--folds", "3", "--epochs", "30"))
    cv = ad.read_h5ad(out / "cv_predictions.h5ad")
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert sorted(cv.obs_names) == sorted(evaluation["perturbations"]) and len(cv) == 12
    by_target = cv.obs.groupby("targets", observed=True)["fold"].nunique()
    assert (by_target == 1).all()                       # both guides of a target share a fold
    assert (cv.obs["n_targets_seen"] == 0).all()         # a held-out gene was never perturbed in training
    assert set(evaluation["summary"]) == {"predictor", "no_change", "training_mean", "linear"}
    for layer in ("change_no_change", "change_training_mean", "change_linear", "observed_change"):
        assert layer in cv.layers
    # the training-mean baseline of a fold is the mean observed change of the other folds' perturbations
    fold0 = cv.obs["fold"] == 0
    expected = cv.layers["observed_change"][~fold0.to_numpy()].mean(axis=0)
    np.testing.assert_allclose(cv.layers["change_training_mean"][fold0.to_numpy()][0], expected, atol=1e-5)
    assert (out / "report.html").read_text().count("<img") == 2 + len(cv)
    assert len(list((out / "plots").glob("perturbation_*.png"))) == len(cv)
