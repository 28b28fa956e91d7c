"""Scoring predicted against observed mean changes, and splits that hold out whole perturbations.

    change_metrics(predicted, observed, top_k=20) -> {pearson, pearson_top, mse, mse_top, direction_top}
    target_folds(targets, n_folds, seed) -> {perturbation: fold}
    summarise(per_perturbation) -> {method: {metric: mean}}

Metrics, per perturbation, on the change from the control mean (log1p CP10k):
- ``pearson``: Pearson correlation of predicted and observed change over all scored genes;
- ``pearson_top`` / ``mse_top`` / ``direction_top``: on the ``top_k`` genes with the largest observed
  |change| (GEARS' "top 20 DE" in spirit; genes ranked by the observed mean change, not a test);
  ``direction_top`` is the share of those genes whose predicted change has the observed sign (a
  prediction of exactly zero has no sign and counts as wrong);
- ``mse``: mean squared error over all scored genes.
A correlation of a constant prediction (``no_change``) is undefined and reported as None.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from scfm.errors import ScfmError

METRICS = ("pearson", "pearson_top", "mse", "mse_top", "direction_top")


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def top_genes(observed: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the ``top_k`` largest |observed change|, largest first (ties: lower index first)."""
    return np.argsort(-np.abs(observed), kind="stable")[: min(top_k, observed.size)]


def change_metrics(predicted: np.ndarray, observed: np.ndarray, top_k: int = 20) -> dict[str, float | None]:
    predicted, observed = np.asarray(predicted, np.float64), np.asarray(observed, np.float64)
    top = top_genes(observed, top_k)
    return {
        "pearson": _pearson(predicted, observed),
        "pearson_top": _pearson(predicted[top], observed[top]),
        "mse": float(np.mean((predicted - observed) ** 2)),
        "mse_top": float(np.mean((predicted[top] - observed[top]) ** 2)),
        "direction_top": float(np.mean(np.sign(predicted[top]) == np.sign(observed[top]))),
    }


def target_folds(targets: Mapping[str, Sequence[str]], n_folds: int, seed: int) -> dict[str, int]:
    """Assign every perturbation a fold such that all perturbations with the same target genes (the
    guides of one gene, or one combination) share a fold: a held-out gene is held out whole.

    Target sets are shuffled with ``seed`` and dealt round-robin, so fold sizes differ by at most one set.
    """
    units = sorted({tuple(sorted(t)) for t in targets.values()})
    if n_folds < 2:
        raise ScfmError(f"cross-validation needs at least 2 folds, got {n_folds}")
    if len(units) < n_folds:
        raise ScfmError(f"{n_folds} folds need at least {n_folds} distinct perturbed genes or combinations; "
                        f"the data have {len(units)} (lower --folds)")
    order = np.random.default_rng(seed).permutation(len(units))
    fold_of_unit = {units[u]: i % n_folds for i, u in enumerate(order)}
    return {name: fold_of_unit[tuple(sorted(t))] for name, t in targets.items()}


def seen_targets(targets: Sequence[str], trained_genes: set[str]) -> int:
    """How many of a perturbation's genes were perturbed in training (GEARS' seen 0/1/2 for combinations)."""
    return sum(g in trained_genes for g in targets)


def summarise(per_perturbation: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> dict:
    """Mean (and count of defined values) of every metric per method over perturbations."""
    methods = sorted({m for entry in per_perturbation.values() for m in entry})
    summary = {}
    for method in methods:
        row = {}
        for metric in METRICS:
            values = [e[method][metric] for e in per_perturbation.values()
                      if method in e and e[method].get(metric) is not None]
            row[metric] = float(np.mean(values)) if values else None
            row[f"n_{metric}"] = len(values)
        summary[method] = row
    return summary
