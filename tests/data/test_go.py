"""GO BP annotations from the Bioconductor SQLite files: hierarchy, propagation, gene mapping, GO gene graph."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from scfm.data import go
from scfm.errors import ScfmError

REPO = Path(__file__).resolve().parents[2]
ALL_RELATIONS = ("isa", "part of", "regulates", "positively regulates", "negatively regulates")


# ------------------------------------------------------------------------- hierarchy (no database)
def test_closure_follows_every_path_of_a_dag():
    # a -> b -> d, a -> c -> d -> root; e separate
    parents = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": {"root"}, "e": set()}
    closure = go.ancestors_closure(parents)
    assert closure["a"] == {"b", "c", "d", "root"}
    assert closure["c"] == {"d", "root"}
    assert closure["e"] == frozenset()
    assert go.propagate({"g1": {"a"}, "g2": {"e", "c"}}, parents) == {
        "g1": {"a", "b", "c", "d", "root"}, "g2": {"e", "c", "d", "root"}}


def test_a_cycle_is_refused():
    with pytest.raises(ScfmError, match="cycle"):
        go.ancestors_closure({"a": {"b"}, "b": {"a"}})


def test_missing_database_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(ScfmError, match="make go") as err:
        go.resolve_go_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_default_location_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SCFM_GO_DIR", str(tmp_path / "x"))
    assert go.default_go_dir() == tmp_path / "x"
    monkeypatch.delenv("SCFM_GO_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert go.default_go_dir() == tmp_path / "cache" / "scfm" / "go"


def test_coannotation_edges_are_top_k_jaccard_without_self_edges():
    annotations = {"A": {"t1", "t2", "t3"}, "B": {"t1", "t2"}, "C": {"t3", "t4"}, "D": {"t9"}, "E": set()}
    genes = ["A", "B", "C", "D", "E", "F"]
    edges = go.go_coannotation_edges(genes, annotations, top_k=None, min_jaccard=0.0, block_size=2)
    brute = {}
    for a in genes:
        for b in genes:
            sa, sb = annotations.get(a, set()), annotations.get(b, set())
            if a != b and sa | sb and sa & sb:
                brute[(a, b)] = len(sa & sb) / len(sa | sb)
    got = {(s, t): w for s, t, w in edges.itertuples(index=False)}
    assert got.keys() == brute.keys()
    assert all(np.isclose(got[k], brute[k]) for k in brute)
    top1 = go.go_coannotation_edges(genes, annotations, top_k=1, min_jaccard=0.3)
    assert list(top1.itertuples(index=False, name=None)) == [("A", "B", 2 / 3), ("B", "A", 2 / 3)]
    assert list(edges.columns) == ["source", "target", "weight"]


def test_near_universal_terms_can_be_left_out():
    annotations = {"A": {"root", "x"}, "B": {"root", "x"}, "C": {"root"}}
    edges = go.go_coannotation_edges(list(annotations), annotations, top_k=None, min_jaccard=0.0, max_term_genes=2)
    assert set(zip(edges.source, edges.target)) == {("A", "B"), ("B", "A")}


# ------------------------------------------------------------------------------- real databases
def bioconductor_propagated(go_dir: Path) -> dict[str, set[str]]:
    """org.Hs.eg.db's own propagated table (GOALL), which follows every GO relation, regulates included."""
    with sqlite3.connect(go_dir / go.ORG_DB) as con:
        rows = con.execute("select i.symbol, b.go_id from go_bp_all b join gene_info i on i._id = b._id "
                           "where b.evidence != 'ND'").fetchall()
    found: dict[str, set[str]] = {}
    for symbol, term in rows:
        found.setdefault(symbol, set()).add(term)
    return found


def test_propagation_matches_bioconductor(go_dir):
    """With every relation our propagation reproduces Bioconductor's GOALL table gene for gene; with
    is_a/part_of only (what enrichment uses) each gene's terms are a subset of it, and a strict one."""
    theirs = bioconductor_propagated(go_dir)
    direct = go.load_go_bp(go_dir, propagate_up=False)
    everything = go.propagate(direct, go.go_bp_parents(go_dir, ALL_RELATIONS))
    assert len(everything) > 18_000 and everything.keys() == theirs.keys()
    assert all(everything[g] == theirs[g] for g in theirs)
    ours = go.load_go_bp(go_dir)
    assert all(ours[g] <= theirs[g] for g in theirs)
    assert sum(len(theirs[g]) - len(ours[g]) for g in theirs) > 0


def test_true_path_rule_on_a_known_chain(go_dir):
    names = go.go_term_names(go_dir)
    assert names["GO:0006915"] == "apoptotic process"
    direct, propagated = go.load_go_bp(go_dir, propagate_up=False), go.load_go_bp(go_dir)
    gene = next(g for g, terms in direct.items() if "GO:0006915" in terms)
    # apoptotic process is_a programmed cell death is_a cell death; the root is reached
    assert {"GO:0006915", "GO:0012501", "GO:0008219", "GO:0008150"} <= propagated[gene]
    assert "all" not in propagated[gene]  # GO.sqlite's pseudo-root is no BP term
    parents = go.go_bp_parents(go_dir)
    assert "GO:0012501" in parents["GO:0006915"]


def test_nd_evidence_is_left_out(go_dir):
    with sqlite3.connect(go_dir / go.ORG_DB) as con:
        nd_only = con.execute("""select i.symbol from go_bp b join gene_info i on i._id = b._id group by b._id
                                 having sum(b.evidence != 'ND') = 0 limit 1""").fetchone()[0]
    assert nd_only not in go.load_go_bp(go_dir)
    assert nd_only in go.load_go_bp(go_dir, exclude_evidence=())


def test_symbols_ensembl_ids_and_aliases_map(go_dir):
    mapped = go.map_to_symbols(["TP53", "tp53", "ENSG00000141510", "ENSG00000141510.17", "P53", "NOT_A_GENE",
                                "ENSG99999999999"], go_dir)
    assert mapped == {"TP53": "TP53", "tp53": "TP53", "ENSG00000141510": "TP53", "ENSG00000141510.17": "TP53",
                      "P53": "TP53"}
    per_gene = go.annotate_genes(["ENSG00000141510", "NOT_A_GENE"], go_dir)
    assert set(per_gene) == {"ENSG00000141510"} and "GO:0006915" in per_gene["ENSG00000141510"]


def test_go_graph_of_real_genes_links_related_genes(go_dir):
    genes = ["CD3E", "CD3D", "CD3G", "CD19", "CD79A", "CD79B", "HBB", "HBA1"]
    edges = go.go_coannotation_edges(genes, go_dir=go_dir, top_k=2, min_jaccard=0.1)
    best = edges.groupby("source").first()["target"].to_dict()
    assert best["CD3E"] in {"CD3D", "CD3G"} and best["CD79A"] in {"CD79B", "CD19"}
    assert best["HBB"] == "HBA1"


def test_versions_name_the_pinned_packages(go_dir):
    versions = go.source_versions(go_dir)
    assert versions["go_source_date"] == "2022-07-01" and "r-bioc-go.db 3.16.0-1" in versions["packages"]


def test_install_script_is_idempotent(go_dir):
    """A second run with the files in place checks the manifest and downloads nothing."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install_go.sh"), str(go_dir)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "already" in proc.stdout
