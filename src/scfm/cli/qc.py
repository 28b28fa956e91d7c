"""``scfm qc``: QC metrics, filters, summary and plots for one sample."""

from __future__ import annotations

from pathlib import Path

import click

from scfm.cli.common import check_outputs, non_negative, step_options


@click.command("qc")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="QC'd .h5ad (cells that passed; raw counts in X).")
@click.option("--sample", default=None, help="Sample id; barcodes become <sample>_<barcode> [default: file name].")
@click.option("--batch", default=None, help="Batch label for obs['batch'] [default: the sample id].")
@click.option("--condition", default=None, help="Condition label for obs['condition'].")
@click.option("--layer", default=None, help="Matrix holding raw counts: a layer name, 'raw' or 'X' [default: auto].")
@click.option("--transpose", is_flag=True, help="csv/tsv input is genes x cells.")
@click.option("--min-genes", type=click.IntRange(min=0), default=200, show_default=True,
              help="Remove cells with fewer detected genes.")
@click.option("--min-cells", type=click.IntRange(min=0), default=3, show_default=True,
              help="Remove genes detected in fewer cells.")
@click.option("--max-pct-mito", type=non_negative(), default=20.0, show_default=True,
              help="Remove cells with a larger % of mitochondrial (MT-/mt-) counts.")
@click.option("--max-counts", type=non_negative(), default=None, help="Remove cells with more counts.")
@click.option("--min-counts", type=non_negative(), default=None, help="Remove cells with fewer counts.")
@click.option("--doublets/--no-doublets", default=False, show_default=True,
              help="Remove scrublet-called doublets (seeded by --seed).")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="QC summary JSON [default: OUTPUT with .qc.json].")
@click.option("--plots-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write <sample>.qc_violin.png and <sample>.qc_hist.png here.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Stream .h5ad input in blocks of this many cells [default: only files > 1 GiB].")
@step_options
def qc_command(input_path, output, sample, batch, condition, layer, transpose, min_genes, min_cells, max_pct_mito,
               max_counts, min_counts, doublets, summary, plots_dir, chunk_size, mlflow_uri, seed, quiet):
    """QC one sample: scanpy metrics, filters (min-genes, min/max-counts, max-pct-mito, min-cells,
    doublets, in that order), JSON summary and plots."""
    from scfm import tracking
    from scfm.data.qc import default_summary_path, run_qc, summary_metrics

    summary = summary or default_summary_path(output)
    check_outputs(output, summary, inputs=[input_path], folders=[plots_dir])
    settings = dict(sample=sample, batch=batch, condition=condition, layer=layer, transpose=transpose,
                    min_genes=min_genes, min_cells=min_cells, max_pct_mito=max_pct_mito, max_counts=max_counts,
                    min_counts=min_counts, doublets=doublets, seed=seed, chunk_size=chunk_size)
    uri = tracking.resolve_uri(mlflow_uri, output.parent)
    params = {"input": str(input_path), "output": str(output), **settings}
    with tracking.step_run("qc", uri=uri, params=params, run_name=f"qc {sample or input_path.name}") as run:
        result = run_qc(input_path, output, summary=summary, plots_dir=plots_dir, quiet=quiet, **settings)
        run.log_metrics(summary_metrics(result))
        run.set_tags({"scfm.sample": result["sample"], "scfm.counts_source": result["counts_source"]})
        run.log_artifact(summary)
        for plot in result.get("plots", {}).values():
            run.log_artifact(plot, "plots")
    if not quiet:
        click.echo(
            f"{result['sample']}: {result['cells_out']}/{result['cells_in']} cells, "
            f"{result['genes_out']}/{result['genes_in']} genes passed QC "
            f"(counts from {result['counts_source']}) → {output}",
            err=True,
        )


COMMANDS = [qc_command]
