"""Gene modules: a cosine kNN graph over gene embeddings, Leiden communities, hubs, and per-cell scores.

    found = find_modules(embeddings, n_neighbors=15, resolution=1.0, min_module_size=5, seed=0)
    found.labels              # (genes,) module id per gene, 0 = the largest module; -1 = in a module too small
    found.hub_scores          # (genes,) summed graph weight to the other genes of the gene's module
    found.members()           # module id -> gene indices, hubs first
    controls = control_genes(mean_expression, modules, rng=rng)    # expression-matched, as scanpy/Seurat
    weights = score_weights(modules, controls, n_genes)           # genes x modules
    scores = module_scores(rows, weights)                         # cells x modules, streamed

The embeddings are centred (the mean over genes subtracted) before the cosine: the decoder's outputs pass
through LayerNorm and share a large common direction, which makes every pair of raw vectors look alike.

A module's score in a cell is the mean log1p CP10k expression of its genes minus that of control genes drawn
from the same expression bins (``scanpy.tl.score_genes``), computed for all cells in one streamed pass as a
sparse-matrix product, so it scales to files that do not fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import ScfmError


def centre(embeddings: np.ndarray) -> np.ndarray:
    """Subtract the mean over genes (rows), so that cosine similarity compares what sets genes apart."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings - embeddings.mean(axis=0, keepdims=True)


def cosine_similarity(embeddings: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of ``embeddings[rows]`` (all rows by default) with every row, float32."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.where(norms > 0, norms, 1.0)
    left = unit if rows is None else unit[np.asarray(rows)]
    return left @ unit.T


@dataclass
class Modules:
    labels: np.ndarray  # (genes,) int64, -1 = unassigned
    hub_scores: np.ndarray  # (genes,) float64
    graph: sp.csr_matrix  # genes x genes symmetric kNN connectivities
    n_neighbors: int
    resolution: float
    umap: np.ndarray | None = None  # (genes, 2) UMAP of the same graph, when asked for

    @property
    def module_ids(self) -> list[int]:
        return sorted(int(m) for m in np.unique(self.labels) if m >= 0)

    def members(self) -> dict[int, np.ndarray]:
        """module id -> gene indices, ordered by decreasing hub score."""
        out = {}
        for module in self.module_ids:
            genes = np.flatnonzero(self.labels == module)
            out[module] = genes[np.argsort(-self.hub_scores[genes], kind="stable")]
        return out


def knn_graph(embeddings: np.ndarray, *, n_neighbors: int = 15, seed: int = 0):
    """An AnnData (genes as observations) holding scanpy's cosine kNN graph of ``embeddings``."""
    import anndata as ad
    import scanpy as sc

    n_genes = embeddings.shape[0]
    if n_genes < 3:
        raise ScfmError(f"{n_genes} gene(s) pass the filters: too few for a gene graph (lower --min-cells?)")
    graph = ad.AnnData(X=np.asarray(embeddings, dtype=np.float32))
    k = int(min(n_neighbors, n_genes - 1))
    sc.pp.neighbors(graph, n_neighbors=k, use_rep="X", metric="cosine", random_state=seed)
    return graph


def relabel_by_size(raw: np.ndarray, min_module_size: int) -> np.ndarray:
    """Leiden labels -> 0 for the largest community, 1 for the next, ...; communities smaller than
    ``min_module_size`` -> -1. Ties go to the community whose first gene comes first (deterministic)."""
    raw = np.asarray(raw)
    values, first, sizes = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -sizes))
    labels = np.full(len(raw), -1, dtype=np.int64)
    next_id = 0
    for index in order:
        if sizes[index] >= min_module_size:
            labels[raw == values[index]] = next_id
            next_id += 1
    return labels


def intramodular_connectivity(graph: sp.csr_matrix, labels: np.ndarray) -> np.ndarray:
    """Per gene, the summed edge weight to genes of its own module (its hub score); 0 when unassigned."""
    coo = sp.coo_matrix(graph)
    same = (labels[coo.row] == labels[coo.col]) & (labels[coo.row] >= 0)
    return np.bincount(coo.row[same], weights=coo.data[same], minlength=len(labels))


def find_modules(embeddings: np.ndarray, *, n_neighbors: int = 15, resolution: float = 1.0,
                 min_module_size: int = 5, seed: int = 0, centred: bool = True, umap: bool = False) -> Modules:
    """Leiden modules of the cosine kNN graph of (centred) gene embeddings (and a UMAP of that graph)."""
    import scanpy as sc

    if resolution <= 0:
        raise ScfmError(f"--resolution must be > 0, got {resolution}")
    vectors = centre(embeddings) if centred else np.asarray(embeddings, dtype=np.float32)
    graph = knn_graph(vectors, n_neighbors=n_neighbors, seed=seed)
    sc.tl.leiden(graph, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=-1,
                 directed=False)
    labels = relabel_by_size(graph.obs["leiden"].astype(int).to_numpy(), min_module_size)
    connectivities = sp.csr_matrix(graph.obsp["connectivities"])
    coords = None
    if umap:
        sc.tl.umap(graph, random_state=seed)
        coords = np.asarray(graph.obsm["X_umap"], dtype=np.float32)
    return Modules(labels, intramodular_connectivity(connectivities, labels), connectivities,
                   int(graph.uns["neighbors"]["params"]["n_neighbors"]), float(resolution), coords)


# ------------------------------------------------------------------------------------ scores
def expression_bins(mean_expression: np.ndarray, n_bins: int = 25) -> np.ndarray:
    """Bin of each gene by the rank of its mean expression, the cut scanpy.tl.score_genes uses."""
    ranks = pd.Series(np.asarray(mean_expression)).rank(method="min").to_numpy()
    n_items = max(int(np.round(len(ranks) / (n_bins - 1))), 1)
    return (ranks // n_items).astype(np.int64)


def control_genes(mean_expression: np.ndarray, modules: Mapping[int, Sequence[int]], *, ctrl_size: int = 50,
                  n_bins: int = 25, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """For each module: per expression bin its genes fall in, ``ctrl_size`` random genes of that bin
    (module genes removed afterwards). Indices refer to ``mean_expression`` (the gene pool)."""
    bins = expression_bins(mean_expression, n_bins)
    out = {}
    for module, genes in modules.items():
        genes = np.asarray(genes)
        chosen = []
        for cut in np.unique(bins[genes]):
            pool = np.flatnonzero(bins == cut)
            if ctrl_size < len(pool):
                pool = rng.choice(pool, size=ctrl_size, replace=False)
            chosen.append(pool)
        controls = np.setdiff1d(np.concatenate(chosen), genes)
        if not len(controls):
            raise ScfmError(f"module {module}: no control genes in its expression bins (too few genes tested)")
        out[module] = controls
    return out


def score_weights(modules: Mapping[int, Sequence[int]], controls: Mapping[int, Sequence[int]],
                  n_genes: int) -> sp.csc_matrix:
    """genes x modules: +1/|module| on the module's genes, -1/|controls| on its control genes."""
    rows, cols, values = [], [], []
    for column, module in enumerate(modules):
        genes, ctrl = np.asarray(modules[module]), np.asarray(controls[module])
        rows += [genes, ctrl]
        cols += [np.full(len(genes), column), np.full(len(ctrl), column)]
        values += [np.full(len(genes), 1.0 / len(genes)), np.full(len(ctrl), -1.0 / len(ctrl))]
    if not rows:
        return sp.csc_matrix((n_genes, 0))
    return sp.csc_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n_genes, len(modules)))


def module_scores(rows, weights: sp.spmatrix, *, chunk_size: int = 4096, progress=None) -> np.ndarray:
    """cells x modules: log1p CP10k expression (streamed from ``rows``, raw counts) times ``weights``."""
    from scfm.tasks.genes.embeddings import log_normalised

    n_cells = rows.shape[0]
    out = np.zeros((n_cells, weights.shape[1]), dtype=np.float64)
    weights = sp.csr_matrix(weights, dtype=np.float64)
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        out[start:stop] = (log_normalised(rows[start:stop]).astype(np.float64) @ weights).toarray()
        if progress is not None:
            progress.update(stop - start)
    return out


# --------------------------------------------------------------------------------- baselines
def pca_gene_embeddings(expression: np.ndarray, *, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """Genes x components: PCA loadings of z-scored expression (cells x genes) times each component's
    standard deviation, so that the dot product of two genes approximates their correlation."""
    from sklearn.decomposition import PCA

    expression = np.asarray(expression, dtype=np.float32)  # cells x 19k genes: float32 halves the memory
    std = expression.std(axis=0)
    scaled = np.clip((expression - expression.mean(axis=0)) / np.where(std > 0, std, 1.0), -10, 10)
    n_comps = int(max(2, min(n_comps, scaled.shape[0] - 1, scaled.shape[1] - 1)))
    pca = PCA(n_components=n_comps, svd_solver="randomized" if min(scaled.shape) > 500 else "full",
              random_state=seed).fit(scaled)
    return (pca.components_.T * np.sqrt(pca.explained_variance_)).astype(np.float32)


def random_gene_embeddings(n_genes: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """Gaussian vectors: modules of these say what the Leiden procedure finds when there is nothing to find."""
    return np.random.default_rng(seed).standard_normal((n_genes, dim)).astype(np.float32)
