"""Per-sample quality control: scanpy QC metrics, filters in a fixed order, summary JSON, plots.

Filters run in this order; each one sees only what the previous ones kept:

1. ``min_genes``     cells with fewer detected genes (``n_genes_by_counts``) are removed
2. ``min_counts``    cells with fewer total counts (off unless set)
3. ``max_counts``    cells with more total counts (off unless set)
4. ``max_pct_mito``  cells with a larger percentage of counts in ``MT-``/``mt-`` genes
5. ``min_cells``     genes detected in fewer of the remaining cells are removed
6. ``doublets``      cells that ``scanpy.pp.scrublet`` calls doublets (off unless set)

QC columns (``n_genes_by_counts``, ``total_counts``, ``pct_counts_mt``, ``pct_counts_ribo``) are computed once on
all input genes, before any filter. Large ``.h5ad`` inputs are streamed in row blocks in two passes: the input is
read once (metrics, cell filters applied on the fly, each gene's count over the passing cells) and the passing
cells go to a temporary file next to the output; the gene filter then needs those counts, so a second, cheaper pass
reads only the passing cells back, drops the rare genes and writes the output. Memory holds one block plus
per-cell metrics; scrublet then runs on blocks of at least ``max(chunk_size, 10_000)`` kept cells rather than on
the whole sample.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.data import io
from scfm.errors import ScfmError
from scfm.utils import atomic_output, progress

log = logging.getLogger(__name__)

FILTER_ORDER = ("min_genes", "min_counts", "max_counts", "max_pct_mito", "min_cells", "doublets")
CELL_FILTERS = FILTER_ORDER[:4]
METRIC_COLUMNS = ("n_genes_by_counts", "total_counts", "pct_counts_mt", "pct_counts_ribo")
STREAM_ABOVE_BYTES = 1 << 30  # .h5ad inputs larger than this are streamed when chunk_size is not given
DEFAULT_CHUNK_SIZE = 20_000
DOUBLET_MIN_CELLS = 10_000  # streamed scrublet batches are at least this large: small ones give noisy calls
_PLOTTED = (("n_genes_by_counts", "genes per cell"), ("total_counts", "counts per cell"),
            ("pct_counts_mt", "% mitochondrial counts"))


@dataclass
class QcParams:
    min_genes: int | None = 200
    min_counts: float | None = None
    max_counts: float | None = None
    max_pct_mito: float | None = 20.0
    min_cells: int | None = 3
    doublets: bool = False
    seed: int = 0

    def threshold(self, name: str):
        return self.doublets if name == "doublets" else getattr(self, name)

    def active(self) -> list[str]:
        return [name for name in FILTER_ORDER if self.threshold(name) not in (None, False)]


# --------------------------------------------------------------------------------------------- metrics


def gene_groups(var_names: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Masks of mitochondrial (``MT-``, any case) and ribosomal protein (``RPS``/``RPL``) genes."""
    names = pd.Index(var_names).astype(str).str.upper()
    return np.asarray(names.str.startswith("MT-")), np.asarray(names.str.startswith(("RPS", "RPL")))


def cell_metrics(counts: sp.csr_matrix, mito: np.ndarray, ribo: np.ndarray, index=None) -> pd.DataFrame:
    """scanpy's per-cell QC metrics for a block of cells (they depend on each cell's row only).

    The same numbers as ``scanpy.pp.calculate_qc_metrics`` (explicit zeros dropped in place, as it does;
    the tests compare the two exactly) without its per-gene metrics, which QC does not use. Sums are
    exact: counts are integers (QC refuses anything else).
    """
    counts.eliminate_zeros()
    n_cells = counts.shape[0]
    # float32 sums of integer counts are exact (below 2**24 per cell), whatever the order of the additions
    totals = counts @ np.ones(counts.shape[1], dtype=np.float32)
    metrics = pd.DataFrame({"n_genes_by_counts": np.diff(counts.indptr).astype(np.int32), "total_counts": totals},
                           index=index if index is not None else pd.RangeIndex(n_cells).astype(str))
    with np.errstate(invalid="ignore", divide="ignore"):
        for column, genes in (("pct_counts_mt", mito), ("pct_counts_ribo", ribo)):
            in_group = counts @ np.asarray(genes, dtype=np.float32)
            metrics[column] = np.nan_to_num(in_group / totals * np.float32(100), nan=0.0).astype(np.float32)
    return metrics


def first_failed_cell_filter(metrics: pd.DataFrame, params: QcParams) -> np.ndarray:
    """Per cell, the name of the first cell filter it fails ("" when it passes them all)."""
    failed = np.full(len(metrics), "", dtype=object)
    checks = {
        "min_genes": lambda m, t: m["n_genes_by_counts"].to_numpy() < t,
        "min_counts": lambda m, t: m["total_counts"].to_numpy() < t,
        "max_counts": lambda m, t: m["total_counts"].to_numpy() > t,
        "max_pct_mito": lambda m, t: m["pct_counts_mt"].to_numpy() > t,
    }
    for name in CELL_FILTERS:
        threshold = params.threshold(name)
        if threshold is None:
            continue
        fails = checks[name](metrics, threshold) & (failed == "")
        failed[fails] = name
    return failed


def detect_doublets(counts: sp.csr_matrix, seed: int, path=None) -> tuple[np.ndarray, np.ndarray]:
    """scrublet doublet scores and calls for a block of cells (raw counts).

    scrublet's automatic threshold needs scikit-image; instead the cut is Otsu's threshold on the
    scores of the simulated doublets, which are bimodal (embedded doublets vs neotypic ones).
    """
    import scanpy as sc

    n_cells, n_genes = counts.shape
    if n_cells < 30:
        raise ScfmError(f"doublet detection needs at least 30 cells, {n_cells} passed the filters before it", path)
    block = ad.AnnData(X=counts.copy())
    with np.errstate(invalid="ignore", divide="ignore"):
        sc.pp.scrublet(block, n_prin_comps=min(30, n_cells - 1, n_genes - 1), threshold=1.0,
                       random_state=seed, verbose=False)
    scores = block.obs["doublet_score"].to_numpy(np.float32)
    threshold = otsu_threshold(np.asarray(block.uns["scrublet"]["doublet_scores_sim"], dtype=np.float64))
    return scores, scores > threshold


def otsu_threshold(values: np.ndarray, bins: int = 100) -> float:
    """The cut maximising the between-class variance of a 1-D distribution (Otsu 1979)."""
    counts, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)[:-1]
    weight_high = counts.sum() - weight_low
    mean_low = np.cumsum(counts * centers)[:-1] / np.maximum(weight_low, 1)
    mean_high = (np.sum(counts * centers) - np.cumsum(counts * centers)[:-1]) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    # cuts inside an empty gap score the same: take the middle of the gap, not its lower edge
    best = np.flatnonzero(between == between.max())
    return float((edges[1:-1][best[0]] + edges[1:-1][best[-1]]) / 2)


# --------------------------------------------------------------------------------------------- summary


def build_summary(
    *,
    sample_of_cell: np.ndarray,
    removed_by: np.ndarray,
    n_genes_in: int,
    genes_removed: int,
    params: QcParams,
) -> dict:
    """Cells/genes in and out per filter, overall and per sample, from each cell's removing filter."""
    n_cells = len(removed_by)
    filters = {}
    cells, genes = n_cells, n_genes_in
    for name in params.active():
        if name == "min_cells":
            removed_cells, removed_genes = 0, genes_removed
        else:
            removed_cells, removed_genes = int(np.sum(removed_by == name)), 0
        filters[name] = {
            "axis": "genes" if name == "min_cells" else "cells",
            "threshold": params.threshold(name),
            "cells_in": cells,
            "cells_out": cells - removed_cells,
            "genes_in": genes,
            "genes_out": genes - removed_genes,
            "removed": removed_cells + removed_genes,
        }
        cells, genes = cells - removed_cells, genes - removed_genes
    per_sample = {}
    for sample in pd.unique(sample_of_cell):
        mine = removed_by[sample_of_cell == sample]
        per_sample[str(sample)] = {
            "cells_in": int(len(mine)),
            "cells_out": int(np.sum(mine == "")),
            "removed": {name: int(np.sum(mine == name)) for name in params.active() if name != "min_cells"},
        }
    return {
        "filter_order": params.active(),
        "filters": filters,
        "cells_in": n_cells,
        "cells_out": cells,
        "genes_in": n_genes_in,
        "genes_out": genes,
        "per_sample": per_sample,
    }


def _refuse_empty(filters: dict, path: Path) -> None:
    for name, step in filters.items():
        if step["cells_out"] == 0 or step["genes_out"] == 0:
            what = "cells" if step["cells_out"] == 0 else "genes"
            raise ScfmError(
                f"QC filter '{name}' (threshold {step['threshold']}) removed all remaining {what} "
                f"({step[what + '_in']}); nothing to write — loosen it",
                path,
            )


def _distribution(metrics: pd.DataFrame) -> dict:
    return {
        column: {"median": float(np.median(metrics[column])), "mean": float(np.mean(metrics[column]))}
        for column in METRIC_COLUMNS
    } if len(metrics) else {}


def summary_metrics(summary: dict) -> dict[str, float]:
    """Flat numbers of a QC summary, for MLflow."""
    numbers = {f"qc.{key}": summary[key] for key in ("cells_in", "cells_out", "genes_in", "genes_out")}
    for name, step in summary["filters"].items():
        numbers[f"qc.removed.{name}"] = step["removed"]
    for column, stats in summary.get("after", {}).items():
        numbers[f"qc.median_after.{column}"] = stats["median"]
    if "doublet_rate" in summary:
        numbers["qc.doublet_rate"] = summary["doublet_rate"]
    return numbers


def _uns_safe(value):
    """anndata cannot store None in uns: drop those keys (the JSON summary keeps them)."""
    if isinstance(value, dict):
        return {str(k): _uns_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- plots


def write_plots(before: pd.DataFrame, after: pd.DataFrame, params: QcParams, sample: str, directory: Path) -> dict:
    """Violin and histogram PNGs of the QC metrics before/after filtering → {kind: written path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = {
        "n_genes_by_counts": [params.min_genes],
        "total_counts": [params.min_counts, params.max_counts],
        "pct_counts_mt": [params.max_pct_mito],
    }
    written = {}
    for kind in ("violin", "hist"):
        fig, axes = plt.subplots(1, len(_PLOTTED), figsize=(4.2 * len(_PLOTTED), 3.6))
        for ax, (column, label) in zip(axes, _PLOTTED):
            values = [before[column].to_numpy(float), after[column].to_numpy(float)]
            if kind == "violin":
                # a kernel density needs spread: constant values (e.g. no mitochondrial genes) get a line
                spread = [i for i, v in enumerate(values) if np.ptp(v) > 0]
                if spread:
                    ax.violinplot([values[i] for i in spread], positions=[i + 1 for i in spread], showmedians=True)
                for i in set(range(2)) - set(spread):
                    ax.hlines(values[i][0], i + 0.8, i + 1.2, color="tab:blue")
                ax.set_xticks([1, 2], [f"before\n(n={len(before)})", f"after\n(n={len(after)})"])
                ax.set_ylabel(label)
                for t in thresholds[column]:
                    if t is not None:
                        ax.axhline(t, color="crimson", lw=0.8, ls="--")
            else:
                shown = [t for t in thresholds[column] if t is not None]
                bins = np.histogram_bin_edges(np.concatenate([values[0], shown]), bins=50)
                ax.hist(values[0], bins=bins, color="0.7", label="before")
                ax.hist(values[1], bins=bins, color="tab:blue", alpha=0.7, label="after")
                ax.set_xlabel(label)
                ax.set_ylabel("cells")
                for t in thresholds[column]:
                    if t is not None:
                        ax.axvline(t, color="crimson", lw=0.8, ls="--")
                ax.legend(frameon=False, fontsize=8)
        fig.suptitle(f"QC {sample}")
        fig.tight_layout()
        target = directory / f"{sample}.qc_{kind}.png"
        with atomic_output(target) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        written[kind] = target
    return written


# --------------------------------------------------------------------------------------------- run


def default_summary_path(output: str | os.PathLike) -> Path:
    """``x.qc.h5ad`` / ``x.h5ad`` → ``x.qc.json``."""
    output = Path(output)
    stem = output.name[: -len(".h5ad")] if output.name.endswith(".h5ad") else output.name
    stem = stem[: -len(".qc")] if stem.endswith(".qc") else stem
    return output.with_name(f"{stem}.qc.json")


def run_qc(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    sample: str | None = None,
    batch: str | None = None,
    condition: str | None = None,
    layer: str | None = None,
    transpose: bool = False,
    min_genes: int | None = 200,
    min_cells: int | None = 3,
    max_pct_mito: float | None = 20.0,
    max_counts: float | None = None,
    min_counts: float | None = None,
    doublets: bool = False,
    summary: str | os.PathLike | None = None,
    plots_dir: str | os.PathLike | None = None,
    seed: int = 0,
    quiet: bool = False,
    chunk_size: int | None = None,
) -> dict:
    """QC one input and write the passing cells to ``output`` (.h5ad); return the summary.

    ``sample`` (default: the input's ``obs['sample']`` when present, else its file name) prefixes barcodes.
    ``chunk_size`` streams ``.h5ad`` inputs in blocks of that many cells; ``None`` streams only files larger
    than 1 GiB. The JSON summary goes to ``summary`` and PNG plots to ``plots_dir`` when given; every output
    is written atomically, so a failure leaves none of them behind.
    """
    input, output = Path(input), Path(output)
    params = QcParams(min_genes, min_counts, max_counts, max_pct_mito, min_cells, doublets, seed)
    fmt = io.input_format(input)
    streamed = fmt == "h5ad" and (
        chunk_size is not None or (input.is_file() and input.stat().st_size > STREAM_ABOVE_BYTES)
    )
    labels = {"sample": sample, "batch": batch, "condition": condition}
    run = _run_streamed if streamed else _run_in_memory
    with contextlib.ExitStack() as outputs:
        # every output is opened here and renamed into place only when all of them are complete
        h5ad_tmp = outputs.enter_context(atomic_output(output))
        result, before, after = run(input, h5ad_tmp, params, labels, layer, transpose,
                                    chunk_size or DEFAULT_CHUNK_SIZE, quiet)
        result.update(
            input=str(input.resolve()),
            output=str(output.resolve()),
            streamed=streamed,
            params={**asdict(params), "chunk_size": chunk_size if streamed else None, "layer": layer},
            before=_distribution(before),
            after=_distribution(after),
        )
        if plots_dir is not None:
            directory = Path(plots_dir)
            directory.mkdir(parents=True, exist_ok=True)
            name = result["sample"]
            for kind in ("violin", "hist"):
                outputs.enter_context(_keep_unless_failed(directory / f"{name}.qc_{kind}.png"))
            result["plots"] = {k: str(p.resolve()) for k, p in write_plots(before, after, params, name,
                                                                              directory).items()}
        if summary is not None:
            result["summary_path"] = str(Path(summary).resolve())
            summary_tmp = outputs.enter_context(atomic_output(summary))
            summary_tmp.write_text(json.dumps(result, indent=2) + "\n")
        _write_summary_into_h5ad(h5ad_tmp, result)
    return result


@contextlib.contextmanager
def _keep_unless_failed(path: Path) -> Iterator[None]:
    """Remove ``path`` if the surrounding QC run fails after it was written."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _sample_labels(obs: pd.DataFrame, input: Path, labels: dict) -> tuple[str, bool]:
    """→ (sample id, whether barcodes need the prefix)."""
    if labels["sample"] is not None:
        return labels["sample"], True
    if "sample" in obs and obs["sample"].nunique() >= 1:
        values = pd.unique(obs["sample"].astype(str))
        return (values[0] if len(values) == 1 else "+".join(values[:3])), False
    return io.sample_name(input), True


def _label_obs(obs: pd.DataFrame, sample: str, prefix: bool, labels: dict) -> pd.DataFrame:
    obs = obs.copy()
    if prefix:
        obs.index = pd.Index([f"{sample}_{b}" for b in obs.index])
        obs["sample"] = sample
    if labels["batch"] is not None or "batch" not in obs:
        obs["batch"] = labels["batch"] if labels["batch"] is not None else obs["sample"].astype(str)
    if labels["condition"] is not None:
        obs["condition"] = labels["condition"]
    return obs


def _run_in_memory(input, h5ad_tmp, params, labels, layer, transpose, chunk_size, quiet):
    read = io.read_input(input, layer=layer, transpose=transpose, require_counts=True)
    adata = read.adata
    sample, prefix = _sample_labels(adata.obs, input, labels)
    adata.obs = _label_obs(adata.obs, sample, prefix, labels)
    mito, ribo = gene_groups(adata.var_names)
    metrics = cell_metrics(adata.X, mito, ribo, index=adata.obs_names)
    for column in METRIC_COLUMNS:
        adata.obs[column] = metrics[column]
    removed_by = first_failed_cell_filter(metrics, params)
    kept_cells = removed_by == ""
    n_cells_per_gene = np.bincount(adata.X[kept_cells].indices, minlength=adata.n_vars)
    kept_genes = _gene_mask(n_cells_per_gene, params)
    _refuse_empty(_summary_so_far(adata.obs["sample"], removed_by, adata.n_vars, kept_genes, params), input)
    adata.var["n_cells_by_counts"] = n_cells_per_gene.astype(np.int32)
    adata.var["mt"], adata.var["ribo"] = mito, ribo
    passed = adata[kept_cells, kept_genes].copy()
    if params.doublets:
        scores, calls = detect_doublets(passed.X, params.seed, input)
        passed.obs["doublet_score"], passed.obs["predicted_doublet"] = scores, calls
        removed_by[np.flatnonzero(kept_cells)[calls]] = "doublets"
        passed = passed[~calls].copy()
    summary = build_summary(sample_of_cell=adata.obs["sample"].astype(str).to_numpy(), removed_by=removed_by,
                            n_genes_in=adata.n_vars, genes_removed=int(np.sum(~kept_genes)), params=params)
    _refuse_empty(summary["filters"], input)
    summary.update(sample=sample, counts_source=read.counts_source)
    if params.doublets:
        summary["doublet_rate"] = float(np.mean(removed_by[kept_cells] == "doublets"))
    passed.X = sp.csr_matrix(passed.X, dtype=np.float32)
    passed.write_h5ad(h5ad_tmp)
    return summary, metrics, passed.obs[list(METRIC_COLUMNS)]


def _gene_mask(n_cells_per_gene: np.ndarray, params: QcParams) -> np.ndarray:
    if params.min_cells is None:
        return np.ones(len(n_cells_per_gene), dtype=bool)
    return n_cells_per_gene >= params.min_cells


def _summary_so_far(samples, removed_by, n_genes, kept_genes, params):
    """Filter counts before doublet calling, to refuse an empty result as early as possible."""
    return build_summary(sample_of_cell=np.asarray(samples).astype(str), removed_by=removed_by, n_genes_in=n_genes,
                         genes_removed=int(np.sum(~kept_genes)),
                         params=QcParams(**{**asdict(params), "doublets": False}))["filters"]


def _run_streamed(input, h5ad_tmp, params, labels, layer, transpose, chunk_size, quiet):
    if transpose:
        raise ScfmError("transpose applies to csv/tsv inputs only", input)
    info = io.inspect_h5ad(input, layer=layer)
    with tempfile.TemporaryDirectory(dir=Path(h5ad_tmp).parent, prefix=".scfm-qc-") as scratch:
        passed_cells = Path(scratch) / "passed_cells.h5"
        first = _stream_cell_filters(input, passed_cells, info, params, layer, chunk_size, quiet)
        return _stream_gene_filter(input, passed_cells, h5ad_tmp, first, info, params, labels, chunk_size, quiet)


@dataclass
class _FirstPass:
    obs: pd.DataFrame  # every input cell
    metrics: pd.DataFrame
    removed_by: np.ndarray
    n_cells_per_gene: np.ndarray  # over the cells that pass the cell filters
    var: pd.DataFrame
    mito: np.ndarray
    ribo: np.ndarray


def _stream_cell_filters(input, passed_cells: Path, info, params, layer, chunk_size, quiet) -> _FirstPass:
    """Pass 1 over the input: per-cell metrics, cell filters, gene detection; passing cells (all genes) to disk."""
    metric_blocks, removed_blocks, obs_blocks = [], [], []
    n_cells_per_gene = np.zeros(info.n_vars, dtype=np.int64)
    mito = ribo = None
    writer = _CsrWriter(passed_cells, n_cols=info.n_vars)
    bar = progress(total=info.n_obs, desc=f"QC metrics {input.name}", unit="cells", quiet=quiet)
    with bar, contextlib.closing(writer):
        for obs, block, var in io.iter_chunks(input, chunk_size, layer=layer, require_counts=True):
            if mito is None:  # every block has the same genes
                mito, ribo = gene_groups(var.index)
            metrics = cell_metrics(block, mito, ribo, index=obs.index)
            removed = first_failed_cell_filter(metrics, params)
            passed = block if (removed == "").all() else block[removed == ""]
            n_cells_per_gene += np.bincount(passed.indices, minlength=info.n_vars)
            writer.append(passed)
            metric_blocks.append(metrics)
            removed_blocks.append(removed)
            obs_blocks.append(obs)
            bar.update(block.shape[0])
    return _FirstPass(obs=pd.concat(obs_blocks), metrics=pd.concat(metric_blocks),
                      removed_by=np.concatenate(removed_blocks), n_cells_per_gene=n_cells_per_gene,
                      var=var, mito=mito, ribo=ribo)


def _stream_gene_filter(input, passed_cells: Path, h5ad_tmp, first: _FirstPass, info, params, labels, chunk_size,
                        quiet):
    """Pass 2, over the cells that passed only: drop rare genes, call doublets, write the output."""
    sample, prefix = _sample_labels(first.obs, input, labels)
    obs_all = _label_obs(first.obs, sample, prefix, labels)
    metrics_all = first.metrics
    metrics_all.index = obs_all.index
    removed_by = first.removed_by
    kept_genes = _gene_mask(first.n_cells_per_gene, params)
    _refuse_empty(_summary_so_far(obs_all["sample"], removed_by, info.n_vars, kept_genes, params), input)
    var_out = first.var[kept_genes].copy()
    var_out["n_cells_by_counts"] = first.n_cells_per_gene[kept_genes].astype(np.int32)
    var_out["mt"], var_out["ribo"] = first.mito[kept_genes], first.ribo[kept_genes]
    passed_rows = np.flatnonzero(removed_by == "")
    passed_obs = obs_all.iloc[passed_rows].copy()
    for column in METRIC_COLUMNS:
        passed_obs[column] = metrics_all[column].to_numpy()[passed_rows]

    if kept_genes.all() and not params.doublets:
        # nothing left to drop: the passing cells on disk already are the output matrix
        os.replace(passed_cells, h5ad_tmp)
        writer = _CsrWriter.reopen(h5ad_tmp)
        kept_obs = [passed_obs]
    else:
        writer = _CsrWriter(h5ad_tmp, n_cols=int(kept_genes.sum()))
        with _closing_on_error(writer):
            kept_obs = _write_kept_genes(input, passed_cells, writer, passed_obs, obs_all, removed_by, kept_genes,
                                         params, chunk_size, quiet)
    with contextlib.closing(writer):
        summary = build_summary(sample_of_cell=obs_all["sample"].astype(str).to_numpy(), removed_by=removed_by,
                                n_genes_in=info.n_vars, genes_removed=int(np.sum(~kept_genes)), params=params)
        _refuse_empty(summary["filters"], input)
        summary.update(sample=sample, counts_source=info.counts_source)
        passed_obs = pd.concat(kept_obs)
        if params.doublets:
            n_tested = int(np.sum(np.isin(removed_by, ["", "doublets"])))
            summary["doublet_rate"] = float(np.sum(removed_by == "doublets") / max(1, n_tested))
        writer.finish(obs=passed_obs, var=var_out)
    return summary, metrics_all, passed_obs[list(METRIC_COLUMNS)]


@contextlib.contextmanager
def _closing_on_error(writer):
    try:
        yield
    except BaseException:
        writer.close()
        raise


def _write_kept_genes(input, passed_cells, writer, passed_obs, obs_all, removed_by, kept_genes, params, chunk_size,
                      quiet) -> list[pd.DataFrame]:
    """Read the passing cells back, keep the genes that passed, call doublets; → obs of the cells written."""
    flush_size = max(chunk_size, DOUBLET_MIN_CELLS)  # scrublet runs on buffers of >= flush_size kept cells
    kept_obs, pending_obs, pending_rows = [], [], []

    def flush(final: bool) -> None:
        nonlocal pending_obs, pending_rows
        while pending_rows and (final or sum(r.shape[0] for r in pending_rows) >= 2 * flush_size):
            rows = sp.vstack(pending_rows, format="csr")
            obs = pd.concat(pending_obs)
            take = rows.shape[0] if final else flush_size
            rows_now, obs_now = rows[:take], obs.iloc[:take].copy()
            pending_rows = [rows[take:]] if take < rows.shape[0] else []
            pending_obs = [obs.iloc[take:]] if take < rows.shape[0] else []
            scores, calls = detect_doublets(rows_now, params.seed, input)
            obs_now["doublet_score"], obs_now["predicted_doublet"] = scores, calls
            removed_by[obs_all.index.get_indexer(obs_now.index[calls])] = "doublets"
            writer.append(rows_now[~calls])
            kept_obs.append(obs_now[~calls])

    bar = progress(total=len(passed_obs), desc=f"QC genes {input.name}", unit="cells", quiet=quiet)
    with bar:
        offset = 0
        for block in _read_csr_blocks(passed_cells, chunk_size):
            rows, obs = _keep_columns(block, kept_genes), passed_obs.iloc[offset:offset + block.shape[0]]
            if params.doublets:
                pending_rows.append(rows)
                pending_obs.append(obs)
                flush(final=False)
            else:
                writer.append(rows)
                kept_obs.append(obs)
            offset += block.shape[0]
            bar.update(block.shape[0])
        flush(final=True)
    return kept_obs


def _read_csr_blocks(path: Path, chunk_size: int) -> Iterator[sp.csr_matrix]:
    """Row blocks of a matrix that :class:`_CsrWriter` wrote (already checked counts: no validation again)."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f["X"]
        indptr = group["indptr"][:]
        n_rows, n_cols = len(indptr) - 1, int(group.attrs["n_cols"])
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            lo, hi = int(indptr[start]), int(indptr[stop])
            yield sp.csr_matrix((group["data"][lo:hi], group["indices"][lo:hi], indptr[start:stop + 1] - lo),
                                shape=(stop - start, n_cols))


def _keep_columns(block: sp.csr_matrix, kept: np.ndarray) -> sp.csr_matrix:
    """``block[:, kept]`` for a boolean mask, in one vectorised pass (column order and sortedness kept)."""
    if kept.all():
        return block
    new_index = np.cumsum(kept, dtype=np.int64) - 1
    keep = kept[block.indices]
    indptr = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[block.indptr]
    return sp.csr_matrix((block.data[keep], new_index[block.indices[keep]].astype(np.int32), indptr),
                         shape=(block.shape[0], int(kept.sum())))


class _CsrWriter:
    """Append CSR row blocks to an ``.h5ad`` on disk; obs/var/uns are written at the end."""

    def __init__(self, path: Path, n_cols: int):
        import h5py

        self.file = h5py.File(path, "w")
        self.n_cols, self.n_rows, self.nnz = n_cols, 0, 0
        group = self.file.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        opts = dict(maxshape=(None,), chunks=(1 << 18,))  # uncompressed, like write_h5ad
        self.data = group.create_dataset("data", shape=(0,), dtype=np.float32, **opts)
        self.indices = group.create_dataset("indices", shape=(0,), dtype=np.int32, **opts)
        self.indptr = group.create_dataset("indptr", shape=(1,), dtype=np.int64, data=[0], **opts)
        group.attrs["n_cols"] = n_cols  # read back by _read_csr_blocks before finish() sets the shape
        self.group = group

    @classmethod
    def reopen(cls, path: Path) -> "_CsrWriter":
        """A writer on a matrix written earlier (e.g. moved into place), to finish it."""
        import h5py

        writer = cls.__new__(cls)
        writer.file = h5py.File(path, "r+")
        writer.group = writer.file["X"]
        writer.data, writer.indices, writer.indptr = (writer.group[k] for k in ("data", "indices", "indptr"))
        writer.n_cols = int(writer.group.attrs["n_cols"])
        writer.n_rows, writer.nnz = len(writer.indptr) - 1, len(writer.data)
        return writer

    def append(self, rows: sp.csr_matrix) -> None:
        rows = sp.csr_matrix(rows, dtype=np.float32)
        rows.sort_indices()
        n, nnz = rows.shape[0], rows.nnz
        self.data.resize((self.nnz + nnz,))
        self.data[self.nnz:] = rows.data
        self.indices.resize((self.nnz + nnz,))
        self.indices[self.nnz:] = rows.indices
        self.indptr.resize((self.n_rows + n + 1,))
        self.indptr[self.n_rows + 1:] = rows.indptr[1:] + self.nnz
        self.n_rows, self.nnz = self.n_rows + n, self.nnz + nnz

    def finish(self, obs: pd.DataFrame, var: pd.DataFrame) -> None:
        from anndata.io import write_elem

        self.group.attrs["shape"] = (self.n_rows, self.n_cols)
        self.file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(self.file, "obs", obs)
        write_elem(self.file, "var", var)
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(self.file, name, {})

    def close(self) -> None:
        self.file.close()


def _write_summary_into_h5ad(path: Path, summary: dict) -> None:
    import h5py
    from anndata.io import read_elem, write_elem

    with h5py.File(path, "a") as f:
        uns = read_elem(f["uns"]) if "uns" in f else {}
        scfm = dict(uns.get("scfm", {}))
        scfm["qc"] = _uns_safe(summary)
        uns["scfm"] = scfm
        if "uns" in f:
            del f["uns"]
        write_elem(f, "uns", uns)
