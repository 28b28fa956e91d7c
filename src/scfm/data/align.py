"""Gene alignment: put any count matrix into vocabulary order.

Each input gene (column) is mapped to at most one vocabulary token, trying these rules in order and
stopping at the first that matches:

1. ``ensembl``   — same Ensembl gene id, version suffixes stripped (``ENSG00000141510.12`` →
   ``ENSG00000141510``), when the input gene and the vocabulary both carry ids;
2. ``symbol``    — the same gene symbol, exactly;
3. ``symbol_ci`` — the same symbol ignoring case (only when that spelling is unique in the vocabulary);
4. ``alias``     — an alias table (TSV with columns ``alias`` and ``gene_name``) maps the input symbol
   to a vocabulary gene.

Symbols (rules 2–3) never pair an input gene with a vocabulary gene when both carry Ensembl ids: had
they been the same gene, rule 1 would have matched them. Several input genes mapped to one token are
summed; input genes without a token are dropped; vocabulary genes missing from the input are zero.

The mapping is computed once per gene list (:class:`GeneAligner`) and applied to any number of
row chunks, so large files stream through in bounded memory.

**Coverage** (what ``--min-coverage`` tests) is the fraction of the input's total counts that land
in vocabulary genes: a vocabulary that misses a few lowly expressed genes barely matters, one that
misses the highly expressed ones does. The coverage report also gives the vocabulary genes present,
input genes matched, matches per rule and the unmatched genes that carry the most counts.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.data.vocab import Vocabulary
from scfm.errors import ScfmError

RULES = ("ensembl", "symbol", "symbol_ci", "alias")
DEFAULT_MIN_COVERAGE = 0.3
# var columns that carry the other identifier, in order of preference (10x, scanpy, CELLxGENE, ours)
SYMBOL_COLUMNS = ("gene_symbols", "gene_name", "gene_symbol", "feature_name", "symbol")
ENSEMBL_COLUMNS = ("ensembl_id", "gene_ids", "gene_id", "ensembl", "feature_id")
_ENSEMBL_GENE = re.compile(r"^ENS[A-Z]*G\d{6,}")
_N_EXAMPLES = 10


def strip_version(ensembl_id: str) -> str:
    """``ENSG00000141510.12`` → ``ENSG00000141510``; anything that is not an Ensembl gene id → ``""``."""
    match = _ENSEMBL_GENE.match(ensembl_id.strip())
    return match.group(0) if match else ""


def _looks_like_ensembl(names: np.ndarray) -> bool:
    if len(names) == 0:
        return False
    hits = sum(bool(_ENSEMBL_GENE.match(str(n))) for n in names)
    return hits >= 0.5 * len(names)


def gene_identifiers(var_df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    """(symbols, Ensembl ids or None) for the rows of an AnnData ``var`` table.

    ``var_names`` are taken as Ensembl ids when most of them look like one (then the symbol comes
    from a column such as ``gene_symbols``), else as symbols (then an id may come from ``gene_ids``).
    Missing ids are ``""``.
    """
    names = np.asarray(var_df.index.astype(str))
    columns = {str(c): c for c in var_df.columns}
    if _looks_like_ensembl(names):
        ensembl = names
        symbol_col = next((columns[c] for c in SYMBOL_COLUMNS if c in columns), None)
        symbols = names if symbol_col is None else np.asarray(var_df[symbol_col].astype(str))
    else:
        symbols = names
        ensembl_col = next((columns[c] for c in ENSEMBL_COLUMNS if c in columns), None)
        ensembl = None if ensembl_col is None else np.asarray(var_df[ensembl_col].astype(str))
    if ensembl is not None:
        ensembl = np.array([strip_version(e) for e in ensembl], dtype=object)
        if not any(ensembl):
            ensembl = None
    return np.asarray(symbols, dtype=object), ensembl


def load_aliases(path: str | os.PathLike) -> dict[str, str]:
    """Alias TSV (header ``alias``, ``gene_name``) → {alias: vocabulary gene name}."""
    path = Path(path)
    if not path.is_file():
        raise ScfmError("alias file not found", path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.reader(handle, delimiter="\t") if any(c.strip() for c in r)]
    if not rows:
        raise ScfmError("empty alias file (expected columns alias and gene_name)", path)
    header = [c.strip() for c in rows[0]]
    missing = [c for c in ("alias", "gene_name") if c not in header]
    if missing:
        raise ScfmError(f"missing column(s) {', '.join(missing)} in the alias file header", path)
    a, g = header.index("alias"), header.index("gene_name")
    aliases = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) <= max(a, g):
            raise ScfmError(f"line {line_no} has {len(row)} fields, fewer than the header", path)
        aliases[row[a].strip()] = row[g].strip()
    return aliases


@dataclass
class GeneMapping:
    """Where each input column goes: ``token[i]`` (−1 = dropped) and the rule that matched it."""

    token: np.ndarray  # int64 [n_input]
    rule: np.ndarray  # object [n_input], "" when unmatched
    symbols: np.ndarray  # object [n_input]
    n_vocab: int

    @property
    def matched(self) -> np.ndarray:
        return self.token >= 0

    @property
    def has_shared_tokens(self) -> bool:
        """Whether several input genes map to one token (their counts are then summed)."""
        tokens = self.token[self.matched]
        return len(np.unique(tokens)) < len(tokens)


def map_genes(var_df: pd.DataFrame, vocab: Vocabulary, aliases: Mapping[str, str] | None = None) -> GeneMapping:
    symbols, ensembl = gene_identifiers(var_df)
    n = len(symbols)
    token = np.full(n, -1, dtype=np.int64)
    rule = np.full(n, "", dtype=object)

    vocab_ens = None
    if vocab.ensembl_ids is not None:
        vocab_ens = [strip_version(e) for e in vocab.ensembl_ids]
        if not any(vocab_ens):
            vocab_ens = None
    by_ensembl = {e: t for t, e in enumerate(vocab_ens or []) if e}
    folded: dict[str, int] = {}
    for t, gene in enumerate(vocab.genes):
        folded[gene.upper()] = -2 if gene.upper() in folded else t  # -2: ambiguous spelling
    aliases_folded = {k.upper(): v for k, v in (aliases or {}).items()}

    def symbol_allowed(i: int, t: int) -> bool:
        both_have_ids = ensembl is not None and ensembl[i] and vocab_ens is not None and vocab_ens[t]
        return not both_have_ids

    for i in range(n):
        symbol = str(symbols[i])
        if ensembl is not None and ensembl[i] in by_ensembl:
            token[i], rule[i] = by_ensembl[ensembl[i]], "ensembl"
            continue
        t = vocab._index.get(symbol, -1)
        if t >= 0 and symbol_allowed(i, t):
            token[i], rule[i] = t, "symbol"
            continue
        t = folded.get(symbol.upper(), -1)
        if t >= 0 and symbol_allowed(i, t):
            token[i], rule[i] = t, "symbol_ci"
            continue
        target = (aliases or {}).get(symbol, aliases_folded.get(symbol.upper()))
        if target is not None and target in vocab:
            token[i], rule[i] = vocab.index_of(target), "alias"
    return GeneMapping(token=token, rule=rule, symbols=symbols, n_vocab=len(vocab))


class GeneAligner:
    """Apply one gene mapping to row chunks and keep the counts needed for the coverage report."""

    def __init__(self, var_df: pd.DataFrame, vocab: Vocabulary, aliases: Mapping[str, str] | None = None):
        self.vocab = vocab
        self.mapping = map_genes(var_df, vocab, aliases)
        self._sum_duplicates = self.mapping.has_shared_tokens
        self.counts_per_input_gene = np.zeros(len(self.mapping.token), dtype=np.float64)
        self.n_cells = 0

    def apply(self, counts: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
        """[cells, n_input] counts → [cells, n_vocab] CSR float32, column indices sorted."""
        csr = sp.csr_matrix(counts, dtype=np.float32)
        n_cells, n_input = csr.shape
        if n_input != len(self.mapping.token):
            raise ValueError(f"chunk has {n_input} genes, the mapping {len(self.mapping.token)}")
        self.counts_per_input_gene += np.bincount(csr.indices, weights=csr.data, minlength=n_input)
        self.n_cells += n_cells
        # relabel each stored value's column with its token and drop unmatched genes, row by row
        tokens = self.mapping.token[csr.indices]
        keep = (tokens >= 0) & (csr.data != 0)
        kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        indptr = kept_before[csr.indptr]  # a row starts after the kept values of the rows above it
        aligned = sp.csr_matrix(
            (csr.data[keep], tokens[keep].astype(np.int32), indptr), shape=(n_cells, self.mapping.n_vocab)
        )
        aligned.has_sorted_indices = False
        if self._sum_duplicates:
            aligned.sum_duplicates()  # also sorts
        else:
            aligned.sort_indices()
        return aligned

    def coverage(self) -> dict:
        m = self.mapping
        matched = m.matched
        total = float(self.counts_per_input_gene.sum())
        kept = float(self.counts_per_input_gene[matched].sum())
        present = int(len(np.unique(m.token[matched])))
        unmatched = np.flatnonzero(~matched)
        top = unmatched[np.argsort(-self.counts_per_input_gene[unmatched], kind="stable")][:_N_EXAMPLES]
        return {
            "definition": "fraction_counts_kept = counts in genes matched to the vocabulary / all input counts",
            "fraction_counts_kept": kept / total if total > 0 else 0.0,
            "n_cells": self.n_cells,
            "total_counts": total,
            "counts_kept": kept,
            "n_vocab_genes": m.n_vocab,
            "vocab_genes_present": present,
            "fraction_vocab_genes_present": present / m.n_vocab,
            "n_input_genes": len(m.token),
            "input_genes_matched": int(matched.sum()),
            "fraction_input_genes_matched": float(matched.mean()) if len(m.token) else 0.0,
            "input_genes_summed_into_shared_token": int(matched.sum()) - present,
            "matched_by_rule": {r: int((m.rule == r).sum()) for r in RULES},
            "unmatched_examples": [str(m.symbols[i]) for i in top],
        }

    def check_overlap(self, path: str | os.PathLike | None = None) -> None:
        """ScfmError when no input gene maps to the vocabulary (needs no counts)."""
        if self.mapping.matched.any():
            return
        examples = ", ".join(str(s) for s in self.mapping.symbols[:5])
        raise ScfmError(
            f"no gene overlaps the vocabulary ({len(self.mapping.token)} input genes, e.g. {examples}; "
            f"vocabulary genes e.g. {', '.join(self.vocab.genes[:3])}). Wrong species, or Ensembl ids vs "
            "symbols? Pass --aliases or use a vocabulary built from this kind of data.",
            path,
        )

    def check(self, min_coverage: float, path: str | os.PathLike | None = None) -> dict:
        """The coverage report, or ScfmError when nothing or too little matched."""
        self.check_overlap(path)
        report = self.coverage()
        examples = ", ".join(report["unmatched_examples"][:5])
        if report["total_counts"] > 0 and report["fraction_counts_kept"] < min_coverage:
            raise ScfmError(
                f"coverage {report['fraction_counts_kept']:.3f} is below --min-coverage {min_coverage} "
                f"(only that fraction of the counts falls in vocabulary genes; "
                f"{report['input_genes_matched']}/{report['n_input_genes']} input genes matched; "
                f"unmatched genes with most counts: {examples}). Wrong species, or Ensembl ids vs symbols?",
                path,
            )
        return report


def align_matrix(
    csr: sp.spmatrix | np.ndarray,
    var_df: pd.DataFrame,
    vocab: Vocabulary,
    aliases: Mapping[str, str] | None = None,
) -> tuple[sp.csr_matrix, dict]:
    """[cells, n_input] counts with gene table ``var_df`` → ([cells, len(vocab)] CSR float32, coverage)."""
    aligner = GeneAligner(var_df, vocab, aliases)
    aligned = aligner.apply(csr)
    return aligned, aligner.coverage()


def vocab_var(vocab: Vocabulary) -> pd.DataFrame:
    var = pd.DataFrame(index=pd.Index(vocab.genes, name=None))
    if vocab.ensembl_ids is not None:
        var["ensembl_id"] = vocab.ensembl_ids
    return var


def scfm_uns(vocab: Vocabulary, counts_source: str, coverage: dict, previous: Mapping | None = None) -> dict:
    """``uns['scfm']`` of an aligned file; earlier steps' entries (e.g. ``qc``) are kept."""
    from scfm import __version__

    uns = dict(previous or {})
    uns.update(
        vocab_sha256=vocab.sha256, counts_source=counts_source, scfm_version=__version__, coverage=coverage
    )
    return uns


def align_adata(
    adata: ad.AnnData,
    vocab: Vocabulary,
    *,
    aliases: Mapping[str, str] | None = None,
    counts_source: str = "X",
    min_coverage: float | None = None,
) -> tuple[ad.AnnData, dict]:
    """In-memory alignment of ``adata.X`` (raw counts) → (aligned AnnData, coverage).

    The result has ``X`` CSR float32 in vocabulary order, ``var_names`` = vocabulary genes, the same
    ``obs`` and ``uns['scfm']`` = {vocab_sha256, counts_source, scfm_version, coverage}. With
    ``min_coverage`` set, too little overlap raises ScfmError.
    """
    aligner = GeneAligner(adata.var, vocab, aliases)
    X = aligner.apply(adata.X)
    coverage = aligner.check(min_coverage if min_coverage is not None else 0.0)
    aligned = ad.AnnData(X=X, obs=adata.obs.copy(), var=vocab_var(vocab))
    aligned.uns["scfm"] = scfm_uns(vocab, counts_source, coverage, adata.uns.get("scfm"))
    return aligned, coverage


# ---------------------------------------------------------------------------------- streaming input
@dataclass
class ChunkedInput:
    """An input opened for streaming: cell count, counts source, earlier steps' ``uns['scfm']`` and
    an iterator of ``(obs_block, csr_counts_block, var)``."""

    path: Path
    n_cells: int
    counts_source: str
    uns_scfm: dict
    chunks: Iterator[tuple[pd.DataFrame, sp.csr_matrix, pd.DataFrame]]


def open_chunked(path: str | os.PathLike, *, chunk_size: int = 10_000, layer: str | None = None) -> ChunkedInput:
    """Open an input for row-chunked reading of its raw counts (non-integer values are an error).

    ``.h5ad`` files stream from disk through :func:`scfm.data.io.iter_chunks` (one block of the matrix
    in memory at a time); other formats are read whole by :func:`scfm.data.io.read_input`, then cut.
    The count matrix is chosen by the readers' rules (``layer``, else ``.raw``, ``X``, ``layers['counts']``).
    """
    from scfm.data import io

    path = Path(path)
    if io.input_format(path) == "h5ad":
        info = io.inspect_h5ad(path, layer=layer)
        if not info.is_counts:  # fail before any output is started, not at the first block
            raise ScfmError(
                f"{info.counts_source} has non-integer values where raw counts are required "
                "(normalized data? pass --layer with the raw-count layer)",
                path,
            )
        chunks = io.iter_chunks(path, chunk_size, layer=layer, require_counts=True)
        return ChunkedInput(path, info.n_obs, info.counts_source, _h5ad_uns_scfm(path), chunks)
    result = io.read_input(path, layer=layer, require_counts=True)
    adata = result.adata

    def chunks():
        for start in range(0, adata.n_obs, chunk_size):
            yield adata.obs.iloc[start : start + chunk_size], adata.X[start : start + chunk_size], adata.var

    return ChunkedInput(path, adata.n_obs, result.counts_source, dict(adata.uns.get("scfm", {})), chunks())


def _h5ad_uns_scfm(path: Path) -> dict:
    """``uns['scfm']`` of an ``.h5ad`` (e.g. the QC summary), read without loading the matrix."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as handle:
        if "uns" in handle and "scfm" in handle["uns"]:
            return dict(read_elem(handle["uns"]["scfm"]))
    return {}


def iter_count_chunks(
    path: str | os.PathLike, *, chunk_size: int = 10_000, layer: str | None = None, quiet: bool = True
) -> Iterator[tuple[pd.DataFrame, sp.csr_matrix, pd.DataFrame]]:
    """Yield ``(obs_df, csr_counts_chunk, var_df)`` over an input, with a progress bar."""
    from scfm.utils import progress

    source = open_chunked(path, chunk_size=chunk_size, layer=layer)
    with progress(total=source.n_cells, desc=f"reading {Path(path).name}", unit="cells", quiet=quiet) as bar:
        for obs, csr, var in source.chunks:
            bar.update(csr.shape[0])
            yield obs, csr, var


# ---------------------------------------------------------------------------------- streaming output
class AlignedH5adWriter:
    """Write an aligned ``.h5ad`` block by block (``X`` grows on disk; only ``obs`` is kept in memory).

    The file follows anndata's on-disk layout (``X`` a CSR group with ``data``/``indices``/``indptr``),
    so ``anndata.read_h5ad`` reads it like any other. Write into a temporary path (atomic_output).
    """

    int32_limit = np.iinfo(np.int32).max  # more stored values than this need int64 indices

    def __init__(self, path: str | os.PathLike, vocab: Vocabulary):
        import h5py

        self.vocab = vocab
        self.file = h5py.File(path, "w")
        group = self.file.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        chunk = 1 << 16
        self.data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(chunk,))
        self.indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(chunk,))
        self.indptr_values = [np.zeros(1, dtype=np.int64)]
        self.group = group
        self.n_rows = 0
        self.nnz = 0
        self.obs_blocks: list[pd.DataFrame] = []

    def append(self, csr: sp.csr_matrix, obs: pd.DataFrame) -> None:
        n = csr.nnz
        self.data.resize((self.nnz + n,))
        self.indices.resize((self.nnz + n,))
        self.data[self.nnz :] = csr.data.astype(np.float32, copy=False)
        self.indices[self.nnz :] = csr.indices.astype(np.int32, copy=False)
        self.indptr_values.append(csr.indptr[1:].astype(np.int64) + self.nnz)
        self.nnz += n
        self.n_rows += csr.shape[0]
        self.obs_blocks.append(obs)

    def finish(self, uns_scfm: dict) -> None:
        from anndata.io import write_elem

        indptr = np.concatenate(self.indptr_values)
        if self.nnz < self.int32_limit:
            indptr = indptr.astype(np.int32)  # scipy wants indices and indptr of one dtype
        else:
            self._widen_indices()
        self.group.create_dataset("indptr", data=indptr)
        self.group.attrs["shape"] = np.array([self.n_rows, len(self.vocab)], dtype=np.int64)
        obs = pd.concat(self.obs_blocks) if self.obs_blocks else pd.DataFrame()
        write_elem(self.file, "obs", obs)
        write_elem(self.file, "var", vocab_var(self.vocab))
        write_elem(self.file, "uns", {"scfm": uns_scfm})
        for empty in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(self.file, empty, {})
        self.file.attrs["encoding-type"] = "anndata"
        self.file.attrs["encoding-version"] = "0.1.0"
        self.file.close()

    def _widen_indices(self, block: int = 1 << 26) -> None:
        """More than 2^31 stored values: indptr must be int64, so indices become int64 too."""
        narrow = self.group["indices"]
        wide = self.group.create_dataset("indices64", shape=narrow.shape, dtype=np.int64)
        for start in range(0, narrow.shape[0], block):
            wide[start : start + block] = narrow[start : start + block]
        del self.group["indices"]
        self.group.move("indices64", "indices")

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


DEFAULT_SHARD_OBS_COLUMNS = ("sample", "batch", "condition")


def align_file(
    input_path: str | os.PathLike,
    vocab: Vocabulary,
    *,
    out_h5ad: str | os.PathLike | None = None,
    shards_dir: str | os.PathLike | None = None,
    aliases: Mapping[str, str] | None = None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
    chunk_size: int = 10_000,
    cells_per_shard: int = 100_000,
    layer: str | None = None,
    shard_obs_columns: list[str] | None = None,
    quiet: bool = True,
) -> dict:
    """Stream one input through alignment into an aligned ``.h5ad`` and/or Parquet shards.

    Memory holds one block of ``chunk_size`` cells plus ``obs``. Shards carry ``shard_obs_columns``
    (default: whichever of sample, batch, condition the input has). Raises ScfmError — leaving no
    output — on unreadable input, no gene overlap, or coverage below ``min_coverage``.
    Returns the coverage report.
    """
    from contextlib import ExitStack

    from scfm.data.shards import ShardWriter
    from scfm.utils import atomic_output, progress

    if out_h5ad is None and shards_dir is None:
        raise ScfmError("nothing to write: give an output .h5ad and/or a shards directory")
    if chunk_size < 1:
        raise ScfmError(f"chunk size must be positive, got {chunk_size}")
    source = open_chunked(input_path, chunk_size=chunk_size, layer=layer)
    aligner: GeneAligner | None = None
    with ExitStack() as stack:
        h5_writer = None
        if out_h5ad is not None:
            tmp = stack.enter_context(atomic_output(out_h5ad))
            h5_writer = AlignedH5adWriter(tmp, vocab)
            stack.callback(h5_writer.close)
        shard_writer = None
        bar = stack.enter_context(
            progress(total=source.n_cells, desc=f"aligning {Path(input_path).name}", unit="cells", quiet=quiet)
        )
        for obs, csr, var in source.chunks:
            if aligner is None:
                aligner = GeneAligner(var, vocab, aliases)
                aligner.check_overlap(input_path)  # fail fast, before reading every block
            aligned = aligner.apply(csr)
            if h5_writer is not None:
                h5_writer.append(aligned, obs)
            if shards_dir is not None:
                if shard_writer is None:
                    columns = shard_obs_columns
                    if columns is None:
                        columns = [c for c in DEFAULT_SHARD_OBS_COLUMNS if c in obs.columns]
                    shard_writer = ShardWriter(shards_dir, vocab, columns, cells_per_shard=cells_per_shard)
                    stack.enter_context(shard_writer)
                shard_writer.write(list(obs.index.astype(str)), aligned, obs)
            bar.update(csr.shape[0])
        coverage = aligner.check(min_coverage, input_path)
        if h5_writer is not None:
            h5_writer.finish(scfm_uns(vocab, source.counts_source, coverage, source.uns_scfm))
    return coverage
