"""``scfm pretrain`` and ``scfm finetune``: thin wrappers over :mod:`scfm.train`."""

from __future__ import annotations

import json

import click

from scfm.cli.common import fraction, non_negative, positive, step_options


@click.command("pretrain")
@click.option("--shards", "shards", multiple=True, required=True, type=click.Path(),
              help="Shard directory from `scfm align` (repeat for several).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Output directory.")
@click.option("--vocab", type=click.Path(), default=None,
              help="Vocabulary TSV the shards were aligned to (default: the --init-checkpoint's).")
@click.option("--model-preset", type=click.Choice(["tiny", "small", "base-100m"]), default="tiny", show_default=True)
@click.option("--init-checkpoint", type=click.Path(), default=None,
              help="Start from this checkpoint (our directory or an official .ckpt).")
@click.option("--zero-stage", type=click.IntRange(1, 3), default=2, show_default=True)
@click.option("--deepspeed-config", type=click.Path(), default=None,
              help="DeepSpeed JSON config (default: the packaged zero<stage>.json).")
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Cells per rank per micro-step.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-steps per optimizer step.")
@click.option("--max-steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Optimizer steps to train to.")
@click.option("--lr-decay-steps", type=click.IntRange(min=1), default=None,
              help="Cosine horizon in steps (default: --max-steps). Set it to stop early and resume later.")
@click.option("--lr", type=positive(), default=1e-4, show_default=True)
@click.option("--min-lr-ratio", type=fraction(), default=0.1, show_default=True, help="Final LR / peak LR.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=9766, show_default=True,
              help="Linear LR warmup in optimizer steps. 9,766 is the released run's: 10 million cells per device at "
                   "its 1,024 cells per device and step. Short runs need far fewer (e.g. a tenth of --max-steps).")
@click.option("--weight-decay", type=non_negative(), default=0.0, show_default=True,
              help="AdamW weight decay (never on biases, norms or embedding tables).")
@click.option("--adam-betas", type=(fraction(open_high=True), fraction(open_high=True)), default=(0.9, 0.999),
              show_default=True)
@click.option("--adam-eps", type=positive(), default=1e-8, show_default=True)
@click.option("--gradient-clipping", type=non_negative(), default=1.0, show_default=True)
@click.option("--encoder-dropout", type=fraction(open_high=True), default=0.1, show_default=True,
              help="Dropout in the encoder layers (attention weights, attention output, feed-forward), as the "
                   "released encoder's nn.TransformerEncoderLayer; off whenever the model is evaluated.")
@click.option("--performer-redraw-interval", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Redraw the decoder's random features every N training calls (micro-batches); 0: never.")
@click.option("--init", type=click.Choice(["pytorch", "small-normal"]), default="pytorch", show_default=True,
              help="Initialisation of a fresh model: PyTorch's defaults, as the released code, or N(0, 0.02).")
@click.option("--save-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Checkpoint every N steps.")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--resume", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              is_flag=False, flag_value="always",
              help="auto: continue from the newest complete checkpoint in OUTPUT, start fresh if none; "
                   "always (also a bare --resume): require one; never: refuse a directory holding checkpoints.")
@click.option("--overwrite", is_flag=True,
              help="Start over: delete OUTPUT's checkpoints of an earlier run (with --resume never or auto).")
@click.option("--mix-row-groups", type=click.IntRange(min=1), default=256, show_default=True,
              help="Shard pieces pooled and shuffled together per round (memory: this x row group size / "
                   "--row-group-slices cells per process).")
@click.option("--row-group-slices", type=click.IntRange(min=1), default=4, show_default=True,
              help="Slices each Parquet row group is dealt into (more: more row groups mixed, more reads).")
@click.option("--mask-ratio", type=fraction(open_low=True), default=0.3, show_default=True,
              help="Share of nonzero genes masked.")
@click.option("--zero-mask-ratio", type=fraction(), default=0.03, show_default=True, help="Share of zero genes masked.")
@click.option("--mask-token-prob", type=fraction(), default=0.8, show_default=True)
@click.option("--random-token-prob", type=fraction(), default=0.1, show_default=True)
@click.option("--downsample-prob", type=fraction(), default=0.5, show_default=True,
              help="Chance a cell (with at least --downsample-min-total counts) is binomially thinned.")
@click.option("--downsample-beta", type=(positive(), positive()), default=(2.0, 2.0), show_default=True,
              help="Beta(a, b) prior of the fraction of counts a thinned cell keeps.")
@click.option("--downsample-min-total", type=non_negative(), default=1000.0, show_default=True,
              help="Cells with fewer counts are never thinned.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 on CUDA; on a CPU with native bf16 (AVX-512 BF16, AMX) bf16 autocast when the encoder "
                   "is at least 128 wide and the first batch's predictions keep per-cell cosine >= 0.999 to fp32, "
                   "else fp32; a resumed run keeps its checkpoint's choice.")
@step_options
def pretrain_command(shards, out_dir, mask_ratio, zero_mask_ratio, mask_token_prob, random_token_prob,
                     downsample_prob, downsample_beta, downsample_min_total, mlflow_uri, seed, quiet, **options):
    """Pretrain (or continue pretraining) on Parquet shards with DeepSpeed ZeRO.

    Runs as one process, under torchrun/deepspeed, or under srun (Slurm).

    \b
    Re-running the same command continues the run (--resume auto): it picks the newest checkpoint
    that every rank finished saving, after checking that the settings that change the math (model,
    vocabulary, processes, micro batch, grad accumulation, seed, data mixing, redraw interval, masking and
    down-sampling) are the same; --max-steps, --save-every and the LR schedule may change.

    \b
    Defaults follow the released scFoundation run: AdamW lr 1e-4, betas (0.9, 0.999), no weight decay,
    9,766 warmup steps, clipping 1.0, encoder dropout 0.1, random features redrawn every 1,000 calls,
    PyTorch-default init, masking 30 %/3 % (80/10/10), down-sampling half of the cells with >= 1,000
    counts to a Beta(2, 2) fraction. Every resolved value is logged to MLflow (recipe.*).

    \b
    Preemption and requeue (Slurm): on SIGTERM or SIGUSR1 every rank finishes the current step, a
    checkpoint is saved and scfm exits with code 75 ("preempted"). Ask for the warning signal and a
    requeue in the batch script, and run the same command again:
      #SBATCH --requeue --signal=USR1@120
      srun scfm pretrain --shards S -o RUN ...    # --resume auto is the default
      [ $? -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"
    A job requeued by `scontrol requeue` or preempted by a higher-priority job gets SIGTERM the same
    way and continues from its last checkpoint when it starts again. (Under torchrun the workers
    exit 75 but torchrun itself reports 1.)
    """
    from scfm.train.objective import ObjectiveConfig
    from scfm.train.pretrain import PretrainSettings, pretrain
    from scfm.utils import check_output_path

    check_output_path(out_dir, directory=True)  # written into, not replaced: its checkpoints are continued
    objective = ObjectiveConfig(
        mask_ratio=mask_ratio, zero_mask_ratio=zero_mask_ratio, mask_token_prob=mask_token_prob,
        random_token_prob=random_token_prob, downsample_prob=downsample_prob, downsample_beta=downsample_beta,
        downsample_min_total=downsample_min_total,
    )
    settings = PretrainSettings(shards=list(shards), out_dir=out_dir, objective=objective, seed=seed, quiet=quiet,
                                mlflow_uri=mlflow_uri, **options)
    metrics = pretrain(settings)
    if metrics and not quiet:
        click.echo(json.dumps(metrics))


@click.command("finetune")
@click.argument("input_paths", metavar="INPUT.h5ad...", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Classifier directory to write.")
@click.option("--checkpoint", required=True, type=click.Path(), help="Our checkpoint dir or an official .ckpt.")
@click.option("--version", "ckpt_version", type=click.Choice(["ce", "rde", "gene"]), default="ce", show_default=True,
              help="Which model of an official .ckpt.")
@click.option("--vocab", type=click.Path(), default=None, help="Vocabulary TSV (needed for an official .ckpt).")
@click.option("--label-key", required=True, help="obs column with the cell-type labels.")
@click.option("--unfreeze-layers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Train the last K encoder layers too (0: frozen encoder).")
@click.option("--encoder-lr-ratio", type=non_negative(), default=0.01, show_default=True,
              help="Learning rate of unfrozen encoder layers, relative to --lr.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=positive(), default=1e-3, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=5, show_default=True,
              help="Epochs without val macro-F1 gain.")
@click.option("--test-size", type=fraction(open_low=True, open_high=True), default=0.2, show_default=True)
@click.option("--val-size", type=fraction(open_low=True, open_high=True), default=0.1, show_default=True)
@click.option("--pool", type=click.Choice(["all", "max"]), default="all", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Encoder precision on a CPU: auto picks bf16 autocast where the CPU has native bf16, the encoder "
                   "is at least 128 wide and the first cells' embeddings keep per-cell cosine >= 0.999 to fp32, "
                   "else fp32.")
@click.option("--min-cells-per-class", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes with fewer labelled cells are left out (and listed in metrics.json).")
@step_options
def finetune_command(input_paths, out_dir, mlflow_uri, seed, quiet, **options):
    """Fine-tune a cell-type classifier head on the cell embedding; report accuracy and macro-F1 vs a PCA baseline.

    Several aligned INPUTs (same vocabulary) are trained on together; their cells without a label are
    left out and counted in metrics.json.
    """
    from scfm.train.finetune import FinetuneSettings, finetune
    from scfm.utils import check_output_path

    check_output_path(out_dir, inputs=[*input_paths, options["checkpoint"], options["vocab"]], directory=True)
    settings = FinetuneSettings(input_path=list(input_paths), out_dir=out_dir, seed=seed, quiet=quiet,
                                mlflow_uri=mlflow_uri, **options)
    metrics = finetune(settings)
    if not quiet:
        click.echo(json.dumps({k: metrics[k] for k in ("test", "baseline") if k in metrics}))


COMMANDS = [pretrain_command, finetune_command]
