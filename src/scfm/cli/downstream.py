"""``scfm annotate``, ``scfm enhance``, ``scfm report`` and ``scfm demo``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from scfm import tracking
from scfm.cli.common import check_outputs, fraction, log_resolved_precision, step_options
from scfm.utils import atomic_output, seed_everything

_existing = click.Path(exists=True, dir_okay=False)


@click.command("annotate")
@click.argument("input", type=_existing)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Annotated h5ad to write.")
@click.option("--classifier", type=click.Path(exists=True, file_okay=False),
              help="Classifier directory from `scfm finetune`.")
@click.option("--reference", type=_existing, help="Embedded, labelled reference h5ad for kNN label transfer.")
@click.option("--label-key", default=None, help="obs column of the reference holding cell types.")
@click.option("--k", type=click.IntRange(min=1), default=15, show_default=True, help="Neighbours for kNN transfer.")
@click.option("--min-confidence", type=fraction(), default=0.5, show_default=True,
              help="Cells whose top class probability is lower are labelled 'unknown'.")
@click.option("--embedding-key", default="X_scfm", show_default=True, help="obsm key of the cell embedding.")
@step_options
def annotate(input, output, classifier, reference, label_key, k, min_confidence, embedding_key,
             mlflow_uri, seed, quiet):
    """Label embedded cells in INPUT with a classifier head or by kNN transfer from a reference."""
    from scfm.tasks.annotate import annotate_file

    check_outputs(output, inputs=[input, reference])
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


@click.command("enhance")
@click.argument("input", type=_existing)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="h5ad to write (.h5ad).")
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="Our checkpoint directory or the official models.ckpt.")
@click.option("--version", default="rde", show_default=True, type=click.Choice(["ce", "rde", "gene"]),
              help="Which model of an official .ckpt (ignored for our checkpoint directories).")
@click.option("--vocab", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Vocabulary TSV (needed for an official .ckpt).")
@click.option("--target-depth", default="a1", show_default=True,
              help="t<log10 depth> (t4 = 10k reads), f<fold> (f1 = as sequenced) or a<added log10> (a1 = 10x).")
@click.option("--layer", default="scfm_enhanced", show_default=True, help="Layer receiving the prediction.")
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="Thin real cells and measure how well they are predicted back.")
@click.option("--thin-fraction", type=fraction(open_low=True, open_high=True), default=0.2, show_default=True,
              help="Share of reads kept when thinning cells for the evaluation.")
@click.option("--eval-cells", type=click.IntRange(min=2), default=200, show_default=True,
              help="Cells used in the evaluation.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Cells per decoder pass (the decoder covers every gene: memory grows with it).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 on CUDA; on a CPU, as for scfm embed. The choice and its reason go to "
                   "uns['scfm']['enhance'] and MLflow.")
@step_options
def enhance(input, output, checkpoint, version, vocab, target_depth, layer, evaluate, thin_fraction, eval_cells,
            batch_size, device, precision, mlflow_uri, seed, quiet):
    """Predict every cell of INPUT at a higher read depth (a layer of OUTPUT), with an honest evaluation."""
    from scfm.tasks.enhance import enhance_file

    check_outputs(output, inputs=[input, checkpoint, vocab])
    seed_everything(seed)
    params = {"input": input, "checkpoint": checkpoint, "version": version, "target_depth": target_depth,
              "layer": layer, "evaluate": evaluate, "thin_fraction": thin_fraction, "eval_cells": eval_cells,
              "precision": precision, "seed": seed}
    uri = tracking.resolve_uri(mlflow_uri, Path(output).parent)
    with tracking.step_run("enhance", uri=uri, params=params) as run:
        settings = enhance_file(
            input, output, checkpoint, version=version, vocab=vocab, target_depth=target_depth, layer=layer,
            evaluate=evaluate, thin_fraction=thin_fraction, eval_cells=eval_cells, batch_size=batch_size,
            device=device, precision=precision, seed=seed, quiet=quiet,
        )
        log_resolved_precision(run, settings)
        evaluation = settings.get("evaluation")
        if evaluation:
            run.log_metrics({
                f"{measure}.{what}": evaluation[measure][what]["median"]
                for measure in ("pearson", "spearman") for what in ("prediction", "thinned_input")
            })
            run.log_dict(evaluation, "enhance_evaluation.json")
    if not quiet:
        click.echo(f"enhanced {settings['n_cells']} cells into layers['{layer}']: {output}", err=True)
        if evaluation:
            p, s = evaluation["pearson"], evaluation["spearman"]
            click.echo(
                f"evaluation on {evaluation['n_cells']} thinned cells (median per-cell correlation with the original): "
                f"prediction pearson {p['prediction']['median']:.3f} spearman {s['prediction']['median']:.3f}; "
                f"thinned input pearson {p['thinned_input']['median']:.3f} "
                f"spearman {s['thinned_input']['median']:.3f}", err=True,
            )


@click.command("report")
@click.argument("inputs", nargs=-1, required=True, type=_existing)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The HTML report to write.")
@click.option("--embedding-key", default="X_scfm", show_default=True, help="obsm key of the scfm embedding.")
@click.option("--label-key", default=None,
              help="obs column with known cell types (enables label metrics on the cells that have one).")
@click.option("--labels-optional", is_flag=True,
              help="When no input has a label in --label-key, report without label metrics instead of failing.")
@click.option("--batch-key", default=None, help="obs column with batches (enables batch-mixing metrics).")
@click.option("--qc-json", multiple=True, type=_existing, help="QC summary JSON(s) from `scfm qc` (repeatable).")
@click.option("--run-id", "run_ids", multiple=True, help="MLflow run whose curves to plot (repeatable).")
@click.option("--metrics-json", type=click.Path(dir_okay=False), default=None,
              help="Where to write the metrics JSON (default: <report stem>.metrics.json next to the HTML).")
@click.option("--title", default=None, help="Report title.")
@click.option("--max-cells", type=click.IntRange(min=100), default=50_000, show_default=True,
              help="Report on a seeded random subset of at most this many cells.")
@click.option("--perturbation", type=click.Path(exists=True, file_okay=False), default=None,
              help="Predictor directory of `scfm perturb train --folds K`: adds a perturbation-response section.")
@click.option("--gene-modules", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Output directory of `scfm genes modules` to add as a section (repeatable).")
@step_options
def report(inputs, output, embedding_key, label_key, labels_optional, batch_key, qc_json, run_ids, metrics_json, title,
           max_cells, perturbation, gene_modules, mlflow_uri, seed, quiet):
    """Write one self-contained HTML report (and a metrics JSON) for embedded h5ad INPUTS.

    Several INPUTS are concatenated into one combined report; label metrics score the cells that
    have a label (inputs without the --label-key column are named in the report).
    """
    from scfm.report import genes as gene_section
    from scfm.report.html import build_report, flat_metrics, load_report_inputs

    output = Path(output)
    metrics_path = Path(metrics_json) if metrics_json else output.with_name(f"{output.stem}.metrics.json")
    check_outputs(output, metrics_path, inputs=[*inputs, *qc_json])
    uri = tracking.resolve_uri(mlflow_uri, output.parent)
    seed_everything(seed)
    # inputs are read and checked first: a bad input fails in seconds and opens no MLflow run
    loaded = load_report_inputs(inputs, embedding_key=embedding_key, label_key=label_key, batch_key=batch_key,
                                qc_json=qc_json, mlflow_uri=uri, run_ids=run_ids, labels_optional=labels_optional)
    extra = [gene_section.report_section(directory, i) for i, directory in enumerate(gene_modules)]
    params = {"inputs": list(inputs), "embedding_key": embedding_key, "label_key": label_key,
              "labels_optional": labels_optional, "batch_key": batch_key, "run_ids": list(run_ids), "max_cells": max_cells, "seed": seed,
              "gene_modules": list(gene_modules)}
    if perturbation is not None:
        from scfm.report.perturb import load_result

        load_result(perturbation)  # checked before any work, like the other inputs
        params["perturbation"] = perturbation
    with tracking.step_run("report", uri=uri, params=params) as run:
        text, result = build_report(
            loaded, embedding_key=embedding_key, label_key=label_key, batch_key=batch_key, qc_json=qc_json,
            run_ids=run_ids, seed=seed, title=title, max_cells=max_cells, quiet=quiet, perturbation=perturbation,
            extra_sections=[(key, name, body) for key, name, body, _ in extra],
        )
        if extra:
            result["gene_modules"] = [metrics for *_, metrics in extra]
        with atomic_output(metrics_path) as tmp_json, atomic_output(output) as tmp_html:
            tmp_json.write_text(json.dumps(result, indent=2))
            tmp_html.write_text(text, encoding="utf-8")
        run.log_metrics(flat_metrics(result))
        run.log_artifact(output)
        run.log_artifact(metrics_path)
    if not quiet:
        click.echo(f"report: {output}\nmetrics: {metrics_path}", err=True)


@click.command("demo")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory for every output.")
@click.option("--quick", is_flag=True, help="Small settings (CI): fewer pretraining steps and epochs.")
@step_options
def demo(output, quick, mlflow_uri, seed, quiet):
    """Run QC -> align -> pretrain -> fine-tune -> embed -> annotate -> enhance -> report on bundled PBMCs."""
    from scfm.demo import print_summary, run_demo
    from scfm.utils import check_output_path

    check_output_path(output, directory=True)
    summary = run_demo(output, quick=quick, seed=seed, quiet=quiet, mlflow_uri=mlflow_uri)
    print_summary(summary)


COMMANDS = [annotate, enhance, report, demo]
