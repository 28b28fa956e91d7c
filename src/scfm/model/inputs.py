"""Expression -> model inputs: normalisation, read-depth tokens, padded token batches, length buckets.

Token layout (see ``ModelConfig``): gene ``g`` is position ``g`` in vocabulary order, the target depth
``T`` is position ``n_genes`` and the source depth ``S`` is position ``n_genes + 1``. The encoder sees
the nonzero genes of a cell in vocabulary order followed by ``T`` and ``S``, right-padded to the
longest cell of the batch; the decoder sees all ``n_genes + 2`` positions.

Normalisation (``pre_normalized``), as in the released embedding script:

- ``F``: counts -> ``log1p(x / total * 1e4)``, ``total`` = the cell's raw count (row sum, or ``totals``).
- ``T``: values are already normalised; ``total`` = row sum of the given values (or ``totals``).
- ``A``: values are already normalised and the raw totals come separately (``totals`` is required).

``S = log10(total)``. Target depth notation: ``t4`` -> ``T = 4``; ``f1`` -> ``T = log10(total * 1)``;
``a5`` -> ``T = log10(total) + 5``.

Unlike the released script, ``T`` and ``S`` are always encoder tokens (it drops any value <= 0, which
for ``S`` only happens for a cell with a single count); cells with a total <= 0 are rejected.

Bulk input (``input_type="bulk"``), as the released script treats it: ``T = S``, and no target depth.

- ``F``: raw expression -> scanpy's ``normalize_total`` with its default target (the median total of
  the samples in the input, :func:`bulk_target_sum`), then ``log1p``; ``T = S = log10`` of the sum of
  the transformed values.
- ``T``: values are already normalised and log-transformed; ``T = S =`` their plain sum (no log10).
- ``A`` is not defined for bulk input.

The decoder needs no dense (cells x genes) input: every position is an encoder output, the learned
mask vector, or the embedding of the value 0 (a zero gene), so :class:`PretrainBatch` lists only the
hidden positions (and, rarely, nonzero values the encoder does not take, e.g. negative pre-normalised
values); the model builds the full-length decoder input from those.

Public helpers:
    EncoderInputs(values, gene_ids, padding_mask)            padded encoder tensors
    PretrainBatch(encoder, hidden, extra_positions, extra_values)
    build_pretrain_batch(gene_ids, values, masked, target_log_depth, source_log_depth, config)
    normalize_counts(block, *, totals=None, pre_normalized="F") -> (normalised CSR float32, totals)
    depth_tokens(totals, target_depth) -> (T, S)
    bulk_target_sum(totals) -> float                          the median total, as normalize_total uses
    normalize_bulk(block, *, target_sum, pre_normalized) -> (normalised CSR float32, T, S)
    encoder_inputs_from_csr(normalised, T, S, config, rows=None) -> EncoderInputs
    decoder_batch_from_csr(normalised, T, S, config, rows=None) -> PretrainBatch (nothing masked)
    length_buckets(n_tokens, batch_size, max_tokens=None) -> list of row-index arrays
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from scfm.errors import ScfmError
from scfm.model.config import ModelConfig

PRE_NORMALIZED_CHOICES = ("F", "T", "A")
INPUT_TYPES = ("singlecell", "bulk")
BULK_PRE_NORMALIZED = ("F", "T")
_TARGET_DEPTH = re.compile(r"^([tfa])(\d+(?:\.\d+)?)$")


@dataclass
class EncoderInputs:
    values: torch.Tensor  # (B, L) float: normalised expression, then T and S; pad_value on padding
    gene_ids: torch.Tensor  # (B, L) long: positions; pad_position on padding
    padding_mask: torch.Tensor  # (B, L) bool: True on padding

    def to(self, device) -> "EncoderInputs":
        device = torch.device(device)
        if device.type != "cuda":
            return EncoderInputs(self.values.to(device), self.gene_ids.to(device), self.padding_mask.to(device))
        # page-locked host memory lets the copy run behind the host, which can then prepare the next batch
        return EncoderInputs(*(t.pin_memory().to(device, non_blocking=True)
                               for t in (self.values, self.gene_ids, self.padding_mask)))

    @property
    def n_tokens(self) -> torch.Tensor:
        return (~self.padding_mask).sum(dim=1)


@dataclass
class PretrainBatch:
    """Everything ``XTrimoGene.forward`` needs, in O(nonzero genes) per cell; see the module docstring.

    Positions not listed anywhere are zero genes (the decoder embeds the value 0 there).
    """

    encoder: EncoderInputs  # visible nonzero genes + T + S
    hidden: torch.Tensor  # (H, 2) long: (cell, position) shown to the decoder as the learned mask vector
    extra_positions: torch.Tensor  # (E, 2) long: nonzero values that reach the decoder but not the encoder
    extra_values: torch.Tensor  # (E,) float: their values

    @property
    def n_cells(self) -> int:
        return self.encoder.values.shape[0]

    def to(self, device) -> "PretrainBatch":
        return PretrainBatch(self.encoder.to(device), self.hidden.to(device), self.extra_positions.to(device),
                             self.extra_values.to(device))


def _position_pairs(rows: Sequence[np.ndarray]) -> torch.Tensor:
    """Per-cell position arrays -> (N, 2) long (cell, position)."""
    counts = [len(r) for r in rows]
    cells = np.repeat(np.arange(len(rows)), counts)
    positions = np.concatenate(rows) if rows else np.zeros(0)
    return torch.from_numpy(np.stack([cells, positions.astype(np.int64)], axis=1).astype(np.int64))


# ---------------------------------------------------------------------------------------- padding
def pad_encoder_tokens(
    gene_ids: Sequence[np.ndarray], values: Sequence[np.ndarray], config: ModelConfig
) -> EncoderInputs:
    """Per-cell token ids and values (T and S included) -> right-padded tensors."""
    lengths = np.fromiter((len(g) for g in gene_ids), dtype=np.int64, count=len(gene_ids))
    if len(lengths) == 0:
        raise ValueError("no cells to pad")
    width = int(lengths.max())
    out_values = np.full((len(lengths), width), config.pad_value, dtype=np.float32)
    out_ids = np.full((len(lengths), width), config.pad_position, dtype=np.int64)
    for row, (ids, vals) in enumerate(zip(gene_ids, values)):
        out_values[row, : len(ids)] = vals
        out_ids[row, : len(ids)] = ids
    ids_t = torch.from_numpy(out_ids)
    return EncoderInputs(torch.from_numpy(out_values), ids_t, ids_t == config.pad_position)


def build_pretrain_batch(
    gene_ids: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    masked: Sequence[np.ndarray],
    target_log_depth: Sequence[float],
    source_log_depth: Sequence[float],
    config: ModelConfig,
) -> PretrainBatch:
    """Per cell: ``gene_ids`` (k,) ascending vocabulary ids, ``values`` (k,) normalised expression
    (zeros allowed, e.g. masked zero genes), ``masked`` (k,) bool; plus the cell's T and S (log10).

    The encoder gets the unmasked genes with value > 0, then T and S; the decoder sees every
    position: masked genes as the learned mask vector, unmasked negative values as themselves
    (the encoder only takes positive values), everything else through the encoder or as a zero gene.
    """
    enc_ids, enc_values, hidden_rows, extra_rows, extra_values = [], [], [], [], []
    for row in range(len(gene_ids)):
        ids = np.asarray(gene_ids[row], dtype=np.int64)
        vals = np.asarray(values[row], dtype=np.float32)
        hidden = np.asarray(masked[row], dtype=bool)
        if ids.size and (ids.min() < 0 or ids.max() >= config.n_genes):
            raise ValueError(f"cell {row}: gene ids outside 0..{config.n_genes - 1}")
        t, s = np.float32(target_log_depth[row]), np.float32(source_log_depth[row])
        visible = ~hidden & (vals > 0)
        extra = ~hidden & (vals < 0)
        enc_ids.append(np.concatenate([ids[visible], [config.t_position, config.s_position]]))
        enc_values.append(np.concatenate([vals[visible], [t, s]]).astype(np.float32))
        hidden_rows.append(ids[hidden])
        extra_rows.append(ids[extra])
        extra_values.append(vals[extra])
    return PretrainBatch(
        pad_encoder_tokens(enc_ids, enc_values, config), _position_pairs(hidden_rows), _position_pairs(extra_rows),
        torch.from_numpy(np.concatenate(extra_values).astype(np.float32)),
    )


# ---------------------------------------------------------------------------- normalisation
def parse_target_depth(spec: str) -> tuple[str, float]:
    """``"t4"`` -> ``("t", 4.0)``; also ``f<fold>`` and ``a<added log10>``."""
    match = _TARGET_DEPTH.match(str(spec).strip())
    if not match:
        raise ScfmError(f"invalid target depth {spec!r}: expected t<log10 depth> (e.g. t4), "
                        "f<fold change> (e.g. f1) or a<added log10> (e.g. a5)")
    return match.group(1), float(match.group(2))


def _as_csr(block) -> sp.csr_matrix:
    if sp.issparse(block):
        csr = sp.csr_matrix(block)
    else:
        csr = sp.csr_matrix(np.asarray(block))
    if not csr.has_sorted_indices:
        csr = csr.sorted_indices()
    return csr


def normalize_counts(block, *, totals=None, pre_normalized: str = "F", row_offset: int = 0
                     ) -> tuple[sp.csr_matrix, np.ndarray]:
    """A row block (cells x genes, vocabulary order) -> (normalised CSR float32, raw totals float64).

    ``row_offset``: the block's first row in the whole input, so that errors name the right cell.
    """
    if pre_normalized not in PRE_NORMALIZED_CHOICES:
        raise ScfmError(f"pre_normalized must be one of F, T, A, got {pre_normalized!r}")
    csr = _as_csr(block).astype(np.float64)
    if totals is None:
        if pre_normalized == "A":
            raise ScfmError("pre_normalized A needs the raw total count of every cell (totals)")
        totals = np.asarray(csr.sum(axis=1)).ravel()
    totals = np.asarray(totals, dtype=np.float64).ravel()
    if totals.shape[0] != csr.shape[0]:
        raise ScfmError(f"{totals.shape[0]} totals for {csr.shape[0]} cells")
    bad = np.flatnonzero(~(totals > 0))
    if bad.size:
        raise ScfmError(f"{bad.size} cell(s) have a total count <= 0 (first: row {int(bad[0]) + row_offset}); "
                        "remove empty cells first (scfm qc does)")
    if pre_normalized == "F":
        row_of = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        csr.data = np.log1p(csr.data / totals[row_of] * 1e4)
    return csr.astype(np.float32), totals


def depth_tokens(totals: np.ndarray, target_depth: str = "t4") -> tuple[np.ndarray, np.ndarray]:
    """Raw totals -> (T, S) in log10, float32 (computed in float64 like the released script)."""
    kind, number = parse_target_depth(target_depth)
    source = np.log10(np.asarray(totals, dtype=np.float64))
    if kind == "t":
        target = np.full_like(source, number)
    elif kind == "f":
        if number <= 0:
            raise ScfmError(f"invalid target depth {target_depth!r}: the fold change must be > 0")
        target = np.log10(np.asarray(totals, dtype=np.float64) * number)
    else:
        target = source + number
    return target.astype(np.float32), source.astype(np.float32)


# --------------------------------------------------------------------------------------- bulk
def check_input_type(input_type: str, pre_normalized: str) -> None:
    if input_type not in INPUT_TYPES:
        raise ScfmError(f"unknown input type {input_type!r} (choose from {', '.join(INPUT_TYPES)})")
    if input_type == "bulk" and pre_normalized not in BULK_PRE_NORMALIZED:
        raise ScfmError(f"bulk input takes pre_normalized F (raw expression) or T (normalised and log-transformed), "
                        f"not {pre_normalized!r}")


def bulk_target_sum(totals: np.ndarray) -> float:
    """scanpy ``normalize_total``'s default target: the median total over samples whose total is positive."""
    totals = np.asarray(totals, dtype=np.float64).ravel()
    positive = totals[totals > 0]
    if positive.size == 0:
        raise ScfmError("every sample has a total expression <= 0")
    return float(np.median(positive))


def normalize_bulk(block, *, target_sum: float | None = None, pre_normalized: str = "F", row_offset: int = 0
                   ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """A row block of bulk samples -> (normalised CSR float32, T, S) with ``T = S`` (see the module notes).

    ``target_sum`` (needed for ``F``) is the median total of the whole input, so that a sample's values
    do not depend on how the input is cut into blocks.
    """
    check_input_type("bulk", pre_normalized)
    csr = _as_csr(block).astype(np.float64)
    if pre_normalized == "F":
        if target_sum is None or not target_sum > 0:
            raise ScfmError("bulk input with pre_normalized F needs the median total of the input (target_sum > 0)")
        totals = np.asarray(csr.sum(axis=1)).ravel()
        _refuse_empty(totals, row_offset)
        # divide by total / target like scanpy does, so that the values agree to the last bit
        factor = totals / target_sum
        csr.data = np.log1p(csr.data / np.repeat(factor, np.diff(csr.indptr)))
        depth = np.log10(np.asarray(csr.sum(axis=1)).ravel())
    else:
        depth = np.asarray(csr.sum(axis=1)).ravel()
        _refuse_empty(depth, row_offset)
    depth = depth.astype(np.float32)
    return csr.astype(np.float32), depth, depth.copy()


def _refuse_empty(totals: np.ndarray, row_offset: int) -> None:
    bad = np.flatnonzero(~(totals > 0))
    if bad.size:
        raise ScfmError(f"{bad.size} sample(s) have a total expression <= 0 (first: row {int(bad[0]) + row_offset}); "
                        "remove them first")


# ------------------------------------------------------------------------------ from CSR rows
def encoder_inputs_from_csr(
    normalised: sp.csr_matrix, target: np.ndarray, source: np.ndarray, config: ModelConfig, rows=None
) -> EncoderInputs:
    """Gather the positive entries of the chosen rows (never densifying cells x genes) + T, S; pad."""
    rows = np.arange(normalised.shape[0]) if rows is None else np.asarray(rows)
    sub = normalised[rows]
    if sub.nnz and sub.data.min() <= 0:
        sub = sub.copy()
        sub.data[sub.data <= 0] = 0
        sub.eliminate_zeros()
    if not sub.has_sorted_indices:
        sub = sub.sorted_indices()
    counts = np.diff(sub.indptr)
    n_cells, width = len(rows), int(counts.max(initial=0)) + 2
    values = np.full((n_cells, width), config.pad_value, dtype=np.float32)
    gene_ids = np.full((n_cells, width), config.pad_position, dtype=np.int64)
    row_of = np.repeat(np.arange(n_cells), counts)
    col_of = np.arange(sub.nnz) - np.repeat(sub.indptr[:-1], counts)
    values[row_of, col_of] = sub.data
    gene_ids[row_of, col_of] = sub.indices
    cells = np.arange(n_cells)
    values[cells, counts], gene_ids[cells, counts] = target[rows], config.t_position
    values[cells, counts + 1], gene_ids[cells, counts + 1] = source[rows], config.s_position
    ids_t = torch.from_numpy(gene_ids)
    return EncoderInputs(torch.from_numpy(values), ids_t, ids_t == config.pad_position)


def decoder_batch_from_csr(
    normalised: sp.csr_matrix, target: np.ndarray, source: np.ndarray, config: ModelConfig, rows=None
) -> PretrainBatch:
    """Inference batch for the full encoder -> decoder path: nothing masked."""
    rows = np.arange(normalised.shape[0]) if rows is None else np.asarray(rows)
    sub = normalised[rows].tocoo()
    negative = sub.data < 0  # the encoder takes positive values only; the decoder sees these as they are
    extra = torch.from_numpy(np.stack([sub.row[negative], sub.col[negative]], axis=1).astype(np.int64))
    return PretrainBatch(
        encoder_inputs_from_csr(normalised, target, source, config, rows),
        torch.zeros((0, 2), dtype=torch.long), extra, torch.from_numpy(sub.data[negative].astype(np.float32)),
    )


def length_buckets(n_tokens: np.ndarray, batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Group cells of similar length so padding costs little; returns row-index arrays.

    Cells are sorted by length; a batch closes at ``batch_size`` cells or when padding every cell
    to the batch's longest would exceed ``max_tokens``. Callers scatter results back by index.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = np.argsort(np.asarray(n_tokens), kind="stable")
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        size = end - start
        longest = n_tokens[order[end - 1]]
        too_many = max_tokens is not None and size > 1 and size * longest > max_tokens
        if too_many:
            batches.append(order[start : end - 1])
            start = end - 1
        elif size == batch_size:
            batches.append(order[start:end])
            start = end
    if start < len(order):
        batches.append(order[start:])
    return batches
