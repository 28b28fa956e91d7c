"""Baselines every evaluation puts next to the predictor, fitted on the same training perturbations.

- ``no_change``: the control mean (a predicted change of zero everywhere).
- ``training_mean``: the mean change over the training perturbations, for every perturbation.
- ``linear``: the linear model of Ahlmann-Eltze, Huber & Anders (2024): each gene is embedded by its
  expression profile across control cells (its loadings on the top principal components of the control
  cells), a perturbation by the sum of its genes' embeddings, and the change is G W p + b with W fitted
  by ridge regression on the training perturbations. A perturbed gene that is never detected has a zero
  profile, so the model falls back to the training mean b for it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

BASELINES = ("no_change", "training_mean", "linear")


def gene_profile_embedding(control: sp.spmatrix | np.ndarray, n_components: int = 10, *, n_nodes: int | None = None
                           ) -> np.ndarray:
    """(n_nodes, k): each gene's loadings on the top-k principal components of control-cell expression
    (genes as observations, cells as features); nodes beyond the matrix (never measured) get zeros."""
    dense = control.toarray() if sp.issparse(control) else np.asarray(control)
    dense = dense.astype(np.float64)
    genes_by_cells = (dense - dense.mean(axis=0)).T            # centre each gene over cells
    genes_by_cells -= genes_by_cells.mean(axis=0)              # and each cell over genes (PCA over genes)
    k = int(max(1, min(n_components, min(genes_by_cells.shape) - 1)))
    u, s, _ = np.linalg.svd(genes_by_cells, full_matrices=False)
    embedding = u[:, :k] * s[:k]
    n_nodes = embedding.shape[0] if n_nodes is None else n_nodes
    full = np.zeros((n_nodes, k))
    full[: embedding.shape[0]] = embedding
    return full


class LinearBaseline:
    """change(p) = G W e_p + b, with G the scored genes' embedding and e_p the sum of p's genes' rows."""

    def __init__(self, embedding: np.ndarray, n_outputs: int, ridge: float = 0.1):
        self.embedding = embedding
        self.n_outputs = n_outputs
        self.ridge = ridge

    def _pert(self, perturbations: list[list[int]]) -> np.ndarray:
        return np.stack([self.embedding[list(nodes)].sum(axis=0) for nodes in perturbations])

    def fit(self, perturbations: list[list[int]], changes: np.ndarray) -> "LinearBaseline":
        genes = self.embedding[: self.n_outputs]                       # (m, k)
        perts = self._pert(perturbations)                               # (n, k)
        self.intercept = changes.mean(axis=0)                           # (m,)
        centred = changes - self.intercept                              # (n, m)
        k = genes.shape[1]
        left = np.linalg.solve(genes.T @ genes + self.ridge * np.eye(k), genes.T)   # (k, m)
        right = np.linalg.solve(perts.T @ perts + self.ridge * np.eye(k), perts.T)  # (k, n)
        self.weights = left @ centred.T @ right.T                      # (k, k)
        return self

    def predict(self, perturbations: list[list[int]]) -> np.ndarray:
        genes = self.embedding[: self.n_outputs]
        return (genes @ self.weights @ self._pert(perturbations).T).T + self.intercept


def baseline_predictions(train_perts: list[list[int]], train_changes: np.ndarray, test_perts: list[list[int]],
                         embedding: np.ndarray, ridge: float = 0.1) -> dict[str, np.ndarray]:
    """Every baseline's predicted change for the test perturbations, (n_test, n_outputs) each."""
    n_test, m = len(test_perts), train_changes.shape[1]
    linear = LinearBaseline(embedding, m, ridge).fit(train_perts, train_changes)
    return {
        "no_change": np.zeros((n_test, m)),
        "training_mean": np.repeat(train_changes.mean(axis=0, keepdims=True), n_test, axis=0),
        "linear": linear.predict(test_perts),
    }
