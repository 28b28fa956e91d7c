"""Pretraining loop: shards → masked read-depth-aware regression → DeepSpeed ZeRO → checkpoint dir.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch_size`` cells on every rank. Each
rank streams its own part of the shards (:class:`scfm.data.shards.ShardDataset`, no DataLoader
workers, so the position it reports is exactly the cells consumed).

Output directory::

    checkpoints/step_000050/   DeepSpeed checkpoint (+ scfm_rank<r>.json: loader position, torch RNG,
                               + scfm_checkpoint.json: written last, once every rank finished saving)
    checkpoints/latest         the newest complete checkpoint (moved after scfm_checkpoint.json)
    model/                     final consolidated fp32 checkpoint (config.json, model.safetensors, vocab.tsv)
    train_log.jsonl            one line per optimizer step: step, loss, lr, grad_norm, cells_per_s
    loss_curve.png, metrics.json, deepspeed_config.json, mlflow.db (default store)

Exact resume: a checkpoint holds the model, the optimizer and LR scheduler (DeepSpeed), each rank's
loader position and torch RNG states (ours; dropout draws from them). The masking draws come from a
generator seeded by ``(seed, micro step, rank)`` (see :mod:`scfm.train.objective`) and the Performer's
random features are redrawn from ``(seed, redraw number)`` (:func:`scfm.model.performer.redraw_generator`),
so nothing else needs saving: a ``--resume`` run recomputes the uninterrupted run's batches and losses.

The recipe (defaults = the released scFoundation training, ``model/training_hyperparameter.txt`` of the
official repository, where it says): AdamW, lr 1e-4, betas (0.9, 0.999) (torch's defaults, which the
released run's ``adam_w`` kept), no weight decay (and, when one is set, none on biases, norms and
embedding tables), gradient clipping 1.0, linear warmup over 9,766 optimizer steps then a cosine decay
to 10 % (the decay's shape and floor are ours: the file gives the warmup, not the decay), encoder
dropout 0.1 (``nn.TransformerEncoderLayer``'s default, which the released encoder layers keep; the
Performer decoder has none), the decoder's random features redrawn every 1,000 training calls, i.e.
micro-batches (the released Performer's ``feature_redraw_interval``), PyTorch-default initialisation
(:class:`scfm.model.xtrimogene.XTrimoGene`), masking 30 % / 3 % with 80/10/10 and the paper's
down-sampling (:mod:`scfm.train.objective`). 9,766 = ⌈10^7 / 1,024⌉: the released run put 128 cells x
8 accumulated micro-batches = 1,024 cells on each device per step, so its warmup ended once every
device had seen 10 million cells; with other batch sizes set ``--warmup-steps`` to keep what matters
to you (the same number of steps, or of cells). Every resolved value goes to MLflow (``recipe.*``)
and into the final checkpoint's ``config.json`` (``extra.pretrain.recipe``).

Re-runs into the same directory (``--resume``):

- ``auto`` (default) resumes from the newest *complete* checkpoint and starts fresh when there is none;
  ``always`` requires one; ``never`` refuses a directory holding checkpoints unless ``overwrite``.
- A checkpoint is complete once its ``scfm_checkpoint.json`` exists: rank 0 writes it after a barrier
  that every rank reaches only when its own part is on disk, so a save killed halfway is never picked.
- That file also records the settings that change the math (:func:`math_settings`); resuming with
  different ones is an error naming the setting, so a resumed run is the run it continues.
- SIGTERM or SIGUSR1 (Slurm preemption, ``scontrol requeue``, ``--signal=USR1@120``) lets the current
  step finish, saves a checkpoint and exits with :attr:`Preempted.exit_code`; the next run resumes.
  Rank 0 also leaves ``PREEMPTED`` (JSON: step, checkpoint, signal) in the run directory until a run
  continues it, because launchers such as torchrun report their own exit status, not the workers'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scfm.errors import ScfmError, ScfmUsageError
from scfm.train.objective import Batch, ObjectiveConfig, make_batch, masked_mse, step_generator
from scfm.train.safe_load import pickle_enums_by_value, refuse_unsafe_files, weights_only_loads
from scfm.utils import atomic_output, progress

CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"
TRAIN_LOG = "train_log.jsonl"
COMPLETE_MARKER = "scfm_checkpoint.json"
PREEMPTED_MARKER = "PREEMPTED"  # in the run directory while the run is stopped and waits to be continued
RESUME_MODES = ("auto", "always", "never")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RELEASED_WARMUP_STEPS = 9766  # model/training_hyperparameter.txt of the released scFoundation run


class Preempted(ScfmError):
    """Stopped by SIGTERM/SIGUSR1 after saving a checkpoint; running the same command again continues."""

    exit_code = 75  # EX_TEMPFAIL ("try again later"): tells a requeue script this is not a failure
    run_status = "KILLED"  # the MLflow run was stopped from outside, it did not fail


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
    warmup_steps: int = RELEASED_WARMUP_STEPS
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    gradient_clipping: float = 1.0
    encoder_dropout: float = 0.1
    performer_redraw_interval: int = 1000  # training calls (micro-batches) between redraws; 0 = never
    init: str = "pytorch"  # pytorch | small-normal (a fresh model only)
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | always | never
    overwrite: bool = False  # with resume="never": delete an earlier run's checkpoints and start over
    mix_row_groups: int = 256
    row_group_slices: int = 4
    precision: str = "auto"  # auto | fp32 | bf16 (see scfm.model.precision)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    seed: int = 0
    quiet: bool = False
    mlflow_uri: str | None = None

    def validate(self) -> None:
        if self.resume not in RESUME_MODES:
            raise ScfmUsageError(f"--resume must be one of {', '.join(RESUME_MODES)}, got {self.resume!r}")
        if self.overwrite and self.resume == "always":
            raise ScfmUsageError("--overwrite starts over, --resume always continues: give one of them")
        for name in ("micro_batch_size", "grad_accum", "max_steps", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ScfmUsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup_steps < 0:
            raise ScfmUsageError("--warmup-steps must not be negative")
        if self.lr <= 0:
            raise ScfmUsageError("--lr must be positive")
        if self.weight_decay < 0:
            raise ScfmUsageError("--weight-decay must not be negative")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ScfmUsageError(f"--adam-betas must be in [0, 1), got {self.adam_betas}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ScfmUsageError(f"--encoder-dropout must be in [0, 1), got {self.encoder_dropout}")
        if self.performer_redraw_interval < 0:
            raise ScfmUsageError("--performer-redraw-interval must not be negative (0: never redraw)")
        if self.mix_row_groups < 1 or self.row_group_slices < 1:
            raise ScfmUsageError("--mix-row-groups and --row-group-slices must be at least 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ScfmUsageError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.vocab is None and self.init_checkpoint is None:
            raise ScfmUsageError("give --vocab (the vocabulary the shards were aligned to) or --init-checkpoint")

    def to_params(self) -> dict:
        params = dataclasses.asdict(self)
        params["objective"] = self.objective.to_dict()
        params["shards"] = list(self.shards)
        return params

    def recipe(self, *, decay_steps: int, world_size: int, bf16: bool, grad_accum_dtype, fresh_model: bool) -> dict:
        """Every resolved value that shapes the optimisation (logged to MLflow and kept in the checkpoint)."""
        return {
            "optimizer": "AdamW", "lr": self.lr, "adam_betas": list(self.adam_betas), "adam_eps": self.adam_eps,
            "weight_decay": self.weight_decay, "weight_decay_exempt": "biases, LayerNorms, embedding tables",
            "gradient_clipping": self.gradient_clipping, "schedule": "linear warmup, cosine decay",
            "warmup_steps": self.warmup_steps, "lr_decay_steps": decay_steps, "min_lr_ratio": self.min_lr_ratio,
            "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum, "world_size": world_size,
            "cells_per_step": self.micro_batch_size * self.grad_accum * world_size,
            "encoder_dropout": self.encoder_dropout, "performer_redraw_interval": self.performer_redraw_interval,
            "init": self.init if fresh_model else "from --init-checkpoint",
            "precision": "bf16" if bf16 else "fp32", "grad_accum_dtype": str(grad_accum_dtype or "fp32"),
            "mix_row_groups": self.mix_row_groups, "row_group_slices": self.row_group_slices,
            "objective": self.objective.to_dict(),
        }


# ---------------------------------------------------------------------------------- model inputs


def pretraining_loss(model, batch: Batch, dtype: torch.dtype, device, cpu_bf16: bool = False) -> torch.Tensor:
    """Masked MSE of the model's predictions at the scored positions against the original profile.

    ``dtype`` is the weights' dtype (bf16 under DeepSpeed's bf16 on CUDA); ``cpu_bf16`` runs the forward
    under bf16 autocast on a CPU, the weights and optimizer staying fp32.
    """
    inputs = batch.inputs.to(device)
    if dtype != torch.float32:
        inputs = _cast_floats(inputs, dtype)
    with _cpu_autocast(cpu_bf16):
        prediction = model(inputs, batch.positions.to(device)).float()
    return masked_mse(prediction, batch.targets.to(device))


def _cpu_autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def bf16_prediction_cosine(model, batch: Batch, device) -> float:
    """Worst per-cell cosine between the fp32 and the CPU-bf16 predictions of one batch (no update)."""
    from scfm.model.precision import min_row_cosine

    inputs = batch.inputs.to(device)  # every position of every cell: rows are cells
    was_training = model.training
    model.eval()  # no dropout: the two passes differ only by precision
    try:
        with torch.no_grad():
            fp32 = model(inputs).float()
            with _cpu_autocast(True):
                bf16 = model(inputs).float()
    finally:
        model.train(was_training)
    return min_row_cosine(fp32.cpu().numpy(), bf16.cpu().numpy())


def training_precision(requested: str, device_type: str, deepspeed_bf16: bool, bf16_cosine,
                       encoder_dim: int | None = None, resumed: dict | None = None):
    """The precision of a training run: DeepSpeed's bf16 on CUDA, bf16 autocast on a CPU that has it.

    ``resumed``: the choice recorded in the checkpoint this run continues; ``auto`` keeps it, so that a
    resumed run computes in the precision it started with.
    """
    from scfm.model.precision import PrecisionChoice, announce, choose_precision, cpu_native_bf16

    if device_type == "cuda":
        precision = "bf16" if deepspeed_bf16 else "fp32"
        how = "DeepSpeed bf16" if deepspeed_bf16 else "fp32"
        return PrecisionChoice(precision, f"{requested} on CUDA: {how}")
    if requested == "auto" and resumed and resumed.get("precision") in ("fp32", "bf16"):
        return PrecisionChoice(resumed["precision"],
                               f"auto, resumed: the checkpoint's choice ({resumed.get('precision_reason')})")
    return announce(choose_precision(requested, device_type, native_bf16=cpu_native_bf16, bf16_cosine=bf16_cosine,
                                     encoder_dim=encoder_dim))


def model_config(model):
    return getattr(model, "module", model).config


def _cast_floats(inputs, dtype):
    inputs.encoder.values = inputs.encoder.values.to(dtype)
    inputs.extra_values = inputs.extra_values.to(dtype)
    return inputs


class FeatureRedraw:
    """New Performer random features every ``interval`` training calls, the same on every rank.

    Draw k (k = micro step // interval) always comes from ``redraw_generator(seed, k)``, so a resumed
    run puts back the projections the uninterrupted run had at that micro step.
    """

    def __init__(self, interval: int, seed: int):
        self.interval, self.seed = int(interval), int(seed)

    def before_micro_step(self, module, micro_step: int) -> None:
        if self.interval and micro_step > 0 and micro_step % self.interval == 0:
            self._apply(module, micro_step // self.interval)

    def restore(self, module, micro_step: int) -> None:
        if self.interval and micro_step >= self.interval:
            self._apply(module, micro_step // self.interval)

    def _apply(self, module, draw: int) -> None:
        from scfm.model.performer import redraw_generator

        module.redraw_random_features(redraw_generator(self.seed, draw))


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
    return manifests, vocab, config.replace(dropout=settings.encoder_dropout), initial


def build_model(config, initial, seed: int, init: str = "pytorch"):
    from scfm.model.xtrimogene import XTrimoGene

    if initial is not None:
        model = XTrimoGene(config)
        model.load_state_dict(initial.model.state_dict())  # the checkpoint's weights, this run's dropout
        return model.float()
    return XTrimoGene(config, seed=seed, init=init)


# ---------------------------------------------------------------------------------- checkpoints


def checkpoint_tag(step: int) -> str:
    return f"step_{step:06d}"


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint: the newest step dir with its completion marker.

    ``latest`` is only a convenience for DeepSpeed's tools; the markers decide, so a save killed
    after some ranks wrote their part (or before ``latest`` moved) is passed over.
    """
    complete = [p.name for p in step_dirs(checkpoint_dir) if (p / COMPLETE_MARKER).is_file()]
    return complete[-1] if complete else None


def step_dirs(checkpoint_dir: Path) -> list[Path]:
    return sorted(p for p in checkpoint_dir.glob("step_*") if p.is_dir())


def math_settings(settings: PretrainSettings, config, vocab, world_size: int, zero_stage: int) -> dict:
    """What a resumed run must share with its checkpoint to continue the same computation.

    Keys are the names users know (flags); the step horizon, LR schedule and saving may change.
    """
    return {
        "model config": config.to_dict(),
        "vocabulary (sha256)": vocab.sha256,
        "number of processes (world size)": world_size,
        "--zero-stage": zero_stage,
        "--micro-batch-size": settings.micro_batch_size,
        "--grad-accum": settings.grad_accum,
        "--seed": settings.seed,
        "--mix-row-groups": settings.mix_row_groups,
        "--row-group-slices": settings.row_group_slices,
        "--performer-redraw-interval": settings.performer_redraw_interval,
        **{f"--{k.replace('_', '-')}": v for k, v in settings.objective.to_dict().items()},
    }


def check_same_math(saved: dict, current: dict, tag: str, checkpoint_dir: Path) -> None:
    current = json.loads(json.dumps(current))  # tuples → lists, as they were saved
    for name, value in current.items():
        before = saved.get(name)
        if before == value:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            key = next(k for k in sorted(set(value) | set(before)) if value.get(k) != before.get(k))
            name, value, before = f"{name} ({key})", value.get(key), before.get(key)
        raise ScfmError(f"cannot resume: checkpoint {tag} was written with {name} = {_show(before)}, this run has "
                        f"{_show(value)} (use the same setting, or --resume never --overwrite to start over)",
                        checkpoint_dir)


def _show(value) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "…"  # a sha256
    return json.dumps(value)


def read_checkpoint_record(checkpoint_dir: Path, tag: str) -> dict:
    return json.loads((checkpoint_dir / tag / COMPLETE_MARKER).read_text())


def plan_start(settings: PretrainSettings, checkpoint_dir: Path, math: dict) -> str | None:
    """Which checkpoint tag this run resumes from (None: start fresh); refuses what --resume forbids."""
    tag = latest_tag(checkpoint_dir)
    if settings.resume == "always" and tag is None:
        raise ScfmError("--resume always: no checkpoint to resume from (none complete)", checkpoint_dir)
    if settings.resume == "never" or settings.overwrite:
        if step_dirs(checkpoint_dir) and not settings.overwrite:
            raise ScfmError("--resume never: the directory holds checkpoints of an earlier run (continue it with "
                            "--resume auto, or start over with --overwrite)", checkpoint_dir)
        return None
    if tag is None and _unmarked_latest(checkpoint_dir):
        # checkpoints from before completion markers: starting fresh here would delete them
        raise ScfmError(f"checkpoints/latest names {_unmarked_latest(checkpoint_dir)}, which has no {COMPLETE_MARKER} "
                        "(written by an older scfm?): continue it with that version, or start over with --overwrite",
                        checkpoint_dir)
    if tag is not None:
        check_same_math(read_checkpoint_record(checkpoint_dir, tag).get("math", {}), math, tag, checkpoint_dir)
    return tag


def _unmarked_latest(checkpoint_dir: Path) -> str | None:
    latest = checkpoint_dir / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    complete = tag and (checkpoint_dir / tag / COMPLETE_MARKER).is_file()
    return tag if tag and (checkpoint_dir / tag).is_dir() and not complete else None


def save_training_state(engine, checkpoint_dir: Path, step: int, micro_step: int, dataset, rank: int,
                        keep: int, math: dict, precision: dict | None = None) -> str:
    """Every rank's part, a barrier, then rank 0 marks the checkpoint complete and moves ``latest``."""
    tag = checkpoint_tag(step)
    if rank == 0 and (checkpoint_dir / tag).exists():
        shutil.rmtree(checkpoint_dir / tag)  # leftovers of a save that was killed: nothing to mix in
    torch.distributed.barrier()
    (checkpoint_dir / tag).mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "micro_step": micro_step,
        "loader": dataset.state_dict(),
        "torch_rng": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():  # dropout on the GPU draws from the device's generator
        state["cuda_rng"] = torch.cuda.get_rng_state().tolist()
    with atomic_output(checkpoint_dir / tag / f"scfm_rank{rank}.json") as tmp:
        tmp.write_text(json.dumps(state))
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step, "micro_step": micro_step},
                           save_latest=False)
    torch.distributed.barrier()  # every rank's files are on disk
    if rank == 0:
        record = {"step": step, "micro_step": micro_step, "math": math, "precision": precision}
        with atomic_output(checkpoint_dir / tag / COMPLETE_MARKER) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        with atomic_output(checkpoint_dir / "latest") as tmp:
            tmp.write_text(tag)
        _prune_checkpoints(checkpoint_dir, keep)
    torch.distributed.barrier()
    return tag


def _prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; incomplete ones are only debris of killed saves."""
    complete = [p for p in step_dirs(checkpoint_dir) if (p / COMPLETE_MARKER).is_file()]
    kept = set(complete[-keep:])
    for old in step_dirs(checkpoint_dir):
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def load_training_state(engine, checkpoint_dir: Path, tag: str, dataset, rank: int) -> tuple[int, int]:
    rank_file = checkpoint_dir / tag / f"scfm_rank{rank}.json"
    if not rank_file.is_file():
        raise ScfmError(f"--resume: checkpoint {tag} has no state for rank {rank} (was it written with another "
                        "number of processes?)", checkpoint_dir)
    refuse_unsafe_files(checkpoint_dir / tag)  # the run directory may be writable by others: unpickle nothing
    with weights_only_loads(checkpoint_dir / tag):
        load_path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if load_path is None:
        raise ScfmError(f"--resume: DeepSpeed could not load checkpoint {tag}", checkpoint_dir)
    state = json.loads(rank_file.read_text())
    if state["loader"].get("world_size") not in (None, dataset.world_size):
        raise ScfmError(f"--resume: checkpoint {tag} was written by {state['loader']['world_size']} processes, "
                        f"this run has {dataset.world_size}", checkpoint_dir)
    dataset.load_state_dict(state["loader"])
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda_rng"], dtype=torch.uint8))
    return int(state["step"]), int(state["micro_step"])


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 instead of dying, so the loop can save first (main thread only)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_rank_stopping(stop: StopRequest, world_size: int) -> bool:
    """Ranks get the signal at different moments; they must agree on the step at which all of them save."""
    if world_size == 1:
        return stop.signal_name is not None
    flag = torch.tensor([int(stop.signal_name is not None)])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def consolidated_state_dict(engine, checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a (possibly ZeRO-3 partitioned, possibly bf16) DeepSpeed checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed reports on stdout, which holds our metrics JSON; a resumed run may read a checkpoint it did not write
    with contextlib.redirect_stdout(sys.stderr), weights_only_loads(checkpoint_dir / tag):
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


def _all_reduce_min(value: float, world_size: int) -> float:
    """Every rank takes the same precision decision: the worst cosine any rank measured."""
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return float(tensor.item())


def write_preempted_marker(out_dir: Path, step: int, tag: str, reason: str) -> None:
    with atomic_output(out_dir / PREEMPTED_MARKER) as tmp:
        tmp.write_text(json.dumps({"step": step, "checkpoint": tag, "signal": reason}) + "\n")


def pretrain(settings: PretrainSettings) -> dict:
    """Run (or resume) pretraining; returns the final metrics on rank 0 (an empty dict on the others)."""
    from scfm import tracking
    from scfm.data.shards import ShardDataset
    from scfm.train.distributed import (build_deepspeed_config, detect_launch_env, init_distributed,
                                        initialize_engine)

    settings.validate()
    out_dir = Path(settings.out_dir)
    checkpoint_dir = out_dir / CHECKPOINTS
    manifests, vocab, config, initial = open_inputs(settings)
    ds_config = build_deepspeed_config(
        zero_stage=settings.zero_stage,
        config_path=settings.deepspeed_config,
        micro_batch_size=settings.micro_batch_size,
        grad_accum=settings.grad_accum,
        gradient_clipping=settings.gradient_clipping,
        bf16=None if settings.precision == "auto" else settings.precision == "bf16",
    )
    launch = detect_launch_env()  # the layout only: refusals below come before any process group
    math = math_settings(settings, config, vocab, launch.world_size, ds_config["zero_optimization"]["stage"])
    resume_tag = plan_start(settings, checkpoint_dir, math)
    resuming = resume_tag is not None

    launch = init_distributed(launch)
    rank, world_size = launch.rank, launch.world_size
    torch.manual_seed(settings.seed + rank)
    model = build_model(config, initial, settings.seed, settings.init)
    decay_steps = settings.lr_decay_steps or settings.max_steps
    pickle_enums_by_value()
    engine = initialize_engine(
        model, ds_config, lr=settings.lr, weight_decay=settings.weight_decay, betas=tuple(settings.adam_betas),
        eps=settings.adam_eps, warmup_steps=settings.warmup_steps, max_steps=decay_steps,
        min_lr_ratio=settings.min_lr_ratio,
    )
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    dataset = ShardDataset(
        [m["dir"] for m in manifests], rank=rank, world_size=world_size, seed=settings.seed,
        mix_row_groups=settings.mix_row_groups, row_group_slices=settings.row_group_slices, loop=True,
    )
    redraw = FeatureRedraw(settings.performer_redraw_interval, settings.seed)
    recipe = settings.recipe(decay_steps=decay_steps, world_size=world_size, bf16=dtype == torch.bfloat16,
                             grad_accum_dtype=engine.get_data_types()[1], fresh_model=initial is None)

    step, micro_step = 0, 0
    if not resuming and launch.is_main and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)  # a fresh start (allowed by plan_start): no stale checkpoint to mix with
    torch.distributed.barrier()
    if resuming:
        step, micro_step = load_training_state(engine, checkpoint_dir, resume_tag, dataset, rank)
        _reapply_schedule(engine, settings.warmup_steps, decay_steps, settings.min_lr_ratio)
        redraw.restore(engine.module, micro_step)
    if launch.is_main:
        if settings.warmup_steps >= decay_steps:
            print(f"warning: --warmup-steps {settings.warmup_steps} >= the LR horizon of {decay_steps} steps: "
                  "the learning rate never reaches --lr (set --warmup-steps, e.g. to a tenth of --max-steps)",
                  file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        (out_dir / PREEMPTED_MARKER).unlink(missing_ok=True)  # this run continues it
    log_path = out_dir / TRAIN_LOG
    history = read_train_log(log_path, up_to_step=step) if resuming else []

    # the bf16 check on a CPU runs on the first micro-batch, which is then trained on as usual
    stream = iter(dataset)
    first_cells = next_cells(stream, settings.micro_batch_size)
    stream = itertools.chain(first_cells, stream)

    def first_batch_cosine() -> float:
        batch = make_batch(first_cells, config.n_genes, settings.objective,
                           step_generator(settings.seed, micro_step, rank), config)
        return _all_reduce_min(bf16_prediction_cosine(engine, batch, engine.device), world_size)

    recorded = read_checkpoint_record(checkpoint_dir, resume_tag).get("precision") if resuming else None
    precision = training_precision(settings.precision, torch.device(engine.device).type, ds_config["bf16"]["enabled"],
                                   first_batch_cosine, config.encoder_dim, resumed=recorded)
    cpu_bf16 = torch.device(engine.device).type != "cuda" and precision.precision == "bf16"

    params = {
        **settings.to_params(), "resolved_precision": precision.precision, "precision_reason": precision.reason,
        "world_size": world_size, "launcher": launch.launcher, "deepspeed": ds_config,
        "model": config.to_dict(), "n_parameters": sum(p.numel() for p in model.parameters()),
        "resumed_from_step": step if resuming else None, "recipe": recipe,
    }
    uri = tracking.resolve_uri(settings.mlflow_uri, out_dir)
    with StopRequest() as stop, tracking.step_run("pretrain", uri=uri, params=tracking.flatten_params(params),
                                                  enabled=launch.is_main) as run:
        run.log_dict(ds_config, "deepspeed_config.json")
        run.log_dict({"model": config.to_dict()}, "model_config.json")
        run.log_dict(recipe, "recipe.json")
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
                                   step_generator(settings.seed, micro_step, rank), config)
                redraw.before_micro_step(engine.module, micro_step)
                loss = pretraining_loss(engine, batch, dtype, engine.device, cpu_bf16)
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
            stopping = any_rank_stopping(stop, world_size)
            if step % settings.save_every == 0 or step == settings.max_steps or stopping:
                tag = save_training_state(engine, checkpoint_dir, step, micro_step, dataset, rank,
                                          settings.keep_checkpoints, math, precision.as_params())
                if launch.is_main:
                    write_train_log(log_path, history)
            if stopping and step < settings.max_steps:  # at the last step, finishing is as quick
                bar.close()
                run.set_tags({"scfm.preempted_after_step": step})
                reason = stop.signal_name or "signal on another rank"
                if launch.is_main:
                    write_preempted_marker(out_dir, step, tag, reason)
                raise Preempted(f"preempted ({reason}) after step {step}: "
                                f"saved checkpoint {tag}; run the same command again to continue", checkpoint_dir)
        bar.close()

        metrics = _final_metrics(history, settings, world_size)
        metrics.update(precision=precision.precision, precision_reason=precision.reason)
        torch.distributed.barrier()
        if launch.is_main:
            tag = latest_tag(checkpoint_dir)
            state = consolidated_state_dict(engine, checkpoint_dir, tag)
            final = write_final_model(out_dir, state, config, vocab,
                                      extra={"pretrain": {"step": step, "tag": tag, "final_loss": metrics["final_loss"],
                                                          "recipe": recipe}})
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
