"""``scfm annotate``, ``scfm enhance``, ``scfm report`` and ``scfm demo``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from scfm import tracking
from scfm.cli.common import step_options
from scfm.utils import atomic_output, seed_everything

_existing = click.Path(exists=True, dir_okay=False)


@click.command("annotate")
@click.argument("input", type=_existing)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Annotated h5ad to write.")
@click.option("--classifier", type=click.Path(exists=True, file_okay=False),
              help="Classifier directory from `scfm finetune`.")
@click.option("--reference", type=_existing, help="Embedded, labelled reference h5ad for kNN label transfer.")
@click.option("--label-key", default=None, help="obs column of the reference holding cell types.")
@click.option("--k", type=int, default=15, show_default=True, help="Neighbours for kNN transfer.")
@click.option("--min-confidence", type=float, default=0.5, show_default=True,
              help="Cells whose top class probability is lower are labelled 'unknown'.")
@click.option("--embedding-key", default="X_scfm", show_default=True, help="obsm key of the cell embedding.")
@step_options
def annotate(input, output, classifier, reference, label_key, k, min_confidence, embedding_key,
             mlflow_uri, seed, quiet):
    """Label embedded cells in INPUT with a classifier head or by kNN transfer from a reference."""
    from scfm.tasks.annotate import annotate_file

    seed_everything(seed)
    params = {"input": input, "classifier": classifier, "reference": reference, "label_key": label_key, "k": k,
              "min_confidence": min_confidence, "embedding_key": embedding_key, "seed": seed}
    uri = tracking.resolve_uri(mlflow_uri, Path(output).parent)
    with tracking.step_run("annotate", uri=uri, params=params) as run:
        summary = annotate_file(
            input, output, classifier=classifier, reference=reference, label_key=label_key, k=k,
            min_confidence=min_confidence, embedding_key=embedding_key,
        )
        run.log_metrics({"n_cells": summary["n_cells"], "n_unknown": summary["n_unknown"],
                         "unknown_fraction": summary["n_unknown"] / max(summary["n_cells"], 1)})
        run.log_dict(summary, "annotate.json")
    if not quiet:
        click.echo(f"annotated {summary['n_cells']} cells ({summary['n_unknown']} unknown): {output}", err=True)


@click.command("report")
@click.argument("inputs", nargs=-1, required=True, type=_existing)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The HTML report to write.")
@click.option("--embedding-key", default="X_scfm", show_default=True, help="obsm key of the scfm embedding.")
@click.option("--label-key", default=None, help="obs column with known cell types (enables label metrics).")
@click.option("--batch-key", default=None, help="obs column with batches (enables batch-mixing metrics).")
@click.option("--qc-json", multiple=True, type=_existing, help="QC summary JSON(s) from `scfm qc` (repeatable).")
@click.option("--run-id", "run_ids", multiple=True, help="MLflow run whose curves to plot (repeatable).")
@click.option("--metrics-json", type=click.Path(dir_okay=False), default=None,
              help="Where to write the metrics JSON (default: <report stem>.metrics.json next to the HTML).")
@click.option("--title", default=None, help="Report title.")
@step_options
def report(inputs, output, embedding_key, label_key, batch_key, qc_json, run_ids, metrics_json, title,
           mlflow_uri, seed, quiet):
    """Write one self-contained HTML report (and a metrics JSON) for embedded h5ad INPUTS.

    Several INPUTS are concatenated into one combined report.
    """
    from scfm.report.html import build_report, flat_metrics, load_report_inputs

    output = Path(output)
    metrics_path = Path(metrics_json) if metrics_json else output.with_name(f"{output.stem}.metrics.json")
    uri = tracking.resolve_uri(mlflow_uri, output.parent)
    seed_everything(seed)
    # inputs are read and checked first: a bad input fails in seconds and opens no MLflow run
    loaded = load_report_inputs(inputs, embedding_key=embedding_key, label_key=label_key, batch_key=batch_key,
                                qc_json=qc_json, mlflow_uri=uri, run_ids=run_ids)
    params = {"inputs": list(inputs), "embedding_key": embedding_key, "label_key": label_key,
              "batch_key": batch_key, "run_ids": list(run_ids), "seed": seed}
    with tracking.step_run("report", uri=uri, params=params) as run:
        text, result = build_report(
            loaded, embedding_key=embedding_key, label_key=label_key, batch_key=batch_key, qc_json=qc_json,
            run_ids=run_ids, seed=seed, title=title, quiet=quiet,
        )
        with atomic_output(metrics_path) as tmp_json, atomic_output(output) as tmp_html:
            tmp_json.write_text(json.dumps(result, indent=2))
            tmp_html.write_text(text, encoding="utf-8")
        run.log_metrics(flat_metrics(result))
        run.log_artifact(output)
        run.log_artifact(metrics_path)
    if not quiet:
        click.echo(f"report: {output}\nmetrics: {metrics_path}", err=True)


COMMANDS = [annotate, report]
