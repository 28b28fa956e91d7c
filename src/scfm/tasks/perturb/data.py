"""Perturb-seq cells grouped by perturbation, checked, on the scale the predictor works on.

    parse_targets("STAT1+IRF1") -> ("IRF1", "STAT1")
    load_screen(paths, ScreenOptions(perturbation_key=..., control=...), vocab_genes=...) -> Screen
    read_table(path, required_columns, what) -> DataFrame

A *perturbation* is a group of cells (the unit that is predicted and scored: a target gene, a guide, a
combination); its *targets* are the genes it perturbs (the unit the predictor embeds). Targets come from
the perturbation's name, split on ``+`` with ``ctrl`` parts dropped (GEARS' ``A+B`` / ``A+ctrl``), or
from an obs column (``target_key``) when the perturbation column names guides.

Expression is log1p of counts per 10k (the scale the model reads), averaged per perturbation. Genes
scored are those detected in at least ``min_gene_fraction`` of the cells (at most ``max_genes``, the
most variable first); target genes are always part of the gene set the predictor embeds, even when
they are never measured (their observed change is then unknown and not scored).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import ScfmError

CONTROL_PARTS = {"ctrl", "control"}
COMBO_SEPARATOR = "+"


def read_table(path, required: Sequence[str], what: str) -> pd.DataFrame:
    """A tab- or comma-separated file with a header row holding at least the ``required`` columns (as text)."""
    path = Path(path)
    if not path.exists():
        raise ScfmError(f"{what} not found", path)
    try:
        table = pd.read_csv(path, sep=None, engine="python", dtype={c: str for c in required})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ScfmError(f"cannot read the {what} ({exc})", path) from exc
    missing = sorted(set(required) - set(table.columns))
    if missing:
        raise ScfmError(f"the {what} needs columns {', '.join(required)}; missing {missing} "
                        f"(columns: {', '.join(map(str, table.columns))})", path)
    return table


@dataclass(frozen=True)
class ScreenOptions:
    """How cells become perturbations (the flags `scfm perturb train` and `predict --input` share)."""

    perturbation_key: str
    control: str
    target_key: str | None = None
    separator: str = COMBO_SEPARATOR
    unassigned: tuple[str, ...] = ("unassigned",)
    min_cells: int = 20
    min_gene_fraction: float = 0.01
    max_genes: int | None = 5000
    skip_unknown_targets: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "unassigned": list(self.unassigned)}


def parse_targets(name: str, separator: str = COMBO_SEPARATOR) -> tuple[str, ...]:
    """The genes a perturbation name perturbs, sorted (``B+A`` and ``A+B`` are one combination)."""
    parts = [p.strip() for p in str(name).split(separator)]
    return tuple(sorted({p for p in parts if p and p.lower() not in CONTROL_PARTS}))


def log_normalise(counts: sp.csr_matrix, totals: np.ndarray | None = None) -> sp.csr_matrix:
    """log1p(counts / total x 1e4) per cell, sparse float32 (totals default to the row sums)."""
    csr = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(csr.sum(axis=1)).ravel() if totals is None else np.asarray(totals, dtype=np.float64)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    csr = sp.diags(scale) @ csr
    csr.data = np.log1p(csr.data)
    return sp.csr_matrix(csr, dtype=np.float32)


def column_means(matrix: sp.csr_matrix) -> np.ndarray:
    return np.asarray(matrix.mean(axis=0), dtype=np.float64).ravel()


@dataclass
class Screen:
    """A loaded screen: which genes, which perturbations, their cells, and what was left out."""

    vocab_genes: list[str]                       # the checkpoint's / input's vocabulary, in order
    genes: list[str]                             # genes scored (predictor outputs), in vocabulary order
    node_genes: list[str]                        # genes + unmeasured targets (what the predictor embeds)
    names: list[str]                             # perturbations kept, sorted
    targets: dict[str, tuple[str, ...]]
    cells: dict[str, sp.csr_matrix]              # log1p CP10k rows of each perturbation (genes scored)
    control: sp.csr_matrix                       # log1p CP10k rows of control cells (genes scored)
    control_counts: sp.csr_matrix                # raw counts of control cells over the whole vocabulary
    control_label: str
    skipped_small: dict[str, int] = field(default_factory=dict)      # perturbation -> cells (< min_cells)
    skipped_unknown: dict[str, list[str]] = field(default_factory=dict)  # perturbation -> genes not in vocab

    @property
    def control_mean(self) -> np.ndarray:
        return column_means(self.control)

    def mean(self, name: str) -> np.ndarray:
        return column_means(self.cells[name])

    def mean_change(self, names: Sequence[str]) -> np.ndarray:
        """Observed mean expression minus control mean, (len(names), genes)."""
        control = self.control_mean
        return np.stack([self.mean(n) - control for n in names]) if names else np.zeros((0, len(self.genes)))

    def n_cells(self, name: str) -> int:
        return int(self.cells[name].shape[0])


def _read(path: Path):
    import anndata as ad

    if not path.exists():
        raise ScfmError("input not found", path)
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # anndata raises many types for a file that is not an h5ad
        raise ScfmError(f"cannot read as h5ad ({type(exc).__name__}: {exc})", path) from exc


def _labels(adata, path: Path, key: str, what: str) -> pd.Series:
    if key not in adata.obs:
        columns = ", ".join(map(str, adata.obs.columns[:20]))
        raise ScfmError(f"{what} '{key}' is not an obs column (columns: {columns})", path)
    return adata.obs[key].astype("string").fillna("").astype(str)


def _check_aligned(adata, path: Path, vocab_genes: list[str] | None) -> list[str]:
    genes = list(map(str, adata.var_names))
    if vocab_genes is not None and genes != vocab_genes:
        raise ScfmError("the genes are not the checkpoint's vocabulary (or the first input's genes) in its order; "
                        "align every input to it first (scfm align --vocab <checkpoint>/vocab.tsv)", path)
    return genes


def _targets_of(names: np.ndarray, target_values: np.ndarray | None, separator: str, path: Path
                ) -> dict[str, tuple[str, ...]]:
    targets: dict[str, tuple[str, ...]] = {}
    for name in np.unique(names):
        if target_values is None:
            targets[name] = parse_targets(name, separator)
            continue
        found = {parse_targets(t, separator) for t in np.unique(target_values[names == name])}
        if len(found) > 1:
            raise ScfmError(f"perturbation {name!r} has cells with different targets "
                            f"({', '.join('+'.join(t) for t in sorted(found))})", path)
        targets[name] = found.pop()
    return targets


def select_genes(counts: sp.csr_matrix, normalised: sp.csr_matrix, *, min_fraction: float, max_genes: int | None
                 ) -> np.ndarray:
    """Vocabulary positions of the genes to score: detected in >= min_fraction of cells, at most
    max_genes of them (highest variance of log1p CP10k first), returned in vocabulary order."""
    detected = np.asarray((counts > 0).mean(axis=0)).ravel()
    keep = np.flatnonzero(detected >= min_fraction)
    if max_genes is not None and keep.size > max_genes:
        sub = normalised[:, keep]
        mean = column_means(sub)
        variance = np.asarray(sub.multiply(sub).mean(axis=0)).ravel() - mean**2
        keep = np.sort(keep[np.argsort(-variance, kind="stable")[:max_genes]])
    return keep


def load_screen(paths: Sequence[str | Path], options: ScreenOptions, *, vocab_genes: list[str] | None = None
                ) -> Screen:
    """Read aligned h5ads, group cells by ``obs[perturbation_key]`` and check everything a user can get wrong.

    Cells whose label is empty or in ``unassigned`` are left out. Perturbations with fewer than
    ``min_cells`` cells are skipped (and listed in ``skipped_small``). A target gene outside the
    vocabulary is an error, or with ``skip_unknown_targets`` its perturbations are skipped and listed.
    """
    perturbation_key, control, target_key = options.perturbation_key, options.control, options.target_key
    min_cells, min_gene_fraction = options.min_cells, options.min_gene_fraction
    paths = [Path(p) for p in paths]
    if not paths:
        raise ScfmError("no input h5ad given")
    blocks, labels, target_labels = [], [], []
    for path in paths:
        adata = _read(path)
        vocab_genes = _check_aligned(adata, path, vocab_genes)
        labels.append(_labels(adata, path, perturbation_key, "--perturbation-key").to_numpy())
        if target_key is not None:
            target_labels.append(_labels(adata, path, target_key, "--target-key").to_numpy())
        blocks.append(sp.csr_matrix(adata.X, dtype=np.float32))
    first = paths[0]
    label = np.concatenate(labels)
    if not (label == control).any():
        present = pd.Series(label).value_counts().index[:10]
        raise ScfmError(f"--control '{control}' is not a value of obs['{perturbation_key}'] "
                        f"(most common values: {', '.join(map(str, present))})", first)
    counts = sp.vstack(blocks, format="csr")
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    keep_cell = (label != "") & ~np.isin(label, list(options.unassigned)) & (totals > 0)
    is_control = keep_cell & (label == control)
    perturbed = keep_cell & ~is_control
    if not perturbed.any():
        raise ScfmError(f"obs['{perturbation_key}'] has no perturbed cells besides the control '{control}'", first)

    names_per_cell = label[perturbed]
    target_values = np.concatenate(target_labels)[perturbed] if target_key is not None else None
    targets = _targets_of(names_per_cell, target_values, options.separator, first)
    without = [n for n, t in targets.items() if not t]
    if without:
        raise ScfmError(f"perturbation(s) without a target gene: {', '.join(without[:5])} (only the control "
                        f"'{control}' may name no gene; use --target-key when the labels are guides)", first)
    vocab_set = set(vocab_genes)
    unknown = {n: [g for g in t if g not in vocab_set] for n, t in targets.items()}
    unknown = {n: g for n, g in unknown.items() if g}
    if unknown and not options.skip_unknown_targets:
        genes = sorted({g for gs in unknown.values() for g in gs})
        raise ScfmError(f"{len(genes)} perturbed gene(s) are not in the vocabulary, so they have no embedding: "
                        f"{', '.join(genes[:10])}{' …' if len(genes) > 10 else ''} (use a vocabulary that "
                        "includes them, or --skip-unknown-targets to leave those perturbations out)", first)

    normalised = log_normalise(counts, totals)
    gene_pos = select_genes(counts[keep_cell], normalised[keep_cell], min_fraction=min_gene_fraction,
                            max_genes=options.max_genes)
    if gene_pos.size == 0:
        raise ScfmError(f"no gene is detected in {min_gene_fraction:.1%} of the cells (lower --min-gene-fraction)",
                        first)
    scored = normalised[:, gene_pos]
    index = np.flatnonzero(perturbed)
    cells, small = {}, {}
    for name in sorted(targets):
        if name in unknown:
            continue
        rows = index[names_per_cell == name]
        if rows.size < min_cells:
            small[name] = int(rows.size)
            continue
        cells[name] = scored[rows]
    if not cells:
        raise ScfmError(f"no perturbation has at least {min_cells} cells (lower --min-cells)", first)
    genes = [vocab_genes[i] for i in gene_pos]
    gene_set = set(genes)
    extra = sorted({g for n in cells for g in targets[n] if g not in gene_set}, key=vocab_genes.index)
    control_rows = np.flatnonzero(is_control)
    return Screen(
        vocab_genes=list(vocab_genes), genes=genes, node_genes=genes + extra, names=sorted(cells),
        targets={n: targets[n] for n in cells}, cells=cells, control=scored[control_rows],
        control_counts=counts[control_rows], control_label=control, skipped_small=small, skipped_unknown=unknown,
    )
