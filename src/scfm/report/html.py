"""``scfm report``: one self-contained HTML file (PNG images inlined) plus a metrics JSON.

Sections, always present (with a note saying why when a section has nothing to show):
summary, QC, metrics (scfm vs a PCA baseline on the same cells), UMAPs side by side, Leiden clusters,
annotation (confusion matrix), drug sensitivity (``scfm drug score`` columns, see report/drug.py), training
curves (from linked MLflow runs), parameters and versions.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from string import Template
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from scfm.errors import ScfmError
from scfm.report import metrics as M
from scfm.report import plots
from scfm.report.drug import drug_section

PCA_KEY = "X_pca_baseline"
QC_COLOURS = ("total_counts", "n_genes_by_counts", "pct_counts_mt", "pct_counts_ribo", "doublet_score")
SECTIONS = (
    ("summary", "Summary"),
    ("metrics", "Metrics"),
    ("qc", "QC"),
    ("umap", "UMAP: scfm vs PCA"),
    ("leiden", "Leiden clusters"),
    ("annotation", "Annotation"),
    ("drug", "Drug sensitivity"),
    ("training", "Training curves"),
    ("provenance", "Parameters and versions"),
)
# sections shown only when their input is given (`scfm report --perturbation DIR`)
OPTIONAL_SECTIONS = (("perturbation", "Perturbation response"),)
MIN_CELLS = 3  # and genes: fewer leave no two-component PCA baseline to compare with
VERSIONED_PACKAGES = ("scfm", "torch", "deepspeed", "scanpy", "anndata", "scikit-learn", "numpy", "mlflow")
TRAINING_STEPS = ("pretrain", "finetune")


# ----------------------------------------------------------------------------- inputs


def read_inputs(paths: Sequence[str | os.PathLike], embedding_key: str):
    """Read one or more h5ad files (several are concatenated for a combined report)."""
    import anndata as ad

    from scfm.tasks.annotate import embedding_of

    adatas = []
    for path in paths:
        try:
            adata = ad.read_h5ad(path)
        except Exception as exc:
            raise ScfmError(f"cannot read as h5ad ({type(exc).__name__}: {exc})", path) from exc
        embedding_of(adata, embedding_key, path)  # present, and finite in every cell
        adatas.append(adata)
    if len(adatas) == 1:
        return adatas[0], [dict(adatas[0].uns.get("scfm", {}))]
    dims = {a.obsm[embedding_key].shape[1] for a in adatas}
    if len(dims) > 1:
        raise ScfmError(f"inputs have embeddings of different sizes {sorted(dims)}", paths[0])
    combined = ad.concat(adatas, join="outer", merge="same", index_unique="-", label="input",
                         keys=[Path(p).name for p in paths])
    return combined, [dict(a.uns.get("scfm", {})) for a in adatas]


def unlabelled_inputs(adata, label_key: str, paths: Sequence[str]) -> list[str]:
    """Names of the inputs none of whose cells has a (non-missing) label in ``obs[label_key]``."""
    names = [Path(p).name for p in paths]
    if label_key not in adata.obs:
        return names
    known = adata.obs[label_key].notna().to_numpy()
    if len(paths) == 1:
        return [] if known.any() else names
    source = adata.obs["input"].astype(str).to_numpy()  # added by read_inputs when concatenating
    return [name for name in names if not known[source == name].any()]


def check_label_key(adata, label_key: str | None, paths: Sequence[str], *, optional: bool = False) -> list[str]:
    """Refuse a label key no cell carries (unless ``optional``); return the inputs without labels.

    Label metrics are computed on the labelled cells, so a combined report may join labelled and
    unlabelled samples (a pipeline batch of new samples next to a labelled one).
    """
    if label_key is None:
        return []
    missing = unlabelled_inputs(adata, label_key, paths)
    if len(missing) == len(paths) and not optional:
        if label_key not in adata.obs:
            columns = ", ".join(map(str, adata.obs.columns[:20]))
            where = f"columns: {columns}" if len(paths) == 1 else f"inputs: {', '.join(missing)}"
            raise ScfmError(f"--label-key '{label_key}' is not an obs column of any input ({where})", paths[0])
        raise ScfmError(f"--label-key '{label_key}': no cell has a label (inputs: {', '.join(missing)})", paths[0])
    return missing


def check_obs_key(adata, key: str | None, flag: str, path) -> None:
    if key is not None and key not in adata.obs:
        columns = ", ".join(map(str, adata.obs.columns[:20]))
        raise ScfmError(f"{flag} '{key}' is not an obs column (columns: {columns})", path)


def _looks_like_counts(matrix) -> bool:
    data = matrix.data if hasattr(matrix, "data") else np.asarray(matrix).ravel()
    sample = np.asarray(data[:100_000], dtype=np.float64)
    return bool(sample.size and (sample >= 0).all() and np.allclose(sample, np.round(sample)))


def add_pca_baseline(adata, *, seed: int = 0, n_comps: int = 50) -> str:
    """PCA of log1p(CP10k) expression (or of X as given when X is not counts) into ``obsm[PCA_KEY]``."""
    import anndata as ad
    import scanpy as sc

    work = ad.AnnData(X=adata.X.astype(np.float32).copy())
    recipe = "PCA of X as stored"
    if _looks_like_counts(work.X):
        sc.pp.normalize_total(work, target_sum=1e4)
        sc.pp.log1p(work)
        recipe = "PCA of log1p(counts per 10k)"
    n_comps = int(max(2, min(n_comps, work.n_obs - 1, work.n_vars - 1)))
    sc.pp.pca(work, n_comps=n_comps, random_state=seed)
    adata.obsm[PCA_KEY] = work.obsm["X_pca"]
    return f"{recipe}, {n_comps} components"


def subsample_cells(adata, max_cells: int | None, *, seed: int = 0):
    """A seeded random subset of at most ``max_cells`` cells (graphs and UMAPs of millions of cells
    take hours and show nothing more); returns (subset, number of cells before)."""
    n_total = adata.n_obs
    if max_cells is None or n_total <= max_cells:
        return adata, n_total
    keep = np.sort(np.random.default_rng(seed).choice(n_total, size=max_cells, replace=False))
    return adata[keep].copy(), n_total


def qc_colour_columns(adata) -> list[str]:
    present = [c for c in QC_COLOURS if c in adata.obs and pd.api.types.is_numeric_dtype(adata.obs[c])]
    if not present:  # inputs without QC columns still get depth / complexity colourings
        matrix = adata.X
        adata.obs["total_counts"] = np.asarray(matrix.sum(axis=1)).ravel()
        adata.obs["n_genes_by_counts"] = np.asarray((matrix > 0).sum(axis=1)).ravel()
        present = ["total_counts", "n_genes_by_counts"]
    return present


# ----------------------------------------------------------------------------- MLflow


def linked_training_runs(uri: str | None, run_ids: Sequence[str]) -> list[str]:
    """Explicit ``--run-id``s, else the pretrain/fine-tune runs under the current pipeline parent run."""
    if run_ids or not uri:
        return list(run_ids)
    from mlflow.tracking import MlflowClient

    from scfm.tracking import current_parent_run_id

    client = MlflowClient(tracking_uri=uri)
    try:
        parent = current_parent_run_id(uri)
        if not parent:
            return []
        experiment_id = client.get_run(parent).info.experiment_id
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
            order_by=["attributes.start_time ASC"],
        )
    except Exception:
        return []  # a report without curves beats no report
    return [run.info.run_id for run in found if run.data.tags.get("scfm.step") in TRAINING_STEPS]


def read_metric_histories(uri: str, run_id: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """(run name, {metric: [(step, value), ...]}) for one MLflow run; metrics logged once are skipped."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise ScfmError(f"MLflow run {run_id} not found ({type(exc).__name__})", uri) from exc
    name = run.info.run_name or run.data.tags.get("scfm.step", run_id)
    histories = {}
    for key in sorted(run.data.metrics):
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if len(points) > 1:
            histories[key] = points
    return f"{name} ({run_id[:8]})", histories


# ----------------------------------------------------------------------------- HTML pieces


def _e(value: Any) -> str:
    return html.escape(str(value))


def img_tag(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{encoded}">'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.4g}"
    if value is None:
        return "n/a"
    return str(value)


def table(rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            cells.append(f'<td class="num">{_e(_fmt(value))}</td>' if numeric else f"<td>{_e(_fmt(value))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def flatten(mapping: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(mapping, dict):
        rows = []
        for key, value in mapping.items():
            rows.extend(flatten(value, f"{prefix}{key}."))
        return rows
    if isinstance(mapping, np.ndarray):
        mapping = mapping.tolist()
    if isinstance(mapping, (list, tuple)):
        mapping = json.dumps(mapping, default=str)
        if len(mapping) > 300:
            mapping = mapping[:300] + " …"
    return [(prefix.rstrip("."), mapping)]


def note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def section(key: str, title: str, body: str) -> str:
    return f'<section id="section-{key}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- sections


def summary_section(adata, inputs: Sequence[str], embedding_key: str, label_key, batch_key, n_input_cells) -> str:
    cells = adata.n_obs if n_input_cells == adata.n_obs else (
        f"{adata.n_obs} (a seeded random subset of the {n_input_cells} input cells; see --max-cells)")
    rows = [
        ("inputs", ", ".join(map(str, inputs))),
        ("cells", cells),
        ("genes", adata.n_vars),
        ("embedding", f"obsm['{embedding_key}'] ({adata.obsm[embedding_key].shape[1]} dims)"),
        ("label key", label_key or "none"),
        ("batch key", batch_key or "none"),
        ("created", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    return table(rows)


QC_HEADLINE = ("sample", "cells_in", "cells_out", "genes_in", "genes_out")


def _qc_headline(summary: Any) -> dict:
    """The few numbers a reader wants first: cells and genes in/out, and what each filter removed."""
    if not isinstance(summary, dict):
        return {}
    row = {k: summary[k] for k in QC_HEADLINE if k in summary}
    for name, details in (summary.get("filters") or {}).items():
        if isinstance(details, dict) and "removed" in details:
            row[f"removed by {name}"] = details["removed"]
    return row


def unique_qc_summaries(qc_summaries: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The pipeline passes each sample's QC JSON and the inputs carry the same summary: show it once."""
    seen, unique = set(), []
    for source, summary in qc_summaries:
        key = json.dumps(_qc_headline(summary), sort_keys=True, default=str) if _qc_headline(summary) else source
        if key not in seen:
            seen.add(key)
            unique.append((source, summary))
    return unique


def qc_section(adata, qc_summaries: list[tuple[str, Any]], qc_columns: list[str]) -> str:
    parts = []
    summaries = unique_qc_summaries(qc_summaries)
    if summaries:
        headlines = [_qc_headline(summary) for _, summary in summaries]
        fields = list(dict.fromkeys(k for h in headlines for k in h))
        rows = [(source, *[h.get(f) for f in fields]) for (source, _), h in zip(summaries, headlines)]
        parts.append(table(rows, header=("QC summary", *fields)))
        for source, summary in summaries:
            parts.append(f"<details><summary>full QC summary: {_e(source)}</summary>")
            parts.append(table(flatten(summary), header=("field", "value")))
            parts.append("</details>")
    else:
        parts.append(note("No QC summary: the input has no uns['scfm']['qc'] and no --qc-json was given."))
    stats = []
    for column in qc_columns:
        values = adata.obs[column].to_numpy(dtype=float)
        stats.append((column, *np.nanpercentile(values, [5, 50, 95]).round(3).tolist(), float(np.nanmean(values))))
    parts.append("<h3>Per-cell QC metrics of the cells in this report</h3>")
    parts.append(table(stats, header=("metric", "5th pct", "median", "95th pct", "mean")))
    return "\n".join(parts)


def label_coverage(adata, label_key: str, inputs_without_labels: Sequence[str]) -> dict:
    """How many of the report's cells the label metrics score, and which inputs had no labels."""
    scored = int(adata.obs[label_key].notna().sum()) if label_key in adata.obs else 0
    return {"key": label_key, "n_scored_cells": scored, "n_cells": int(adata.n_obs),
            "inputs_without_labels": list(inputs_without_labels)}


def label_coverage_text(labels: dict) -> str:
    key, scored, total = labels["key"], labels["n_scored_cells"], labels["n_cells"]
    if scored == 0:
        text = f"No cell has a label in obs['{key}']: label-based metrics are skipped."
    elif scored == total:
        text = f"Label-based metrics score all {total} cells (obs['{key}'])."
    else:
        text = (f"Label-based metrics score the {scored} of {total} cells that have a label in obs['{key}']; "
                "the other cells are in the UMAPs, clusters and batch metrics only.")
    if labels["inputs_without_labels"]:
        text += f" Inputs without labels: {', '.join(labels['inputs_without_labels'])}."
    return text


def metrics_section(result: dict) -> str:
    embeddings = result["embeddings"]
    names = list(embeddings)
    keys = ["knn_accuracy", "ari", "nmi", "silhouette", "batch_asw", "n_leiden_clusters", "n_labelled_cells", "n_dims"]
    rows = [(key, *[embeddings[n].get(key) for n in names]) for key in keys if any(key in embeddings[n] for n in names)]
    parts = [table(rows, header=("metric", *names))]
    parts.append(
        '<p class="meta">kNN accuracy: 5-fold stratified cross-validated 15-NN classifier on the labels. '
        "ARI/NMI: Leiden clusters vs labels. Silhouette: labels, rescaled to 0..1. Batch ASW: scIB-style "
        "batch silhouette within labels (1 = well mixed). PCA baseline: "
        f"{_e(result['pca_recipe'])}.</p>"
    )
    if "annotation" in result:
        ann = result["annotation"]
        rows = [(k, ann[k]) for k in ("accuracy", "macro_f1", "unknown_fraction", "accuracy_of_assigned")]
        parts.append("<h3>Annotation vs known labels</h3>")
        parts.append(table(rows, header=("metric", "value")))
    if not result.get("label_key"):
        parts.append(note("No --label-key: label-based metrics (kNN accuracy, ARI, NMI, silhouette) are skipped."))
    elif "labels" in result:
        parts.append(note(label_coverage_text(result["labels"])))
    parts.extend(note(f"Not computed: {text}") for text in result.get("skipped", []))
    return "\n".join(parts)


def _too_few_for_graph(n_cells: int) -> str:
    return (f"only {n_cells} cells; the kNN graph behind Leiden clusters and UMAPs needs more than "
            f"{M.N_NEIGHBORS} (its neighbours per cell).")


def skipped_analyses(n_cells: int, embeddings: dict, label_key: str | None) -> list[str]:
    """What the report leaves out because these cells cannot support it, in words for the reader."""
    skipped = []
    if not M.has_graph(n_cells):
        skipped.append("Leiden clusters, ARI, NMI and UMAPs: " + _too_few_for_graph(n_cells))
    scored = [values for values in embeddings.values() if "n_labelled_cells" in values]
    if label_key and scored:
        if any("silhouette" not in values for values in scored):
            skipped.append("silhouette: it needs between 2 and (labelled cells - 1) label classes.")
        if any(values.get("knn_accuracy") is None for values in scored):
            skipped.append(f"kNN accuracy: it needs two classes with at least {M.KNN_FOLDS} labelled cells each "
                           f"({M.KNN_FOLDS}-fold cross-validation).")
    return skipped


def training_section(curves: list[tuple[str, dict]]) -> str:
    parts = []
    for name, histories in curves:
        if histories:
            parts.append(f"<h3>{_e(name)}</h3>")
            parts.append(img_tag(plots.curves_png(histories, name), f"training curves {name}"))
        else:
            parts.append(note(f"{name}: no metric was logged more than once."))
    if not curves:
        parts.append(note("No MLflow training run linked (pass --run-id, or run under a pipeline parent run)."))
    return "\n".join(parts)


def provenance_section(uns_list: list[dict], params: dict) -> str:
    versions = []
    for package in VERSIONED_PACKAGES:
        try:
            versions.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            versions.append((package, "not installed"))
    parts = ["<h3>Package versions</h3>", table(versions, header=("package", "version"))]
    parts += ["<h3>Report parameters</h3>", table(flatten(params), header=("parameter", "value"))]
    for i, uns in enumerate(uns_list):
        title = "uns['scfm'] of the input" if len(uns_list) == 1 else f"uns['scfm'] of input {i + 1}"
        parts.append(f"<details open><summary>{_e(title)}</summary>")
        parts.append(f"<pre>{_e(json.dumps(_jsonable(uns), indent=2, default=str))}</pre></details>")
    return "\n".join(parts)


def package_versions() -> dict[str, str]:
    found = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def render(title: str, subtitle: str, bodies: dict[str, str],
           extra_sections: Sequence[tuple[str, str, str]] = ()) -> str:
    """``extra_sections``: (key, title, body) of sections built elsewhere (e.g. gene modules), shown last."""
    template = Template((Path(__file__).parent / "templates" / "report.html").read_text())
    shown = [*SECTIONS, *[(key, name) for key, name in OPTIONAL_SECTIONS if key in bodies],
             *((key, name) for key, name, _ in extra_sections)]
    bodies = {**bodies, **{key: body for key, _, body in extra_sections}}
    nav = "".join(f'<a href="#section-{key}">{_e(name)}</a>' for key, name in shown)
    sections = "\n".join(section(key, name, bodies[key]) for key, name in shown)
    return template.substitute(title=_e(title), subtitle=_e(subtitle), nav=nav, sections=sections)


# ----------------------------------------------------------------------------- the report


@dataclass
class ReportInputs:
    """Everything a report reads, loaded and checked before any computation (so bad input fails fast)."""

    paths: list[str]
    adata: Any
    uns_list: list[dict]
    qc_summaries: list[tuple[str, Any]]
    curves: list[tuple[str, dict]]
    inputs_without_labels: list[str] = field(default_factory=list)


def load_report_inputs(
    inputs: Sequence[str | os.PathLike],
    *,
    embedding_key: str = "X_scfm",
    label_key: str | None = None,
    batch_key: str | None = None,
    qc_json: Sequence[str | os.PathLike] = (),
    mlflow_uri: str | None = None,
    run_ids: Sequence[str] = (),
    labels_optional: bool = False,
) -> ReportInputs:
    paths = [os.fspath(p) for p in inputs]
    adata, uns_list = read_inputs(paths, embedding_key)
    if adata.n_obs < MIN_CELLS or adata.n_vars < MIN_CELLS:
        raise ScfmError(f"{adata.n_obs} cells x {adata.n_vars} genes: a report needs at least {MIN_CELLS} of each "
                        "(the PCA baseline has at least two components)", paths[0])
    without_labels = check_label_key(adata, label_key, paths, optional=labels_optional)
    check_obs_key(adata, batch_key, "--batch-key", paths[0])
    qc_summaries = [(f"{Path(p).name}: uns['scfm']['qc']", u["qc"]) for p, u in zip(paths, uns_list) if "qc" in u]
    for path in qc_json:
        try:
            qc_summaries.append((Path(path).name, json.loads(Path(path).read_text())))
        except (OSError, ValueError) as exc:
            raise ScfmError(f"cannot read QC JSON ({exc})", path) from exc
    curves = [read_metric_histories(mlflow_uri, r) for r in linked_training_runs(mlflow_uri, run_ids)]
    return ReportInputs(paths, adata, uns_list, qc_summaries, curves, without_labels)


def build_report(
    loaded: ReportInputs,
    *,
    embedding_key: str = "X_scfm",
    label_key: str | None = None,
    batch_key: str | None = None,
    qc_json: Sequence[str | os.PathLike] = (),
    run_ids: Sequence[str] = (),
    seed: int = 0,
    title: str | None = None,
    max_cells: int | None = 50_000,
    quiet: bool = False,
    perturbation=None,
    extra_sections: Sequence[tuple[str, str, str]] = (),
) -> tuple[str, dict]:
    """Compute metrics and figures for loaded inputs; return (HTML text, metrics dict).

    ``perturbation``: a predictor directory of `scfm perturb train --folds K`, shown in its own section.
    ``extra_sections``: (key, title, body) of sections built by their own step (e.g. gene modules), shown last."""
    from scfm.utils import progress

    inputs, uns_list = loaded.paths, loaded.uns_list
    adata, n_input_cells = subsample_cells(loaded.adata, max_cells, seed=seed)
    qc_summaries, curves = loaded.qc_summaries, loaded.curves

    bar = progress(total=6, desc="report", unit="stage", quiet=quiet)
    pca_recipe = add_pca_baseline(adata, seed=seed)
    bar.update()
    result: dict = {
        "n_cells": int(adata.n_obs),
        "n_input_cells": int(n_input_cells),
        "inputs": inputs,
        "embedding_key": embedding_key,
        "label_key": label_key,
        "batch_key": batch_key,
        "seed": seed,
        "pca_recipe": pca_recipe,
        "embeddings": {},
    }
    import scanpy as sc

    if label_key is not None:
        result["labels"] = label_coverage(adata, label_key, loaded.inputs_without_labels)
        if result["labels"]["n_scored_cells"] == 0:
            label_key = None  # --labels-optional and nothing to score: the report says so
    coords, clusters = {}, {}
    for name, key in (("scfm", embedding_key), ("PCA", PCA_KEY)):
        result["embeddings"][name], clusters[name] = M.embedding_metrics(
            adata, key, label_key=label_key, batch_key=batch_key, seed=seed
        )
        if clusters[name] is not None:
            sc.tl.umap(adata, random_state=seed)  # on the graph the metrics just built for this embedding
            coords[name] = adata.obsm["X_umap"].copy()
        bar.update()
    result["skipped"] = skipped_analyses(adata.n_obs, result["embeddings"], label_key)
    if "scfm_cell_type" in adata.obs and label_key and adata.obs[label_key].notna().any():
        result["annotation"] = M.annotation_metrics(adata.obs["scfm_cell_type"], adata.obs[label_key])

    colourings = []
    if label_key:
        colourings.append((label_key, adata.obs[label_key].astype(str).astype("category")))
    if "scfm_cell_type" in adata.obs:
        colourings.append(("scfm_cell_type", adata.obs["scfm_cell_type"].astype(str).astype("category")))
    if batch_key:
        colourings.append((batch_key, adata.obs[batch_key].astype(str).astype("category")))
    qc_columns = qc_colour_columns(adata)
    colourings += [(c, adata.obs[c]) for c in qc_columns]
    umap_body = "\n".join(
        f"<h3>coloured by {_e(name)}</h3>\n" + img_tag(plots.umap_pair_png(coords, values, name, seed=seed), name)
        for name, values in colourings
    ) if coords else note(f"No UMAPs: {_too_few_for_graph(adata.n_obs)}")
    bar.update()
    leiden_parts = [] if coords else [note(f"No Leiden clusters: {_too_few_for_graph(adata.n_obs)}")]
    for name in coords:
        own = pd.Series(pd.Categorical(clusters[name]), index=adata.obs_names)
        leiden_parts.append(f"<h3>Leiden clusters of the {_e(name)} embedding</h3>")
        leiden_parts.append(img_tag(plots.umap_pair_png(coords, own, f"{name} Leiden", seed=seed), f"{name} Leiden"))
        sizes = own.value_counts().sort_index()
        leiden_parts.append(table([(", ".join(f"{k}: {v}" for k, v in sizes.items()),)], header=("cluster: cells",)))
    if "annotation" in result:
        ann = result["annotation"]
        truth = ann["classes"][: ann["n_truth_classes"]]
        matrix = np.asarray(ann["confusion"])[: len(truth)]
        annotation_body = img_tag(plots.confusion_png(matrix, truth, ann["classes"]), "confusion matrix")
        settings = dict(uns_list[0].get("annotate", {}))
        settings.pop("classes", None)
        if settings:
            annotation_body += table(flatten(settings), header=("annotation setting", "value"))
    elif "scfm_cell_type" in adata.obs:
        counts = adata.obs["scfm_cell_type"].astype(str).value_counts()
        annotation_body = note("No --label-key, so no confusion matrix; predicted cell types:") + table(
            counts.items(), header=("scfm_cell_type", "cells")
        )
    else:
        annotation_body = note("No obs['scfm_cell_type'] in the input: run `scfm annotate` for a confusion matrix.")
    bar.update()

    params = {
        "inputs": inputs, "embedding_key": embedding_key, "label_key": label_key, "batch_key": batch_key,
        "qc_json": [os.fspath(p) for p in qc_json], "run_ids": list(run_ids), "seed": seed,
    }
    result["versions"] = package_versions()
    drug_body, result["drug_sensitivity"] = drug_section(adata, coords, group_key=label_key, seed=seed)
    bodies = {
        "summary": summary_section(adata, inputs, embedding_key, label_key, batch_key, n_input_cells),
        "qc": qc_section(adata, qc_summaries, qc_columns),
        "metrics": metrics_section(result),
        "umap": umap_body,
        "leiden": "\n".join(leiden_parts),
        "annotation": annotation_body,
        "drug": drug_body,
        "training": training_section(curves),
        "provenance": provenance_section(uns_list, params),
    }
    result["training_runs"] = [name for name, _ in curves]
    if perturbation is not None:
        from scfm.report.perturb import load_result, perturbation_section

        bodies["perturbation"] = perturbation_section(perturbation)
        summary = load_result(perturbation)[0]["summary"]
        result["perturbation"] = {"predictor": os.fspath(perturbation), "summary": summary}
    bar.update()
    bar.close()
    title = title or f"scfm report: {', '.join(Path(p).name for p in inputs)}"
    subtitle = f"{adata.n_obs} cells · scfm {result['versions'].get('scfm', '?')}"
    return render(title, subtitle, bodies, extra_sections), _jsonable(result)


def flat_metrics(result: dict) -> dict[str, float]:
    """The numeric metrics as ``{"scfm.ari": ..., "annotation.accuracy": ...}`` for MLflow."""
    flat = {}
    for name, values in result["embeddings"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                flat[f"{name.lower()}.{key}"] = float(value)
    if "labels" in result:
        flat["labels.n_scored_cells"] = float(result["labels"]["n_scored_cells"])
    for key, value in result.get("annotation", {}).items():
        if isinstance(value, (int, float)) and value is not None:
            flat[f"annotation.{key}"] = float(value)
    for method, values in result.get("perturbation", {}).get("summary", {}).items():
        flat.update({f"perturbation.{method}.{k}": float(v) for k, v in values.items() if v is not None})
    return flat
