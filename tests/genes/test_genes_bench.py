"""The evaluation of bench/genes.py on the real demo PBMCs: DoRothEA edges and GO modules, every method run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "genes.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_genes", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_edges_and_modules_are_scored_against_curated_biology(shared_data, go_dir, monkeypatch):
    pytest.importorskip("arboreto", reason="the bench extra (arboreto) is not installed")
    monkeypatch.setenv("SCFM_SHARED_DATA", str(shared_data))
    bench = load_bench()
    from scfm.model.config import ModelConfig
    from scfm.model.xtrimogene import XTrimoGene
    from scfm.tasks.genes.modules import pca_gene_embeddings, random_gene_embeddings

    adata = bench.load_pbmc()
    counts = adata.X.tocsr()
    genes = bench.tested_genes(counts)
    names = [str(adata.var_names[g]) for g in genes]
    expression = bench.log_expression(counts, genes)
    model = XTrimoGene(ModelConfig.preset("tiny", n_genes=adata.n_vars), seed=0)
    scfm, seconds = bench.scfm_gene_embeddings(model, counts, genes)
    pca = pca_gene_embeddings(expression)

    rows, info = bench.evaluate_network(names, {"scfm": (scfm, seconds), "PCA": (pca, 0.0)}, expression, seed=0,
                                        with_grnboost2=True)
    # the truth set, counted independently from DoRothEA and the TF list
    truth = bench.dorothea_ac()
    present = set(names)
    edges = truth[truth.tf.isin(present) & truth.target.isin(present) & (truth.tf != truth.target)]
    candidates = set(edges.tf) & set(bench.lambert_tfs())
    assert info["n_candidate_tfs"] == len(candidates) >= 5
    assert info["n_true_edges"] == len(edges[edges.tf.isin(candidates)].drop_duplicates(["tf", "target"]))
    by = {row["method"]: row for row in rows}
    share = info["n_true_edges"] / (len(candidates) * (len(names) - 1))
    assert all(np.isclose(row["auprc"] / row["auprc_ratio"], share) for row in rows)
    assert 0.5 < by["random (mean of 20)"]["auprc_ratio"] < 2.0
    # known regulons are co-expressed in real PBMCs: correlation and GRNBoost2 find them well above chance
    assert by["|Pearson|"]["auprc_ratio"] > 2.0 and by["|Spearman|"]["auprc_ratio"] > 2.0
    assert by["GRNBoost2 (arboreto)"]["auprc_ratio"] > 2.0
    assert np.isfinite(by["scfm cosine"]["auprc"]) and by["scfm cosine"]["seconds"] > 0

    modules, modules_info = bench.evaluate_modules(
        names, {"PCA": pca, "random": random_gene_embeddings(len(names), 32, seed=0)}, seed=0)
    fraction = {row["embedding"]: row["fraction_enriched"] for row in modules}
    assert modules_info["n_genes_annotated"] > 0.8 * len(names)
    # co-expression modules of real cells carry biology; modules of random vectors (nearly) never do
    assert fraction["PCA"] > 0.4 and fraction["random"] < 0.25
