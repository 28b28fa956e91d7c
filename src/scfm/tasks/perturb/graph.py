"""Gene-gene graphs for the perturbation predictor.

    read_edge_table(path, genes) -> GeneGraph          # a prior: TSV edge list (`--gene-graph`)
    graph_from_edges(genes, edges, source=...)         # any edge list: pairs, triples or a DataFrame
    coexpression_graph(expression, genes, ...)          # the default, from control cells
    normalised_adjacency(graph) -> torch sparse (n, n)  # D^-1/2 (A + I) D^-1/2

Edge-list file (``--gene-graph``): tab- or comma-separated with a header row; columns ``source`` and
``target`` (gene symbols as in the vocabulary) and optionally ``weight`` (a positive number, default 1).
Edges are undirected; a pair listed twice keeps its largest weight; self-loops are ignored (the
normalisation adds them); genes outside the predictor's genes are dropped and counted.

A Gene Ontology co-annotation graph (what GEARS uses to propagate perturbations) is one more edge list:
pass its ``(gene_a, gene_b, weight)`` rows to :func:`graph_from_edges`.

The co-expression graph follows GEARS: each gene is linked to its ``k`` most correlated genes (Pearson
over cells of log1p expression) whose absolute correlation is at least ``threshold``. It is built
from control cells only, so no perturbed cell of a held-out perturbation shapes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import ScfmError

EDGE_COLUMNS = ("source", "target", "weight")


@dataclass
class GeneGraph:
    """Undirected weighted edges over ``genes`` (edge i joins ``pairs[i, 0]`` and ``pairs[i, 1]``)."""

    genes: list[str]
    pairs: np.ndarray    # (E, 2) int64, i < j
    weights: np.ndarray  # (E,) float32, > 0
    source: str
    n_dropped: int = 0   # input edges naming a gene outside ``genes``

    @property
    def n_edges(self) -> int:
        return int(self.pairs.shape[0])

    def degree(self) -> np.ndarray:
        return np.bincount(self.pairs.ravel(), minlength=len(self.genes))

    def summary(self) -> dict:
        degree = self.degree()
        return {"source": self.source, "n_genes": len(self.genes), "n_edges": self.n_edges,
                "n_dropped_edges": int(self.n_dropped), "isolated_genes": int((degree == 0).sum()),
                "median_degree": float(np.median(degree)) if degree.size else 0.0}

    def to_frame(self) -> pd.DataFrame:
        names = np.asarray(self.genes, dtype=object)
        return pd.DataFrame({"source": names[self.pairs[:, 0]], "target": names[self.pairs[:, 1]],
                             "weight": self.weights})

    def union(self, other: "GeneGraph") -> "GeneGraph":
        if other.genes != self.genes:
            raise ValueError("graphs over different genes")
        return _dedupe(self.genes, np.vstack([self.pairs, other.pairs]),
                       np.concatenate([self.weights, other.weights]), f"{self.source} + {other.source}",
                       self.n_dropped + other.n_dropped)


def _dedupe(genes, pairs: np.ndarray, weights: np.ndarray, source: str, n_dropped: int) -> GeneGraph:
    pairs = np.sort(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=1)
    weights = np.asarray(weights, dtype=np.float32).ravel()
    keep = pairs[:, 0] != pairs[:, 1]
    pairs, weights = pairs[keep], weights[keep]
    if pairs.size:
        # largest weight per pair: sort by weight descending, keep the first of each pair
        order = np.lexsort((-weights, pairs[:, 1], pairs[:, 0]))
        pairs, weights = pairs[order], weights[order]
        first = np.ones(len(pairs), dtype=bool)
        first[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
        pairs, weights = pairs[first], weights[first]
    return GeneGraph(list(genes), pairs.reshape(-1, 2), weights, source, n_dropped)


def graph_from_edges(genes: Sequence[str], edges, *, source: str = "edge list", path=None) -> GeneGraph:
    """Edges given as a DataFrame (first two columns genes, optional third a weight) or as
    ``(gene_a, gene_b)`` / ``(gene_a, gene_b, weight)`` tuples, restricted to ``genes``."""
    frame = edges if isinstance(edges, pd.DataFrame) else pd.DataFrame(list(edges))
    if frame.shape[1] < 2:
        raise ScfmError("an edge list needs two gene columns (source, target) and optionally a weight", path)
    a = frame.iloc[:, 0].astype(str).to_numpy()
    b = frame.iloc[:, 1].astype(str).to_numpy()
    if frame.shape[1] >= 3:
        weights = pd.to_numeric(frame.iloc[:, 2], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~(np.isfinite(weights) & (weights > 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ScfmError(f"edge weights must be positive numbers (row {row + 1}: {frame.iloc[row, 2]})", path)
    else:
        weights = np.ones(len(frame))
    index = {g: i for i, g in enumerate(genes)}
    ia = np.array([index.get(g, -1) for g in a], dtype=np.int64)
    ib = np.array([index.get(g, -1) for g in b], dtype=np.int64)
    known = (ia >= 0) & (ib >= 0)
    return _dedupe(genes, np.stack([ia[known], ib[known]], axis=1), weights[known], source,
                   int((~known).sum()))


def read_edge_table(path, genes: Sequence[str]) -> GeneGraph:
    """A ``--gene-graph`` file (columns source, target[, weight]) over the predictor's genes."""
    from scfm.tasks.perturb.data import read_table

    path = Path(path)
    frame = read_table(path, ("source", "target"), "gene graph")
    columns = ["source", "target"] + (["weight"] if "weight" in frame.columns else [])
    graph = graph_from_edges(genes, frame[columns], source=path.name, path=path)
    if graph.n_edges == 0:
        raise ScfmError(f"none of the {len(frame)} edges joins two of the predictor's genes "
                        "(gene symbols must match the vocabulary)", path)
    return graph


def coexpression_graph(expression: sp.spmatrix | np.ndarray, genes: Sequence[str], *, n_genes: int | None = None,
                       threshold: float = 0.4, k: int = 20) -> GeneGraph:
    """Top-``k`` |Pearson| >= ``threshold`` neighbours of each gene over the rows of ``expression``
    (cells x the first columns of ``genes``; genes beyond the matrix's width get no edges)."""
    dense = expression.toarray() if sp.issparse(expression) else np.asarray(expression)
    dense = dense.astype(np.float64)
    n = dense.shape[1] if n_genes is None else n_genes
    if dense.shape[0] < 3:
        return GeneGraph(list(genes), np.zeros((0, 2), np.int64), np.zeros(0, np.float32), "co-expression")
    centred = dense - dense.mean(axis=0)
    scale = np.sqrt((centred**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centred.T @ centred) / np.outer(scale, scale)
    corr = np.nan_to_num(np.abs(corr), nan=0.0)
    np.fill_diagonal(corr, 0.0)
    pairs, weights = [], []
    k = min(k, max(n - 1, 0))
    for gene in range(n):
        if k == 0:
            break
        best = np.argpartition(-corr[gene], k - 1)[:k] if n > k else np.arange(n)
        best = best[corr[gene, best] >= threshold]
        pairs.extend((gene, other) for other in best)
        weights.extend(corr[gene, best])
    return _dedupe(genes, np.asarray(pairs, dtype=np.int64).reshape(-1, 2), np.asarray(weights), "co-expression", 0)


def normalised_adjacency(graph: GeneGraph):
    """D^-1/2 (A + I) D^-1/2 as a torch sparse COO tensor (what one SGConv / GCN step multiplies by)."""
    import torch

    n = len(graph.genes)
    rows = np.concatenate([graph.pairs[:, 0], graph.pairs[:, 1], np.arange(n)])
    cols = np.concatenate([graph.pairs[:, 1], graph.pairs[:, 0], np.arange(n)])
    values = np.concatenate([graph.weights, graph.weights, np.ones(n, dtype=np.float32)]).astype(np.float64)
    adjacency = sp.coo_matrix((values, (rows, cols)), shape=(n, n)).tocsr()
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    scale = sp.diags(1.0 / np.sqrt(degree))
    normalised = (scale @ adjacency @ scale).tocoo()
    indices = torch.from_numpy(np.vstack([normalised.row, normalised.col]).astype(np.int64))
    return torch.sparse_coo_tensor(indices, torch.from_numpy(normalised.data.astype(np.float32)), (n, n),
                                   check_invariants=False).coalesce()


def combine(graphs: Iterable[GeneGraph]) -> GeneGraph | None:
    graphs = list(graphs)
    if not graphs:
        return None
    merged = graphs[0]
    for other in graphs[1:]:
        merged = merged.union(other)
    return merged
