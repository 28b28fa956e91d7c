"""``scfm mlflow-init``: create the shared store and the pipeline's parent run before parallel steps."""

from __future__ import annotations

import click

from scfm import tracking


@click.command("mlflow-init")
@click.option("--mlflow-uri", required=True, help="Tracking URI shared by every pipeline step.")
@click.option("--run-name", required=True, help="Name of the parent run (Nextflow's workflow.runName).")
@click.option("--session-id", required=True, help="Nextflow's workflow.sessionId; -resume keeps it.")
@click.option("--experiment", default=tracking.DEFAULT_EXPERIMENT, show_default=True)
def mlflow_init(mlflow_uri: str, run_name: str, session_id: str, experiment: str) -> None:
    """Create the MLflow store and the parent run; print the parent run id.

    Idempotent per session id, so a resumed pipeline reuses its parent run.
    """
    click.echo(tracking.ensure_parent_run(mlflow_uri, run_name, session_id, experiment))


COMMANDS = [mlflow_init]
