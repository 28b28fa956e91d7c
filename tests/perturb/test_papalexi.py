"""Real CRISPR knockouts (Papalexi et al. 2021, ECCITE-seq, THP-1): guide assignment and the cross-validated
evaluation, computed again here from the files the commands wrote. What the predictor scores is in bench/RESULTS.md
(bench/perturb.py); this test checks the machinery on the real screen."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import perturb as bench  # noqa: E402  (bench/perturb.py: the .rda loader and the preparation the benchmark uses)

pytestmark = pytest.mark.slow
DATA = bench.shared_data()
if not (DATA / bench.PAPALEXI).exists():
    pytest.skip(f"real data not found: {DATA / bench.PAPALEXI} (the shared data folder)", allow_module_level=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    work = tmp_path_factory.mktemp("papalexi")
    return work, bench.prepare(work, DATA, checkpoint=None, vocab_path=None)


def test_guides_are_assigned_as_documented(prepared):
    work, info = prepared
    guides = ad.read_h5ad(work / "guides.h5ad")
    labelled = ad.read_h5ad(work / "papalexi.labelled.h5ad")
    assert labelled.shape == (20729, 299) and guides.n_vars == 110
    counts = sp.csr_matrix(guides.X).toarray()
    order = np.argsort(-counts, axis=1, kind="stable")
    best = counts[np.arange(len(counts)), order[:, 0]]
    second = counts[np.arange(len(counts)), order[:, 1]]
    assigned = (best >= 5) & (best >= 2 * second) & (best > second)
    table = dict(np.loadtxt(work / "guide_targets.tsv", dtype=str, skiprows=1))
    expected = np.where(assigned, [table[guides.var_names[k]] for k in order[:, 0]], "unassigned")
    assert (labelled.obs[bench.KEY].astype(str).to_numpy() == expected).all()
    assert len(set(table.values()) - {bench.CONTROL}) == 26
    # targets measured among the 299 genes are the ones the vocabulary did not have to add
    vocab = [line.split("\t")[0] for line in (work / "vocab.tsv").read_text().splitlines()[1:]]
    assert vocab[:299] == list(labelled.var_names)
    assert sorted(vocab[299:]) == sorted(set(info["targets"]) - set(labelled.var_names))


@pytest.fixture(scope="module")
def evaluated(prepared):
    from scfm.tasks.perturb.data import ScreenOptions
    from scfm.tasks.perturb.model import FitSettings
    from scfm.tasks.perturb.run import train_file

    work, info = prepared
    out = work / "predictor"
    train_file([info["aligned"]], out, ScreenOptions(bench.KEY, bench.CONTROL), gene_feature_kind="learned",
               gene_graphs=[info["prior"]], folds=5, seed=0, fit_settings=FitSettings(epochs=60), quiet=True)
    return work, info, json.loads((out / "evaluation.json").read_text()), ad.read_h5ad(out / "cv_predictions.h5ad")


def test_every_target_is_held_out_once_and_scored_against_its_cells(evaluated):
    work, info, evaluation, cv = evaluated
    assert sorted(evaluation["perturbations"]) == info["targets"] == sorted(cv.obs_names)
    folds = cv.obs["fold"].to_numpy()
    assert sorted(np.bincount(folds).tolist()) == [5, 5, 5, 5, 5]
    assert (cv.obs["n_targets_seen"] == 0).all()
    # observed change of STAT1 knock-outs, recomputed from the labelled counts
    cells = ad.read_h5ad(work / "papalexi.labelled.h5ad")
    counts = sp.csr_matrix(cells.X).toarray().astype(np.float64)
    logged = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    label = cells.obs[bench.KEY].astype(str).to_numpy()
    keep = counts.sum(axis=1) > 0
    genes = list(cells.var_names)
    columns = [genes.index(g) for g in cv.var_names]
    change = (logged[keep & (label == "STAT1")].mean(axis=0) - logged[keep & (label == bench.CONTROL)].mean(axis=0))
    np.testing.assert_allclose(cv["STAT1"].layers["observed_change"].ravel(), change[columns], atol=1e-4)
    assert change[genes.index("STAT1")] < -1                     # a knock-out: the target's own mRNA falls


def test_reported_metrics_are_those_of_the_written_predictions(evaluated):
    from scipy.stats import pearsonr

    _, _, evaluation, cv = evaluated
    observed = cv.layers["observed_change"]
    for method, layer in (("predictor", "predicted_change"), ("training_mean", "change_training_mean"),
                          ("linear", "change_linear")):
        mse = [np.mean((cv.layers[layer][i] - observed[i]) ** 2) for i in range(len(cv))]
        assert evaluation["summary"][method]["mse"] == pytest.approx(np.mean(mse), rel=1e-4)
        top = [np.argsort(-np.abs(observed[i]))[:20] for i in range(len(cv))]
        pearson = [pearsonr(cv.layers[layer][i, t], observed[i, t]).statistic for i, t in enumerate(top)]
        assert evaluation["summary"][method]["pearson_top"] == pytest.approx(np.mean(pearson), rel=1e-3)
    assert evaluation["summary"]["no_change"]["pearson"] is None
