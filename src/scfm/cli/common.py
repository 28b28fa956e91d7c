"""Options and flag types every step shares, so that each command spells and checks them the same way."""

from __future__ import annotations

import math

import click

mlflow_uri_option = click.option(
    "--mlflow-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow tracking URI (default: sqlite:///<output dir>/mlflow.db).",
)
seed_option = click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


def step_options(func):
    """``--mlflow-uri``, ``--seed`` and ``--quiet``, in that order, on every step command."""
    return mlflow_uri_option(seed_option(quiet_option(func)))


class FiniteFloat(click.FloatRange):
    """A float flag that must be a finite number within a range.

    click's own ``float`` and ``FloatRange`` accept ``nan`` (it compares false with every bound) and
    ``inf``; a learning rate or a fraction of NaN then fails deep inside a step, or not at all.
    """

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def positive() -> FiniteFloat:
    """A finite number > 0 (learning rates, scales)."""
    return FiniteFloat(min=0, min_open=True)


def non_negative() -> FiniteFloat:
    """A finite number >= 0 (weight decay, clipping, thresholds)."""
    return FiniteFloat(min=0)


def fraction(*, open_low: bool = False, open_high: bool = False) -> FiniteFloat:
    """A finite number within 0..1; ``open_low`` / ``open_high`` exclude the ends."""
    return FiniteFloat(0, 1, min_open=open_low, max_open=open_high)


def check_outputs(*files, inputs=(), folders=()) -> None:
    """Check every output path of a command before any work (see :func:`scfm.utils.check_output_path`);
    ``folders`` are output folders written into (not replaced), and two outputs may not share a path."""
    from pathlib import Path

    from scfm.errors import ScfmUsageError
    from scfm.utils import check_output_path

    given = [Path(f) for f in files if f is not None]
    for path in given:
        check_output_path(path, inputs=inputs)
    for folder in folders:
        if folder is not None:
            check_output_path(folder, directory=True)
    seen: dict = {}
    for path in given:
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            raise ScfmUsageError(f"two outputs of this step are the same file ({first} and {path})", path)


def log_resolved_precision(run, settings: dict) -> None:
    """The precision a step's model ran in and why, next to the requested ``precision`` param (absent when
    no model ran, e.g. a gene network from saved gene embeddings)."""
    if "precision_reason" in settings:
        run.log_params({"resolved_precision": settings["precision"], "precision_reason": settings["precision_reason"]})
