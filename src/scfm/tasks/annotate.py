"""Cell-type annotation of embedded cells: a fine-tuned classifier head, or kNN transfer from a reference.

Both paths produce the same schema (see docs/architecture.md, "annotated h5ad"):
``obs['scfm_cell_type']`` (``unknown`` below ``min_confidence``), ``obs['scfm_confidence']`` (the top
class probability), ``obsm['scfm_probabilities']`` (cells x classes) and
``uns['scfm']['annotate']`` with ``classes`` (the column order) and every setting used.

A reference is frozen: batches arriving later are annotated against the same file, so its embedding
must come from the same checkpoint and settings as the query's; that is checked, not assumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scfm.errors import ScfmError, ScfmUsageError

UNKNOWN = "unknown"
CELL_TYPE_KEY = "scfm_cell_type"
CONFIDENCE_KEY = "scfm_confidence"
PROBABILITIES_KEY = "scfm_probabilities"

# embed settings that define the embedding space; paths, batch sizes, devices and timings do not
# (a Nextflow task stages the same checkpoint under a different path every time)
EMBEDDING_SPACE_KEYS = (
    "checkpoint_sha256", "checkpoint_source", "version", "output_type", "pool", "input_type", "target_depth",
    "pre_normalized", "vocab_sha256", "n_genes", "model",
)


@dataclass
class Annotation:
    """Per-cell probabilities over ``classes`` and the labels derived from them."""

    probabilities: np.ndarray  # (n_cells, n_classes), rows sum to 1
    classes: list[str]
    min_confidence: float
    settings: dict = field(default_factory=dict)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    @property
    def cell_types(self) -> np.ndarray:
        best = np.asarray(self.classes, dtype=object)[self.probabilities.argmax(axis=1)]
        return np.where(self.confidence >= self.min_confidence, best, UNKNOWN)


def embedding_of(adata, key: str, path) -> np.ndarray:
    if key not in adata.obsm:
        raise ScfmError(f"no embedding obsm['{key}'] (run `scfm embed` first, or pass --embedding-key)", path)
    embedding = np.asarray(adata.obsm[key], dtype=np.float32)
    check_finite_embedding(embedding, key, path)
    return embedding


def check_finite_embedding(embedding: np.ndarray, key: str, path) -> None:
    """Refuse NaN or infinite embeddings: neighbours and classifiers cannot place such cells."""
    bad = np.flatnonzero(~np.isfinite(embedding).all(axis=1)) if embedding.ndim == 2 else []
    if len(bad):
        raise ScfmError(f"obsm['{key}'] holds NaN or infinite values in {len(bad)} of {embedding.shape[0]} cells "
                        f"(first: row {int(bad[0])}); re-embed the file", path)


def embed_settings(adata) -> dict | None:
    scfm = adata.uns.get("scfm", {})
    settings = scfm.get("embed") if isinstance(scfm, dict) else None
    return dict(settings) if settings is not None else None


def _comparable(settings: dict) -> dict:
    return {k: _plain(settings[k]) for k in EMBEDDING_SPACE_KEYS if k in settings}


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_same_embedding(query, reference, query_path, reference_path) -> None:
    """Refuse a reference whose embedding came from another checkpoint or other settings."""
    mine, theirs = embed_settings(query), embed_settings(reference)
    if mine is None and theirs is None:
        return  # embeddings made outside scfm: the dimension check below is all we can do
    if mine is None or theirs is None:
        which = query_path if mine is None else reference_path
        raise ScfmError(
            "has no uns['scfm']['embed'] settings, so the reference and query embeddings cannot be "
            "confirmed to be comparable (embed both with `scfm embed` and the same checkpoint)", which
        )
    a, b = _comparable(mine), _comparable(theirs)
    differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differing:
        details = "; ".join(f"{k}: reference {b.get(k)!r} vs query {a.get(k)!r}" for k in differing[:4])
        raise ScfmError(f"reference was embedded with a different checkpoint or settings ({details})", reference_path)


def knn_transfer(query: np.ndarray, reference: np.ndarray, labels: np.ndarray, *, k: int = 15) -> tuple[np.ndarray, list[str]]:
    """Fraction of each class among the k nearest reference cells (euclidean)."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, len(labels)))
    knn.fit(reference, labels)
    return knn.predict_proba(query), [str(c) for c in knn.classes_]


def annotate_with_reference(
    adata, reference_path, *, label_key: str, k: int = 15, min_confidence: float = 0.5,
    embedding_key: str = "X_scfm", input_path=None,
) -> Annotation:
    import anndata as ad

    query = embedding_of(adata, embedding_key, input_path)
    try:
        reference = ad.read_h5ad(reference_path)
    except Exception as exc:
        raise ScfmError(f"cannot read the reference as h5ad ({type(exc).__name__}: {exc})", reference_path) from exc
    if label_key not in reference.obs:
        columns = ", ".join(map(str, reference.obs.columns[:20]))
        raise ScfmError(f"--label-key '{label_key}' is not an obs column of the reference (columns: {columns})",
                        reference_path)
    ref_embedding = embedding_of(reference, embedding_key, reference_path)
    if ref_embedding.shape[1] != query.shape[1]:
        raise ScfmError(
            f"embedding dimension mismatch: reference obsm['{embedding_key}'] has {ref_embedding.shape[1]} dims, "
            f"the query has {query.shape[1]}", reference_path,
        )
    check_same_embedding(adata, reference, input_path, reference_path)
    labels = reference.obs[label_key]
    known = labels.notna().to_numpy() & (labels.astype(str) != UNKNOWN).to_numpy()
    if known.sum() == 0:
        raise ScfmError(f"the reference has no labelled cells in obs['{label_key}']", reference_path)
    probabilities, classes = knn_transfer(query, ref_embedding[known], labels[known].astype(str).to_numpy(), k=k)
    settings = {
        "method": "knn", "reference": os.fspath(reference_path), "label_key": label_key,
        "k": int(min(k, int(known.sum()))), "n_reference_cells": int(known.sum()),
    }
    return Annotation(probabilities, classes, min_confidence, settings)


def annotate_with_classifier(
    adata, classifier_dir, *, min_confidence: float = 0.5, embedding_key: str = "X_scfm", input_path=None,
    batch_size: int = 256, device: str = "cpu",
) -> Annotation:
    """Apply a classifier from ``scfm finetune`` (its head reads the cell embedding)."""
    from scfm.train.finetune import load_classifier, predict_proba

    query = embedding_of(adata, embedding_key, input_path)
    classifier = load_classifier(classifier_dir)
    expected = getattr(classifier, "embedding_dim", None)
    if expected is not None and int(expected) != query.shape[1]:
        raise ScfmError(
            f"embedding dimension mismatch: the classifier expects {expected} dims, obsm['{embedding_key}'] has "
            f"{query.shape[1]}", input_path,
        )
    check_classifier_settings(adata, classifier.config, input_path)
    check_classifier_weights(adata, classifier_dir, classifier.config, input_path)
    probabilities = np.asarray(predict_proba(classifier, query), dtype=np.float64)
    classes = [str(c) for c in classifier.labels]
    settings = {"method": "classifier", "classifier": os.fspath(classifier_dir)}
    return Annotation(probabilities, classes, min_confidence, settings)


def check_classifier_settings(adata, classifier_config: dict, input_path) -> None:
    """The head was trained on embeddings made one way; refuse embeddings made another way."""
    settings = embed_settings(adata)
    if settings is None:
        return
    differing = [
        f"{key}: classifier {classifier_config[key]!r} vs input {settings[key]!r}"
        for key in ("pool", "target_depth", "pre_normalized")
        if key in classifier_config and key in settings and str(classifier_config[key]) != str(settings[key])
    ]
    if differing:
        raise ScfmError(f"the input was embedded with other settings than the classifier was trained on "
                        f"({'; '.join(differing)})", input_path)


def check_classifier_weights(adata, classifier_dir, classifier_config: dict, input_path) -> None:
    """The head reads one encoder's embedding space: refuse embeddings from other weights or genes."""
    import json

    from scfm.model.checkpoint import CONFIG_FILE
    from scfm.train.finetune import accepted_checkpoint_sha256s

    settings = embed_settings(adata)
    if settings is None:
        raise ScfmError("has no uns['scfm']['embed'] settings, so its embedding cannot be confirmed to come from the "
                        "classifier's encoder (embed it with `scfm embed`)", input_path)
    accepted = accepted_checkpoint_sha256s(classifier_dir, classifier_config)
    embedded_with = str(settings.get("checkpoint_sha256"))
    if embedded_with not in accepted:
        theirs = " or ".join(sorted(f"{sha[:12]}…" for sha in accepted))
        raise ScfmError(f"was embedded with other weights than the classifier was trained on (checkpoint_sha256 "
                        f"{embedded_with[:12]}…, the classifier's {theirs}); embed it with --checkpoint "
                        f"{classifier_dir}", input_path)
    vocab_sha = json.loads((Path(classifier_dir) / CONFIG_FILE).read_text()).get("vocab_sha256")
    embedded_vocab = str(settings.get("vocab_sha256"))
    if vocab_sha is not None and embedded_vocab != vocab_sha:
        raise ScfmError(f"was embedded with another vocabulary than the classifier's (vocab_sha256 "
                        f"{embedded_vocab[:12]}…, the classifier's {vocab_sha[:12]}…)", input_path)


def write_annotation(adata, annotation: Annotation, *, embedding_key: str) -> None:
    """Store an :class:`Annotation` in ``adata`` under the documented keys."""
    cell_types = annotation.cell_types
    categories = list(annotation.classes) + ([UNKNOWN] if UNKNOWN not in annotation.classes else [])
    adata.obs[CELL_TYPE_KEY] = pd.Categorical(cell_types, categories=categories)
    adata.obs[CONFIDENCE_KEY] = annotation.confidence.astype(np.float32)
    adata.obsm[PROBABILITIES_KEY] = annotation.probabilities.astype(np.float32)
    scfm = dict(adata.uns.get("scfm", {}))
    scfm["annotate"] = {
        **annotation.settings,
        "classes": list(annotation.classes),
        "min_confidence": float(annotation.min_confidence),
        "embedding_key": embedding_key,
        "n_cells": int(adata.n_obs),
        "n_unknown": int((cell_types == UNKNOWN).sum()),
    }
    adata.uns["scfm"] = scfm


def annotate_file(
    input_path, output_path, *, classifier=None, reference=None, label_key: str | None = None, k: int = 15,
    min_confidence: float = 0.5, embedding_key: str = "X_scfm",
) -> dict:
    """Read an embedded h5ad, annotate it, write the annotated h5ad; return ``uns['scfm']['annotate']``."""
    import anndata as ad

    from scfm.utils import atomic_output

    if (classifier is None) == (reference is None):
        raise ScfmUsageError("give exactly one of --classifier or --reference")
    if reference is not None and not label_key:
        raise ScfmUsageError("--reference needs --label-key (the reference's obs column with cell types)")
    if not 0.0 <= min_confidence <= 1.0:
        raise ScfmUsageError(f"--min-confidence must be within 0..1, got {min_confidence}")
    if k < 1:
        raise ScfmUsageError(f"--k must be at least 1, got {k}")
    try:
        adata = ad.read_h5ad(input_path)
    except Exception as exc:
        raise ScfmError(f"cannot read as h5ad ({type(exc).__name__}: {exc})", input_path) from exc
    if reference is not None:
        annotation = annotate_with_reference(
            adata, reference, label_key=label_key, k=k, min_confidence=min_confidence,
            embedding_key=embedding_key, input_path=input_path,
        )
    else:
        annotation = annotate_with_classifier(
            adata, classifier, min_confidence=min_confidence, embedding_key=embedding_key, input_path=input_path
        )
    write_annotation(adata, annotation, embedding_key=embedding_key)
    with atomic_output(Path(output_path)) as tmp:
        adata.write_h5ad(tmp)
    return dict(adata.uns["scfm"]["annotate"])
