"""Gene graphs: the edge-list format, co-expression from control cells, the normalised adjacency."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from scfm.errors import ScfmError
from scfm.tasks.perturb.graph import (coexpression_graph, graph_from_edges, normalised_adjacency,
                                      read_edge_table)

GENES = ["A", "B", "C", "D"]


def test_edge_table_is_undirected_deduplicated_and_restricted(tmp_path):
    path = tmp_path / "prior.tsv"
    pd.DataFrame({"source": ["A", "B", "A", "C", "X", "D"], "target": ["B", "A", "C", "C", "A", "A"],
                  "weight": [0.5, 2.0, 1.0, 3.0, 1.0, 0.7]}).to_csv(path, sep="\t", index=False)
    graph = read_edge_table(path, GENES)
    edges = {(GENES[a], GENES[b]): w for (a, b), w in zip(graph.pairs.tolist(), graph.weights.tolist())}
    # A-B listed twice keeps the larger weight; the self-loop C-C and the unknown gene X are dropped
    assert edges == {("A", "B"): 2.0, ("A", "C"): 1.0, ("A", "D"): pytest.approx(0.7)}
    assert graph.n_dropped == 1
    assert graph.summary()["isolated_genes"] == 0


def test_edge_table_without_weights_and_a_go_style_edge_list():
    unweighted = graph_from_edges(GENES, [("A", "B"), ("C", "D")])
    assert unweighted.weights.tolist() == [1.0, 1.0]
    # what a GO co-annotation helper returns, (gene_a, gene_b, shared-term weight) rows, plugs in as it is
    go = graph_from_edges(GENES, pd.DataFrame({"gene_a": ["A"], "gene_b": ["D"], "jaccard": [0.25]}), source="GO")
    assert go.to_frame().to_dict("records") == [{"source": "A", "target": "D", "weight": 0.25}]
    merged = unweighted.union(go)
    assert merged.n_edges == 3


@pytest.mark.parametrize("content, message", [
    ("a\tb\nA\tB\n", "the gene graph needs columns source, target; missing"),
    ("source\ttarget\tweight\nA\tB\t-1\n", "weights must be positive numbers (row 1: -1"),
    ("source\ttarget\nX\tY\n", "none of the 1 edges joins two of the predictor's genes"),
])
def test_bad_edge_tables_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(ScfmError, match=message.replace("(", r"\(")):
        read_edge_table(path, GENES)


def test_coexpression_links_correlated_genes_only():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=500)
    expression = np.stack([latent + 0.1 * rng.normal(size=500), -latent + 0.1 * rng.normal(size=500),
                           rng.normal(size=500), rng.normal(size=500)], axis=1)
    graph = coexpression_graph(expression, GENES + ["E"], threshold=0.4, k=2)
    # A and B are anti-correlated (|r| counts), C and D are noise; E is beyond the matrix: no edges
    assert [tuple(p) for p in graph.pairs.tolist()] == [(0, 1)]
    assert graph.weights[0] > 0.9
    assert graph.degree().tolist() == [1, 1, 0, 0, 0]


def test_normalised_adjacency_is_symmetric_with_self_loops():
    graph = graph_from_edges(GENES, [("A", "B", 1.0), ("B", "C", 3.0)])
    dense = normalised_adjacency(graph).to_dense().numpy()
    adjacency = np.eye(4)
    adjacency[0, 1] = adjacency[1, 0] = 1.0
    adjacency[1, 2] = adjacency[2, 1] = 3.0
    scale = 1 / np.sqrt(adjacency.sum(axis=1))
    np.testing.assert_allclose(dense, adjacency * scale[:, None] * scale[None, :], rtol=1e-6)
    assert isinstance(normalised_adjacency(graph), torch.Tensor)
