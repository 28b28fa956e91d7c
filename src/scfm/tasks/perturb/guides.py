"""Guide assignment: a cells x guides UMI matrix → one perturbation label per cell.

    assign_guides(counts, guides, min_umi=5, min_ratio=2.0) -> DataFrame (guide, guide_umi, second_umi)
    read_guide_targets(path) -> {guide: target}
    assign_file(cells, guide_counts, guide_targets, output, key=...) -> summary   # `scfm perturb assign`

A cell is assigned its most-counted guide when that guide has at least ``min_umi`` UMIs and at least
``min_ratio`` times the UMIs of the cell's second guide; otherwise it is ``unassigned`` (no guide,
too few UMIs, or two guides of similar strength, i.e. a likely multiplet in a low-MOI screen). Ties
are never assigned. The assigned guide is then mapped to its target gene through a guide → target
table, in which control guides carry the control label (e.g. ``non-targeting``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import ScfmError

UNASSIGNED = "unassigned"


def _top_two(counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(column of the largest count, largest count, second largest count) per row."""
    matrix = sp.csr_matrix(counts, dtype=np.float64)
    n_rows = matrix.shape[0]
    best_col = np.full(n_rows, -1, dtype=np.int64)
    best = np.zeros(n_rows)
    second = np.zeros(n_rows)
    for row in range(n_rows):
        start, stop = matrix.indptr[row], matrix.indptr[row + 1]
        values = matrix.data[start:stop]
        if values.size == 0:
            continue
        order = np.argsort(-values, kind="stable")
        best_col[row] = matrix.indices[start + order[0]]
        best[row] = values[order[0]]
        second[row] = values[order[1]] if values.size > 1 else 0.0
    return best_col, best, second


def assign_guides(counts, guides, *, min_umi: float = 5, min_ratio: float = 2.0) -> pd.DataFrame:
    """One row per cell: ``guide`` (name or ``unassigned``), ``guide_umi`` and ``second_umi``.

    ``counts``: cells x guides (dense or sparse); ``guides``: the column names.
    """
    guides = [str(g) for g in guides]
    if counts.shape[1] != len(guides):
        raise ScfmError(f"{counts.shape[1]} guide columns but {len(guides)} guide names")
    if min_ratio < 1:
        raise ScfmError(f"the margin over the second guide must be >= 1, got {min_ratio}")
    best_col, best, second = _top_two(counts)
    # a tie (best == second) is never assigned: with min_ratio >= 1 it fails the margin unless both are 0
    assigned = (best_col >= 0) & (best >= min_umi) & (best >= min_ratio * second) & (best > second)
    names = np.array(guides, dtype=object)
    label = np.where(assigned, names[np.maximum(best_col, 0)], UNASSIGNED)
    return pd.DataFrame({"guide": label, "guide_umi": best, "second_umi": second})


def read_guide_targets(path) -> dict[str, str]:
    """A TSV/CSV with columns ``guide`` and ``target`` (header row) → {guide: target}."""
    from scfm.tasks.perturb.data import read_table

    table = read_table(path, ("guide", "target"), "guide → target table").dropna(subset=["guide", "target"])
    duplicated = table["guide"][table["guide"].duplicated()]
    conflicting = [g for g in duplicated.unique() if table.loc[table["guide"] == g, "target"].nunique() > 1]
    if conflicting:
        raise ScfmError(f"guide(s) listed with different targets: {', '.join(conflicting[:5])}", path)
    return dict(zip(table["guide"].astype(str), table["target"].astype(str)))


def read_guide_counts(path):
    """Guide UMI counts: an ``.h5ad`` (cells x guides, obs_names = cell ids) or a CSV/TSV whose first
    column holds cell ids and whose other columns are guides. Returns (cell ids, guide names, CSR)."""
    path = Path(path)
    if not path.exists():
        raise ScfmError("guide-count file not found", path)
    try:
        if path.suffix.lower() == ".h5ad":
            import anndata as ad

            guides = ad.read_h5ad(path)
            return list(map(str, guides.obs_names)), list(map(str, guides.var_names)), sp.csr_matrix(guides.X)
        table = pd.read_csv(path, sep=None, engine="python", index_col=0)
    except Exception as exc:  # anndata and pandas raise many types for a file that is not what it claims
        raise ScfmError(f"cannot read guide counts ({type(exc).__name__}: {exc})", path) from exc
    values = table.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        raise ScfmError("guide counts must be numbers (first column: cell ids, then one column per guide)", path)
    return list(map(str, table.index)), list(map(str, table.columns)), sp.csr_matrix(values.astype(np.float64))


def assign_file(cells_path, guide_counts_path, guide_targets_path, output_path, *, key: str = "perturbation",
                min_umi: float = 5, min_ratio: float = 2.0) -> dict:
    """Label every cell of CELLS (h5ad) from its guide counts; write OUTPUT with obs[key] (target gene,
    control label or ``unassigned``), obs[f"{key}_guide"], obs[f"{key}_guide_umi"]. Returns a summary."""
    import anndata as ad

    from scfm.utils import atomic_output

    cells_path, output_path = Path(cells_path), Path(output_path)
    if output_path.suffix.lower() != ".h5ad":
        raise ScfmError(f"output must end in .h5ad, got {output_path.name!r}")
    cell_ids, guide_names, counts = read_guide_counts(guide_counts_path)
    targets = read_guide_targets(guide_targets_path)
    unmapped = [g for g in guide_names if g not in targets]
    if unmapped:
        raise ScfmError(f"{len(unmapped)} guide(s) have no target in the guide → target table "
                        f"(first: {', '.join(unmapped[:5])})", guide_targets_path)
    try:
        adata = ad.read_h5ad(cells_path)
    except Exception as exc:
        raise ScfmError(f"cannot read as h5ad ({type(exc).__name__}: {exc})", cells_path) from exc
    position = pd.Index(cell_ids)
    if not position.is_unique:
        raise ScfmError("cell ids of the guide counts are not unique", guide_counts_path)
    rows = position.get_indexer(adata.obs_names.astype(str))
    found = rows >= 0
    if not found.any():
        raise ScfmError(f"no cell of {cells_path.name} is in the guide counts (cell ids such as "
                        f"{adata.obs_names[0]!r} vs {cell_ids[0]!r})", guide_counts_path)
    assignment = assign_guides(counts, guide_names, min_umi=min_umi, min_ratio=min_ratio)
    guide = np.full(adata.n_obs, UNASSIGNED, dtype=object)
    umi = np.zeros(adata.n_obs)
    guide[found] = assignment["guide"].to_numpy()[rows[found]]
    umi[found] = assignment["guide_umi"].to_numpy()[rows[found]]
    label = np.array([targets.get(g, UNASSIGNED) for g in guide], dtype=object)
    adata.obs[key] = pd.Categorical(label)
    adata.obs[f"{key}_guide"] = pd.Categorical(guide)
    adata.obs[f"{key}_guide_umi"] = umi.astype(np.float32)
    settings = {"key": key, "min_umi": min_umi, "min_ratio": min_ratio,
                "guide_counts": str(guide_counts_path), "guide_targets": str(guide_targets_path)}
    scfm_uns = dict(adata.uns.get("scfm", {}))
    scfm_uns["perturb_assign"] = settings
    adata.uns["scfm"] = scfm_uns
    with atomic_output(output_path) as tmp:
        adata.write_h5ad(tmp)
    counts_per_label = pd.Series(label).value_counts()
    return {**settings, "n_cells": int(adata.n_obs), "n_without_guide_counts": int((~found).sum()),
            "n_unassigned": int((label == UNASSIGNED).sum()),
            "cells_per_label": {str(k): int(v) for k, v in counts_per_label.items()}}
