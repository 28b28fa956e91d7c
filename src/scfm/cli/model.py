"""``scfm embed`` and ``scfm convert``: apply a checkpoint to cells; turn the official file into ours."""

from __future__ import annotations

from pathlib import Path

import click

from scfm.cli.common import check_outputs, fraction, step_options


@click.command("embed")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="OUT.h5ad (aligned data + embeddings) or OUT.npy (the array only).")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="scfm checkpoint directory or the official models.ckpt.")
@click.option("--vocab", "vocab_path", type=click.Path(path_type=Path),
              help="Vocabulary TSV (required with an official .ckpt; checked against a checkpoint directory's).")
@click.option("--output-type", type=click.Choice(["cell", "gene", "gene-expression"]), default="cell",
              show_default=True, help="Cell embeddings, gene embeddings (.npy only) or predicted expression.")
@click.option("--pool", type=click.Choice(["all", "max"]), default="all", show_default=True,
              help="Cell pooling: all = S, T, max, mean (4 x d); max = max over tokens (d).")
@click.option("--target-depth", default="t4", show_default=True,
              help="T token: t<log10 depth>, f<fold of the cell's depth> or a<log10 added>.")
@click.option("--pre-normalized", type=click.Choice(["F", "T", "A"]), default="F", show_default=True,
              help="F: raw counts; T: log1p-normalised; A: normalised, raw totals in obs['total_counts'].")
@click.option("--input-type", type=click.Choice(["singlecell", "bulk"]), default="singlecell", show_default=True,
              help="bulk: rows are bulk samples, T = S = log10 of the summed normalised values (F: scaled to the "
                   "input's median total, then log1p) or the plain sum (T); --target-depth is not used.")
@click.option("--version", "version", type=click.Choice(["ce", "rde", "gene"]), default=None,
              help="Which model of an official .ckpt (default: gene for gene outputs, else ce).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Cells per batch (default: cell output 4 on CPU, 64 on CUDA; decoder outputs 2).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 on CUDA; on a CPU with native bf16 (AVX-512 BF16, AMX) bf16 when the encoder is at "
                   "least 128 wide and the first cells keep per-cell cosine >= 0.999 to fp32, else fp32. bf16 on a "
                   "CPU without it is emulated and slower than fp32. The choice and its reason go to "
                   "uns['scfm']['embed'].")
@click.option("--chunk-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Cells read from disk at a time (bounds memory).")
@click.option("--min-coverage", type=fraction(), default=0.3, show_default=True,
              help="When aligning: fail if less of the counts fall in vocabulary genes.")
@step_options
def embed_command(input_path, output, checkpoint, vocab_path, output_type, pool, target_depth, pre_normalized,
                  input_type, version, batch_size, device, precision, chunk_size, min_coverage, mlflow_uri, seed, quiet):
    """Embed INPUT's cells with a checkpoint: obsm['X_scfm'], layers['scfm_expr'] or a .npy."""
    from scfm import tracking
    from scfm.tasks.embed import embed_file
    from scfm.utils import seed_everything

    check_outputs(output, inputs=[input_path, checkpoint, vocab_path])
    seed_everything(seed)
    version = version or ("gene" if output_type != "cell" else "ce")
    params = {"input": str(input_path), "output": str(output), "checkpoint": str(checkpoint),
              "vocab": str(vocab_path), "output_type": output_type, "pool": pool, "target_depth": target_depth,
              "pre_normalized": pre_normalized, "input_type": input_type, "version": version,
              "batch_size": str(batch_size),
              "device": device, "precision": precision, "chunk_size": chunk_size, "min_coverage": min_coverage,
              "seed": seed}
    with tracking.step_run("embed", uri=tracking.resolve_uri(mlflow_uri, output.resolve().parent),
                           params=params) as run:
        result = embed_file(input_path, output, checkpoint, vocab=vocab_path, output_type=output_type, pool=pool,
                            target_depth=target_depth, pre_normalized=pre_normalized, version=version,
                            batch_size=batch_size, device=device, precision=precision, chunk_size=chunk_size,
                            min_coverage=min_coverage, quiet=quiet, input_type=input_type)
        run.log_params({"resolved_device": result["device"], "resolved_precision": result["precision"],
                        "precision_reason": result["precision_reason"],
                        "vocab_sha256": result["vocab_sha256"]})
        run.log_metrics({"n_cells": result["n_cells"], "seconds": result["seconds"],
                         "cells_per_s": result["cells_per_s"], "coverage": result.get("coverage")})
        run.log_dict({k: v for k, v in result.items()}, "embed_settings.json")
    if not quiet:
        click.echo(f"embedded {result['n_cells']} cells → {output} ({result['cells_per_s']:.1f} cells/s)", err=True)


@click.command("convert")
@click.argument("checkpoint", metavar="CKPT", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write.")
@click.option("--version", "version", type=click.Choice(["ce", "rde", "gene"]), default="ce", show_default=True,
              help="Which model of the official file: ce (cell), rde (read-depth enhancement) or gene.")
@click.option("--vocab", "vocab_path", required=True, type=click.Path(path_type=Path),
              help="The gene list the checkpoint was trained on (OS_scRNA_gene_index.19264.tsv).")
@step_options
def convert_command(checkpoint, output, version, vocab_path, mlflow_uri, seed, quiet):
    """Convert an official scFoundation .ckpt (one version) into a scfm checkpoint directory."""
    from scfm import tracking
    from scfm.model.checkpoint import load_checkpoint, save_checkpoint
    from scfm.utils import check_output_path, seed_everything

    check_output_path(output, inputs=[checkpoint, vocab_path], directory=True)
    seed_everything(seed)
    params = {"checkpoint": str(checkpoint), "output": str(output), "version": version, "vocab": str(vocab_path)}
    with tracking.step_run("convert", uri=tracking.resolve_uri(mlflow_uri, output.resolve().parent),
                           params=params) as run:
        loaded = load_checkpoint(checkpoint, version=version, vocab=vocab_path)
        save_checkpoint(output, loaded.model, loaded.config, loaded.vocab,
                        extra={"converted_from": str(checkpoint), "version": version})
        n_params = sum(p.numel() for p in loaded.model.parameters())
        run.log_params({"model": loaded.config.to_dict(), "vocab_sha256": loaded.vocab.sha256})
        run.log_metrics({"n_parameters": n_params})
        run.log_artifact(output / "config.json")
    if not quiet:
        click.echo(f"converted {checkpoint} [{version}] → {output} ({n_params / 1e6:.1f}M parameters)", err=True)


COMMANDS = [embed_command, convert_command]
