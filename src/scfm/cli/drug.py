"""``scfm drug train | predict | adapt | score``: drug response on cell lines and single cells."""

from __future__ import annotations

from pathlib import Path

import click

from scfm import tracking
from scfm.cli.common import check_outputs, fraction, non_negative, positive, step_options
from scfm.utils import check_output_path, seed_everything

_file = click.Path(exists=True, dir_okay=False, path_type=Path)
_dir = click.Path(exists=True, file_okay=False, path_type=Path)
_representation = click.option(
    "--representation", type=click.Choice(["scfm", "expression", "pca"]), default="scfm", show_default=True,
    help="Cell features: obsm[--embedding-key] from `scfm embed`, X as it is, or PCA of X (fitted on training lines).")
_embedding_key = click.option("--embedding-key", default="X_scfm", show_default=True, help="obsm key of the embedding.")


def _drug_list(value: str | None) -> list[str] | None:
    return [d.strip() for d in value.split(",") if d.strip()] if value else None


@click.group("drug")
def drug() -> None:
    """Drug response: ln IC50 regression on cell lines, sensitivity transfer to single cells."""


@drug.command("train")
@click.argument("cells", type=_file)
@click.option("--response", required=True, type=_file,
              help="Table of cell_line, drug, ln_ic50 (CSV or TSV; GDSC column names work too).")
@click.option("--smiles", "smiles_path", required=True, type=_file, help="Table of drug, smiles.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model directory to write (also predictions.tsv, metrics.json, plots/).")
@_representation
@_embedding_key
@click.option("--split-by", type=click.Choice(["cell_line", "drug", "pair"]), default="cell_line", show_default=True,
              help="Unit held out for validation and test: unseen cell lines, unseen drugs or random pairs.")
@click.option("--test-fraction", type=fraction(open_high=True), default=0.1, show_default=True)
@click.option("--val-fraction", type=fraction(open_low=True, open_high=True), default=0.1,
              show_default=True, help="Held out for early stopping.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=10, show_default=True,
              help="Epochs without a better validation Pearson before stopping.")
@click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--learning-rate", type=positive(), default=1e-3, show_default=True)
@click.option("--pca-components", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--fingerprint-bits", type=click.IntRange(min=64), default=1024, show_default=True)
@click.option("--fingerprint-radius", type=click.IntRange(min=1), default=2, show_default=True)
@step_options
def train(cells, response, smiles_path, output, representation, embedding_key, split_by, test_fraction, val_fraction,
          max_epochs, patience, batch_size, learning_rate, pca_components, fingerprint_bits, fingerprint_radius,
          mlflow_uri, seed, quiet):
    """Train an ln IC50 regressor on the cell lines of CELLS (.h5ad, obs_names = cell-line names).

    Drugs whose SMILES RDKit cannot parse, or that have none, are listed on stderr and in metrics.json and
    left out; cell lines or drugs with no overlap between the tables are an error.
    """
    from scfm.tasks.drug.regression import RegressorSettings
    from scfm.tasks.drug.run import train_file
    from scfm.utils import progress

    check_output_path(output, inputs=[cells, response, smiles_path], directory=True)
    seed_everything(seed)
    settings = RegressorSettings(max_epochs=max_epochs, patience=patience, batch_size=batch_size,
                                 learning_rate=learning_rate, pca_components=pca_components, seed=seed)
    params = {"cells": str(cells), "response": str(response), "smiles": str(smiles_path), "output": str(output),
              "representation": representation, "embedding_key": embedding_key, "split_by": split_by,
              "test_fraction": test_fraction, "val_fraction": val_fraction, "fingerprint_bits": fingerprint_bits,
              "fingerprint_radius": fingerprint_radius, **settings.__dict__}
    with tracking.step_run("drug_train", uri=tracking.resolve_uri(mlflow_uri, output.resolve().parent),
                           params=params) as run:
        with progress(total=max_epochs, desc="epochs", unit="epoch", quiet=quiet) as bar:
            metrics = train_file(
                cells, response, smiles_path, output, representation=representation, embedding_key=embedding_key,
                split_by=split_by, test_fraction=test_fraction, val_fraction=val_fraction, settings=settings,
                radius=fingerprint_radius, n_bits=fingerprint_bits, progress=bar,
                log_epoch=lambda record: run.log_metrics({k: v for k, v in record.items() if k != "epoch"},
                                                         step=record["epoch"]))
        run.log_metrics(_flat(metrics))
        run.log_artifact(output / "metrics.json")
        run.log_artifact(output / "plots")
    skipped = metrics["dropped"]["drugs_with_unparsable_smiles"]
    if skipped:
        click.echo(f"warning: {len(skipped)} drug(s) skipped, RDKit cannot parse their SMILES: {', '.join(skipped)}",
                   err=True)
    if not quiet:
        part = metrics.get("test") or metrics["val"]
        click.echo(f"trained on {metrics['n_cell_lines']} cell lines x {metrics['n_drugs']} drugs "
                   f"(best epoch {metrics['best_epoch']}); {'test' if 'test' in metrics else 'validation'} pearson "
                   f"{part['model']['pearson']:.3f} (drug-mean baseline {part['drug_mean_baseline']['pearson']:.3f}): "
                   f"{output}", err=True)


def _flat(metrics: dict) -> dict:
    return {f"{part}.{who}.{name}": value for part in ("train", "val", "test") if part in metrics
            for who, values in metrics[part].items() for name, value in values.items()}


@drug.command("predict")
@click.argument("cells", type=_file)
@click.option("--model", "model_dir", required=True, type=_dir, help="Model directory from `scfm drug train`.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Predictions TSV (cell_line, drug, predicted_ln_ic50).")
@click.option("--drugs", default=None, help="Comma-separated drugs (default: every drug of the model).")
@click.option("--smiles", "smiles_path", type=_file, default=None,
              help="drug, smiles table for drugs the model has not seen.")
@click.option("--response", type=_file, default=None,
              help="Measured ln IC50: predict only those pairs and write <output stem>.metrics.json.")
@_embedding_key
@step_options
def predict(cells, model_dir, output, drugs, smiles_path, response, embedding_key, mlflow_uri, seed, quiet):
    """Predict ln IC50 for the cell lines of CELLS with a trained model; an unknown drug is an error."""
    from scfm.tasks.drug.run import predict_file

    check_outputs(output, inputs=[cells, smiles_path, response])
    seed_everything(seed)
    params = {"cells": str(cells), "model": str(model_dir), "output": str(output), "drugs": drugs,
              "smiles": str(smiles_path), "response": str(response), "embedding_key": embedding_key}
    with tracking.step_run("drug_predict", uri=tracking.resolve_uri(mlflow_uri, output.resolve().parent),
                           params=params) as run:
        summary = predict_file(cells, model_dir, output, drugs=_drug_list(drugs), smiles_path=smiles_path,
                               response_path=response, embedding_key=embedding_key)
        run.log_metrics({"n_pairs": summary["n_pairs"], **summary.get("metrics", {})})
        run.log_artifact(output)
    if not quiet:
        extra = f", pearson {summary['metrics']['pearson']:.3f}" if "metrics" in summary else ""
        click.echo(f"predicted {summary['n_pairs']} pairs{extra}: {output}", err=True)


@drug.command("adapt")
@click.argument("bulk", type=_file)
@click.option("--response", required=True, type=_file, help="cell_line, drug, ln_ic50 of the bulk lines.")
@click.option("--target", "targets", required=True, multiple=True, type=_file,
              help="Unlabelled single cells to adapt to (.h5ad, repeatable).")
@click.option("--drugs", required=True, help="Comma-separated drugs to train a sensitivity classifier for.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Sensitivity model directory to write.")
@click.option("--representation", type=click.Choice(["scfm", "expression"]), default="scfm", show_default=True,
              help="scfm: obsm[--embedding-key] of both inputs; expression: X on the genes both share.")
@_embedding_key
@click.option("--sensitive-quantile", type=fraction(open_low=True, open_high=True), default=0.5, show_default=True,
              help="A line is sensitive when its ln IC50 is at or below this quantile of the drug's values.")
@click.option("--domain-weight", type=non_negative(), default=1.0, show_default=True,
              help="Weight of the adversarial domain loss (0: no adaptation).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True,
              help="Bulk lines and cells per step (each).")
@step_options
def adapt(bulk, response, targets, drugs, output, representation, embedding_key, sensitive_quantile, domain_weight,
          epochs, steps_per_epoch, batch_size, mlflow_uri, seed, quiet):
    """Train sensitive/resistant classifiers on BULK cell lines, adapted adversarially to single cells."""
    from scfm.tasks.drug.run import adapt_file
    from scfm.tasks.drug.transfer import TransferSettings
    from scfm.utils import progress

    check_output_path(output, inputs=[bulk, response, *targets], directory=True)
    seed_everything(seed)
    drug_names = _drug_list(drugs) or []
    settings = TransferSettings(domain_weight=domain_weight, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                batch_size=batch_size, sensitive_quantile=sensitive_quantile, seed=seed)
    params = {"bulk": str(bulk), "response": str(response), "targets": [str(t) for t in targets],
              "drugs": drug_names, "output": str(output), "representation": representation,
              "embedding_key": embedding_key, **settings.__dict__}
    with tracking.step_run("drug_adapt", uri=tracking.resolve_uri(mlflow_uri, output.resolve().parent),
                           params=params) as run:
        with progress(total=len(drug_names), desc="drugs", unit="drug", quiet=quiet) as bar:
            summary = adapt_file(bulk, response, list(targets), output, drugs=drug_names,
                                 representation=representation, embedding_key=embedding_key, settings=settings,
                                 progress=bar)
        run.log_metrics({f"{d}.{k}": v for d, m in summary["per_drug"].items() for k, v in m.items()})
        run.log_artifact(output / "metrics.json")
    if not quiet:
        for drug_name, m in summary["per_drug"].items():
            click.echo(f"{drug_name}: held-out bulk AUROC {m['source_val_auroc']:.3f}, "
                       f"domain AUROC {m['domain_auroc']:.3f}", err=True)


@drug.command("score")
@click.argument("input_path", metavar="INPUT", type=_file)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="h5ad to write: INPUT + obs['scfm_<drug>_sensitivity'].")
@click.option("--model", "model_dir", required=True, type=_dir, help="Model directory from `scfm drug adapt`.")
@click.option("--drugs", default=None, help="Comma-separated drugs (default: every drug of the model).")
@_embedding_key
@step_options
def score(input_path, output, model_dir, drugs, embedding_key, mlflow_uri, seed, quiet):
    """Score each cell of INPUT for sensitivity to the model's drugs."""
    from scfm.tasks.drug.run import score_file

    check_outputs(output, inputs=[input_path])
    seed_everything(seed)
    params = {"input": str(input_path), "output": str(output), "model": str(model_dir), "drugs": drugs,
              "embedding_key": embedding_key}
    with tracking.step_run("drug_score", uri=tracking.resolve_uri(mlflow_uri, output.resolve().parent),
                           params=params) as run:
        summary = score_file(input_path, output, model_dir, drugs=_drug_list(drugs), embedding_key=embedding_key)
        run.log_metrics({"n_cells": summary["n_cells"],
                         **{f"{d}.mean_sensitivity": v for d, v in summary["mean_sensitivity"].items()}})
    if not quiet:
        click.echo(f"scored {summary['n_cells']} cells for {', '.join(summary['drugs'])}: {output}", err=True)


COMMANDS = [drug]
