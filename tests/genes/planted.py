"""Synthetic data with known structure for the gene-module and network tests."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def planted_embeddings(n_modules: int = 4, genes_per_module: int = 25, n_free: int = 0, dim: int = 32,
                       spread: float = 0.6, offset: float = 4.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Genes driven by one of ``n_modules`` shared latent vectors (plus noise), then ``n_free`` genes of
    their own; every vector shifted by one common ``offset`` direction, as decoder outputs are.
    Returns (genes x dim, planted module per gene, -1 for free genes)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_modules, dim))
    truth = np.concatenate([np.repeat(np.arange(n_modules), genes_per_module), np.full(n_free, -1)])
    vectors = np.where(truth[:, None] >= 0, centres[np.maximum(truth, 0)], 0.0)
    vectors = vectors + rng.standard_normal((len(truth), dim)) * np.where(truth[:, None] >= 0, spread, 1.0)
    common = rng.standard_normal(dim)
    return (vectors + offset * common / np.linalg.norm(common) * np.sqrt(dim)).astype(np.float32), truth


def planted_tf_programme(n_genes: int = 200, n_targets: int = 12, dim: int = 32, closeness: float = 0.5,
                         seed: int = 0) -> tuple[np.ndarray, int, np.ndarray]:
    """Gene embeddings where gene 0 is a TF and ``n_targets`` genes lie near it; the rest are random.
    Returns (genes x dim, TF index, target indices)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_genes, dim))
    targets = rng.choice(np.arange(1, n_genes), size=n_targets, replace=False)
    vectors[targets] = vectors[0] + closeness * rng.standard_normal((n_targets, dim))
    return vectors.astype(np.float32), 0, np.sort(targets)


def planted_counts(n_cells: int, n_genes: int, programmes: dict[int, np.ndarray], *, strength: float = 1.5,
                   seed: int = 0) -> sp.csr_matrix:
    """Poisson counts where the genes of each programme share a per-cell latent factor (log-normal activity);
    every other gene varies on its own. Cell depth varies too."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.3, 3.0, size=n_genes)
    log_rate = np.log(base)[None, :] + 0.3 * rng.standard_normal((n_cells, n_genes))
    for genes in programmes.values():
        factor = rng.standard_normal(n_cells)[:, None]
        log_rate[:, genes] += strength * factor
    depth = rng.uniform(0.6, 1.6, size=(n_cells, 1))
    counts = rng.poisson(np.exp(log_rate) * depth).astype(np.float32)
    counts[counts.sum(axis=1) == 0, 0] = 1  # no empty cell
    return sp.csr_matrix(counts)
