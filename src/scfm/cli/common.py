"""Options every step shares, so that each command spells them the same way."""

from __future__ import annotations

import click

mlflow_uri_option = click.option(
    "--mlflow-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow tracking URI (default: sqlite:///<output dir>/mlflow.db).",
)
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


def step_options(func):
    """``--mlflow-uri``, ``--seed`` and ``--quiet``, in that order, on every step command."""
    return mlflow_uri_option(seed_option(quiet_option(func)))
