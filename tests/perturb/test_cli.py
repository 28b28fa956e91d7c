"""`scfm perturb train | predict` as a user meets them: bad input, MLflow, the report section."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from perturb_data import CONTROL, synthetic_screen
from scfm.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def train(inputs, out, *extra):
    return invoke("perturb", "train", *inputs, "-o", out, "--perturbation-key", "guide", "--target-key", "gene",
                  "--control", CONTROL, "--gene-features", "learned", "--epochs", "5", "--quiet",
                  "--mlflow-uri", f"sqlite:///{out.parent}/mlflow.db", *extra)


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, screen_path):
    out = tmp_path_factory.mktemp("trained") / "predictor"
    result = train([screen_path], out, "--folds", "3", "--epochs", "20")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("flags, message", [
    (["--perturbation-key", "nope"], "--perturbation-key 'nope' is not an obs column (columns: guide, gene)"),
    (["--control", "NT"], "--control 'NT' is not a value of obs['guide'] (most common values: non-targeting,"),
    (["--target-key", "missing"], "--target-key 'missing' is not an obs column"),
])
def test_bad_keys_fail_in_one_line_without_output(screen_path, tmp_path, flags, message):
    out = tmp_path / "predictor"
    result = train([screen_path], out, "--folds", "0", *flags)
    assert result.exit_code == 1
    assert last_line(result).startswith(f"error: {screen_path}: {message}")
    assert not out.exists()


def test_gene_outside_the_vocabulary_is_an_error_or_skipped_when_asked(tmp_path, tiny_checkpoint):
    screen = synthetic_screen(seed=3)
    gene = screen.obs["gene"].astype(str)
    screen.obs["gene"] = gene.where(gene != "G06", "NOTAGENE").astype("category")
    screen.write_h5ad(tmp_path / "screen.h5ad")
    out = tmp_path / "predictor"
    result = train([tmp_path / "screen.h5ad"], out, "--folds", "0")
    assert result.exit_code == 1
    assert last_line(result) == (
        f"error: {tmp_path / 'screen.h5ad'}: 1 perturbed gene(s) are not in the vocabulary, so they have no "
        "embedding: NOTAGENE (use a vocabulary that includes them, or --skip-unknown-targets to leave those "
        "perturbations out)")
    assert not out.exists()
    result = train([tmp_path / "screen.h5ad"], out, "--folds", "0", "--skip-unknown-targets")
    assert result.exit_code == 0, result.output
    assert "skipped 2 perturbation(s) whose genes are not in the vocabulary: G06_g1 (NOTAGENE), G06_g2 (NOTAGENE)" \
        in result.output
    trained = json.loads((out / "predictor.json").read_text())["trained"]
    assert sorted(trained) == sorted(f"G0{i}_g{g}" for i in range(1, 6) for g in (1, 2))


def test_unaligned_input_is_refused_with_a_checkpoint(tmp_path, tiny_checkpoint):
    screen = synthetic_screen(seed=3)
    screen[:, ::-1].copy().write_h5ad(tmp_path / "reversed.h5ad")
    out = tmp_path / "predictor"
    result = train([tmp_path / "reversed.h5ad"], out, "--folds", "0", "--checkpoint", tiny_checkpoint,
                   "--gene-features", "scfm")
    assert result.exit_code == 1
    assert "not the checkpoint's vocabulary (or the first input's genes) in its order" in last_line(result)
    assert not out.exists()


def test_scfm_features_need_a_checkpoint(screen_path, tmp_path):
    result = train([screen_path], tmp_path / "predictor", "--gene-features", "scfm")
    assert result.exit_code == 2 and last_line(result) == "error: --gene-features scfm needs --checkpoint (or choose " \
                                                          "random / learned)"


def test_small_perturbations_are_listed_and_skipped(tmp_path):
    screen = synthetic_screen(seed=4)
    keep = ~((screen.obs["guide"].astype(str) == "G03_g1") & (screen.obs_names.str[-1] != "0"))
    screen[keep.to_numpy()].copy().write_h5ad(tmp_path / "screen.h5ad")   # G03_g1 keeps 6 of its 60 cells
    out = tmp_path / "predictor"
    result = train([tmp_path / "screen.h5ad"], out, "--folds", "0", "--min-cells", "10")
    assert result.exit_code == 0, result.output
    assert "warning: skipped 1 perturbation(s) with fewer than 10 cells: G03_g1 (6)" in result.output
    assert "G03_g1" not in json.loads((out / "predictor.json").read_text())["trained"]
    result = train([tmp_path / "screen.h5ad"], tmp_path / "none", "--folds", "0", "--min-cells", "1000")
    assert result.exit_code == 1 and "no perturbation has at least 1000 cells (lower --min-cells)" in last_line(result)
    assert not (tmp_path / "none").exists()


def test_predict_refuses_unknown_genes_without_output(trained, tmp_path):
    out = tmp_path / "predicted.h5ad"
    result = invoke("perturb", "predict", trained, "-o", out, "--perturbation", "G01+G77",
                    "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert result.exit_code == 1
    assert last_line(result) == ("error: perturbed gene(s) G77 are not among the predictor's 40 genes (its scored "
                                 "genes and the perturbed genes of its training data): no embedding to predict from")
    assert not out.exists()
    result = invoke("perturb", "predict", tmp_path, "-o", out, "--perturbation", "G01",
                    "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert result.exit_code == 1 and "not a predictor directory" in last_line(result)


def test_train_logs_params_metrics_and_artifacts(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained.parent}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("scfm").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["scfm.step"] == "perturb_train"
    assert run.data.params["perturbation_key"] == "guide" and run.data.params["folds"] == "3"
    # learned gene features: no model ran, so no precision was decided
    assert run.data.params["precision"] == "auto" and "resolved_precision" not in run.data.params
    evaluation = json.loads((trained / "evaluation.json").read_text())
    assert run.data.metrics["linear.mse"] == pytest.approx(evaluation["summary"]["linear"]["mse"])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 20
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation.json", "predictor.json", "report.html", "plots"} <= artifacts


def test_report_takes_the_perturbation_section(trained, tmp_path, pbmc_counts):
    embedded = tmp_path / "pbmc.embedded.h5ad"
    cells = pbmc_counts.copy()
    cells.obsm["X_scfm"] = np.random.default_rng(0).normal(size=(cells.n_obs, 8)).astype(np.float32)
    cells.write_h5ad(embedded)
    out = tmp_path / "report.html"
    result = invoke("report", embedded, "-o", out, "--perturbation", trained, "--max-cells", "300",
                    "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db", "--quiet")
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert 'id="section-perturbation"' in text and "Per held-out perturbation" in text
    assert text.count("top genes of G0") == 12
    metrics = json.loads((tmp_path / "report.metrics.json").read_text())
    assert set(metrics["perturbation"]["summary"]) == {"predictor", "no_change", "training_mean", "linear"}
    result = invoke("report", embedded, "-o", tmp_path / "bad.html", "--perturbation", tmp_path,
                    "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert result.exit_code == 1 and "no evaluation.json / cv_predictions.h5ad" in last_line(result)
    assert not (tmp_path / "bad.html").exists()


def test_bin_executable_predicts_like_the_pipeline(trained, tmp_path, scfm_bin):
    out = tmp_path / "predicted.h5ad"
    scfm_bin("perturb", "predict", trained, "-o", out, "--perturbation", "G01", "--perturbation", "G02+G03",
             "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db", "--quiet")
    import anndata as ad

    predicted = ad.read_h5ad(out)
    assert list(predicted.obs_names) == ["G01", "G02+G03"] and predicted.obs["targets"].tolist() == ["G01", "G02+G03"]
