"""The gene vocabulary: which genes the model knows, and their token ids.

A vocabulary is a tab-separated file with a header row. Row order defines the token id (first data
row = token 0). The column ``gene_name`` is required; ``ensembl_id`` is optional and, when present,
lets alignment match inputs by Ensembl id. Other columns are ignored, so the official scFoundation
file ``OS_scRNA_gene_index.19264.tsv`` (columns ``gene_name`` and ``index``) loads as it is.

Identity: ``Vocabulary.sha256`` is the SHA-256 of the gene names in token order, each followed by a
newline (UTF-8). Two files with the same genes in the same order have the same hash whatever their
other columns, and every aligned file and shard directory records it, so a model never reads data
laid out for another vocabulary.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from scfm.errors import ScfmError
from scfm.utils import atomic_output


@dataclass(frozen=True)
class Vocabulary:
    genes: list[str]
    ensembl_ids: list[str] | None = None
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _sha256: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        genes = [str(g) for g in self.genes]
        object.__setattr__(self, "genes", genes)
        if not genes:
            raise ScfmError("the vocabulary has no genes")
        seen: dict[str, int] = {}
        for token, gene in enumerate(genes):
            if not gene:
                raise ScfmError(f"empty gene name at token {token}")
            if gene in seen:
                raise ScfmError(f"duplicate gene name {gene!r} (tokens {seen[gene]} and {token})")
            seen[gene] = token
        object.__setattr__(self, "_index", seen)
        digest = hashlib.sha256()
        for gene in genes:
            digest.update(gene.encode("utf-8") + b"\n")
        object.__setattr__(self, "_sha256", digest.hexdigest())
        if self.ensembl_ids is not None:
            ids = [str(e) for e in self.ensembl_ids]
            if len(ids) != len(genes):
                raise ScfmError(f"{len(ids)} Ensembl ids for {len(genes)} genes")
            object.__setattr__(self, "ensembl_ids", ids)

    # ------------------------------------------------------------------ identity and lookup
    def __repr__(self) -> str:  # 19k gene names are not a useful repr
        ids = "with" if self.ensembl_ids is not None else "without"
        return f"Vocabulary({len(self)} genes {ids} Ensembl ids, sha256={self.sha256[:12]}…)"

    def __len__(self) -> int:
        return len(self.genes)

    def __contains__(self, gene: object) -> bool:
        return gene in self._index

    def index_of(self, gene: str) -> int:
        """Token id of ``gene`` (exact symbol); KeyError when it is not in the vocabulary."""
        return self._index[gene]

    @property
    def sha256(self) -> str:
        """SHA-256 of the gene names in token order, each followed by a newline (UTF-8)."""
        return self._sha256

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise ScfmError("vocabulary file not found", path)
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle, delimiter="\t"))
        except UnicodeDecodeError as exc:
            raise ScfmError(f"not a UTF-8 text file ({exc.reason})", path) from exc
        rows = [row for row in rows if any(cell.strip() for cell in row)]
        if not rows:
            raise ScfmError("empty vocabulary file (expected a header row with a gene_name column)", path)
        header = [cell.strip() for cell in rows[0]]
        if "gene_name" not in header:
            raise ScfmError(f"missing column 'gene_name' in the header (found: {', '.join(header)})", path)
        if len(rows) == 1:
            raise ScfmError("the vocabulary has a header but no genes", path)
        name_col = header.index("gene_name")
        ens_col = header.index("ensembl_id") if "ensembl_id" in header else None
        genes, ensembl = [], []
        for line_no, row in enumerate(rows[1:], start=2):
            if len(row) <= max(name_col, ens_col or 0):
                raise ScfmError(f"line {line_no} has {len(row)} fields, fewer than the header", path)
            genes.append(row[name_col].strip())
            if ens_col is not None:
                ensembl.append(row[ens_col].strip())
        try:
            return cls(genes, ensembl if ens_col is not None else None)
        except ScfmError as exc:
            raise ScfmError(exc.message, path) from exc

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``gene_name`` (and ``ensembl_id`` when known) as TSV, atomically."""
        path = Path(path)
        with atomic_output(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
                if self.ensembl_ids is None:
                    writer.writerow(["gene_name"])
                    writer.writerows([g] for g in self.genes)
                else:
                    writer.writerow(["gene_name", "ensembl_id"])
                    writer.writerows(zip(self.genes, self.ensembl_ids))
        return path


def build_vocabulary(
    inputs: Sequence[str | os.PathLike],
    min_cells: int = 1,
    *,
    chunk_size: int = 10_000,
    layer: str | None = None,
    quiet: bool = True,
) -> Vocabulary:
    """A vocabulary of the genes detected (count > 0) in at least ``min_cells`` cells over all inputs.

    Order: descending number of cells in which the gene is detected, ties broken by gene name, so
    the same inputs always give the same vocabulary (and hash) whatever their order. Genes are keyed
    by symbol; an Ensembl id is kept when the inputs carry one.
    Inputs are streamed in chunks of ``chunk_size`` cells (bounded memory).
    """
    from scfm.data.align import gene_identifiers, iter_count_chunks

    if min_cells < 1:
        raise ScfmError(f"--min-cells must be at least 1, got {min_cells}")
    if not inputs:
        raise ScfmError("no input files given")
    cells_per_gene: dict[str, int] = {}
    ensembl_of: dict[str, str] = {}
    for path in inputs:
        for _obs, csr, var_df in iter_count_chunks(path, chunk_size=chunk_size, layer=layer, quiet=quiet):
            symbols, ensembl = gene_identifiers(var_df)
            # merge columns that share a symbol first, so a cell counts once per gene
            unique, column_of = np.unique(symbols, return_inverse=True)
            merge = sp.csr_matrix(
                (np.ones(len(symbols), dtype=np.float32), (np.arange(len(symbols)), column_of)),
                shape=(len(symbols), len(unique)),
            )
            merged = (csr @ merge).tocsr()
            detected = np.bincount(merged.indices[merged.data > 0], minlength=len(unique))
            for col in np.flatnonzero(detected):
                gene = str(unique[col])
                cells_per_gene[gene] = cells_per_gene.get(gene, 0) + int(detected[col])
            if ensembl is not None:
                for gene, ens in zip(symbols, ensembl):
                    if ens:
                        ensembl_of.setdefault(str(gene), str(ens))
    kept = [(gene, n) for gene, n in cells_per_gene.items() if n >= min_cells]
    if not kept:
        raise ScfmError(
            f"no gene is detected in at least {min_cells} cells", os.fspath(inputs[0]) if len(inputs) == 1 else None
        )
    kept.sort(key=lambda item: (-item[1], item[0]))
    genes = [gene for gene, _ in kept]
    ensembl_ids = [ensembl_of.get(g, "") for g in genes] if ensembl_of else None
    return Vocabulary(genes, ensembl_ids)
