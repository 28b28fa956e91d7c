"""The ``scfm`` command: one thin subcommand per pipeline step.

Each subcommand parses flags, calls one package function and maps :class:`~scfm.errors.ScfmError`
to ``error: <path>: <problem>`` with a non-zero exit. Subcommands live in the modules of this
package by area and are registered below.
"""

from __future__ import annotations

import sys

import click

from scfm import __version__
from scfm.errors import ScfmError, Terminated


class ScfmGroup(click.Group):
    def invoke(self, ctx):
        from scfm.utils import close_progress_bars, sigterm_unwinds

        try:
            with sigterm_unwinds():
                return super().invoke(ctx)
        except (ScfmError, Terminated) as exc:
            close_progress_bars()
            click.echo(f"error: {exc.one_line()}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=ScfmGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="scfm")
def cli() -> None:
    """scfm: QC, align, pretrain, fine-tune, embed, annotate and report single-cell data
    with a scFoundation-style foundation model."""


def _register() -> None:
    # imported here so that `scfm --help` stays fast and each area owns its own module
    from scfm.cli import align, downstream, drug, genes, model, perturb, qc, samplesheet, tracking, train

    for module in (qc, align, model, train, downstream, genes, perturb, tracking, drug, samplesheet):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None, prog_name: str = "scfm") -> int:
    """Entry point for ``scfm`` and the ``bin/scfm-<step>`` executables."""
    try:
        cli.main(args=argv, prog_name=prog_name, standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def run_step(step: str) -> int:
    """``bin/scfm-<step> ARGS`` is exactly ``scfm <step> ARGS``."""
    return main([*step.split(), *sys.argv[1:]], prog_name=f"scfm-{step.replace(' ', '-')}")
