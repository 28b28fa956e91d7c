"""Over-representation of GO Biological Process terms in gene modules (hypergeometric test, BH per module).

    table = enrich_modules({"0": ["CD3E", ...], ...}, background=tested_genes, annotations=per_gene,
                           term_names=names)
    summary = enrichment_summary(table, module_names=["0", "1", ...], alpha=0.05)

The universe is the background genes (every gene the modules were built from) that carry at least one GO BP
annotation; module genes without one cannot be enriched in anything and are not counted. Only terms with
``min_term_size``..``max_term_size`` annotated genes in that universe are tested (10 and 500: smaller terms
cannot reach significance in a module, larger ones say little). Per module, every tested term with at least
one gene of the module gets P(X >= overlap) under the hypergeometric distribution, and the p-values of those
terms are adjusted together by Benjamini-Hochberg (``q_value``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

COLUMNS = ("module", "go_id", "term", "overlap", "module_annotated", "term_size", "universe", "expected",
           "fold_enrichment", "p_value", "q_value", "genes")


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (monotone, capped at 1)."""
    from scipy.stats import false_discovery_control

    p_values = np.asarray(p_values, dtype=np.float64)
    return false_discovery_control(p_values, method="bh") if len(p_values) else p_values


def enrich_modules(
    modules: Mapping[str, Sequence[str]],
    background: Iterable[str],
    annotations: Mapping[str, Iterable[str]],
    term_names: Mapping[str, str] | None = None,
    *,
    min_term_size: int = 10,
    max_term_size: int = 500,
) -> pd.DataFrame:
    """One row per (module, term) tested, sorted by module then p-value; columns ``COLUMNS``."""
    from scipy.stats import hypergeom

    term_names = term_names or {}
    universe = [g for g in dict.fromkeys(map(str, background)) if annotations.get(g)]
    members: dict[str, set[str]] = {}
    for gene in universe:
        for term in annotations[gene]:
            members.setdefault(term, set()).add(gene)
    tested = {t: genes for t, genes in members.items() if min_term_size <= len(genes) <= max_term_size}
    in_universe = set(universe)
    rows = []
    for module, genes in modules.items():
        annotated = [g for g in dict.fromkeys(map(str, genes)) if g in in_universe]
        hits: dict[str, list[str]] = {}
        for gene in annotated:
            for term in annotations[gene]:
                if term in tested:
                    hits.setdefault(term, []).append(gene)
        if not hits:
            continue
        terms = sorted(hits)
        overlap = np.array([len(hits[t]) for t in terms])
        sizes = np.array([len(tested[t]) for t in terms])
        p = hypergeom.sf(overlap - 1, len(universe), sizes, len(annotated))
        q = benjamini_hochberg(p)
        expected = sizes * len(annotated) / len(universe)
        for i, term in enumerate(terms):
            rows.append((str(module), term, term_names.get(term, ""), int(overlap[i]), len(annotated), int(sizes[i]),
                         len(universe), float(expected[i]), float(overlap[i] / expected[i]), float(p[i]),
                         float(q[i]), ",".join(sorted(hits[term]))))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if len(table):
        table["_order"] = table["module"].map({str(m): i for i, m in enumerate(modules)})
        table = table.sort_values(["_order", "p_value", "go_id"]).drop(columns="_order").reset_index(drop=True)
    return table


def enrichment_summary(table: pd.DataFrame, module_names: Sequence[str], *, alpha: float = 0.05,
                       top: int = 5) -> dict:
    """Fraction of modules with a term at ``q < alpha``, and each module's top terms."""
    significant = table[table["q_value"] < alpha] if len(table) else table
    per_module = {}
    for module in map(str, module_names):
        rows = significant[significant["module"] == module].head(top) if len(significant) else significant
        per_module[module] = [
            {"go_id": r.go_id, "term": r.term, "overlap": int(r.overlap), "term_size": int(r.term_size),
             "fold_enrichment": float(r.fold_enrichment), "q_value": float(r.q_value)}
            for r in rows.itertuples()
        ]
    n_enriched = sum(1 for terms in per_module.values() if terms)
    return {
        "alpha": alpha,
        "n_modules": len(per_module),
        "n_modules_enriched": n_enriched,
        "fraction_modules_enriched": n_enriched / len(per_module) if per_module else float("nan"),
        "top_terms": per_module,
    }
