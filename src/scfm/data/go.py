"""Gene Ontology Biological Process annotations, offline, from Bioconductor's SQLite databases.

``scripts/install_go.sh`` (``make go``) fetches Debian's ``r-bioc-org.hs.eg.db`` and ``r-bioc-go.db`` (pinned,
SHA-256 checked) and keeps ``org.Hs.eg.sqlite`` (human genes -> GO, Ensembl ids, aliases) and ``GO.sqlite``
(term names, hierarchy) in one directory: ``--go-db DIR``, else ``$SCFM_GO_DIR``, else
``${XDG_CACHE_HOME:-~/.cache}/scfm/go``.

    go_dir = resolve_go_dir(None)                       # or an explicit directory; ScfmError when missing
    annotations = load_go_bp(go_dir)                    # official symbol -> frozenset of GO ids (propagated)
    names = go_term_names(go_dir)                       # GO id -> term name
    symbols = map_to_symbols(["CD3E", "ENSG00000105383", "CD33"], go_dir)   # input name -> official symbol
    per_gene = annotate_genes(genes, go_dir)            # input name -> GO ids, via map_to_symbols
    edges = go_coannotation_edges(genes, go_dir=go_dir, top_k=20)          # source, target, weight (Jaccard)

Annotations: org.Hs.eg.db's direct BP annotations (all evidence codes but ND, "no biological data", which
only ever points at the root) propagated to every ancestor through ``is_a`` and ``part_of`` (the relations
along which an annotation is true of the parent; ``regulates`` is not). So a gene annotated to "apoptotic
process" also counts for "programmed cell death" and "cell death".
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from scfm.errors import ScfmError

ORG_DB = "org.Hs.eg.sqlite"
GO_DB = "GO.sqlite"
PROPAGATING_RELATIONS = ("isa", "part of")  # GO.sqlite's spelling of is_a and part_of
DEFAULT_EXCLUDED_EVIDENCE = ("ND",)
_ENSEMBL_GENE = re.compile(r"^ENSG\d{11}(\.\d+)?$")


# ------------------------------------------------------------------------------------- location
def default_go_dir() -> Path:
    """``$SCFM_GO_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/scfm/go`` (where ``make go`` installs)."""
    if os.environ.get("SCFM_GO_DIR"):
        return Path(os.environ["SCFM_GO_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "scfm" / "go"


def resolve_go_dir(go_dir: str | os.PathLike | None = None) -> Path:
    """The GO directory to use; ScfmError naming it (and how to install it) when it is incomplete."""
    path = Path(go_dir) if go_dir is not None else default_go_dir()
    missing = [name for name in (ORG_DB, GO_DB) if not (path / name).is_file()]
    if missing:
        raise ScfmError(f"no GO database here ({', '.join(missing)} missing): run `make go` "
                        "(scripts/install_go.sh DIR) or pass --go-db DIR", path)
    return path.resolve()


def _connect(path: Path) -> sqlite3.Connection:
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        connection.execute("select 1 from sqlite_master limit 1")
    except sqlite3.Error as exc:
        raise ScfmError(f"cannot read as SQLite ({exc})", path) from exc
    return connection


def _query(path: Path, sql: str, params: Sequence = ()) -> list[tuple]:
    connection = _connect(path)
    try:
        return connection.execute(sql, params).fetchall()
    except sqlite3.Error as exc:
        raise ScfmError(f"unexpected database layout ({exc})", path) from exc
    finally:
        connection.close()


# ------------------------------------------------------------------------------------- ontology
def go_term_names(go_dir: str | os.PathLike | None = None, ontology: str = "BP") -> dict[str, str]:
    """GO id -> term name for one ontology (BP, MF or CC). Shared between calls: treat it as read-only."""
    return _term_names(resolve_go_dir(go_dir), ontology)


@functools.lru_cache(maxsize=4)
def _term_names(go_dir: Path, ontology: str) -> dict[str, str]:
    return dict(_query(go_dir / GO_DB, "select go_id, term from go_term where ontology = ?", (ontology,)))


def go_bp_parents(go_dir: str | os.PathLike | None = None,
                  relations: Iterable[str] = PROPAGATING_RELATIONS) -> dict[str, frozenset[str]]:
    """GO id -> its direct BP parents through the given relations (is_a and part_of by default)."""
    return _bp_parents(resolve_go_dir(go_dir), tuple(sorted(relations)))


@functools.lru_cache(maxsize=4)
def _bp_parents(go_dir: Path, relations: tuple[str, ...]) -> dict[str, frozenset[str]]:
    path = go_dir / GO_DB
    marks = ",".join("?" * len(relations))
    rows = _query(path, f"""
        select child.go_id, parent.go_id from go_bp_parents link
        join go_term child on child._id = link._id
        join go_term parent on parent._id = link._parent_id
        where link.relationship_type in ({marks}) and parent.ontology = 'BP'""", relations)
    # (GO.sqlite links each ontology's root to a pseudo-term "all", which is no BP term)
    parents: dict[str, set[str]] = {}
    for child, parent in rows:
        parents.setdefault(child, set()).add(parent)
    return {child: frozenset(found) for child, found in parents.items()}


def ancestors_closure(parents: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """term -> every ancestor (not the term itself), by depth-first search with memoisation.

    GO is a DAG; a cycle (a broken file) would recurse forever, so it is refused.
    """
    closure: dict[str, frozenset[str]] = {}
    visiting: set[str] = set()

    def visit(term: str) -> frozenset[str]:
        if term in closure:
            return closure[term]
        if term in visiting:
            raise ScfmError(f"the GO hierarchy has a cycle through {term}")
        visiting.add(term)
        found: set[str] = set()
        for parent in parents.get(term, ()):
            found.add(parent)
            found |= visit(parent)
        visiting.discard(term)
        closure[term] = frozenset(found)
        return closure[term]

    for term in list(parents):
        visit(term)
    return closure


def propagate(direct: Mapping[str, Iterable[str]], parents: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """gene -> its direct terms plus every ancestor of them (the true-path rule)."""
    closure = ancestors_closure(parents)
    out = {}
    for gene, terms in direct.items():
        found = set(terms)
        for term in terms:
            found |= closure.get(term, frozenset())
        out[gene] = frozenset(found)
    return out


# ----------------------------------------------------------------------------------- annotations
@functools.lru_cache(maxsize=4)
def _direct_bp(go_dir: Path, excluded: tuple[str, ...]) -> dict[str, frozenset[str]]:
    marks = ",".join("?" * len(excluded)) or "''"
    rows = _query(go_dir / ORG_DB, f"""
        select info.symbol, bp.go_id from go_bp bp join gene_info info on info._id = bp._id
        where bp.evidence not in ({marks})""", excluded)
    direct: dict[str, set[str]] = {}
    for symbol, term in rows:
        direct.setdefault(symbol, set()).add(term)
    return {symbol: frozenset(terms) for symbol, terms in direct.items()}


@functools.lru_cache(maxsize=4)
def _load_go_bp(go_dir: Path, propagate_up: bool, excluded: tuple[str, ...]) -> dict[str, frozenset[str]]:
    direct = _direct_bp(go_dir, excluded)
    return propagate(direct, go_bp_parents(go_dir)) if propagate_up else direct


def load_go_bp(go_dir: str | os.PathLike | None = None, *, propagate_up: bool = True,
               exclude_evidence: Iterable[str] = DEFAULT_EXCLUDED_EVIDENCE) -> dict[str, frozenset[str]]:
    """Official human gene symbol -> GO Biological Process ids (propagated through is_a/part_of by default).

    The result is shared between calls (cached): treat it as read-only.
    """
    return _load_go_bp(resolve_go_dir(go_dir), propagate_up, tuple(sorted(exclude_evidence)))


@functools.lru_cache(maxsize=4)
def _symbol_tables(go_dir: Path) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(upper-case symbol -> symbol, Ensembl gene id -> symbol, upper-case unique alias -> symbol)."""
    org = go_dir / ORG_DB
    symbols = {s.upper(): s for (s,) in _query(org, "select symbol from gene_info")}
    ensembl: dict[str, set[str]] = {}
    for ens, symbol in _query(org, "select e.ensembl_id, i.symbol from ensembl e join gene_info i on i._id = e._id"):
        ensembl.setdefault(ens, set()).add(symbol)
    aliases: dict[str, set[str]] = {}
    for alias, symbol in _query(org, "select a.alias_symbol, i.symbol from alias a join gene_info i on i._id = a._id"):
        aliases.setdefault(alias.upper(), set()).add(symbol)
    # an id or alias naming several genes says nothing about which one was measured
    unique = lambda table: {key: next(iter(found)) for key, found in table.items() if len(found) == 1}  # noqa: E731
    return symbols, unique(ensembl), unique(aliases)


def map_to_symbols(genes: Iterable[str], go_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Input gene name -> official symbol, for the names that map: the symbol itself (case-insensitive),
    an Ensembl gene id (version suffix ignored), else a previous symbol or alias naming one gene only."""
    symbols, ensembl, aliases = _symbol_tables(resolve_go_dir(go_dir))
    found = {}
    for gene in genes:
        name = str(gene)
        if _ENSEMBL_GENE.match(name):
            symbol = ensembl.get(name.split(".")[0])
        else:
            symbol = symbols.get(name.upper()) or aliases.get(name.upper())
        if symbol is not None:
            found[name] = symbol
    return found


def annotate_genes(genes: Iterable[str], go_dir: str | os.PathLike | None = None, *,
                   propagate_up: bool = True) -> dict[str, frozenset[str]]:
    """Input gene name -> GO BP ids, for the input genes that map to an annotated symbol."""
    genes = [str(g) for g in genes]
    annotations = load_go_bp(go_dir, propagate_up=propagate_up)
    mapped = map_to_symbols(genes, go_dir)
    return {gene: annotations[symbol] for gene, symbol in mapped.items() if symbol in annotations}


# -------------------------------------------------------------------------------- gene-gene graph
def incidence_matrix(genes: Sequence[str], annotations: Mapping[str, Iterable[str]], *,
                     max_term_genes: int | None = None):
    """(genes x terms CSR of 0/1 float32, term ids): the terms annotating at least one of ``genes``.

    ``max_term_genes`` drops terms annotating more of ``genes`` than that (the root and other near-universal
    terms make every pair of genes look alike).
    """
    import scipy.sparse as sp

    columns: dict[str, int] = {}
    rows, cols = [], []
    for row, gene in enumerate(genes):
        for term in annotations.get(gene, ()):
            rows.append(row)
            cols.append(columns.setdefault(term, len(columns)))
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(genes), len(columns)))
    terms = np.array(list(columns), dtype=object)
    if max_term_genes is not None and len(terms):
        keep = np.flatnonzero(np.asarray(matrix.sum(axis=0)).ravel() <= max_term_genes)
        matrix, terms = matrix[:, keep].tocsr(), terms[keep]
    return matrix, terms


def go_coannotation_edges(
    genes: Sequence[str],
    annotations: Mapping[str, Iterable[str]] | None = None,
    *,
    go_dir: str | os.PathLike | None = None,
    top_k: int | None = 20,
    min_jaccard: float = 0.1,
    max_term_genes: int | None = None,
    block_size: int = 1024,
) -> pd.DataFrame:
    """Gene-gene edges weighted by the Jaccard index of the genes' GO BP term sets.

    For each gene in ``genes`` (every gene is a ``source``), its ``top_k`` most similar other genes with a
    Jaccard index >= ``min_jaccard`` (``top_k=None``: all of them). A GO-similarity gene graph of this kind
    (top 20 per gene, GEARS) gives genes without measurements neighbours with them. ``annotations`` maps the
    names in ``genes`` to GO ids; by default ``annotate_genes(genes, go_dir)`` (propagated, so shared ancestors
    count: pass ``annotate_genes(genes, go_dir, propagate_up=False)`` to compare direct annotations only, or
    ``max_term_genes`` to drop near-universal terms). Genes without annotation have no edges. Rows are computed ``block_size`` genes at a time, so memory stays at block x genes.

    Returns a DataFrame with columns ``source``, ``target``, ``weight`` (decoupler's convention), sorted by
    source (input order) then decreasing weight; no self-edges; pairs appear in both directions when each
    is in the other's top k.
    """
    genes = [str(g) for g in genes]
    if annotations is None:
        annotations = annotate_genes(genes, go_dir)
    matrix, _ = incidence_matrix(genes, annotations, max_term_genes=max_term_genes)
    sizes = np.asarray(matrix.sum(axis=1)).ravel()
    transposed = matrix.T.tocsr()
    sources, targets, weights = [], [], []
    for start in range(0, len(genes), block_size):
        stop = min(start + block_size, len(genes))
        shared = (matrix[start:stop] @ transposed).toarray().astype(np.float64)  # block x genes, terms in common
        union = sizes[start:stop, None] + sizes[None, :] - shared
        jaccard = np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)
        jaccard[np.arange(stop - start), np.arange(start, stop)] = 0.0  # no self-edges
        for local, row in enumerate(jaccard):
            candidates = np.flatnonzero(row >= max(min_jaccard, np.finfo(np.float32).tiny))
            if top_k is not None and len(candidates) > top_k:
                candidates = candidates[np.argpartition(-row[candidates], top_k - 1)[:top_k]]
            candidates = candidates[np.lexsort((candidates, -row[candidates]))]
            sources.extend([start + local] * len(candidates))
            targets.extend(candidates.tolist())
            weights.extend(row[candidates].tolist())
    names = np.array(genes, dtype=object)
    return pd.DataFrame({"source": names[np.asarray(sources, dtype=np.int64)],
                         "target": names[np.asarray(targets, dtype=np.int64)],
                         "weight": np.asarray(weights, dtype=np.float64)})


def source_versions(go_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Where the annotations come from (GO release, Entrez date): for provenance in outputs."""
    path = resolve_go_dir(go_dir)
    meta = dict(_query(path / ORG_DB, "select name, value from metadata"))
    versions = {"go_source_date": meta.get("GOSOURCEDATE", "?"), "gene_source_date": meta.get("GOEGSOURCEDATE", "?"),
                "organism": meta.get("ORGANISM", "?")}
    manifest = path / "MANIFEST"
    if manifest.is_file():
        versions["packages"] = manifest.read_text().strip().replace("\n", "; ")
    return versions
