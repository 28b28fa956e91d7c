"""Metrics, splits that hold out whole perturbations, combination names, the linear baseline."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr

from scfm.errors import ScfmError
from scfm.tasks.perturb.baselines import LinearBaseline, baseline_predictions
from scfm.tasks.perturb.data import parse_targets
from scfm.tasks.perturb.evaluate import change_metrics, summarise, target_folds


def test_metrics_match_an_independent_computation():
    rng = np.random.default_rng(1)
    observed = rng.normal(size=50)
    predicted = observed + rng.normal(scale=0.5, size=50)
    metrics = change_metrics(predicted, observed, top_k=10)
    top = np.argsort(-np.abs(observed))[:10]
    assert metrics["pearson"] == pytest.approx(pearsonr(predicted, observed).statistic)
    assert metrics["pearson_top"] == pytest.approx(pearsonr(predicted[top], observed[top]).statistic)
    assert metrics["mse"] == pytest.approx(np.mean((predicted - observed) ** 2))
    assert metrics["mse_top"] == pytest.approx(np.mean((predicted[top] - observed[top]) ** 2))
    assert metrics["direction_top"] == pytest.approx(np.mean(np.sign(predicted[top]) == np.sign(observed[top])))
    # no change: correlation undefined, direction always wrong, MSE = mean square of the observed change
    flat = change_metrics(np.zeros(50), observed, top_k=10)
    assert flat["pearson"] is None and flat["direction_top"] == 0.0
    assert flat["mse"] == pytest.approx(np.mean(observed**2))
    summary = summarise({"p1": {"m": metrics, "none": flat}, "p2": {"m": metrics, "none": flat}})
    assert summary["none"]["pearson"] is None and summary["none"]["n_pearson"] == 0
    assert summary["m"]["mse"] == pytest.approx(metrics["mse"]) and summary["m"]["n_mse"] == 2


def test_combination_names_are_order_free_and_ignore_ctrl():
    assert parse_targets("STAT1+IRF1") == parse_targets("IRF1+STAT1") == ("IRF1", "STAT1")
    assert parse_targets("JAK2+ctrl") == ("JAK2",)
    assert parse_targets("ctrl") == ()


def test_folds_hold_out_every_guide_of_a_gene_together():
    targets = {f"{g}_g{i}": (g,) for g in "ABCDEFG" for i in (1, 2, 3)}
    targets.update({"A+B": ("A", "B"), "B+A_again": ("A", "B"), "C+D": ("C", "D")})
    folds = target_folds(targets, 3, seed=4)
    for gene in "ABCDEFG":
        assert len({folds[f"{gene}_g{i}"] for i in (1, 2, 3)}) == 1, gene
    assert folds["A+B"] == folds["B+A_again"]  # one combination is one unit, whatever the name order
    sizes = np.bincount([folds[n] for n in {tuple(t): n for n, t in targets.items()}.values()])
    assert sizes.max() - sizes.min() <= 1
    assert folds == target_folds(targets, 3, seed=4)          # seeded
    assert folds != target_folds(targets, 3, seed=5)
    for fold in range(3):
        held_out = {g for n, t in targets.items() if folds[n] == fold and len(t) == 1 for g in t}
        trained = {g for n, t in targets.items() if folds[n] != fold and len(t) == 1 for g in t}
        assert not held_out & trained


def test_too_many_folds_is_an_error():
    with pytest.raises(ScfmError, match="3 folds need at least 3 distinct perturbed genes"):
        target_folds({"a": ("A",), "b": ("B",)}, 3, seed=0)


def test_linear_baseline_recovers_a_linear_effect_and_falls_back_to_the_mean():
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(12, 3))
    embedding[:8] -= embedding[:8].mean(axis=0)            # training perturbations centred: b is their mean
    embedding[11] = 0.0                                     # a gene never measured: zero profile
    weights, offset = rng.normal(size=(3, 3)), rng.normal(size=10)
    train = [[i] for i in range(8)]
    changes = np.stack([embedding[:10] @ weights @ embedding[i] + offset for i in range(8)])
    model = LinearBaseline(embedding, 10, ridge=1e-8).fit(train, changes)
    truth = embedding[:10] @ weights @ embedding[9] + offset
    np.testing.assert_allclose(model.predict([[9]])[0], truth, atol=1e-5)
    predicted = baseline_predictions(train, changes, [[11], [0, 1]], embedding)
    np.testing.assert_allclose(predicted["linear"][0], changes.mean(axis=0))   # zero profile -> training mean
    assert (predicted["no_change"] == 0).all()
    np.testing.assert_allclose(predicted["training_mean"][1], changes.mean(axis=0))
