"""``scfm mlflow-init`` / ``scfm mlflow-finish``: the pipeline's parent MLflow run, before and after
the parallel steps."""

from __future__ import annotations

import os

import click

from scfm import tracking
from scfm.errors import ScfmUsageError

URI_HELP = "Tracking URI shared by every pipeline step (default: MLFLOW_TRACKING_URI)."


def _uri(mlflow_uri: str | None) -> str:
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ScfmUsageError("no MLflow store: give --mlflow-uri or set MLFLOW_TRACKING_URI")
    return uri


@click.command("mlflow-init")
@click.option("--mlflow-uri", default=None, help=URI_HELP)
@click.option("--session-id", required=True, help="Nextflow's workflow.sessionId; -resume keeps it.")
@click.option("--run-name", default=None, help="Name of the parent run [default: pipeline-<session id>].")
@click.option("--experiment", default=tracking.DEFAULT_EXPERIMENT, show_default=True)
def mlflow_init(mlflow_uri: str | None, session_id: str, run_name: str | None, experiment: str) -> None:
    """Create the MLflow store and the parent run; print the parent run id.

    Idempotent per session id, so a resumed pipeline reuses its parent run.
    """
    click.echo(tracking.ensure_parent_run(_uri(mlflow_uri), run_name, session_id, experiment))


@click.command("mlflow-finish")
@click.option("--mlflow-uri", default=None, help=URI_HELP)
@click.option("--session-id", required=True, help="Nextflow's workflow.sessionId.")
@click.option("--status", type=click.Choice(["FINISHED", "FAILED", "KILLED"]), default="FINISHED", show_default=True)
@click.option("--experiment", default=tracking.DEFAULT_EXPERIMENT, show_default=True)
def mlflow_finish(mlflow_uri: str | None, session_id: str, status: str, experiment: str) -> None:
    """End the pipeline's parent run with STATUS; print its id."""
    click.echo(tracking.finish_parent_run(_uri(mlflow_uri), session_id, status, experiment))


COMMANDS = [mlflow_init, mlflow_finish]
