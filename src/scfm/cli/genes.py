"""``scfm genes modules`` and ``scfm genes network``: gene modules and TF -> target edges from gene embeddings."""

from __future__ import annotations

from pathlib import Path

import click

from scfm.cli.common import check_outputs, fraction, log_resolved_precision, positive, step_options

_GO_DB_HELP = ("Directory with org.Hs.eg.sqlite and GO.sqlite (`make go`); default $SCFM_GO_DIR, else "
               "~/.cache/scfm/go.")


def model_options(func):
    """The flags that choose the model and how cells go through it (shared by both subcommands)."""
    options = [
        click.option("--checkpoint", type=click.Path(path_type=Path),
                     help="scfm checkpoint directory or the official models.ckpt."),
        click.option("--vocab", "vocab_path", type=click.Path(path_type=Path),
                     help="Vocabulary TSV (required with an official .ckpt)."),
        click.option("--version", type=click.Choice(["ce", "rde", "gene"]), default="gene", show_default=True,
                     help="Which model of an official .ckpt (ignored for scfm checkpoint directories)."),
        click.option("--groupby", default=None, help="obs column grouping the cells (e.g. cell type)."),
        click.option("--min-cells", type=click.IntRange(min=0), default=10, show_default=True,
                     help="Genes tested: those detected in at least this many cells (0: every vocabulary gene)."),
        click.option("--max-cells-per-group", type=click.IntRange(min=1), default=2000, show_default=True,
                     help="Average gene embeddings over at most this many random cells per group (all cells "
                          "count as one group without --groupby)."),
        click.option("--target-depth", default="t4", show_default=True,
                     help="T token: t<log10 depth>, f<fold of the cell's depth> or a<log10 added>."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Cells per decoder pass (default: as many as keep the decoder's activations within "
                          "1 GiB, 1-64; the released model's shape gets 3)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
                     help="auto: bf16 on CUDA, fp32 on CPU."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group("genes")
def genes_group():
    """Gene modules and TF -> target networks from the model's gene embeddings."""


@genes_group.command("modules")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write (gene_modules.tsv, gene_embeddings.h5ad, cells.h5ad, enrichment, plots).")
@model_options
@click.option("--min-group-cells", type=click.IntRange(min=1), default=5, show_default=True,
              help="Refuse a --groupby group with fewer cells than this.")
@click.option("--n-neighbors", type=click.IntRange(min=2), default=15, show_default=True,
              help="Neighbours per gene in the cosine kNN graph.")
@click.option("--resolution", type=positive(), default=1.0, show_default=True,
              help="Leiden resolution (higher: more, smaller modules).")
@click.option("--min-module-size", type=click.IntRange(min=1), default=5, show_default=True,
              help="Genes of smaller Leiden communities are left unassigned (module -1).")
@click.option("--enrichment/--no-enrichment", default=True, show_default=True,
              help="GO Biological Process enrichment of each module (needs the GO database).")
@click.option("--go-db", type=click.Path(file_okay=False, path_type=Path), default=None, help=_GO_DB_HELP)
@click.option("--alpha", type=fraction(open_low=True), default=0.05, show_default=True,
              help="A module is enriched when a term has a BH-adjusted p-value below this.")
@click.option("--baseline", type=click.Choice(["pca", "none"]), default="pca", show_default=True,
              help="Also run the same Leiden procedure on PCA-loading gene embeddings and report its enrichment.")
@step_options
def modules_command(input_path, output, checkpoint, vocab_path, version, groupby, min_cells, max_cells_per_group,
                    target_depth, batch_size, device, precision, min_group_cells, n_neighbors, resolution,
                    min_module_size, enrichment, go_db, alpha, baseline, mlflow_uri, seed, quiet):
    """Gene modules of INPUT's cells (aligned h5ad): mean decoder gene embeddings, a kNN graph, Leiden
    modules, module scores per cell (obs of OUTPUT/cells.h5ad), GO enrichment and an HTML section."""
    from scfm import tracking
    from scfm.errors import ScfmUsageError
    from scfm.tasks.genes.steps import gene_modules_file
    from scfm.utils import check_output_path, seed_everything

    if checkpoint is None:
        raise ScfmUsageError("--checkpoint is required")
    # the output folder is replaced whole: none of the inputs may be it or lie inside it
    check_output_path(output, inputs=[input_path, checkpoint, vocab_path, go_db], directory=True)
    seed_everything(seed)
    params = {"input": str(input_path), "output": str(output), "checkpoint": str(checkpoint), "version": version,
              "groupby": groupby, "min_cells": min_cells, "max_cells_per_group": max_cells_per_group,
              "min_group_cells": min_group_cells, "n_neighbors": n_neighbors, "resolution": resolution,
              "min_module_size": min_module_size, "enrichment": enrichment, "go_db": str(go_db), "alpha": alpha,
              "baseline": baseline, "target_depth": target_depth, "batch_size": batch_size, "device": device,
              "precision": precision, "seed": seed}
    uri = tracking.resolve_uri(mlflow_uri, output.resolve().parent)
    with tracking.step_run("genes-modules", uri=uri, params=params) as run:
        summary = gene_modules_file(
            input_path, output, checkpoint=checkpoint, version=version, vocab=vocab_path, groupby=groupby,
            min_cells=min_cells, max_cells_per_group=max_cells_per_group, min_group_cells=min_group_cells,
            n_neighbors=n_neighbors, resolution=resolution, min_module_size=min_module_size, enrichment=enrichment,
            go_dir=go_db, alpha=alpha, baseline=baseline, target_depth=target_depth, batch_size=batch_size,
            device=device, precision=precision, seed=seed, quiet=quiet,
        )
        run.log_metrics(modules_metrics(summary))
        log_resolved_precision(run, summary)
        for name in ("gene_modules.tsv", "summary.json", "gene_modules.html", "enrichment.tsv", "enrichment.json",
                     "module_scores_by_group.tsv"):
            if (output / name).is_file():
                run.log_artifact(output / name)
        run.log_artifact(output / "plots", "plots")
    if not quiet:
        enriched = summary.get("enrichment")
        line = f"{summary['n_modules']} modules of {summary['n_genes']} genes"
        if enriched:
            line += f", {enriched['n_modules_enriched']} with a GO BP term at q < {alpha}"
            if "baseline" in summary:
                line += f" (PCA baseline: {summary['baseline']['n_modules_enriched']} of {summary['baseline']['n_modules']})"
        click.echo(f"{line}: {output}", err=True)


def modules_metrics(summary: dict) -> dict[str, float]:
    metrics = {k: summary[k] for k in ("n_cells", "n_cells_embedded", "n_genes", "n_modules", "n_genes_unassigned",
                                       "seconds")}
    for name, key in (("enrichment", "enrichment"), ("baseline_pca", "baseline")):
        if key in summary:
            metrics[f"{name}.n_modules_enriched"] = summary[key]["n_modules_enriched"]
            metrics[f"{name}.fraction_modules_enriched"] = summary[key]["fraction_modules_enriched"]
    return metrics


@genes_group.command("network")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Edge list to write (TSV).")
@click.option("--tf-list", required=True, type=click.Path(path_type=Path),
              help="Transcription factors, one gene symbol a line (e.g. Lambert et al. 2018).")
@model_options
@click.option("--group", default=None,
              help="Only this group: a value of --groupby (cells input) or a group of the gene-embeddings file.")
@click.option("--top-targets", type=click.IntRange(min=0), default=100, show_default=True,
              help="Edges kept per TF, best first (0: all).")
@click.option("--format", "style", type=click.Choice(["arboreto", "decoupler"]), default="arboreto",
              show_default=True,
              help="arboreto: TF, target, importance (pySCENIC adjacencies; positive scores only); "
                   "decoupler: source, target, weight.")
@step_options
def network_command(input_path, output, tf_list, checkpoint, vocab_path, version, groupby, min_cells,
                    max_cells_per_group, target_depth, batch_size, device, precision, group, top_targets, style,
                    mlflow_uri, seed, quiet):
    """TF -> target edges ranked by gene-embedding similarity. INPUT: an aligned h5ad of cells (with
    --checkpoint) or the gene_embeddings.h5ad written by `scfm genes modules`."""
    from scfm import tracking
    from scfm.tasks.genes.steps import gene_network_file
    from scfm.utils import seed_everything

    check_outputs(output, inputs=[input_path, tf_list, checkpoint, vocab_path])
    seed_everything(seed)
    params = {"input": str(input_path), "output": str(output), "tf_list": str(tf_list), "checkpoint": str(checkpoint),
              "version": version, "groupby": groupby, "group": group, "min_cells": min_cells,
              "max_cells_per_group": max_cells_per_group, "top_targets": top_targets, "format": style,
              "target_depth": target_depth, "batch_size": batch_size, "device": device, "precision": precision,
              "seed": seed}
    uri = tracking.resolve_uri(mlflow_uri, output.resolve().parent)
    with tracking.step_run("genes-network", uri=uri, params=params) as run:
        summary = gene_network_file(
            input_path, output, tf_list=tf_list, checkpoint=checkpoint, version=version, vocab=vocab_path,
            groupby=groupby, group=group, min_cells=min_cells, max_cells_per_group=max_cells_per_group,
            top_targets=top_targets or None, style=style, target_depth=target_depth, batch_size=batch_size,
            device=device, precision=precision, seed=seed, quiet=quiet,
        )
        run.log_metrics({k: summary[k] for k in ("n_genes", "n_tfs", "n_edges", "seconds")})
        log_resolved_precision(run, summary)
        run.log_dict(summary, "network.json")
        run.log_artifact(output)
    if not quiet:
        click.echo(f"{summary['n_edges']} edges from {summary['n_tfs']} TFs over {summary['n_genes']} genes: {output}",
                   err=True)


COMMANDS = [genes_group]
