"""Gene embeddings for a set of cells: the decoder's context embedding of each gene, averaged over cells.

Per cell the decoder gives every vocabulary gene a ``decoder_dim`` vector that depends on the whole cell
(``scfm embed --output-type gene``). Averaging those vectors over cells (and, with a grouping, over the cells
of each group) gives one embedding per gene for that population, as scFoundation's gene module analysis does.
The cells stream through the model two at a time and only running sums of the kept genes are held
(groups x genes x dims), never cells x genes x dims.

Which genes: those detected (count > 0) in at least ``min_cells`` of all input cells. Vocabulary genes the
cells never express would get an embedding too (the model's guess of their context), but nothing in the data
supports it, so they are left out unless ``min_cells=0``.

    stats = gene_statistics(rows)                          # detection and mean log1p CP10k per gene, one pass
    genes = select_genes(stats, min_cells=10)              # vocabulary indices of the genes to embed
    cells = sample_cells(codes, max_cells_per_group=2000, seed=0)
    means = mean_gene_embeddings(model, RowSubset(rows, cells), genes, groups=codes[cells], n_groups=k)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scfm.errors import ScfmError


@dataclass
class GeneStats:
    """Per vocabulary gene, over all cells: in how many cells it is detected and its mean log1p CP10k."""

    n_cells: int
    n_cells_detected: np.ndarray  # (n_genes,) int64
    mean_expression: np.ndarray  # (n_genes,) float64, log1p(counts / total * 1e4), zeros included


def log_normalised(block) -> sp.csr_matrix:
    """Raw counts -> log1p(counts / cell total * 1e4), CSR float32: what the model sees, and scanpy's
    normalize_total(1e4) + log1p."""
    from scfm.model.inputs import normalize_counts

    normalised, _ = normalize_counts(block)
    return normalised


def gene_statistics(rows, *, chunk_size: int = 4096, progress=None) -> GeneStats:
    """One streamed pass over ``rows`` (cells x vocabulary genes, raw counts; row slices give CSR blocks)."""
    n_cells, n_genes = rows.shape
    detected = np.zeros(n_genes, dtype=np.int64)
    sums = np.zeros(n_genes, dtype=np.float64)
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        block = log_normalised(rows[start:stop])
        detected += np.bincount(block.indices, minlength=n_genes)
        sums += np.bincount(block.indices, weights=block.data, minlength=n_genes)
        if progress is not None:
            progress.update(stop - start)
    return GeneStats(n_cells, detected, sums / max(n_cells, 1))


def select_genes(stats: GeneStats, min_cells: int) -> np.ndarray:
    """Vocabulary indices of the genes detected in at least ``min_cells`` cells (all genes for 0)."""
    return np.flatnonzero(stats.n_cells_detected >= min_cells)


def sample_cells(groups: np.ndarray, max_cells_per_group: int | None, *, seed: int = 0) -> np.ndarray:
    """Sorted row indices: at most ``max_cells_per_group`` random cells of each group code (seeded).

    Code -1 (no group) counts as one more group, so that an ungrouped run (all -1) caps all cells.
    """
    groups = np.asarray(groups)
    if max_cells_per_group is None:
        return np.arange(len(groups))
    rng = np.random.default_rng(seed)
    keep = []
    for code in np.unique(groups):
        members = np.flatnonzero(groups == code)
        if len(members) > max_cells_per_group:
            members = rng.choice(members, size=max_cells_per_group, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


class RowSubset:
    """The rows ``index`` (sorted) of a row-sliceable matrix, itself row-sliceable: reads stay in file order.

    Rows are read in runs spanning at most ``max_span`` rows of the source, so a few thousand cells sampled
    from millions cost a few thousand small reads, never one read of everything between them.
    """

    def __init__(self, rows, index: np.ndarray, *, max_span: int = 4096):
        self.rows = rows
        self.index = np.asarray(index, dtype=np.int64)
        if len(self.index) and (np.any(np.diff(self.index) <= 0) or self.index[0] < 0
                                or self.index[-1] >= rows.shape[0]):
            raise ValueError("RowSubset needs strictly increasing row indices inside the matrix")
        self.shape = (len(self.index), rows.shape[1])
        self.max_span = max_span

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        start, stop, _ = rows.indices(self.shape[0])
        wanted = self.index[start:stop]
        blocks = [sp.csr_matrix((0, self.shape[1]), dtype=np.float32)]
        first = 0
        while first < len(wanted):
            end = int(np.searchsorted(wanted, wanted[first] + self.max_span, side="left"))
            low, high = int(wanted[first]), int(wanted[end - 1]) + 1
            block = self.rows[low:high]
            block = block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
            blocks.append(sp.csr_matrix(block)[wanted[first:end] - low])
            first = end
        return sp.vstack(blocks, format="csr", dtype=np.float32)


DECODER_BATCH_BYTES = 1 << 30


def default_batch_size(config) -> int:
    """Cells per decoder pass: as many as keep the widest decoder activation (every position times the
    feed-forward width, in and out, float32) within 1 GiB, between 1 and 64. The released model's shape
    gets 3 cells; a tiny model on a few hundred genes gets 64, where per-batch overhead would dominate."""
    per_cell = config.n_positions * max(config.decoder_ff_dim, config.decoder_dim) * 4 * 2
    return int(min(64, max(1, DECODER_BATCH_BYTES // per_cell)))


@dataclass
class MeanGeneEmbeddings:
    """Mean decoder embeddings of the chosen genes: over all cells given, and per group."""

    genes: np.ndarray  # (G,) vocabulary indices
    overall: np.ndarray  # (G, D) float32
    per_group: np.ndarray  # (n_groups, G, D) float32; NaN for a group without cells
    n_cells: int
    n_cells_per_group: np.ndarray  # (n_groups,) int64


def mean_gene_embeddings(
    model,
    rows,
    genes: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_groups: int = 0,
    target_depth: str = "t4",
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    chunk_size: int = 1024,
    progress=None,
) -> MeanGeneEmbeddings:
    """Average each gene's decoder context embedding over the cells of ``rows`` (and per group).

    ``rows``: cells x vocabulary genes, raw counts, row-sliceable (CSR, ``H5adRows``, ``RowSubset``).
    ``genes``: vocabulary indices to keep. ``groups``: one code per row in ``0..n_groups-1``, or -1 for a
    cell that belongs to no group (it still counts for ``overall``). Sums are kept in float64 on the device.
    ``batch_size``: cells per decoder pass (default: :func:`default_batch_size`).
    """
    from scfm.tasks.embed import _unwrap, decoder_batches, resolve_device

    n_cells = rows.shape[0]
    if n_cells == 0:
        raise ScfmError("no cells to average gene embeddings over")
    genes = np.asarray(genes, dtype=np.int64)
    codes = np.full(n_cells, -1, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    if codes.shape != (n_cells,) or (len(codes) and codes.max() >= n_groups):
        raise ValueError("groups must give one code in -1..n_groups-1 per row")
    config = _unwrap(model).config
    dim = config.decoder_dim
    batch_size = batch_size or default_batch_size(config)
    dev = resolve_device(device)
    keep = torch.as_tensor(genes, device=dev)
    total = torch.zeros(len(genes), dim, dtype=torch.float64, device=dev)
    per_group = torch.zeros(n_groups, len(genes), dim, dtype=torch.float64, device=dev)
    for batch_rows, _, values in decoder_batches(model, rows, output="genes", target_depth=target_depth,
                                                 batch_size=batch_size, device=str(dev), precision=precision,
                                                 chunk_size=chunk_size):
        kept = values.index_select(1, keep).double()  # (cells, G, D)
        total += kept.sum(dim=0)
        batch_codes = torch.as_tensor(codes[batch_rows], device=dev)
        grouped = batch_codes >= 0
        if bool(grouped.any()):
            per_group.index_add_(0, batch_codes[grouped], kept[grouped])
        if progress is not None:
            progress.update(len(batch_rows))
    counts = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.int64)
    denominator = torch.as_tensor(np.where(counts > 0, counts, np.nan), device=dev, dtype=torch.float64)
    return MeanGeneEmbeddings(
        genes=genes,
        overall=(total / n_cells).float().cpu().numpy(),
        per_group=(per_group / denominator[:, None, None]).float().cpu().numpy(),
        n_cells=int(n_cells),
        n_cells_per_group=counts,
    )
