"""GO over-representation: exact hypergeometric tails, BH per module, the right universe."""

from __future__ import annotations

from math import comb

import numpy as np

from scfm.tasks.genes.enrichment import benjamini_hochberg, enrich_modules, enrichment_summary


def hypergeometric_tail(k: int, universe: int, term: int, drawn: int) -> float:
    """P(X >= k) by explicit counting."""
    total = comb(universe, drawn)
    return sum(comb(term, i) * comb(universe - term, drawn - i) for i in range(k, min(term, drawn) + 1)) / total


def toy_annotations():
    genes = [f"g{i}" for i in range(60)]
    annotations = {g: {"root"} for g in genes}
    for g in genes[:12]:
        annotations[g] |= {"planted"}
    for g in genes[::5]:
        annotations[g] |= {"scattered"}
    annotations["g59"] = set()  # annotated to nothing: not in the universe
    return genes, annotations


def test_p_values_are_exact_and_q_values_bh_within_each_module():
    genes, annotations = toy_annotations()
    modules = {"A": genes[:10] + ["g59"], "B": genes[20:40]}
    table = enrich_modules(modules, genes, annotations, {"planted": "planted term"}, min_term_size=5,
                           max_term_size=30)
    universe = 59
    assert set(table["universe"]) == {universe}
    assert "root" not in set(table["go_id"])  # 59 genes: above max_term_size
    row = table[(table.module == "A") & (table.go_id == "planted")].iloc[0]
    assert (row.overlap, row.module_annotated, row.term_size, row.term) == (10, 10, 12, "planted term")
    assert np.isclose(row.p_value, hypergeometric_tail(10, universe, 12, 10), rtol=1e-9)
    for module, rows in table.groupby("module"):
        np.testing.assert_allclose(rows.q_value, benjamini_hochberg(rows.p_value.to_numpy()))
    assert table[table.module == "B"].q_value.min() > 0.05  # no planted signal in B


def test_benjamini_hochberg_matches_the_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.001])
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    expected = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(expected, 1)
    np.testing.assert_allclose(benjamini_hochberg(p), out)


def test_summary_counts_modules_with_a_significant_term():
    genes, annotations = toy_annotations()
    modules = {"A": genes[:12], "B": genes[30:45], "C": genes[45:50]}
    table = enrich_modules(modules, genes, annotations, {}, min_term_size=5, max_term_size=30)
    summary = enrichment_summary(table, list(modules), alpha=0.05)
    assert summary["n_modules"] == 3 and summary["n_modules_enriched"] == 1
    assert summary["fraction_modules_enriched"] == 1 / 3
    assert summary["top_terms"]["A"][0]["go_id"] == "planted" and summary["top_terms"]["B"] == []


def test_no_annotation_no_rows():
    table = enrich_modules({"A": ["x", "y"]}, ["x", "y"], {}, {})
    assert table.empty and list(table.columns)[:3] == ["module", "go_id", "term"]
    assert enrichment_summary(table, ["A"])["n_modules_enriched"] == 0
