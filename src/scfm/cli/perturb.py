"""``scfm perturb assign | train | predict``: perturbation response prediction."""

from __future__ import annotations

from pathlib import Path

import click

from scfm import tracking
from scfm.cli.common import (FiniteFloat, check_outputs, fraction, log_resolved_precision, non_negative, positive,
                              step_options)
from scfm.utils import check_output_path, seed_everything

_existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("perturb")
def perturb_group():
    """Predict how cells respond to genetic perturbations (GEARS-style, with scfm gene embeddings)."""


def _warn(message: str) -> None:
    # skipped perturbations are listed even with --quiet: they change what was trained and scored
    click.echo(f"warning: {message}", err=True)


@perturb_group.command("assign")
@click.argument("cells", type=_existing_file)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="h5ad to write: CELLS with the perturbation columns added.")
@click.option("--guide-counts", required=True, type=_existing_file,
              help="Guide UMI counts: .h5ad (cells x guides) or CSV/TSV (cell id, then one column per guide).")
@click.option("--guide-targets", required=True, type=_existing_file,
              help="Guide → target table (columns guide, target); control guides carry the control label.")
@click.option("--key", default="perturbation", show_default=True,
              help="obs column to write (also <key>_guide and <key>_guide_umi).")
@click.option("--min-umi", type=non_negative(), default=5, show_default=True,
              help="UMIs the top guide needs.")
@click.option("--min-ratio", type=FiniteFloat(min=1), default=2.0, show_default=True,
              help="How many times the second guide's UMIs the top guide needs.")
@step_options
def assign_command(cells, output, guide_counts, guide_targets, key, min_umi, min_ratio, mlflow_uri, seed, quiet):
    """Label each cell of CELLS by its dominant guide's target gene (else 'unassigned')."""
    from scfm.tasks.perturb.guides import assign_file

    check_outputs(output, inputs=[cells, guide_counts, guide_targets])
    seed_everything(seed)
    params = {"cells": str(cells), "guide_counts": str(guide_counts), "guide_targets": str(guide_targets),
              "key": key, "min_umi": min_umi, "min_ratio": min_ratio, "seed": seed}
    with tracking.step_run("perturb_assign", uri=tracking.resolve_uri(mlflow_uri, output.resolve().parent),
                           params=params) as run:
        summary = assign_file(cells, guide_counts, guide_targets, output, key=key, min_umi=min_umi,
                              min_ratio=min_ratio)
        run.log_metrics({"n_cells": summary["n_cells"], "n_unassigned": summary["n_unassigned"],
                         "unassigned_fraction": summary["n_unassigned"] / max(summary["n_cells"], 1)})
        run.log_dict(summary, "perturb_assign.json")
    if not quiet:
        click.echo(f"assigned {summary['n_cells'] - summary['n_unassigned']} of {summary['n_cells']} cells "
                   f"(obs['{key}']): {output}", err=True)


def screen_options(func):
    """How cells are grouped into perturbations (shared by train and predict)."""
    options = [
        click.option("--perturbation-key", required=True, help="obs column naming each cell's perturbation."),
        click.option("--control", required=True, help="Value of --perturbation-key marking control cells "
                                                      "(e.g. non-targeting)."),
        click.option("--target-key", default=None,
                     help="obs column with the perturbed gene(s) when --perturbation-key names guides "
                          "(default: genes are parsed from the perturbation name, GENE or GENE+GENE)."),
        click.option("--combo-separator", default="+", show_default=True,
                     help="Separator of genes in a combination's name ('ctrl' parts are ignored)."),
        click.option("--min-cells", type=click.IntRange(min=1), default=20, show_default=True,
                     help="Perturbations with fewer cells are listed and skipped."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@perturb_group.command("train")
@click.argument("inputs", nargs=-1, required=True, type=_existing_file)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Predictor directory to write.")
@screen_options
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), default=None,
              help="scfm checkpoint directory or official .ckpt (needed for --gene-features scfm).")
@click.option("--vocab", type=_existing_file, default=None, help="Vocabulary TSV (for an official .ckpt).")
@click.option("--version", type=click.Choice(["ce", "rde", "gene"]), default="gene", show_default=True,
              help="Which model of an official .ckpt gives the gene context embeddings.")
@click.option("--gene-features", type=click.Choice(["scfm", "random", "learned"]), default="scfm",
              show_default=True, help="scfm: gene context embeddings of control cells; random / learned: the "
                                      "ablations without the foundation model.")
@click.option("--gene-graph", "gene_graphs", multiple=True, type=_existing_file,
              help="Prior gene graph, TSV with columns source, target[, weight] (repeatable, merged). It "
                   "propagates perturbation embeddings (GEARS uses GO co-annotation).")
@click.option("--coexpression/--no-coexpression", default=True, show_default=True,
              help="Build a co-expression graph of the control cells (for gene embeddings, and for "
                   "perturbations when no --gene-graph is given).")
@click.option("--coexpression-threshold", type=fraction(), default=0.4, show_default=True)
@click.option("--coexpression-k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--skip-unknown-targets", is_flag=True,
              help="Leave out (and list) perturbations of genes outside the vocabulary instead of failing.")
@click.option("--min-gene-fraction", type=fraction(), default=0.01, show_default=True,
              help="Score genes detected in at least this share of cells.")
@click.option("--max-genes", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Score at most this many genes (most variable first).")
@click.option("--control-cells", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Control cells whose gene context embeddings are averaged (a seeded random subset).")
@click.option("--embed-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Cells per decoder pass for the gene context embeddings.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--folds", type=click.IntRange(min=0), default=5, show_default=True,
              help="Cross-validate by target gene first (0: no evaluation).")
@click.option("--epochs", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--hidden-size", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--lr", type=positive(), default=1e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Perturbations per optimizer step.")
@click.option("--replicates", type=click.IntRange(min=1), default=32, show_default=True,
              help="Bootstrap means per training perturbation.")
@click.option("--direction-weight", type=non_negative(), default=0.1, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=20, show_default=True,
              help="Top genes (largest observed change) for the top-gene metrics.")
@step_options
def train_command(inputs, output, perturbation_key, control, target_key, combo_separator, min_cells, checkpoint,
                  vocab, version, gene_features, gene_graphs, coexpression, coexpression_threshold, coexpression_k,
                  skip_unknown_targets, min_gene_fraction, max_genes, control_cells, embed_batch_size, device,
                  precision, folds, epochs, hidden_size, lr, batch_size, replicates, direction_weight, top_k,
                  mlflow_uri, seed, quiet):
    """Train a perturbation predictor on aligned h5ad INPUTS (cross-validated by target gene first)."""
    from scfm.tasks.perturb.data import ScreenOptions
    from scfm.tasks.perturb.model import FitSettings
    from scfm.tasks.perturb.run import train_file

    check_output_path(output, inputs=[*inputs, checkpoint, vocab, *gene_graphs], directory=True)
    seed_everything(seed)
    fit_settings = FitSettings(epochs=epochs, batch_size=batch_size, lr=lr, direction_weight=direction_weight)
    params = {"inputs": [str(p) for p in inputs], "perturbation_key": perturbation_key, "control": control,
              "target_key": target_key, "checkpoint": str(checkpoint), "gene_features": gene_features,
              "gene_graphs": [str(p) for p in gene_graphs], "coexpression": coexpression, "folds": folds,
              "min_cells": min_cells, "fit": fit_settings.to_dict(), "hidden_size": hidden_size,
              "replicates": replicates, "top_k": top_k, "precision": precision, "seed": seed}
    with tracking.step_run("perturb_train", uri=tracking.resolve_uri(mlflow_uri, output.resolve().parent),
                           params=params) as run:
        options = ScreenOptions(perturbation_key, control, target_key=target_key, separator=combo_separator,
                                min_cells=min_cells, min_gene_fraction=min_gene_fraction, max_genes=max_genes,
                                skip_unknown_targets=skip_unknown_targets)
        summary = train_file(
            inputs, output, options, checkpoint=checkpoint, vocab=vocab, version=version, gene_graphs=gene_graphs,
            coexpression=coexpression, coexpression_threshold=coexpression_threshold,
            coexpression_k=coexpression_k, gene_feature_kind=gene_features, control_cells=control_cells,
            embed_batch_size=embed_batch_size, device=device, precision=precision, hidden=hidden_size,
            fit_settings=fit_settings, n_replicates=replicates, folds=folds, top_k=top_k, seed=seed, quiet=quiet,
            on_warning=_warn,
        )
        log_train_run(run, summary, output)
        log_resolved_precision(run, summary["settings"])
    if not quiet:
        click.echo(f"trained on {summary['n_perturbations']} perturbations x {summary['n_genes']} genes: {output}",
                   err=True)
        for method, row in (summary["summary"] or {}).items():
            click.echo(f"  {method:14s} " + "  ".join(
                f"{k} {'n/a' if row[k] is None else format(row[k], '.3f')}"
                for k in ("pearson", "pearson_top", "mse", "direction_top")), err=True)


def log_train_run(run, summary: dict, output: Path) -> None:
    import json

    metrics = {"n_perturbations": summary["n_perturbations"], "n_genes": summary["n_genes"],
               "n_skipped": len(summary["skipped_small"]) + len(summary["skipped_unknown_targets"]),
               "final_loss": summary["final_loss"], "seconds": summary["seconds"]}
    for method, row in (summary["summary"] or {}).items():
        metrics.update({f"{method}.{k}": v for k, v in row.items() if v is not None and not k.startswith("n_")})
    run.log_metrics(metrics)
    losses = json.loads((output / "train_log.json").read_text())["loss"]
    for step, loss in enumerate(losses):
        run.log_metrics({"train_loss": loss}, step=step)
    for name in ("predictor.json", "evaluation.json", "report.html"):
        if (output / name).exists():
            run.log_artifact(output / name)
    if (output / "plots").is_dir():
        run.log_artifact(output / "plots", "plots")


@perturb_group.command("predict")
@click.argument("predictor", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Perturbations x genes h5ad to write.")
@click.option("--perturbation", "perturbations", multiple=True,
              help="A perturbation to predict: GENE or GENE+GENE (repeatable).")
@click.option("--input", "input_path", type=_existing_file, default=None,
              help="Aligned h5ad: predict every perturbation in it and score against its cells.")
@click.option("--perturbation-key", default=None, help="With --input: obs column naming perturbations.")
@click.option("--control", default=None, help="With --input: the control value of --perturbation-key.")
@click.option("--target-key", default=None, help="With --input: obs column with the perturbed gene(s).")
@click.option("--combo-separator", default="+", show_default=True)
@click.option("--min-cells", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=20, show_default=True)
@step_options
def predict_command(predictor, output, perturbations, input_path, perturbation_key, control, target_key,
                    combo_separator, min_cells, top_k, mlflow_uri, seed, quiet):
    """Predict mean expression after each perturbation with a PREDICTOR from `scfm perturb train`."""
    from scfm.tasks.perturb.run import predict_file

    check_outputs(output, inputs=[predictor, input_path])
    seed_everything(seed)
    params = {"predictor": str(predictor), "perturbations": list(perturbations), "input": str(input_path),
              "perturbation_key": perturbation_key, "control": control, "top_k": top_k, "seed": seed}
    with tracking.step_run("perturb_predict", uri=tracking.resolve_uri(mlflow_uri, output.resolve().parent),
                           params=params) as run:
        summary = predict_file(predictor, output, perturbations=perturbations, input_path=input_path,
                               perturbation_key=perturbation_key, control=control, target_key=target_key,
                               separator=combo_separator, min_cells=min_cells, top_k=top_k, on_warning=_warn)
        metrics = {"n_perturbations": summary["n_perturbations"]}
        if summary["evaluation"]:
            row = summary["evaluation"]["summary"]["predictor"]
            metrics.update({f"predictor.{k}": v for k, v in row.items() if v is not None and not k.startswith("n_")})
            run.log_artifact(summary["evaluation_path"])
        run.log_metrics(metrics)
    if not quiet:
        click.echo(f"predicted {summary['n_perturbations']} perturbation(s): {output}", err=True)


COMMANDS = [perturb_group]
