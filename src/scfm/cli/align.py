"""``scfm align`` and ``scfm vocab build``: put cells into vocabulary order; make a vocabulary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from scfm.cli.common import check_outputs, fraction, step_options
from scfm.errors import ScfmUsageError


def _default_coverage_json(output: Path | None, shards_dir: Path | None) -> Path:
    if output is not None:
        name = output.name[: -len(".h5ad")] if output.name.endswith(".h5ad") else output.name
        return output.with_name(f"{name}.coverage.json")
    return shards_dir.with_name(f"{shards_dir.name}.coverage.json")


@click.command("align")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Aligned .h5ad to write.")
@click.option("--vocab", "vocab_path", required=True, type=click.Path(path_type=Path), help="Vocabulary TSV.")
@click.option("--aliases", type=click.Path(path_type=Path), help="Alias TSV (columns alias, gene_name).")
@click.option("--shards-dir", type=click.Path(path_type=Path), help="Directory of Parquet shards to write.")
@click.option("--cells-per-shard", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--shard-obs-columns", default=None,
              help="Comma-separated obs columns to copy into shards (default: sample,batch,condition when present).")
@click.option("--min-coverage", type=fraction(), default=0.3, show_default=True,
              help="Fail when the fraction of input counts in vocabulary genes is lower.")
@click.option("--coverage-json", type=click.Path(path_type=Path),
              help="Coverage report (default: <output>.coverage.json next to the output).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Cells read and aligned at a time (bounds memory).")
@click.option("--layer", default=None, help="Count matrix: a layer name, 'raw' for .raw, or 'X'.")
@step_options
def align_command(input_path, output, vocab_path, aliases, shards_dir, cells_per_shard, shard_obs_columns,
                  min_coverage, coverage_json, chunk_size, layer, mlflow_uri, seed, quiet):
    """Align INPUT's genes to a vocabulary: aligned .h5ad (-o) and/or Parquet shards (--shards-dir)."""
    from scfm import tracking
    from scfm.data.align import align_file, load_aliases
    from scfm.data.vocab import Vocabulary
    from scfm.utils import atomic_output, check_output_path, seed_everything

    if output is None and shards_dir is None:
        raise ScfmUsageError("give -o OUT.h5ad and/or --shards-dir DIR")
    coverage_json = coverage_json or _default_coverage_json(output, shards_dir)
    inputs = [input_path, vocab_path, aliases]
    if shards_dir is not None:
        check_output_path(shards_dir, inputs=inputs, directory=True)  # replaced whole
    check_outputs(output, coverage_json, inputs=inputs)
    seed_everything(seed)
    vocab = Vocabulary.load(vocab_path)
    alias_map = load_aliases(aliases) if aliases else None
    obs_columns = [c.strip() for c in shard_obs_columns.split(",") if c.strip()] if shard_obs_columns else None
    out_dir = (output or shards_dir).resolve().parent
    params = {
        "input": str(input_path), "vocab": str(vocab_path), "vocab_sha256": vocab.sha256, "n_vocab": len(vocab),
        "aliases": str(aliases), "min_coverage": min_coverage, "chunk_size": chunk_size, "layer": str(layer),
        "output": str(output), "shards_dir": str(shards_dir), "cells_per_shard": cells_per_shard, "seed": seed,
    }
    with tracking.step_run("align", uri=tracking.resolve_uri(mlflow_uri, out_dir), params=params) as run:
        started = time.perf_counter()
        coverage = align_file(
            input_path, vocab, out_h5ad=output, shards_dir=shards_dir, aliases=alias_map,
            min_coverage=min_coverage, chunk_size=chunk_size, cells_per_shard=cells_per_shard, layer=layer,
            shard_obs_columns=obs_columns, quiet=quiet,
        )
        seconds = time.perf_counter() - started
        with atomic_output(coverage_json) as tmp:
            tmp.write_text(json.dumps(coverage, indent=2) + "\n")
        run.log_metrics({
            "n_cells": coverage["n_cells"],
            "fraction_counts_kept": coverage["fraction_counts_kept"],
            "fraction_vocab_genes_present": coverage["fraction_vocab_genes_present"],
            "fraction_input_genes_matched": coverage["fraction_input_genes_matched"],
            "seconds": seconds,
            "cells_per_s": coverage["n_cells"] / seconds if seconds > 0 else 0.0,
        })
        run.log_artifact(coverage_json)
        if shards_dir is not None:
            run.log_artifact(Path(shards_dir) / "manifest.json")
    if not quiet:
        click.echo(
            f"aligned {coverage['n_cells']} cells: {coverage['fraction_counts_kept']:.1%} of counts kept, "
            f"{coverage['vocab_genes_present']}/{coverage['n_vocab_genes']} vocabulary genes present",
            err=True,
        )


@click.group("vocab")
def vocab_group():
    """Gene vocabularies (TSV; row order = token id)."""


@vocab_group.command("build")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Vocabulary TSV to write.")
@click.option("--min-cells", type=click.IntRange(min=1), default=10, show_default=True,
              help="Keep genes detected in at least this many cells over all inputs.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option("--layer", default=None, help="Count matrix: a layer name, 'raw' for .raw, or 'X'.")
@step_options
def vocab_build_command(inputs, output, min_cells, chunk_size, layer, mlflow_uri, seed, quiet):
    """Build a vocabulary from INPUT files: genes by descending number of cells detected, then by name."""
    from scfm import tracking
    from scfm.data.vocab import build_vocabulary
    from scfm.utils import seed_everything

    check_outputs(output, inputs=inputs)
    seed_everything(seed)
    params = {"inputs": [str(p) for p in inputs], "min_cells": min_cells, "chunk_size": chunk_size,
              "layer": str(layer), "output": str(output), "seed": seed}
    uri = tracking.resolve_uri(mlflow_uri, output.resolve().parent)
    with tracking.step_run("vocab", uri=uri, params=params) as run:
        vocab = build_vocabulary(inputs, min_cells=min_cells, chunk_size=chunk_size, layer=layer, quiet=quiet)
        vocab.save(output)
        run.log_metrics({"n_genes": len(vocab)})
        run.set_tags({"vocab_sha256": vocab.sha256})
        run.log_artifact(output)
    if not quiet:
        click.echo(f"{output}: {len(vocab)} genes (sha256 {vocab.sha256[:12]})", err=True)


COMMANDS = [align_command, vocab_group]
