"""Pretraining loop: shards → masked read-depth-aware regression → DeepSpeed ZeRO → checkpoint dir.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch_size`` cells on every rank. Each
rank streams its own part of the shards (:class:`scfm.data.shards.ShardDataset`, no DataLoader
workers, so the position it reports is exactly the cells consumed).

Output directory::

    checkpoints/step_000050/   DeepSpeed checkpoint (+ scfm_rank<r>.json: loader position, torch RNG)
    checkpoints/latest         the newest complete checkpoint (written last, by DeepSpeed)
    model/                     final consolidated fp32 checkpoint (config.json, model.safetensors, vocab.tsv)
    train_log.jsonl            one line per optimizer step: step, loss, lr, grad_norm, cells_per_s
    loss_curve.png, metrics.json, deepspeed_config.json, mlflow.db (default store)

Exact resume: a checkpoint holds the model, the optimizer and LR scheduler (DeepSpeed), each rank's
loader position and torch RNG state (ours). The masking draws come from a generator seeded by
``(seed, micro step, rank)`` (see :mod:`scfm.train.objective`), so nothing else needs saving: a
``--resume`` run recomputes the uninterrupted run's batches and losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scfm.errors import ScfmError, ScfmUsageError
from scfm.train.objective import Batch, ObjectiveConfig, make_batch, masked_mse, step_generator
from scfm.utils import atomic_output, progress

CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"
TRAIN_LOG = "train_log.jsonl"


@dataclass
class PretrainSettings:
    shards: list[str]
    out_dir: str
    vocab: str | None = None  # vocabulary TSV; taken from --init-checkpoint when absent
    model_preset: str = "tiny"
    init_checkpoint: str | None = None
    zero_stage: int = 2
    deepspeed_config: str | None = None
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    lr_decay_steps: int | None = None  # cosine horizon; default max_steps (set it to stop early and resume)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    gradient_clipping: float = 1.0
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: bool = False
    shuffle_buffer: int = 1024
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    seed: int = 0
    quiet: bool = False
    mlflow_uri: str | None = None

    def validate(self) -> None:
        for name in ("micro_batch_size", "grad_accum", "max_steps", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ScfmUsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup_steps < 0:
            raise ScfmUsageError("--warmup-steps must not be negative")
        if self.lr <= 0:
            raise ScfmUsageError("--lr must be positive")
        if self.vocab is None and self.init_checkpoint is None:
            raise ScfmUsageError("give --vocab (the vocabulary the shards were aligned to) or --init-checkpoint")

    def to_params(self) -> dict:
        params = dataclasses.asdict(self)
        params["objective"] = self.objective.to_dict()
        params["shards"] = list(self.shards)
        return params


# ---------------------------------------------------------------------------------- model inputs


def to_model_batch(batch: Batch, config):
    """Our dense (B, n_genes) example tensors → the model's ``PretrainBatch`` (encoder tokens + decoder)."""
    from scfm.model.inputs import build_pretrain_batch

    values, hidden = batch.values.numpy(), batch.hidden.numpy()
    gene_ids, cell_values, cell_hidden = [], [], []
    for row in range(len(batch)):
        ids = np.flatnonzero((values[row] > 0) | hidden[row])  # zero genes default to 0 in the decoder
        gene_ids.append(ids)
        cell_values.append(values[row, ids])
        cell_hidden.append(hidden[row, ids])
    return build_pretrain_batch(
        gene_ids, cell_values, cell_hidden, batch.target_depth.tolist(), batch.source_depth.tolist(), config
    )


def pretraining_loss(model, batch: Batch, dtype: torch.dtype, device) -> torch.Tensor:
    """Masked MSE of the model's gene predictions against the original normalised profile."""
    n_genes = batch.values.shape[1]
    inputs = to_model_batch(batch, model_config(model)).to(device)
    if dtype != torch.float32:
        inputs = _cast_floats(inputs, dtype)
    prediction = model(inputs)[:, :n_genes].float()
    return masked_mse(prediction, batch.target.to(device), batch.loss_mask.to(device))


def model_config(model):
    return getattr(model, "module", model).config


def _cast_floats(inputs, dtype):
    inputs.encoder.values = inputs.encoder.values.to(dtype)
    inputs.decoder_values = inputs.decoder_values.to(dtype)
    return inputs


# ---------------------------------------------------------------------------------- inputs check


def open_inputs(settings: PretrainSettings):
    """Manifests, vocabulary, model config and initial weights; every mismatch is an ScfmError."""
    from scfm.data.shards import read_manifest
    from scfm.data.vocab import Vocabulary
    from scfm.model.config import ModelConfig

    manifests = [read_manifest(s) for s in settings.shards]
    initial = None
    if settings.init_checkpoint:
        from scfm.model.checkpoint import load_checkpoint

        initial = load_checkpoint(settings.init_checkpoint)
    vocab = Vocabulary.load(settings.vocab) if settings.vocab else initial.vocab
    source = settings.vocab or settings.init_checkpoint
    for manifest in manifests:
        if manifest["vocab_sha256"] != vocab.sha256:
            raise ScfmError(
                f"shards were aligned to another vocabulary (vocab_sha256 {manifest['vocab_sha256'][:12]}…, "
                f"{source} has {vocab.sha256[:12]}…)",
                manifest["dir"],
            )
    if initial is not None:
        if initial.vocab.sha256 != vocab.sha256:
            raise ScfmError("the initial checkpoint's vocabulary differs from --vocab", settings.init_checkpoint)
        config = initial.config
    else:
        config = ModelConfig.preset(settings.model_preset, n_genes=len(vocab))
    return manifests, vocab, config, initial


def build_model(config, initial, seed: int):
    from scfm.model.xtrimogene import XTrimoGene

    if initial is not None:
        return initial.model.float()
    return XTrimoGene(config, seed=seed)


# ---------------------------------------------------------------------------------- checkpoints


def checkpoint_tag(step: int) -> str:
    return f"step_{step:06d}"


def latest_tag(checkpoint_dir: Path) -> str | None:
    latest = checkpoint_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save_training_state(engine, checkpoint_dir: Path, step: int, micro_step: int, dataset, rank: int,
                        keep: int) -> None:
    """Each rank's loader position and RNG first, then DeepSpeed's states, whose ``latest`` marks completion."""
    tag = checkpoint_tag(step)
    (checkpoint_dir / tag).mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "micro_step": micro_step,
        "loader": dataset.state_dict(),
        "torch_rng": torch.get_rng_state().tolist(),
    }
    with atomic_output(checkpoint_dir / tag / f"scfm_rank{rank}.json") as tmp:
        tmp.write_text(json.dumps(state))
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step, "micro_step": micro_step})
    if rank == 0:
        _prune_checkpoints(checkpoint_dir, keep)


def _prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    tags = sorted(p for p in checkpoint_dir.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(engine, checkpoint_dir: Path, dataset, rank: int) -> tuple[int, int]:
    tag = latest_tag(checkpoint_dir)
    if tag is None:
        raise ScfmError("--resume: no checkpoint to resume from (checkpoints/latest is missing)", checkpoint_dir)
    rank_file = checkpoint_dir / tag / f"scfm_rank{rank}.json"
    if not rank_file.is_file():
        raise ScfmError(f"--resume: checkpoint {tag} has no state for rank {rank} (was it written with another "
                        "number of processes?)", checkpoint_dir)
    load_path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if load_path is None:
        raise ScfmError(f"--resume: DeepSpeed could not load checkpoint {tag}", checkpoint_dir)
    state = json.loads(rank_file.read_text())
    if state["loader"].get("world_size") not in (None, dataset.world_size):
        raise ScfmError(f"--resume: checkpoint {tag} was written by {state['loader']['world_size']} processes, "
                        f"this run has {dataset.world_size}", checkpoint_dir)
    dataset.load_state_dict(state["loader"])
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return int(state["step"]), int(state["micro_step"])


def consolidated_state_dict(engine, checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a (possibly ZeRO-3 partitioned, possibly bf16) DeepSpeed checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports on stdout, which holds our metrics JSON
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    # buffers (e.g. the Performer's random features) are never partitioned; take them from the module
    for name, buffer in engine.module.named_buffers():
        state[name] = buffer.detach().float().cpu().clone()
    return {k: v.float().contiguous() for k, v in state.items()}


def write_final_model(out_dir: Path, state: dict, config, vocab, extra: dict) -> Path:
    from scfm.model.checkpoint import save_checkpoint
    from scfm.model.xtrimogene import XTrimoGene

    model = XTrimoGene(config)
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    return save_checkpoint(out_dir / FINAL_MODEL, model, config, vocab, extra=extra)  # atomic itself


# ---------------------------------------------------------------------------------- logging


def read_train_log(path: Path, up_to_step: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def write_train_log(path: Path, rows: Sequence[dict]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_loss_curve(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked MSE")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------- the loop


def next_cells(stream, n: int) -> list[dict]:
    cells = [cell for _, cell in zip(range(n), stream)]
    if len(cells) < n:
        raise ScfmError("the shards ran out of cells for this rank (too few row groups for the number of ranks?)")
    return cells


def _all_reduce_mean(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item() / world_size)


def pretrain(settings: PretrainSettings) -> dict:
    """Run (or resume) pretraining; returns the final metrics on rank 0 (an empty dict on the others)."""
    from scfm import tracking
    from scfm.data.shards import ShardDataset
    from scfm.train.distributed import build_deepspeed_config, init_distributed, initialize_engine

    settings.validate()
    out_dir = Path(settings.out_dir)
    checkpoint_dir = out_dir / CHECKPOINTS
    manifests, vocab, config, initial = open_inputs(settings)
    if settings.resume and latest_tag(checkpoint_dir) is None:
        raise ScfmError("--resume: no checkpoint to resume from (checkpoints/latest is missing)", checkpoint_dir)

    ds_config = build_deepspeed_config(
        zero_stage=settings.zero_stage,
        config_path=settings.deepspeed_config,
        micro_batch_size=settings.micro_batch_size,
        grad_accum=settings.grad_accum,
        gradient_clipping=settings.gradient_clipping,
    )
    launch = init_distributed()
    rank, world_size = launch.rank, launch.world_size
    torch.manual_seed(settings.seed + rank)
    model = build_model(config, initial, settings.seed)
    decay_steps = settings.lr_decay_steps or settings.max_steps
    engine = initialize_engine(
        model, ds_config, lr=settings.lr, weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps, max_steps=decay_steps, min_lr_ratio=settings.min_lr_ratio,
    )
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    dataset = ShardDataset(
        [m["dir"] for m in manifests], rank=rank, world_size=world_size, seed=settings.seed,
        shuffle_buffer=settings.shuffle_buffer, loop=True,
    )

    step, micro_step = 0, 0
    if not settings.resume and launch.is_main and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)  # a run without --resume starts over: no stale checkpoint to mix with
    torch.distributed.barrier()
    if settings.resume:
        step, micro_step = load_training_state(engine, checkpoint_dir, dataset, rank)
        _reapply_schedule(engine, settings.warmup_steps, decay_steps, settings.min_lr_ratio)
    if launch.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    log_path = out_dir / TRAIN_LOG
    history = read_train_log(log_path, up_to_step=step) if settings.resume else []

    params = {
        **settings.to_params(), "world_size": world_size, "launcher": launch.launcher, "deepspeed": ds_config,
        "model": config.to_dict(), "n_parameters": sum(p.numel() for p in model.parameters()),
        "resumed_from_step": step if settings.resume else None,
    }
    uri = tracking.resolve_uri(settings.mlflow_uri, out_dir)
    with tracking.step_run("pretrain", uri=uri, params=tracking.flatten_params(params),
                           enabled=launch.is_main) as run:
        run.log_dict(ds_config, "deepspeed_config.json")
        run.log_dict({"model": config.to_dict()}, "model_config.json")
        stream = iter(dataset)
        bar = progress(total=settings.max_steps, desc="pretrain", unit="step",
                       quiet=settings.quiet or not launch.is_main)
        bar.update(step)
        engine.train()
        while step < settings.max_steps:
            started = time.perf_counter()
            lr = float(engine.get_lr()[0])  # the LR this step uses (the scheduler moves on at its end)
            micro_losses = []
            for _ in range(settings.grad_accum):
                cells = next_cells(stream, settings.micro_batch_size)
                batch = make_batch(cells, config.n_genes, settings.objective,
                                   step_generator(settings.seed, micro_step, rank))
                loss = pretraining_loss(engine, batch, dtype, engine.device)
                engine.backward(loss)
                engine.step()
                micro_losses.append(float(loss.item()))
                micro_step += 1
            step += 1
            loss_value = _all_reduce_mean(float(np.mean(micro_losses)), world_size)
            elapsed = time.perf_counter() - started
            row = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": _as_float(engine.get_global_grad_norm()),
                "cells_per_s": settings.micro_batch_size * settings.grad_accum * world_size / elapsed,
            }
            history.append(row)
            run.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % settings.save_every == 0 or step == settings.max_steps:
                save_training_state(engine, checkpoint_dir, step, micro_step, dataset, rank,
                                    settings.keep_checkpoints)
                if launch.is_main:
                    write_train_log(log_path, history)
        bar.close()

        metrics = _final_metrics(history, settings, world_size)
        torch.distributed.barrier()
        if launch.is_main:
            tag = latest_tag(checkpoint_dir)
            state = consolidated_state_dict(engine, checkpoint_dir, tag)
            final = write_final_model(out_dir, state, config, vocab,
                                      extra={"pretrain": {"step": step, "tag": tag, "final_loss": metrics["final_loss"]}})
            with atomic_output(out_dir / "metrics.json") as tmp:
                tmp.write_text(json.dumps(metrics, indent=2) + "\n")
            plot_loss_curve(history, out_dir / "loss_curve.png")
            run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            for artifact in ("metrics.json", "loss_curve.png", TRAIN_LOG):
                run.log_artifact(out_dir / artifact)
            run.log_artifact(final, artifact_path=FINAL_MODEL)
        torch.distributed.barrier()
    return metrics if launch.is_main else {}


def _reapply_schedule(engine, warmup_steps: int, decay_steps: int, min_ratio: float) -> None:
    """LambdaLR restores its lambda's settings from the checkpoint; this run's flags win (e.g. a longer run)."""
    scheduler = engine.lr_scheduler
    for fn in getattr(scheduler, "lr_lambdas", []):
        fn.warmup_steps, fn.max_steps, fn.min_ratio = warmup_steps, decay_steps, min_ratio
    # recompute the current LR from the restored step count
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)


def _as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


def _final_metrics(history: list[dict], settings: PretrainSettings, world_size: int) -> dict:
    losses = [r["loss"] for r in history]
    speeds = [r["cells_per_s"] for r in history[1:]] or [r["cells_per_s"] for r in history]
    head = losses[: max(1, len(losses) // 5)]
    tail = losses[-max(1, len(losses) // 5):]
    return {
        "steps": len(history),
        "cells_seen": len(history) * settings.micro_batch_size * settings.grad_accum * world_size,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_loss_first_fifth": float(np.mean(head)) if losses else None,
        "mean_loss_last_fifth": float(np.mean(tail)) if losses else None,
        "mean_cells_per_s": float(np.mean(speeds)) if speeds else None,
        "world_size": world_size,
        **peak_memory(),
    }


def peak_memory() -> dict:
    """This process's peak resident memory, and on CUDA its peak allocated GPU memory (MiB)."""
    import resource

    peaks = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peaks["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks
