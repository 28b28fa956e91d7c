"""scfm enhance: the predicted layer, and an evaluation computed on real binomially thinned cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from click.testing import CliRunner
from scipy.stats import pearsonr, spearmanr

from scfm.cli import cli
from scfm.model.checkpoint import load_checkpoint
from scfm.tasks.embed import predict_expression

EVAL_CELLS = 12
SEED = 5


def log_cp10k(counts) -> np.ndarray:
    cells = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float64))
    sc.pp.normalize_total(cells, target_sum=1e4)
    sc.pp.log1p(cells)
    return cells.X.toarray()


@pytest.fixture(scope="module")
def enhanced(tiny_model, tmp_path_factory):
    checkpoint, cells, _ = tiny_model
    out = tmp_path_factory.mktemp("enhance") / "cells.enhanced.h5ad"
    result = CliRunner().invoke(cli, [
        "enhance", str(cells), "-o", str(out), "--checkpoint", str(checkpoint), "--target-depth", "t4",
        "--eval-cells", str(EVAL_CELLS), "--thin-fraction", "0.2", "--batch-size", "16", "--seed", str(SEED),
        "--mlflow-uri", f"sqlite:///{out.parent}/mlflow.db",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "evaluation on" in result.output
    return out, ad.read_h5ad(out)


def test_prediction_is_written_as_a_layer(enhanced, tiny_model):
    checkpoint, _, aligned = tiny_model
    _, result = enhanced
    layer = result.layers["scfm_enhanced"]
    assert layer.shape == aligned.shape and np.isfinite(layer).all()
    # the layer is the model's prediction at the requested depth, for every cell
    model = load_checkpoint(checkpoint).model
    # the first batch exactly as enhance ran it (--batch-size 16): with bf16 (auto on a CPU with native bf16)
    # a cell's result depends a little on its batch mates' padding
    expected = predict_expression(model, aligned.X[:16], target_depth="t4", device="cpu", batch_size=16)
    np.testing.assert_allclose(layer[:16], expected, rtol=1e-4, atol=1e-5)
    assert (result.X != aligned.X).nnz == 0, "the counts are kept as they were"
    assert result.uns["scfm"]["enhance"]["target_depth"] == "t4"
    # decided once, on the first cells, and recorded with its reason (the tiny preset is too narrow for bf16)
    settings = result.uns["scfm"]["enhance"]
    assert settings["precision"] == "fp32" and settings["precision_reason"]


def test_evaluation_is_computed_on_real_thinned_cells(enhanced, tiny_model):
    checkpoint, _, aligned = tiny_model
    _, result = enhanced
    evaluation = result.uns["scfm"]["enhance"]["evaluation"]
    cells = np.asarray(evaluation["cells"])
    assert evaluation["n_cells"] == len(cells) == EVAL_CELLS
    original = sp.csr_matrix(aligned.X)[cells]
    # thinning keeps ~20% of the reads of real cells
    assert evaluation["mean_original_total"] == pytest.approx(original.sum() / len(cells))
    assert evaluation["mean_thinned_total"] / evaluation["mean_original_total"] == pytest.approx(0.2, abs=0.03)

    # redo the thinning with the documented recipe and score it independently with scipy
    rng = np.random.default_rng(SEED)
    chosen = np.sort(rng.choice(aligned.n_obs, size=EVAL_CELLS, replace=False))
    assert (chosen == cells).all()
    thinned = original.copy()
    thinned.data = rng.binomial(thinned.data.astype(np.int64), 0.2).astype(np.float32)
    thinned.eliminate_zeros()
    measured = np.flatnonzero(np.asarray((aligned.X > 0).sum(axis=0)).ravel() > 0)
    truth = log_cp10k(original)[:, measured]
    thinned_input = log_cp10k(thinned)[:, measured]
    pearson = [pearsonr(a, b).statistic for a, b in zip(thinned_input, truth)]
    spearman = [spearmanr(a, b).statistic for a, b in zip(thinned_input, truth)]
    assert evaluation["pearson"]["thinned_input"]["median"] == pytest.approx(np.median(pearson))
    assert evaluation["spearman"]["thinned_input"]["median"] == pytest.approx(np.median(spearman))
    assert 0 < np.median(pearson) < 1  # thinning loses information but keeps the profile's shape

    model = load_checkpoint(checkpoint).model
    predicted = predict_expression(model, thinned, target_depth="f5", device="cpu")[:, measured]
    model_pearson = [pearsonr(a, b).statistic for a, b in zip(predicted, truth)]
    assert evaluation["pearson"]["prediction"]["median"] == pytest.approx(np.median(model_pearson), abs=1e-4)
    wins = np.mean(np.asarray(model_pearson) > np.asarray(pearson))
    assert evaluation["prediction_beats_thinned_input"]["pearson_fraction_of_cells"] == pytest.approx(wins)


def _fails_cleanly(shared_store, tmp_path, *args, message, code=1):
    out = tmp_path / "out.h5ad"
    result = CliRunner().invoke(cli, ["enhance", *map(str, args), "-o", str(out),
                                      "--mlflow-uri", shared_store], catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.h5ad*"))


def test_normalised_input_is_refused(tiny_model, tmp_path, shared_store):
    checkpoint, _, aligned = tiny_model
    logged = aligned.copy()
    logged.X = sp.csr_matrix(log_cp10k(aligned.X), dtype=np.float32)
    path = tmp_path / "logged.h5ad"
    logged.write_h5ad(path)
    _fails_cleanly(shared_store, tmp_path, path, "--checkpoint", checkpoint, "--no-evaluate",
                   message=f"error: {path}: X does not hold raw counts")


def test_input_sharing_too_few_genes_with_the_model_is_refused(tiny_model, tmp_path, shared_store):
    checkpoint, _, aligned = tiny_model
    other = ad.AnnData(X=aligned.X.copy(), obs=aligned.obs.copy())
    other.var_names = [f"GENE{i}" for i in range(other.n_vars)]
    path = tmp_path / "other.h5ad"
    other.write_h5ad(path)
    _fails_cleanly(shared_store, tmp_path, path, "--checkpoint", checkpoint, message=f"error: {path}:")


def test_bad_thin_fraction_and_depth_are_refused(tiny_model, tmp_path, shared_store):
    checkpoint, cells, _ = tiny_model
    _fails_cleanly(shared_store, tmp_path, cells, "--checkpoint", checkpoint, "--thin-fraction", "1.5",
                   message="Invalid value for '--thin-fraction': 1.5 is not in the range 0<x<1", code=2)
    _fails_cleanly(shared_store, tmp_path, cells, "--checkpoint", checkpoint, "--target-depth", "x9",
                   message="invalid target depth 'x9'")


def test_enhancing_again_replaces_the_layer(enhanced, tmp_path, shared_store):
    path, first = enhanced
    again = tmp_path / "again.h5ad"
    result = CliRunner().invoke(cli, ["enhance", str(path), "-o", str(again), "--checkpoint",
                                      str(first.uns["scfm"]["enhance"]["checkpoint"]), "--target-depth", "t5",
                                      "--no-evaluate", "--batch-size", "16", "--mlflow-uri", shared_store],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    second = ad.read_h5ad(again)
    assert second.uns["scfm"]["enhance"]["target_depth"] == "t5"
    assert "evaluation" not in second.uns["scfm"]["enhance"]
    assert not np.allclose(second.layers["scfm_enhanced"], first.layers["scfm_enhanced"])
