"""Inputs of the drug steps: response and SMILES tables, cell features, and how they overlap.

Tables are CSV (``.csv``) or tab-separated (anything else), with a header:

- response: ``cell_line``, ``drug``, ``ln_ic50`` (GDSC's ``CELL_LINE_NAME``, ``DRUG_NAME``, ``LN_IC50`` are
  accepted too). A pair measured twice is averaged; rows without a value are dropped.
- SMILES: ``drug``, ``smiles``.

Cells are an ``.h5ad`` whose ``obs_names`` are the cell-line (or cell) names. Representations:

- ``scfm``: ``obsm['X_scfm']`` from ``scfm embed`` (``--input-type bulk`` for cell lines);
- ``expression``: ``X`` as it is (give log-normalised or z-scored values), genes matched by name;
- ``pca``: principal components of ``X``, fitted on the training cell lines only and stored with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scfm.errors import ScfmError

REPRESENTATIONS = ("scfm", "expression", "pca")
_ALIASES = {
    "cell_line": ("cell_line", "CELL_LINE_NAME", "cell"),
    "drug": ("drug", "DRUG_NAME"),
    "ln_ic50": ("ln_ic50", "LN_IC50"),
    "smiles": ("smiles", "SMILES"),
}


def read_table(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ScfmError("file not found", path)
    try:
        return pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t", dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ScfmError(f"not a readable table: {str(exc).splitlines()[0]}", path) from exc


def _pick_columns(table: pd.DataFrame, wanted: tuple[str, ...], path) -> pd.DataFrame:
    chosen = {}
    for column in wanted:
        found = next((c for c in _ALIASES[column] if c in table.columns), None)
        if found is None:
            raise ScfmError(f"no column {column!r} (columns: {', '.join(map(str, table.columns[:8]))})", path)
        chosen[column] = table[found]
    return pd.DataFrame(chosen)


def read_response(path) -> pd.DataFrame:
    """``cell_line``, ``drug``, ``ln_ic50`` (float), one row per pair."""
    table = _pick_columns(read_table(path), ("cell_line", "drug", "ln_ic50"), path)
    values = pd.to_numeric(table["ln_ic50"], errors="coerce")
    bad = table["ln_ic50"].notna() & values.isna()
    if bad.any():
        first = table["ln_ic50"][bad].iloc[0]
        raise ScfmError(f"ln_ic50 is not a number in {int(bad.sum())} row(s) (first: {first!r})", path)
    table = table.assign(ln_ic50=values).dropna()
    if table.empty:
        raise ScfmError("no response values", path)
    return table.groupby(["cell_line", "drug"], as_index=False, sort=True)["ln_ic50"].mean()


def read_smiles(path) -> dict[str, str]:
    table = _pick_columns(read_table(path), ("drug", "smiles"), path).dropna(subset=["drug"])
    duplicated = table["drug"][table["drug"].duplicated()]
    if len(duplicated):
        raise ScfmError(f"drug {duplicated.iloc[0]!r} is listed more than once", path)
    return dict(zip(table["drug"], table["smiles"].fillna("")))


@dataclass
class CellTable:
    names: list[str]
    values: np.ndarray  # (n, d) float32: the embedding, or expression in `genes` order
    genes: list[str] | None = None  # expression / pca only
    embed_settings: dict = field(default_factory=dict)  # scfm only: uns['scfm']['embed']


def read_cells(path, representation: str, embedding_key: str = "X_scfm") -> CellTable:
    import anndata as ad

    from scfm.tasks.annotate import embed_settings, embedding_of

    if representation not in REPRESENTATIONS:
        raise ScfmError(f"unknown representation {representation!r} (choose from {', '.join(REPRESENTATIONS)})")
    path = Path(path)
    if not path.is_file():
        raise ScfmError("file not found", path)
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise many types for a file that is not an h5ad
        raise ScfmError(f"not a readable .h5ad file ({type(exc).__name__})", path) from exc
    names = [str(n) for n in adata.obs_names]
    if len(set(names)) != len(names):
        raise ScfmError("obs_names (cell-line or cell names) are not unique", path)
    if representation == "scfm":
        return CellTable(names, embedding_of(adata, embedding_key, path), None, embed_settings(adata) or {})
    matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    matrix = np.asarray(matrix, dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise ScfmError("X holds NaN or infinite values", path)
    return CellTable(names, matrix, [str(g) for g in adata.var_names])


def reorder_genes(cells: CellTable, genes: list[str], path) -> np.ndarray:
    """The expression columns in a model's gene order; every gene must be present."""
    index = pd.Index(cells.genes)
    positions = index.get_indexer(genes)
    missing = [g for g, p in zip(genes, positions) if p < 0]
    if missing:
        raise ScfmError(f"the input lacks {len(missing)} of the model's {len(genes)} genes (first: {missing[0]})", path)
    return cells.values[:, positions]


def overlapping_pairs(response: pd.DataFrame, cell_names: list[str], drugs: list[str], *, response_path,
                      cells_path) -> tuple[pd.DataFrame, dict]:
    """Pairs whose cell line has features and whose drug has a fingerprint; none at all is an error."""
    lines_known = response["cell_line"].isin(set(cell_names))
    if not lines_known.any():
        raise ScfmError(f"no cell line of the response table is in {cells_path} "
                        f"(e.g. {response['cell_line'].iloc[0]!r}; obs_names must be the cell-line names)",
                        response_path)
    drugs_known = response["drug"].isin(set(drugs))
    if not drugs_known.any():
        raise ScfmError(f"no drug of the response table has a usable SMILES (e.g. {response['drug'].iloc[0]!r})",
                        response_path)
    kept = response[lines_known & drugs_known].reset_index(drop=True)
    dropped = {
        "cell_lines_without_features": sorted(set(response["cell_line"][~lines_known])),
        "drugs_without_smiles": sorted(set(response["drug"][~drugs_known])),
        "pairs_dropped": int((~(lines_known & drugs_known)).sum()),
    }
    return kept, dropped
