"""Read single-cell inputs into AnnData, pick the raw-count matrix, read samplesheets.

Formats, chosen by the path:

=====================  ==========================================================
``*.h5ad``             AnnData (in memory, ``backed='r'``, or row blocks via
                       :func:`iter_chunks` for files larger than memory)
``*.h5``               10x Genomics HDF5 (``filtered_feature_bc_matrix.h5``)
directory              10x ``matrix.mtx.gz`` + ``features.tsv.gz`` (or ``genes.tsv``)
                       + ``barcodes.tsv.gz``
``*.loom``             loom (``Gene`` / ``Accession`` row attributes, ``CellID``)
``*.csv`` / ``*.tsv``  cells x genes with a header row and barcodes in the first
                       column (``.gz`` allowed); ``transpose=True`` for genes x cells
=====================  ==========================================================

Which matrix holds the counts: ``layer=NAME`` when given; else ``.raw`` when it holds counts; else ``X``;
and if ``X`` is not counts but ``layers['counts']`` is, that layer. A matrix "holds counts" when every
stored value is a non-negative integer. Negative, NaN or infinite values are always an error.

Gene symbols are the ``var_names``; Ensembl gene ids, whenever the input has them (10x ``gene_ids``, loom
``Accession``, a var column, or Ensembl ids as ``var_names`` next to a symbol column), go to
``var['ensembl_id']``. Duplicate symbols are kept as they are: alignment sums them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import ScfmError

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ".h5ad, .h5 (10x), 10x mtx directory, .loom, .csv, .tsv"
ENSEMBL_COLUMN = "ensembl_id"
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
# var columns that may carry Ensembl gene ids (10x, loom, CELLxGENE, GEO tables), in order of preference
_ENSEMBL_CANDIDATES = ("ensembl_id", "gene_ids", "gene_id", "Accession", "ensembl_gene_id", "feature_id", "ensembl")
# var columns that may carry gene symbols when var_names are Ensembl ids
_SYMBOL_CANDIDATES = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "symbol", "Gene")
_SCAN_BLOCK = 1 << 22  # values checked per block when scanning a matrix stored on disk
_DETECT_VALUES = 1 << 24  # stored values sampled to decide counts vs normalized for streamed files


@dataclass
class ReadResult:
    """An input read into memory.

    ``adata.X`` is the chosen matrix (CSR float32) unless the file was opened backed, in which case
    ``adata`` is the backed file as stored and ``counts_source`` names where its counts are.
    """

    adata: ad.AnnData
    counts_source: str  # "X", "raw.X" or "layers['NAME']"
    is_counts: bool


@dataclass
class H5adInfo:
    """What :func:`inspect_h5ad` learns about an ``.h5ad`` without loading its matrix."""

    n_obs: int
    n_vars: int
    counts_source: str
    is_counts: bool
    matrix_key: str  # HDF5 path of the chosen matrix: "X", "raw/X", "layers/NAME"
    var_key: str  # "var" or "raw/var"


# --------------------------------------------------------------------------------------------- formats


def input_format(path: str | os.PathLike) -> str:
    """``h5ad``, ``10x_h5``, ``10x_mtx``, ``loom``, ``csv`` or ``tsv``; raises for anything else."""
    p = Path(path)
    if not p.exists():
        raise ScfmError("file not found", p)
    if p.is_dir():
        _mtx_files(p)  # raises when the directory is not a 10x matrix
        return "10x_mtx"
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in ((".h5ad", "h5ad"), (".h5", "10x_h5"), (".loom", "loom"), (".csv", "csv"), (".tsv", "tsv")):
        if name.endswith(suffix):
            return fmt
    raise ScfmError(f"unknown input format '{p.suffix or p.name}' (supported: {SUPPORTED_FORMATS})", p)


def sample_name(path: str | os.PathLike) -> str:
    """The default sample id of an input: its file name without the format suffixes."""
    name = Path(path).name
    for suffix in (".gz", ".h5ad", ".h5", ".loom", ".csv", ".tsv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or "sample"


def _mtx_files(directory: Path) -> dict[str, Path]:
    found = {}
    for role, names in (
        ("matrix", ("matrix.mtx.gz", "matrix.mtx")),
        ("features", ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")),
        ("barcodes", ("barcodes.tsv.gz", "barcodes.tsv")),
    ):
        hit = next((directory / n for n in names if (directory / n).is_file()), None)
        if hit is None:
            raise ScfmError(
                f"directory is not a 10x matrix directory: no {names[0]} "
                "(needs matrix.mtx.gz, features.tsv.gz and barcodes.tsv.gz)",
                directory,
            )
        if hit.stat().st_size == 0:
            raise ScfmError("file is empty", hit)
        found[role] = hit
    return found


# --------------------------------------------------------------------------------------------- reading


def read_input(
    path: str | os.PathLike,
    *,
    layer: str | None = None,
    transpose: bool = False,
    sample: str | None = None,
    backed: bool = False,
    require_counts: bool = False,
) -> ReadResult:
    """Read any supported input; pick and validate its raw-count matrix.

    ``sample`` prefixes barcodes (``<sample>_<barcode>``) and sets ``obs['sample']``. ``backed`` only applies
    to ``.h5ad``. ``require_counts`` turns a non-integer matrix into an error instead of ``is_counts=False``.
    """
    path = Path(path)
    fmt = input_format(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ScfmError("file is empty", path)
    if transpose and fmt not in ("csv", "tsv"):
        raise ScfmError("transpose applies to csv/tsv inputs only", path)

    if fmt == "h5ad" and backed:
        info = inspect_h5ad(path, layer=layer)
        _require_counts(info.is_counts, info.counts_source, path, require_counts)
        adata = _read_h5ad(path, backed=True)
        _check_barcodes(adata.obs_names, path)
        if sample is not None:
            log.warning("%s: sample prefix is not applied to a backed file; use iter_chunks", path)
        return ReadResult(adata, info.counts_source, info.is_counts)

    adata = _READERS[fmt](path, transpose)
    matrix, var, source, is_counts = _choose_matrix(adata, layer, path)
    _require_counts(is_counts, source, path, require_counts)
    log.info("%s: using %s (%s)", path, source, "counts" if is_counts else "not integer counts")
    result = ad.AnnData(
        X=_as_csr32(matrix),
        obs=adata.obs.copy(),
        var=_with_ensembl_ids(var.copy()),
        obsm=dict(adata.obsm),
        uns=dict(adata.uns),
    )
    _check_shape(result.n_obs, result.n_vars, path)
    _check_barcodes(result.obs_names, path)
    if sample is not None:
        label_sample(result, sample)
    return ReadResult(result, source, is_counts)


def label_sample(adata: ad.AnnData, sample: str, batch: str | None = None, condition: str | None = None) -> None:
    """Prefix barcodes with the sample id and record sample/batch/condition in ``obs`` (in place)."""
    adata.obs_names = [f"{sample}_{barcode}" for barcode in adata.obs_names]
    adata.obs["sample"] = pd.Categorical([sample] * adata.n_obs)
    adata.obs["batch"] = pd.Categorical([batch if batch is not None else sample] * adata.n_obs)
    if condition is not None:
        adata.obs["condition"] = pd.Categorical([condition] * adata.n_obs)


def _read_h5ad(path: Path, backed: bool = False) -> ad.AnnData:
    import h5py

    if not h5py.is_hdf5(path):
        raise ScfmError("not an HDF5 file (truncated, or not an .h5ad)", path)
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types for damaged files
        raise ScfmError(f"cannot read .h5ad (truncated or damaged?): {type(exc).__name__}: {exc}", path) from exc


def _read_h5ad_any(path: Path, transpose: bool) -> ad.AnnData:
    return _read_h5ad(path)


def _read_10x_h5(path: Path, transpose: bool) -> ad.AnnData:
    import h5py
    import scanpy as sc

    if not h5py.is_hdf5(path):
        raise ScfmError("not an HDF5 file (truncated, or not a 10x .h5)", path)
    try:
        return sc.read_10x_h5(path)
    except Exception as exc:
        raise ScfmError(f"cannot read as a 10x .h5 matrix: {type(exc).__name__}: {exc}", path) from exc


def _read_10x_mtx(path: Path, transpose: bool) -> ad.AnnData:
    import scanpy as sc

    _mtx_files(path)
    try:
        adata = sc.read_10x_mtx(path, var_names="gene_symbols", make_unique=False)
    except Exception as exc:
        raise ScfmError(f"cannot read 10x matrix directory: {type(exc).__name__}: {exc}", path) from exc
    return adata


def _read_loom(path: Path, transpose: bool) -> ad.AnnData:
    import h5py

    if not h5py.is_hdf5(path):
        raise ScfmError("not an HDF5 file (truncated, or not a .loom)", path)
    try:
        with h5py.File(path, "r") as f:
            row_attrs = set(f["row_attrs"].keys()) if "row_attrs" in f else set()
            col_attrs = set(f["col_attrs"].keys()) if "col_attrs" in f else set()
        adata = ad.io.read_loom(
            path,
            sparse=True,
            var_names="Gene" if "Gene" in row_attrs else "var_names",
            obs_names="CellID" if "CellID" in col_attrs else "obs_names",
        )
    except Exception as exc:
        raise ScfmError(f"cannot read .loom: {type(exc).__name__}: {exc}", path) from exc
    return adata


def _read_table(path: Path, transpose: bool) -> ad.AnnData:
    sep = "\t" if input_format(path) == "tsv" else ","
    try:
        table = pd.read_csv(path, sep=sep, index_col=0)
    except pd.errors.EmptyDataError as exc:
        raise ScfmError("file is empty", path) from exc
    except Exception as exc:
        raise ScfmError(f"cannot parse as {'TSV' if sep == chr(9) else 'CSV'}: {exc}", path) from exc
    if transpose:
        table = table.T
    non_numeric = [str(c) for c, dtype in table.dtypes.items() if not pd.api.types.is_numeric_dtype(dtype)]
    if non_numeric:
        axis = "cell" if transpose else "gene"
        raise ScfmError(f"non-numeric values in {axis} column(s) {', '.join(non_numeric[:3])}", path)
    _check_shape(table.shape[0], table.shape[1], path)
    obs = pd.DataFrame(index=table.index.astype(str))
    var = pd.DataFrame(index=table.columns.astype(str))
    return ad.AnnData(X=sp.csr_matrix(table.to_numpy(dtype=np.float64)), obs=obs, var=var)


_READERS = {
    "h5ad": _read_h5ad_any,
    "10x_h5": _read_10x_h5,
    "10x_mtx": _read_10x_mtx,
    "loom": _read_loom,
    "csv": _read_table,
    "tsv": _read_table,
}


# --------------------------------------------------------------------------------------------- counts


def _choose_matrix(adata: ad.AnnData, layer: str | None, path: Path):
    """→ (matrix, var, counts_source, is_counts), values validated."""
    if layer is not None:
        if layer == "X":
            return adata.X, adata.var, "X", _check_values(adata.X, path, "X")
        if layer in ("raw", "raw.X"):
            if adata.raw is None:
                raise ScfmError("layer 'raw' requested but the file has no .raw", path)
            return adata.raw.X, adata.raw.var, "raw.X", _check_values(adata.raw.X, path, "raw.X")
        if layer not in adata.layers:
            known = ", ".join(adata.layers.keys()) or "none"
            raise ScfmError(f"layer '{layer}' not found (layers: {known})", path)
        source = f"layers['{layer}']"
        return adata.layers[layer], adata.var, source, _check_values(adata.layers[layer], path, source)
    if adata.raw is not None and _holds_counts(adata.raw.X):
        _check_values(adata.raw.X, path, "raw.X")
        return adata.raw.X, adata.raw.var, "raw.X", True
    is_counts = _check_values(adata.X, path, "X")
    if not is_counts and "counts" in adata.layers and _holds_counts(adata.layers["counts"]):
        _check_values(adata.layers["counts"], path, "layers['counts']")
        return adata.layers["counts"], adata.var, "layers['counts']", True
    return adata.X, adata.var, "X", is_counts


def _stored_values(matrix) -> np.ndarray:
    if sp.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix).ravel()


def _holds_counts(matrix) -> bool:
    values = _stored_values(matrix)
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.isfinite(values)) and np.all(values >= 0) and np.all(values == np.rint(values)))


def _check_values(matrix, path: Path, source: str) -> bool:
    """Raise on negative/NaN/inf values; return whether all values are integers (counts)."""
    if matrix is None:
        raise ScfmError(f"{source} is empty", path)
    return _check_value_block(_stored_values(matrix), path, source)


def _check_value_block(values: np.ndarray, path: Path, source: str) -> bool:
    if values.size == 0:
        return True
    if not np.issubdtype(values.dtype, np.number):
        raise ScfmError(f"{source} holds non-numeric values", path)
    if np.issubdtype(values.dtype, np.integer):
        if values.min() < 0:
            raise ScfmError(f"{source} has negative values (min {values.min()})", path)
        return True
    if np.isnan(values).any():
        raise ScfmError(f"{source} has NaN values", path)
    if np.isinf(values).any():
        raise ScfmError(f"{source} has infinite values", path)
    if values.min() < 0:
        raise ScfmError(f"{source} has negative values (min {values.min():g})", path)
    return bool(np.all(values == np.rint(values)))


def check_values(values: np.ndarray, path, source: str = "X") -> bool:
    """Raise on negative, NaN or infinite values; return whether all values are integers (counts).
    The check every reader runs on every block it reads."""
    return _check_value_block(np.asarray(values), Path(path), source)


def _require_counts(is_counts: bool, source: str, path: Path, required: bool) -> None:
    if required and not is_counts:
        raise ScfmError(
            f"{source} has non-integer values where raw counts are required "
            "(normalized data? pass --layer with the raw-count layer)",
            path,
        )


def _as_csr32(matrix) -> sp.csr_matrix:
    if sp.issparse(matrix):
        out = sp.csr_matrix(matrix, dtype=np.float32)
    else:
        out = sp.csr_matrix(np.asarray(matrix, dtype=np.float32))
    # files often pair int64 indptr with int32 indices; scipy's kernels need one index dtype
    index_dtype = np.int64 if max(out.nnz, *out.shape) >= 2**31 else np.int32
    out.indices = out.indices.astype(index_dtype, copy=False)
    out.indptr = out.indptr.astype(index_dtype, copy=False)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def _check_shape(n_obs: int, n_vars: int, path: Path) -> None:
    if n_obs == 0:
        raise ScfmError("input has zero cells", path)
    if n_vars == 0:
        raise ScfmError("input has zero genes", path)


def _check_barcodes(barcodes: pd.Index, path: Path) -> None:
    duplicated = pd.Index(barcodes)[pd.Index(barcodes).duplicated()]
    if len(duplicated):
        shown = ", ".join(map(str, duplicated.unique()[:3]))
        raise ScfmError(f"duplicate cell barcodes in one sample: {shown} ({len(duplicated)} duplicates)", path)


def _looks_ensembl(values) -> bool:
    values = pd.Index(values).astype(str)
    if len(values) == 0:
        return False
    return bool(np.mean([bool(_ENSEMBL_RE.match(v)) for v in values[:1000]]) > 0.9)


def _with_ensembl_ids(var: pd.DataFrame) -> pd.DataFrame:
    """Put Ensembl ids (when the input has them) in ``var['ensembl_id']``; symbols stay the var_names."""
    if ENSEMBL_COLUMN in var and _looks_ensembl(var[ENSEMBL_COLUMN]):
        return var
    if _looks_ensembl(var.index):
        symbols = next((c for c in _SYMBOL_CANDIDATES if c in var and not _looks_ensembl(var[c])), None)
        var[ENSEMBL_COLUMN] = var.index.astype(str)
        if symbols is not None:
            var.index = pd.Index(var[symbols].astype(str), name=None)
        return var
    for column in _ENSEMBL_CANDIDATES:
        if column in var and _looks_ensembl(var[column]):
            var[ENSEMBL_COLUMN] = var[column].astype(str).to_numpy()
            return var
    return var


# --------------------------------------------------------------------------------------------- large h5ad


def _h5_open(path: Path):
    import h5py

    path = Path(path)
    input_format(path)
    if path.stat().st_size == 0:
        raise ScfmError("file is empty", path)
    if not h5py.is_hdf5(path):
        raise ScfmError("not an HDF5 file (truncated, or not an .h5ad)", path)
    try:
        return h5py.File(path, "r")
    except Exception as exc:
        raise ScfmError(f"cannot open .h5ad (truncated or damaged?): {exc}", path) from exc


def _h5_shape(node) -> tuple[int, int]:
    import h5py

    if isinstance(node, h5py.Dataset):
        return tuple(node.shape)
    return tuple(int(n) for n in node.attrs["shape"])


def _h5_values(node):
    """The dataset of stored values: ``data`` of a sparse group, or the dense dataset itself."""
    import h5py

    return node if isinstance(node, h5py.Dataset) else node["data"]


def _h5_sampled_counts(node, path: Path, source: str) -> bool:
    """Check the first stored values of an on-disk matrix (bounded memory) for counts."""
    values = _h5_values(node)
    is_counts = True
    flat_total = int(np.prod(values.shape))
    if values.ndim == 1:
        for start in range(0, min(flat_total, _DETECT_VALUES), _SCAN_BLOCK):
            is_counts &= _check_value_block(values[start : start + _SCAN_BLOCK], path, source)
    else:
        rows = max(1, _DETECT_VALUES // max(1, values.shape[1]))
        is_counts &= _check_value_block(np.asarray(values[:rows]).ravel(), path, source)
    return is_counts


def inspect_h5ad(path: str | os.PathLike, *, layer: str | None = None) -> H5adInfo:
    """Shape and count matrix of an ``.h5ad`` without loading it (same choice rules as :func:`read_input`).

    Counts vs normalized is decided on the first 16M stored values; :func:`iter_chunks` checks every
    block as it reads it.
    """
    path = Path(path)
    with _h5_open(path) as f:
        if "X" not in f and layer is None:
            raise ScfmError("no X matrix in the .h5ad", path)
        if layer is not None and layer not in ("X", "raw", "raw.X"):
            key, source = f"layers/{layer}", f"layers['{layer}']"
            if key not in f:
                known = ", ".join(f["layers"].keys()) if "layers" in f else "none"
                raise ScfmError(f"layer '{layer}' not found (layers: {known})", path)
            choice = (key, "var", source, _h5_sampled_counts(f[key], path, source))
        elif layer in ("raw", "raw.X"):
            if "raw/X" not in f:
                raise ScfmError("layer 'raw' requested but the file has no .raw", path)
            choice = ("raw/X", "raw/var", "raw.X", _h5_sampled_counts(f["raw/X"], path, "raw.X"))
        elif layer is None and "raw/X" in f and _h5_raw_is_counts(f["raw/X"], path):
            choice = ("raw/X", "raw/var", "raw.X", True)
        else:
            choice = ("X", "var", "X", _h5_sampled_counts(f["X"], path, "X"))
            if layer is None and not choice[3] and "layers/counts" in f:
                if _h5_sampled_counts(f["layers/counts"], path, "layers['counts']"):
                    choice = ("layers/counts", "var", "layers['counts']", True)
        n_obs, n_vars = _h5_shape(f[choice[0]])
    _check_shape(n_obs, n_vars, path)
    log.info("%s: using %s (%s)", path, choice[2], "counts" if choice[3] else "not integer counts")
    return H5adInfo(n_obs, n_vars, choice[2], choice[3], choice[0], choice[1])


def _h5_raw_is_counts(node, path: Path) -> bool:
    try:
        return _h5_sampled_counts(node, path, "raw.X")
    except ScfmError:
        return False  # a damaged .raw is not the count matrix; X is checked next


def iter_chunks(
    path: str | os.PathLike,
    chunk_size: int,
    *,
    layer: str | None = None,
    require_counts: bool = False,
) -> Iterator[tuple[pd.DataFrame, sp.csr_matrix, pd.DataFrame]]:
    """Yield ``(obs_block, csr_block float32, var)`` for consecutive row blocks of an ``.h5ad``.

    Only one block of the matrix is in memory at a time (plus obs and var). Every block is validated:
    negative/NaN/inf values raise; with ``require_counts`` so do non-integers. Barcodes must be unique.
    """
    from anndata.io import read_elem, sparse_dataset

    path = Path(path)
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    info = inspect_h5ad(path, layer=layer)
    _require_counts(info.is_counts, info.counts_source, path, require_counts)
    with _h5_open(path) as f:
        obs = read_elem(f["obs"])
        var = _with_ensembl_ids(read_elem(f[info.var_key]))
        _check_barcodes(obs.index, path)
        node = f[info.matrix_key]
        import h5py

        matrix = node if isinstance(node, h5py.Dataset) else sparse_dataset(node)
        for start in range(0, info.n_obs, chunk_size):
            stop = min(start + chunk_size, info.n_obs)
            block = _as_csr32(matrix[start:stop])
            is_counts = _check_value_block(block.data, path, info.counts_source)
            _require_counts(is_counts, info.counts_source, path, require_counts)
            yield obs.iloc[start:stop], block, var


# --------------------------------------------------------------------------------------------- samplesheet


def schema_path() -> Path:
    """The packaged samplesheet JSON schema (``assets/schema_input.json`` links to it)."""
    return Path(__file__).resolve().parents[1] / "assets" / "schema_input.json"


def read_samplesheet(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``sample,path[,batch][,condition]``; paths come back absolute.

    ``batch`` defaults to the sample id. Errors name the sheet, the row (1-based, header excluded)
    and the problem.
    """
    import json

    import jsonschema

    path = Path(path)
    if not path.exists():
        raise ScfmError("samplesheet not found", path)
    if path.is_dir() or path.stat().st_size == 0:
        raise ScfmError("samplesheet is empty" if path.is_file() else "samplesheet is a directory", path)
    try:
        sheet = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:
        raise ScfmError(f"cannot parse samplesheet as CSV: {exc}", path) from exc
    sheet.columns = [c.strip() for c in sheet.columns]
    schema = json.loads(schema_path().read_text())
    required = schema["items"]["required"]
    missing = [c for c in required if c not in sheet.columns]
    if missing:
        raise ScfmError(
            f"samplesheet is missing column(s) {', '.join(missing)} (header must be sample,path[,batch][,condition])",
            path,
        )
    known = list(schema["items"]["properties"])
    unknown = [c for c in sheet.columns if c not in known]
    if unknown:
        # a misspelt optional column (`bacth`) would otherwise be dropped without a word
        raise ScfmError(f"samplesheet has unknown column(s) {', '.join(map(repr, unknown))} "
                        f"(allowed: {', '.join(known)})", path)
    if sheet.empty:
        raise ScfmError("samplesheet has no rows", path)
    # optional columns left blank are absent, as nf-schema treats them
    rows = [{k: v.strip() for k, v in row.items() if v.strip() != "" or k in required} for row in sheet.to_dict("records")]
    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(rows), key=lambda e: list(e.absolute_path)):
        raise ScfmError(_schema_message(error, rows), path)
    samples = pd.Index([row["sample"] for row in rows])
    if samples.duplicated().any():
        dup = samples[samples.duplicated()][0]
        raise ScfmError(f"duplicate sample id '{dup}' (each sample must appear once)", path)
    for number, row in enumerate(rows, start=1):
        target = Path(row["path"])
        if not target.is_absolute():
            target = (path.parent / target).resolve()
        if not target.exists():
            raise ScfmError(f"row {number} (sample '{row['sample']}'): path does not exist: {target}", path)
        row["path"] = str(target)
        row.setdefault("batch", row["sample"])
    columns = ["sample", "path", "batch"] + (["condition"] if "condition" in sheet.columns else [])
    frame = pd.DataFrame(rows, columns=columns)
    if "condition" in frame:
        frame["condition"] = frame["condition"].fillna("")
    return frame


def check_samplesheet(path: str | os.PathLike) -> pd.DataFrame:
    """:func:`read_samplesheet`, then each input's format too (what ``scfm samplesheet check`` runs).

    The format check reads no data: a suffix, or the three files of a 10x matrix directory.
    """
    sheet = read_samplesheet(path)
    for number, row in enumerate(sheet.itertuples(), start=1):
        try:
            input_format(row.path)
        except ScfmError as exc:
            raise ScfmError(f"row {number} (sample '{row.sample}'): {exc.message}: {row.path}", path) from exc
    return sheet


def _schema_message(error, rows: list[dict]) -> str:
    where = list(error.absolute_path)
    if where and isinstance(where[0], int):
        number = where[0] + 1
        sample = rows[where[0]].get("sample", "?")
        column = where[1] if len(where) > 1 else None
        text = error.schema.get("errorMessage", error.message)
        if column is None and error.validator == "required":
            text = error.message
        prefix = f"row {number} (sample '{sample}')" + (f", column '{column}'" if column else "")
        return f"{prefix}: {text}"
    return error.message
