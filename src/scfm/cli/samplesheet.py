"""``scfm samplesheet check``: validate a samplesheet the way the pipeline reads it, before a run."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("samplesheet")
def samplesheet_group():
    """Samplesheets: sample,path[,batch][,condition] (schema assets/schema_input.json)."""


@samplesheet_group.command("check")
@click.argument("sheet", metavar="SHEET", type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="Print nothing when the samplesheet is valid.")
def check_command(sheet, quiet):
    """Check SHEET: columns, sample ids, batch names, duplicates, and that every input exists and has a
    supported format (relative paths are relative to SHEET). Exit 0 and one summary line when valid."""
    from scfm.data.io import check_samplesheet

    frame = check_samplesheet(sheet)
    if not quiet:
        n_batches = frame["batch"].nunique()
        click.echo(f"{sheet}: valid, {len(frame)} sample(s) in {n_batches} batch(es), every input found")


COMMANDS = [samplesheet_group]
