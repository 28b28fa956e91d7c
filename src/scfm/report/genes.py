"""The gene-modules report section: module sizes and hubs, each module's top GO terms, score heatmap, gene UMAP.

It is built from a ``scfm genes modules`` output directory (``summary.json``, ``plots/``), so the same body
appears in that directory's own ``gene_modules.html`` and, with ``scfm report --gene-modules DIR``, as a
section of the main report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from scfm.errors import ScfmError
from scfm.report.plots import _pyplot, _scatter, figure_png

SECTION_KEY = "gene-modules"
SECTION_TITLE = "Gene modules"


def score_heatmap_png(by_group: pd.DataFrame, groupby: str) -> bytes:
    """groups x modules mean score, each module's column centred and scaled to its largest magnitude."""
    plt = _pyplot()
    values = by_group.to_numpy(dtype=float)
    centred = values - values.mean(axis=0, keepdims=True)
    scale = np.abs(centred).max(axis=0, keepdims=True)
    shown = np.divide(centred, scale, out=np.zeros_like(centred), where=scale > 0)
    labels = [c.replace("gene_module_", "M") for c in by_group.columns]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(labels) + 2.5, 1.2 + 0.35 * len(by_group)))
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(by_group)), [str(i) for i in by_group.index], fontsize=8)
    ax.set_xlabel("gene module")
    ax.set_ylabel(groupby)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="mean score, centred per module (max |.| = 1)")
    fig.tight_layout()
    return figure_png(fig)


def gene_umap_png(coords: np.ndarray, labels: np.ndarray) -> bytes:
    """Genes on the UMAP of their kNN graph, coloured by module (unassigned genes in grey)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 5.0))
    names = pd.Series(np.where(labels >= 0, [f"M{m}" for m in labels], "unassigned"))
    ordered = sorted(set(names), key=lambda n: (n == "unassigned", int(n[1:]) if n != "unassigned" else 0))
    _scatter(ax, np.asarray(coords), pd.Series(pd.Categorical(names, categories=ordered)),
             "gene embeddings (UMAP), coloured by module", seed=0)
    fig.tight_layout()
    return figure_png(fig)


def load_result(directory: str | Path) -> dict:
    """The summary of a ``scfm genes modules`` output directory; ScfmError when it is not one."""
    directory = Path(directory)
    try:
        return json.loads((directory / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise ScfmError(f"not a `scfm genes modules` output directory (summary.json: {exc})", directory) from exc


def section_body(directory: str | Path) -> str:
    from scfm.report.html import _e, img_tag, note, table

    directory = Path(directory)
    summary = load_result(directory)
    parts = [table([
        ("input", summary["input"]),
        ("cells", f"{summary['n_cells']} ({summary['n_cells_embedded']} averaged over)"),
        ("genes tested", f"{summary['n_genes']} of {summary['n_genes_vocabulary']} (detected in ≥ "
                         f"{summary['min_cells']} cells)"),
        ("modules", f"{summary['n_modules']} (Leiden, resolution {summary['resolution']}, "
                    f"{summary['n_neighbors']}-NN cosine graph; {summary['n_genes_unassigned']} genes in modules "
                    f"under {summary['min_module_size']} genes)"),
    ])]
    enrichment = summary.get("enrichment")
    if enrichment:
        rows = [("scfm gene embeddings", enrichment["n_modules"], enrichment["n_modules_enriched"],
                 enrichment["fraction_modules_enriched"])]
        if "baseline" in summary:
            b = summary["baseline"]
            rows.append((b["name"], b["n_modules"], b["n_modules_enriched"], b["fraction_modules_enriched"]))
        parts.append("<h3>Modules with a significant GO Biological Process term</h3>")
        parts.append(table(rows, header=("gene embedding", "modules", f"with a term at q < {enrichment['alpha']}",
                                         "fraction")))
        go = summary.get("go", {})
        parts.append(f'<p class="meta">Hypergeometric test per module against the {enrichment["n_genes_annotated"]} '
                     f'tested genes with a GO BP annotation (propagated through is_a/part_of), terms of 10–500 '
                     f'genes, Benjamini–Hochberg within each module. GO release {_e(go.get("go_source_date", "?"))}.'
                     "</p>")
    else:
        parts.append(note("GO enrichment was not run (--no-enrichment)."))
    heatmap = directory / "plots" / "module_scores_heatmap.png"
    if heatmap.is_file():
        parts.append(f"<h3>Module scores by {_e(summary['groupby'])}</h3>")
        parts.append(img_tag(heatmap.read_bytes(), "module scores by group"))
    else:
        parts.append(note("No --groupby: no heatmap of module scores by group (scores per cell are in "
                          "module_scores.tsv and cells.h5ad)."))
    umap = directory / "plots" / "gene_umap.png"
    if umap.is_file():
        parts.append("<h3>Gene embeddings</h3>")
        parts.append(img_tag(umap.read_bytes(), "gene UMAP"))
    parts.append("<h3>Modules</h3>")
    top_terms = (enrichment or {}).get("top_terms", {})
    rows = []
    for module, size in summary["module_sizes"].items():
        terms = top_terms.get(module, [])
        described = "; ".join(f"{t['term']} ({t['go_id']}, {t['overlap']}/{t['term_size']}, q={t['q_value']:.2g})"
                              for t in terms) or ("none significant" if enrichment else "n/a")
        rows.append((f"M{module}", size, ", ".join(summary["hub_genes"][module]), described))
    parts.append(table(rows, header=("module", "genes", "hub genes (first 10)", "top GO BP terms")))
    return "\n".join(parts)


def headline(summary: dict) -> dict:
    """The numbers a combined report keeps of one gene-modules result."""
    out = {k: summary[k] for k in ("input", "n_cells", "n_genes", "n_modules")}
    for name, key in (("scfm", "enrichment"), ("pca_baseline", "baseline")):
        if key in summary:
            out[f"{name}_fraction_modules_enriched"] = summary[key]["fraction_modules_enriched"]
    return out


def report_section(directory: str | Path, index: int = 0) -> tuple[str, str, str, dict]:
    """(key, title, body, headline numbers) for ``scfm report --gene-modules DIR``; the i-th gets its own key."""
    summary = load_result(directory)
    key = SECTION_KEY if index == 0 else f"{SECTION_KEY}-{index + 1}"
    title = f"{SECTION_TITLE}: {Path(summary['input']).name}"
    return key, title, section_body(directory), {"directory": str(directory), **headline(summary)}


def standalone_page(directory: str | Path) -> str:
    """A self-contained HTML page holding only the gene-modules section (the report's look)."""
    from string import Template

    from scfm.report.html import _e, section

    summary = load_result(directory)
    template = Template((Path(__file__).parent / "templates" / "report.html").read_text())
    return template.substitute(
        title=_e(f"scfm gene modules: {Path(summary['input']).name}"),
        subtitle=_e(f"{summary['n_genes']} genes · {summary['n_modules']} modules · {summary['n_cells']} cells"),
        nav="", sections=section(SECTION_KEY, SECTION_TITLE, section_body(directory)),
    )
