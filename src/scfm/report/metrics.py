"""Embedding quality metrics for the report, computed with scikit-learn and scanpy.

Every number here is computed the same way for the scfm embedding and for the PCA baseline on the
same cells, so the report compares like with like. The recipes (all seeded with ``seed``):

- **Leiden**: ``sc.pp.neighbors(n_neighbors=15, use_rep=<key>, random_state=seed)`` then
  ``sc.tl.leiden(flavor="igraph", n_iterations=2, resolution=1.0, random_state=seed)``.
- **ARI / NMI**: ``adjusted_rand_score`` / ``normalized_mutual_info_score`` of Leiden vs labels.
- **silhouette**: ``silhouette_score(embedding, labels)`` (euclidean; on at most
  ``MAX_SILHOUETTE_CELLS`` cells drawn with ``seed``), rescaled to 0..1 as ``(s + 1) / 2``.
- **kNN accuracy**: mean of ``cross_val_score(KNeighborsClassifier(15), embedding, labels,
  cv=StratifiedKFold(5, shuffle=True, random_state=seed))``.
- **batch mixing** (only with a batch key of at least two batches): batch ASW as in scIB,
  per label ``mean(1 - |silhouette_samples(embedding, batch)|)`` then the mean over labels, so
  1 means batches are mixed within every cell type and 0 means they are separated.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

N_NEIGHBORS = 15
KNN_FOLDS = 5
MAX_SILHOUETTE_CELLS = 10_000
MAX_KNN_CELLS = 50_000


def leiden_clusters(adata, embedding_key: str, *, seed: int = 0, resolution: float = 1.0) -> np.ndarray:
    """Leiden clusters on the kNN graph of ``obsm[embedding_key]``; also leaves the graph in ``adata``."""
    import scanpy as sc

    sc.pp.neighbors(adata, n_neighbors=N_NEIGHBORS, use_rep=embedding_key, random_state=seed)
    sc.tl.leiden(
        adata, flavor="igraph", n_iterations=2, resolution=resolution, random_state=seed, key_added="_leiden"
    )
    clusters = adata.obs.pop("_leiden").astype(str).to_numpy()
    return clusters


def _subsample(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def usable_labels(labels) -> np.ndarray | None:
    """Labels as strings, or None when they cannot score anything (fewer than two classes)."""
    values = pd.Series(labels).astype(str).to_numpy()
    return values if len(np.unique(values)) >= 2 else None


def silhouette(embedding: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> float | None:
    """None when it is undefined: it needs between 2 and (cells - 1) label classes."""
    from sklearn.metrics import silhouette_score

    keep = _subsample(len(labels), MAX_SILHOUETTE_CELLS, seed)
    if not 2 <= len(np.unique(labels[keep])) <= len(keep) - 1:
        return None
    score = silhouette_score(embedding[keep], labels[keep], metric="euclidean")
    return float((score + 1.0) / 2.0)


def knn_accuracy(embedding: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> float | None:
    """Cross-validated kNN accuracy; None when a class is too small to appear in every fold."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    keep = _subsample(len(labels), MAX_KNN_CELLS, seed)
    x, y = embedding[keep], labels[keep]
    counts = pd.Series(y).value_counts()
    common = counts.index[counts >= KNN_FOLDS]
    mask = np.isin(y, common)  # classes with fewer cells than folds cannot be stratified
    if len(common) < 2:
        return None
    x, y = x[mask], y[mask]
    folds = StratifiedKFold(KNN_FOLDS, shuffle=True, random_state=seed)
    smallest_training_fold = len(y) - int(np.ceil(len(y) / KNN_FOLDS))
    neighbours = min(N_NEIGHBORS, smallest_training_fold)  # a few dozen cells have fewer than 15 to ask
    scores = cross_val_score(KNeighborsClassifier(n_neighbors=neighbours), x, y, cv=folds)
    return float(np.mean(scores))


def batch_asw(embedding: np.ndarray, batches: np.ndarray, labels: np.ndarray | None, *, seed: int = 0) -> float:
    """scIB-style batch silhouette: 1 = batches mixed within each label, 0 = separated."""
    from sklearn.metrics import silhouette_samples

    keep = _subsample(len(batches), MAX_SILHOUETTE_CELLS, seed)
    x, b = embedding[keep], batches[keep]
    groups = labels[keep] if labels is not None else np.zeros(len(keep), dtype=str)
    per_group = []
    for group in np.unique(groups):
        in_group = groups == group
        if not 2 <= len(np.unique(b[in_group])) <= in_group.sum() - 1:
            continue  # a label seen in one batch says nothing about mixing (nor one cell per batch)
        scores = silhouette_samples(x[in_group], b[in_group])
        per_group.append(float(np.mean(1.0 - np.abs(scores))))
    return float(np.mean(per_group)) if per_group else float("nan")


def has_graph(n_cells: int) -> bool:
    """Whether there are enough cells for the kNN graph that Leiden and UMAP are built on."""
    return n_cells > N_NEIGHBORS


def embedding_metrics(
    adata, embedding_key: str, *, label_key: str | None, batch_key: str | None, seed: int = 0
) -> tuple[dict, np.ndarray | None]:
    """All metrics of one embedding, plus its Leiden clusters (needed for plots; None when there are
    too few cells for a graph, see :func:`has_graph`). Metrics that cannot be computed are left out."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    embedding = np.asarray(adata.obsm[embedding_key], dtype=np.float64)
    clusters = leiden_clusters(adata, embedding_key, seed=seed) if has_graph(adata.n_obs) else None
    result: dict = {"n_dims": int(embedding.shape[1])}
    if clusters is not None:
        result["n_leiden_clusters"] = int(len(np.unique(clusters)))
    # label metrics use the labelled cells only (a combined report may join labelled and unlabelled samples)
    labelled = adata.obs[label_key].notna().to_numpy() if label_key else np.zeros(adata.n_obs, dtype=bool)
    labels = usable_labels(adata.obs[label_key][labelled]) if label_key else None
    if labels is not None:
        x = embedding[labelled]
        result["n_labelled_cells"] = int(labelled.sum())
        if clusters is not None:
            result["ari"] = float(adjusted_rand_score(labels, clusters[labelled]))
            result["nmi"] = float(normalized_mutual_info_score(labels, clusters[labelled]))
        score = silhouette(x, labels, seed=seed)
        if score is not None:
            result["silhouette"] = score
        result["knn_accuracy"] = knn_accuracy(x, labels, seed=seed)
    batches = usable_labels(adata.obs[batch_key]) if batch_key else None
    if batches is not None:
        all_labels = None if labels is None or not labelled.all() else labels
        result["batch_asw"] = batch_asw(embedding, batches, all_labels, seed=seed)
    return result, clusters


def annotation_metrics(predicted, truth) -> dict:
    """Agreement of ``scfm_cell_type`` with known labels, with the confusion matrix (rows = truth)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    known = pd.Series(truth).notna().to_numpy()
    predicted = pd.Series(predicted).astype(str).to_numpy()[known]
    truth = pd.Series(truth).astype(str).to_numpy()[known]
    truth_classes = sorted(np.unique(truth))
    predicted_classes = sorted(set(np.unique(predicted)) - set(truth_classes))  # e.g. "unknown"
    classes = truth_classes + predicted_classes
    matrix = confusion_matrix(truth, predicted, labels=classes)
    assigned = predicted != "unknown"
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=truth_classes, average="macro", zero_division=0)),
        "unknown_fraction": float(1.0 - assigned.mean()),
        "accuracy_of_assigned": float(accuracy_score(truth[assigned], predicted[assigned])) if assigned.any() else None,
        "classes": classes,
        "n_truth_classes": len(truth_classes),
        "confusion": matrix.tolist(),
    }
