"""The perturbation section: predicted vs observed change for held-out perturbations.

    perturbation_section(predictor_dir) -> HTML body      # `scfm report --perturbation DIR` adds it
    standalone_html(predictor_dir, title) -> HTML page     # `scfm perturb train` writes report.html
    write_plots(cv_adata, evaluation, plots_dir)           # the same figures as PNG files

It reads what ``scfm perturb train --folds K`` wrote: ``evaluation.json`` (metrics per method, averaged
and per held-out perturbation) and ``cv_predictions.h5ad`` (held-out perturbations x genes with the
predicted, baseline and observed changes). Figures: the averaged metrics per method; predicted vs
observed change of the top genes pooled over held-out perturbations; and one bar chart per held-out
perturbation of its top genes (observed, predictor, linear baseline).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np

from scfm.errors import ScfmError
from scfm.report import plots

SECTION_KEY, SECTION_TITLE = "perturbation", "Perturbation response"
EVALUATION_FILE, CV_FILE = "evaluation.json", "cv_predictions.h5ad"
METRIC_LABELS = {"pearson": "Pearson, all genes", "pearson_top": "Pearson, top genes", "mse": "MSE, all genes",
                 "mse_top": "MSE, top genes", "direction_top": "direction accuracy, top genes"}
COMPARED = ("observed_change", "predicted_change", "change_linear")


def _e(value) -> str:
    return html.escape(str(value))


def load_result(directory):
    """(evaluation dict, cross-validated predictions AnnData) from a predictor directory."""
    import json

    import anndata as ad

    directory = Path(directory)
    evaluation_path, cv_path = directory / EVALUATION_FILE, directory / CV_FILE
    if not evaluation_path.is_file() or not cv_path.is_file():
        raise ScfmError(f"no {EVALUATION_FILE} / {CV_FILE}: pass the directory of `scfm perturb train` run with "
                        "--folds 2 or more", directory)
    try:
        return json.loads(evaluation_path.read_text()), ad.read_h5ad(cv_path)
    except (OSError, ValueError) as exc:
        raise ScfmError(f"cannot read the perturbation result ({exc})", directory) from exc


# ------------------------------------------------------------------------------------ figures
def metrics_png(evaluation: dict) -> bytes:
    plt = plots._pyplot()
    summary = evaluation["summary"]
    methods = list(summary)
    panels = [("pearson", "pearson_top", "direction_top"), ("mse", "mse_top")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    for ax, metrics in zip(axes, panels):
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            values = [summary[method].get(m) for m in metrics]
            heights = [np.nan if v is None else v for v in values]
            ax.bar(np.arange(len(metrics)) + j * width, heights, width, label=method)
        ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2)
        ax.set_xticklabels([METRIC_LABELS[m] for m in metrics], fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=7, loc="best")
    axes[0].set_title("higher is better", fontsize=9)
    axes[1].set_title("lower is better", fontsize=9)
    return plots.figure_png(fig)


def _top_table(adata, name: str):
    table = adata.uns["top_changed_genes"]
    return table[table["perturbation"].astype(str) == name].sort_values("rank")


def scatter_png(adata) -> bytes:
    """Predicted vs observed change of every held-out perturbation's top genes."""
    plt = plots._pyplot()
    table = adata.uns["top_changed_genes"]
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    observed = table["observed_change"].to_numpy(float)
    predicted = table["predicted_change"].to_numpy(float)
    ax.scatter(observed, predicted, s=8, alpha=0.6)
    lim = float(np.nanmax(np.abs(np.concatenate([observed, predicted, [1e-3]]))))
    ax.plot([-lim, lim], [-lim, lim], color="grey", linewidth=0.7)
    ax.axhline(0, color="black", linewidth=0.4)
    ax.axvline(0, color="black", linewidth=0.4)
    ax.set_xlabel("observed change (log1p CP10k)")
    ax.set_ylabel("predicted change")
    ax.set_title("top genes of held-out perturbations", fontsize=9)
    return plots.figure_png(fig)


def perturbation_png(adata, name: str) -> bytes:
    """Bars of the top genes of one perturbation: observed, predictor and linear baseline changes."""
    plt = plots._pyplot()
    genes = _top_table(adata, name)["gene"].astype(str).tolist()
    columns = [adata.var_names.get_loc(g) for g in genes]
    row = adata.obs_names.get_loc(name)
    layers = [k for k in COMPARED if k in adata.layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.36 * len(genes) + 1.5), 3.0))
    width = 0.8 / len(layers)
    for j, layer in enumerate(layers):
        ax.bar(np.arange(len(genes)) + j * width, np.asarray(adata.layers[layer][row, columns]).ravel(), width,
               label=layer.replace("change_", "").replace("_change", ""))
    ax.set_xticks(np.arange(len(genes)) + 0.4 - width / 2)
    ax.set_xticklabels(genes, rotation=90, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("change (log1p CP10k)")
    ax.set_title(f"{name}: top {len(genes)} genes by observed change", fontsize=9)
    ax.legend(fontsize=7)
    return plots.figure_png(fig)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)[:80] or "perturbation"


def write_plots(adata, evaluation: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file, png in (("metrics.png", metrics_png(evaluation)), ("top_genes_scatter.png", scatter_png(adata))):
        (directory / file).write_bytes(png)
        written.append(directory / file)
    for name in map(str, adata.obs_names):
        path = directory / f"perturbation_{safe_name(name)}.png"
        path.write_bytes(perturbation_png(adata, name))
        written.append(path)
    return written


# ------------------------------------------------------------------------------------ HTML
def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_table(evaluation: dict) -> str:
    from scfm.report.html import table

    metrics = evaluation["metrics"]
    rows = [(method, *[_fmt(evaluation["summary"][method].get(m)) for m in metrics])
            for method in evaluation["summary"]]
    return table(rows, header=("method", *[METRIC_LABELS[m] for m in metrics]))


def per_perturbation_table(evaluation: dict, method: str = "predictor") -> str:
    from scfm.report.html import table

    rows = []
    for name, entry in evaluation["perturbations"].items():
        metrics = entry["metrics"]
        rows.append((name, entry["fold"], entry["n_cells"], _fmt(metrics[method]["pearson_top"]),
                     _fmt(metrics["linear"]["pearson_top"]), _fmt(metrics[method]["direction_top"]),
                     _fmt(metrics[method]["mse"]), _fmt(metrics["training_mean"]["mse"])))
    return table(rows, header=("perturbation", "fold", "cells", f"{method} Pearson top", "linear Pearson top",
                               f"{method} direction top", f"{method} MSE", "training-mean MSE"))


def perturbation_section(directory) -> str:
    from scfm.report.html import img_tag, note

    evaluation, adata = load_result(directory)
    top_k = evaluation["top_k"]
    parts = [
        f'<p class="meta">{_e(evaluation["split"])}; {evaluation["n_folds"]} folds; '
        f'{len(evaluation["perturbations"])} held-out perturbations; {evaluation["n_genes_scored"]} genes scored; '
        f'predictor gene features: {_e(evaluation.get("predictor_gene_features"))}; top genes: the {top_k} with '
        f'the largest observed |change|. Changes are log1p counts per 10k minus the control mean.</p>',
        summary_table(evaluation),
        note("Baselines: no_change = the control mean; training_mean = the mean change of the training "
             "perturbations; linear = ridge regression on the perturbed genes' expression profiles in control "
             "cells. Pearson of a constant prediction is undefined (n/a)."),
        img_tag(metrics_png(evaluation), "metrics per method"),
        img_tag(scatter_png(adata), "predicted vs observed change"),
        "<h3>Per held-out perturbation</h3>", per_perturbation_table(evaluation),
    ]
    skipped = evaluation.get("skipped_small") or {}
    if skipped:
        parts.append(note("Skipped (too few cells): " + ", ".join(f"{k} ({v})" for k, v in skipped.items())))
    for name in map(str, adata.obs_names):
        parts.append(f"<h3>{_e(name)}</h3>")
        parts.append(img_tag(perturbation_png(adata, name), f"top genes of {name}"))
    return "\n".join(parts)


def standalone_html(directory, title: str) -> str:
    from string import Template

    from scfm.report.html import section

    template = Template((Path(__file__).parent / "templates" / "report.html").read_text())
    body = section(SECTION_KEY, SECTION_TITLE, perturbation_section(directory))
    return template.substitute(title=_e(title), subtitle="held-out perturbations: predicted vs observed change",
                               nav=f'<a href="#section-{SECTION_KEY}">{_e(SECTION_TITLE)}</a>', sections=body)
