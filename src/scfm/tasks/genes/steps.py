"""What ``scfm genes modules`` and ``scfm genes network`` run: files in, checked, files out.

    summary = gene_modules_file("pbmc.embedded.h5ad", "pbmc.genes/", checkpoint="run/model", groupby="cell_type")
    summary = gene_network_file("pbmc.genes/gene_embeddings.h5ad", "edges.tsv", tf_list="tfs.txt")

Everything that can be checked without the model (input, grouping, GO database and gene mapping, TF list) is
checked before the model runs, so bad input fails early with one line and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import ScfmError, ScfmUsageError
from scfm.tasks.genes import embeddings as E
from scfm.tasks.genes import modules as M

BASELINE_MAX_CELLS = 5000  # cells behind the PCA-loading baseline (a dense cells x genes matrix)
MIN_GO_MAPPED_FRACTION = 0.25
BASELINES = ("pca", "none")
SCORE_PREFIX = "gene_module_"
GENES_UNS_KEY = "genes"


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class CellsInput:
    """An h5ad of cells in the checkpoint's vocabulary order, opened for streaming."""

    path: Path  # as given by the user (named in errors)
    aligned: Path  # the file the rows come from (the input, or an aligned copy in scratch)
    obs: pd.DataFrame
    genes: list[str]  # the vocabulary, in column order
    rows: Any  # row-sliceable raw counts (H5adRows), valid while open_cells is open


def _read_obs(path: Path) -> pd.DataFrame:
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as handle:
            return read_elem(handle["obs"])
    except (OSError, KeyError) as exc:
        raise ScfmError(f"cannot read as h5ad ({type(exc).__name__}: {exc})", path) from exc


@contextlib.contextmanager
def open_cells(path, vocab, scratch: Path, *, quiet: bool = True):
    """Yield a :class:`CellsInput`; an input not yet in vocabulary order is aligned into ``scratch`` first."""
    import h5py

    from scfm.data.align import align_file
    from scfm.tasks.embed import H5adRows, _is_aligned

    path = Path(path)
    if not path.exists():
        raise ScfmError("input not found", path)
    if path.suffix.lower() != ".h5ad":
        raise ScfmError("expected an .h5ad of cells (run scfm qc / scfm align first)", path)
    aligned = path
    if not _is_aligned(path, vocab):
        aligned = scratch / "aligned.h5ad"
        align_file(path, vocab, out_h5ad=aligned, quiet=quiet)
    obs = _read_obs(aligned)
    with h5py.File(aligned, "r") as handle:
        yield CellsInput(path, aligned, obs, list(vocab.genes), H5adRows(handle["X"], path))


def group_codes(obs: pd.DataFrame, groupby: str | None, path, *, min_group_cells: int) -> tuple[np.ndarray, list[str]]:
    """(code per cell, -1 where the value is missing; group names). Unknown column or a small group: ScfmError."""
    if groupby is None:
        return np.full(len(obs), -1, dtype=np.int64), []
    if groupby not in obs.columns:
        columns = ", ".join(map(str, obs.columns[:20]))
        raise ScfmError(f"--groupby '{groupby}' is not an obs column (columns: {columns})", path)
    values = obs[groupby]
    known = values.notna().to_numpy()
    names = sorted(map(str, pd.unique(values[known].astype(str))))
    if not names:
        raise ScfmError(f"--groupby '{groupby}': no cell has a value", path)
    index = {name: code for code, name in enumerate(names)}
    codes = np.full(len(obs), -1, dtype=np.int64)
    codes[known] = values[known].astype(str).map(index).to_numpy()
    sizes = np.bincount(codes[known], minlength=len(names))
    small = [f"{names[i]} ({sizes[i]})" for i in np.flatnonzero(sizes < min_group_cells)]
    if small:
        raise ScfmError(f"--groupby '{groupby}': {len(small)} group(s) have fewer than {min_group_cells} cells "
                        f"(--min-group-cells): {', '.join(small[:10])}", path)
    return codes, names


def go_annotations(genes: list[str], go_dir, path) -> tuple[dict, dict, dict]:
    """(gene -> GO ids, GO id -> name, source versions); ScfmError when too few genes map to GO."""
    from scfm.data import go

    resolved = go.resolve_go_dir(go_dir)
    annotations = go.annotate_genes(genes, resolved)
    if len(annotations) < MIN_GO_MAPPED_FRACTION * len(genes):
        examples = ", ".join(genes[:5])
        raise ScfmError(f"only {len(annotations)} of {len(genes)} genes map to a GO-annotated human gene (symbols or "
                        f"Ensembl ids expected, e.g. {examples}): use human gene symbols, Ensembl ids, or "
                        "--no-enrichment", path)
    return annotations, go.go_term_names(resolved), go.source_versions(resolved)


# --------------------------------------------------------------------------------- gene embeddings
@dataclass
class GeneEmbeddingResult:
    names: list[str]  # the genes kept
    means: E.MeanGeneEmbeddings
    stats: E.GeneStats
    group_names: list[str]
    sampled: np.ndarray  # row indices of the cells averaged over
    precision: dict[str, str]  # the precision the decoder ran in and why (PrecisionChoice.as_params)


@dataclass(frozen=True)
class EmbeddingOptions:
    """Which genes and cells go into the gene embeddings, and how cells go through the model."""

    min_cells: int = 10
    max_cells_per_group: int | None = 2000
    target_depth: str = "t4"
    batch_size: int | None = None
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0


def embed_genes(cells: CellsInput, model, options: EmbeddingOptions, *, codes: np.ndarray, group_names: list[str],
                quiet: bool, stats: E.GeneStats | None = None, restrict: np.ndarray | None = None
                ) -> GeneEmbeddingResult:
    """Gene statistics over all cells, then mean decoder embeddings of the kept genes over sampled cells.

    ``restrict``: a boolean mask of the cells allowed in the average (all by default).
    """
    from scfm.tasks.embed import decide_precision
    from scfm.utils import progress

    if stats is None:
        stats = gene_stats(cells, quiet=quiet)
    genes = E.select_genes(stats, options.min_cells)
    if len(genes) < 3:
        raise ScfmError(f"only {len(genes)} gene(s) are detected in at least {options.min_cells} cells "
                        "(--min-cells)", cells.path)
    eligible = np.ones(len(codes), dtype=bool) if restrict is None else restrict
    sampled = np.flatnonzero(eligible)[E.sample_cells(codes[eligible], options.max_cells_per_group,
                                                      seed=options.seed)]
    chosen = E.RowSubset(cells.rows, sampled)
    choice = decide_precision(model, chosen, options.precision, options.device, output="genes",
                              target_depth=options.target_depth)
    with progress(total=len(sampled), desc="gene embeddings", unit="cells", quiet=quiet) as bar:
        means = E.mean_gene_embeddings(model, chosen, genes, groups=codes[sampled],
                                       n_groups=len(group_names), target_depth=options.target_depth,
                                       batch_size=options.batch_size, device=options.device,
                                       precision=choice.precision, progress=bar)
    names = [cells.genes[g] for g in genes]
    return GeneEmbeddingResult(names, means, stats, group_names, sampled, choice.as_params())


def gene_stats(cells: CellsInput, *, quiet: bool) -> E.GeneStats:
    from scfm.utils import progress

    with progress(total=cells.rows.shape[0], desc="gene statistics", unit="cells", quiet=quiet) as bar:
        return E.gene_statistics(cells.rows, progress=bar)


def write_gene_embeddings(path: Path, result: GeneEmbeddingResult, found: M.Modules | None, uns: dict) -> None:
    """genes x dims h5ad: genes are the observations (obs_names), the embedding dimensions the variables."""
    import anndata as ad

    genes = result.means.genes
    obs = pd.DataFrame({
        "vocab_index": genes.astype(np.int64),
        "n_cells_detected": result.stats.n_cells_detected[genes].astype(np.int64),
        "mean_expression": result.stats.mean_expression[genes].astype(np.float64),
    }, index=pd.Index(result.names, name="gene"))
    if found is not None:
        obs["module"] = found.labels
        obs["hub_score"] = found.hub_scores
    adata = ad.AnnData(X=result.means.overall, obs=obs)
    adata.var_names = [f"dim_{i}" for i in range(adata.n_vars)]
    # group names may hold "/" (a path separator in HDF5), so they are values, never keys
    groups = {"name": list(result.group_names), "layer": [], "n_cells": []}
    for code in range(len(result.group_names)):
        key = f"group_{code}"
        adata.layers[key] = result.means.per_group[code]
        groups["layer"].append(key)
        groups["n_cells"].append(int(result.means.n_cells_per_group[code]))
    if found is not None:
        adata.obsp["connectivities"] = found.graph
        if found.umap is not None:
            adata.obsm["X_umap"] = found.umap
    adata.uns["scfm"] = {GENES_UNS_KEY: {**uns, "groups": groups}}
    adata.write_h5ad(path)


# ----------------------------------------------------------------------------------------- modules
def module_table(result: GeneEmbeddingResult, found: M.Modules) -> pd.DataFrame:
    rank = np.zeros(len(result.names), dtype=np.int64)
    for genes in found.members().values():
        rank[genes] = np.arange(1, len(genes) + 1)
    sizes = pd.Series(found.labels).map(pd.Series(found.labels).value_counts()).to_numpy()
    genes = result.means.genes
    table = pd.DataFrame({
        "gene": result.names, "module": found.labels, "module_size": np.where(found.labels >= 0, sizes, 0),
        "hub_rank": rank, "hub_score": found.hub_scores.round(6),
        "n_cells_detected": result.stats.n_cells_detected[genes],
        "mean_expression": result.stats.mean_expression[genes].round(6),
    })
    assigned = table["module"] >= 0
    return pd.concat([table[assigned].sort_values(["module", "hub_rank"]),
                      table[~assigned].sort_values("gene")], ignore_index=True)


def score_cells(cells: CellsInput, result: GeneEmbeddingResult, found: M.Modules, *, seed: int,
                quiet: bool) -> pd.DataFrame:
    """cells x modules scores (scanpy-style, controls from the tested genes), streamed over every cell."""
    from scfm.utils import progress

    members = found.members()
    pool_means = result.stats.mean_expression[result.means.genes]
    controls = M.control_genes(pool_means, members, rng=np.random.default_rng(seed))
    # the weights live on the tested genes; lift them to vocabulary positions for the streamed product
    lift = np.asarray(result.means.genes)
    local = M.score_weights(members, controls, len(lift)).tocoo()
    weights = sp.csr_matrix((local.data, (lift[local.row], local.col)), shape=(cells.rows.shape[1], local.shape[1]))
    with progress(total=cells.rows.shape[0], desc="module scores", unit="cells", quiet=quiet) as bar:
        scores = M.module_scores(cells.rows, weights, progress=bar)
    columns = [f"{SCORE_PREFIX}{m}" for m in members]
    return pd.DataFrame(scores, index=cells.obs.index.astype(str), columns=columns)


def scores_by_group(scores: pd.DataFrame, codes: np.ndarray, group_names: list[str]) -> pd.DataFrame:
    """groups x modules mean score (cells without a group left out)."""
    known = codes >= 0
    frame = scores[known].copy()
    frame.index = pd.Index(np.asarray(group_names, dtype=object)[codes[known]], name="group")
    return frame.groupby(level=0, sort=True).mean()


def write_cells(source: Path, target: Path, scores: pd.DataFrame) -> None:
    """A copy of the input h5ad whose obs gains one score column per module."""
    import h5py
    from anndata.io import read_elem, write_elem

    shutil.copyfile(source, target)
    with h5py.File(target, "r+") as handle:
        obs = read_elem(handle["obs"])
        stale = [c for c in obs.columns if str(c).startswith(SCORE_PREFIX)]
        obs = obs.drop(columns=stale)
        for column in scores.columns:
            obs[column] = scores[column].to_numpy()
        del handle["obs"]
        write_elem(handle, "obs", obs)


def baseline_embeddings(cells: CellsInput, result: GeneEmbeddingResult, *, seed: int) -> np.ndarray:
    """PCA-loading gene embeddings from the log1p CP10k expression of (at most 5,000 of) the sampled cells."""
    rng = np.random.default_rng(seed)
    chosen = result.sampled
    if len(chosen) > BASELINE_MAX_CELLS:
        chosen = np.sort(rng.choice(chosen, size=BASELINE_MAX_CELLS, replace=False))
    block = E.log_normalised(E.RowSubset(cells.rows, chosen)[0 : len(chosen)])
    return M.pca_gene_embeddings(block[:, result.means.genes].toarray(), seed=seed)


def enrichment_for(found: M.Modules, names: list[str], annotations, term_names, *, alpha: float):
    from scfm.tasks.genes.enrichment import enrich_modules, enrichment_summary

    modules = {str(m): [names[g] for g in genes] for m, genes in found.members().items()}
    table = enrich_modules(modules, names, annotations, term_names)
    return table, enrichment_summary(table, list(modules), alpha=alpha)


def gene_modules_file(
    input_path,
    output_dir,
    *,
    checkpoint,
    version: str = "ce",
    vocab=None,
    groupby: str | None = None,
    min_cells: int = 10,
    max_cells_per_group: int | None = 2000,
    min_group_cells: int = 5,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    min_module_size: int = 5,
    enrichment: bool = True,
    go_dir=None,
    alpha: float = 0.05,
    baseline: str = "pca",
    target_depth: str = "t4",
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Gene embeddings -> modules -> per-cell scores, GO enrichment, plots and an HTML section in OUTPUT_DIR."""
    from scfm.model.checkpoint import load_checkpoint
    from scfm.report import genes as report
    from scfm.tasks.embed import checkpoint_sha256
    from scfm.utils import atomic_output

    if baseline not in BASELINES:
        raise ScfmUsageError(f"unknown baseline {baseline!r} (choose from {', '.join(BASELINES)})")
    input_path, output_dir = Path(input_path), Path(output_dir)
    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint, version=version, vocab=vocab)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(output_dir) as out, \
            tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=".scfm-genes-") as scratch, \
            open_cells(input_path, loaded.vocab, Path(scratch), quiet=quiet) as cells:
        codes, group_names = group_codes(cells.obs, groupby, input_path, min_group_cells=min_group_cells)
        stats = gene_stats(cells, quiet=quiet)
        tested = [cells.genes[g] for g in E.select_genes(stats, min_cells)]
        go = go_annotations(tested, go_dir, input_path) if enrichment else None

        options = EmbeddingOptions(min_cells, max_cells_per_group, target_depth, batch_size, device, precision, seed)
        result = embed_genes(cells, loaded.model, options, codes=codes, group_names=group_names, quiet=quiet,
                             stats=stats)
        found = M.find_modules(result.means.overall, n_neighbors=n_neighbors, resolution=resolution,
                               min_module_size=min_module_size, seed=seed, umap=True)
        if not found.module_ids:
            raise ScfmError(f"no module has {min_module_size} or more genes (--min-module-size); "
                            "try a lower --resolution", input_path)
        scores = score_cells(cells, result, found, seed=seed, quiet=quiet)

        summary: dict[str, Any] = {
            "input": str(input_path), "checkpoint": str(checkpoint),
            "checkpoint_sha256": checkpoint_sha256(checkpoint, version), "groupby": groupby,
            "groups": {name: int(n) for name, n in zip(group_names, result.means.n_cells_per_group)},
            "n_cells": int(len(cells.obs)), "n_cells_embedded": int(result.means.n_cells),
            "n_genes_vocabulary": len(cells.genes), "n_genes": len(result.names), "min_cells": min_cells,
            "n_neighbors": found.n_neighbors, "resolution": resolution, "min_module_size": min_module_size,
            "n_modules": len(found.module_ids), "n_genes_unassigned": int((found.labels < 0).sum()),
            "module_sizes": {str(m): int(len(g)) for m, g in found.members().items()},
            "hub_genes": {str(m): [result.names[i] for i in g[:10]] for m, g in found.members().items()},
            "target_depth": target_depth, "seed": seed, "embedding": "decoder gene context, mean over cells",
            **result.precision,
        }
        out.mkdir()
        (out / "plots").mkdir()
        module_table(result, found).to_csv(out / "gene_modules.tsv", sep="\t", index=False)
        scores.to_csv(out / "module_scores.tsv", sep="\t", index_label="cell_id")
        if groupby is not None:
            by_group = scores_by_group(scores, codes, group_names)
            by_group.to_csv(out / "module_scores_by_group.tsv", sep="\t", index_label=groupby)
            (out / "plots" / "module_scores_heatmap.png").write_bytes(report.score_heatmap_png(by_group, groupby))
        (out / "plots" / "gene_umap.png").write_bytes(report.gene_umap_png(found.umap, found.labels))

        if go is not None:
            annotations, term_names, versions = go
            table, summary["enrichment"] = enrichment_for(found, result.names, annotations, term_names, alpha=alpha)
            summary["enrichment"]["n_genes_annotated"] = sum(1 for g in result.names if g in annotations)
            summary["go"] = versions
            table.to_csv(out / "enrichment.tsv", sep="\t", index=False)
            if baseline == "pca":
                pca = M.find_modules(baseline_embeddings(cells, result, seed=seed), n_neighbors=n_neighbors,
                                     resolution=resolution, min_module_size=min_module_size, seed=seed)
                _, pca_summary = enrichment_for(pca, result.names, annotations, term_names, alpha=alpha)
                pca_summary.pop("top_terms")
                summary["baseline"] = {"name": "PCA loadings of log1p CP10k expression (same Leiden procedure)",
                                       **pca_summary}
            (out / "enrichment.json").write_text(json.dumps(
                {k: summary[k] for k in ("enrichment", "baseline", "go") if k in summary}, indent=2))

        summary["seconds"] = time.perf_counter() - started
        write_gene_embeddings(out / "gene_embeddings.h5ad", result, found,
                              {k: v for k, v in summary.items() if k not in ("enrichment", "hub_genes", "groups")})
        write_cells(cells.aligned, out / "cells.h5ad", scores)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (out / "gene_modules.html").write_text(report.standalone_page(out), encoding="utf-8")
    return summary


# ----------------------------------------------------------------------------------------- network
def read_gene_embeddings(path: Path, group: str | None) -> tuple[list[str], np.ndarray, pd.DataFrame]:
    """(gene names, genes x dims, obs) from a ``gene_embeddings.h5ad`` written by ``scfm genes modules``."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    info = adata.uns.get("scfm", {}).get(GENES_UNS_KEY, {})
    if group is None:
        return list(map(str, adata.obs_names)), np.asarray(adata.X, dtype=np.float32), adata.obs
    groups = [str(name) for name in info.get("groups", {}).get("name", [])]
    if group not in groups:
        raise ScfmError(f"--group '{group}' is not a group of this file (groups: {', '.join(groups) or 'none'})", path)
    layer = str(info["groups"]["layer"][groups.index(group)])
    return list(map(str, adata.obs_names)), np.asarray(adata.layers[layer], dtype=np.float32), adata.obs


def is_gene_embeddings(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return f"uns/scfm/{GENES_UNS_KEY}" in handle
    except OSError:
        return False


def gene_network_file(
    input_path,
    output_path,
    *,
    tf_list,
    checkpoint=None,
    version: str = "ce",
    vocab=None,
    groupby: str | None = None,
    group: str | None = None,
    min_cells: int = 10,
    max_cells_per_group: int | None = 2000,
    top_targets: int | None = 100,
    style: str = "arboreto",
    target_depth: str = "t4",
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """TF -> target edges by embedding similarity, from cells (+ checkpoint) or from a gene-embeddings h5ad."""
    from scfm.tasks.genes.network import EDGE_STYLES, edge_table, load_tf_list, match_tfs, tf_target_scores
    from scfm.utils import atomic_output

    input_path, output_path = Path(input_path), Path(output_path)
    if style not in EDGE_STYLES:
        raise ScfmUsageError(f"unknown edge format {style!r} (choose from {', '.join(EDGE_STYLES)})")
    if not input_path.exists():
        raise ScfmError("input not found", input_path)
    tfs = load_tf_list(tf_list)
    started = time.perf_counter()
    if is_gene_embeddings(input_path):
        names, vectors, obs = read_gene_embeddings(input_path, group)
        keep = obs["n_cells_detected"].to_numpy() >= min_cells if "n_cells_detected" in obs else np.ones(len(names), bool)
        names, vectors = [n for n, k in zip(names, keep) if k], vectors[keep]
        present = match_tfs(tfs, names)
        _check_tfs(present, tfs, names, tf_list)
        source = {"gene_embeddings": str(input_path)}
    else:
        if checkpoint is None:
            raise ScfmUsageError("a cells h5ad needs --checkpoint (or give the gene_embeddings.h5ad of "
                                 "`scfm genes modules`)")
        if group is not None and groupby is None:
            raise ScfmUsageError("--group needs --groupby with a cells h5ad")
        options = EmbeddingOptions(min_cells, max_cells_per_group, target_depth, batch_size, device, precision, seed)
        names, vectors, present, precision = _network_embeddings(
            input_path, checkpoint, version, vocab, tfs, tf_list, options, groupby=groupby, group=group, quiet=quiet,
            scratch_dir=Path(output_path).parent)
        source = {"cells": str(input_path), "checkpoint": str(checkpoint), **precision}
    scores = tf_target_scores(vectors, present)
    table = edge_table(names, present, scores, top_targets=top_targets, style=style)
    with atomic_output(output_path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    return {**source, "n_genes": len(names), "n_tfs_listed": len(tfs), "n_tfs": int(len(present)),
            "tfs": [names[i] for i in present], "n_edges": int(len(table)), "format": style, "group": group,
            "top_targets": top_targets, "seconds": time.perf_counter() - started}


def _check_tfs(present: np.ndarray, tfs: list[str], names: list[str], tf_list) -> None:
    if not len(present):
        raise ScfmError(f"none of the {len(tfs)} TFs of {Path(tf_list).name} is among the {len(names)} genes "
                        f"tested (e.g. {', '.join(names[:5])}): wrong species or gene ids, or --min-cells too high?",
                        tf_list)


def _network_embeddings(input_path, checkpoint, version, vocab, tfs, tf_list, options: EmbeddingOptions, *,
                        groupby, group, quiet, scratch_dir: Path):
    from scfm.model.checkpoint import load_checkpoint
    from scfm.tasks.genes.network import match_tfs

    loaded = load_checkpoint(checkpoint, version=version, vocab=vocab)
    # scratch beside the output, as for `genes modules`: the input's folder may not be writable
    scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix=".scfm-genes-") as scratch, \
            open_cells(input_path, loaded.vocab, Path(scratch), quiet=quiet) as cells:
        codes, group_names = group_codes(cells.obs, groupby, input_path, min_group_cells=1)
        restrict = None
        if group is not None:
            if group not in group_names:
                raise ScfmError(f"--group '{group}' is not a value of obs['{groupby}'] "
                                f"(values: {', '.join(group_names[:20])})", input_path)
            restrict = codes == group_names.index(group)
        stats = gene_stats(cells, quiet=quiet)
        names = [cells.genes[g] for g in E.select_genes(stats, options.min_cells)]
        present = match_tfs(tfs, names)
        _check_tfs(present, tfs, names, tf_list)
        result = embed_genes(cells, loaded.model, options, codes=np.full(len(codes), -1), group_names=[],
                             quiet=quiet, stats=stats, restrict=restrict)
    return result.names, result.means.overall, present, result.precision
