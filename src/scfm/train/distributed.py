"""From a launcher's environment to a DeepSpeed engine.

Three ways to start training, one code path:

- ``torchrun`` / ``deepspeed`` launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
  and ``MASTER_PORT``; we use them as they are.
- ``srun`` (Slurm) sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the compressed
  ``SLURM_JOB_NODELIST``; the first host becomes the rendezvous address and the port is derived from
  the job id, so every task agrees without talking first.
- Anything else is one process: rank 0 of 1 on 127.0.0.1 and a free port.

The DeepSpeed config starts from ``assets/deepspeed/zero{1,2,3}.json`` (or a user's file) and gets
the run's overrides: micro batch, gradient accumulation, clipping, and bf16 only on a CUDA device
that supports it (fp32 on CPU, where DeepSpeed's bf16 path is untested). The optimizer is torch's
AdamW handed to DeepSpeed as a client optimizer, which ZeRO accepts with
``zero_allow_untested_optimizer``; the learning rate follows a linear warmup then a cosine decay.

The packaged configs set ``data_types.grad_accum_dtype`` to fp32: with bf16 weights DeepSpeed would
otherwise accumulate (and, under ZeRO-2, keep the partitioned) gradients in bf16, whose 8-bit
mantissa loses small per-micro-batch contributions when several micro-batches are summed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from scfm.errors import ScfmError

SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: ``"gpu[01-03,07],login1"`` → gpu01, gpu02, gpu03, gpu07, login1."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
        if not prefix.strip():
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                start, end = part.split("-", 1)
                width = len(start)  # zero padding is part of the host name
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(start), int(end) + 1))
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    if not hosts:
        raise ScfmError(f"cannot parse the Slurm node list {nodelist!r}")
    return hosts


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the rank layout from torchrun/deepspeed variables, else Slurm's, else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # the srun step's own layout when present: a batch script's allocation may be larger
        nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
                    or "127.0.0.1")
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=int(env.get("MASTER_PORT") or SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single")


def export_launch_env(launch: LaunchEnv) -> None:
    """Write the layout into the variables torch.distributed's ``env://`` rendezvous reads."""
    os.environ.update(
        RANK=str(launch.rank),
        WORLD_SIZE=str(launch.world_size),
        LOCAL_RANK=str(launch.local_rank),
        MASTER_ADDR=launch.master_addr,
        MASTER_PORT=str(launch.master_port),
    )


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def init_distributed(launch: LaunchEnv | None = None) -> LaunchEnv:
    """Export the layout and start the process group (gloo on CPU, nccl on CUDA); idempotent."""
    import deepspeed
    import torch

    launch = launch or detect_launch_env()
    export_launch_env(launch)
    if use_cuda():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        if not use_cuda():
            skip_shared_memory_comm_op(deepspeed)
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda() else "gloo", verbose=False)
    return launch


def skip_shared_memory_comm_op(deepspeed) -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op at start-up.

    Training needs only gloo (the op serves inference all-reduce). The build takes minutes on first use and
    holds a file lock in the torch extensions cache; a process killed mid-build (a preempted or cancelled
    task) leaves that lock behind, and every later run on the machine then waits on it forever.
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ---------------------------------------------------------------------------- DeepSpeed config


def packaged_zero_config(stage: int) -> Path:
    if stage not in (1, 2, 3):
        raise ScfmError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
    return Path(str(resources.files("scfm") / "assets" / "deepspeed" / f"zero{stage}.json"))


def read_json_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ScfmError("DeepSpeed config not found", path)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScfmError(f"not a JSON DeepSpeed config ({exc})", path) from exc
    if not isinstance(data, dict):
        raise ScfmError("a DeepSpeed config must be a JSON object", path)
    return data


def build_deepspeed_config(
    *,
    zero_stage: int = 2,
    config_path: str | os.PathLike | None = None,
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    gradient_clipping: float | None = None,
    bf16: bool | None = None,
) -> dict[str, Any]:
    """The packaged (or given) config with this run's overrides; ``bf16=None`` means "on CUDA if supported"."""
    base = read_json_config(config_path) if config_path else read_json_config(packaged_zero_config(zero_stage))
    config = copy.deepcopy(base)
    if config_path is None or "zero_optimization" not in config:
        config.setdefault("zero_optimization", {})["stage"] = zero_stage
    if micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    if grad_accum is not None:
        config["gradient_accumulation_steps"] = int(grad_accum)
    if gradient_clipping is not None:
        config["gradient_clipping"] = float(gradient_clipping)
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    config.setdefault("gradient_accumulation_steps", 1)
    # fp32 gradient accumulation unless the given config asks otherwise (see the module docstring)
    config.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    # the world size is only known at initialize; DeepSpeed derives train_batch_size itself
    config.pop("train_batch_size", None)
    config["zero_allow_untested_optimizer"] = True

    wanted = config.get("bf16", {}).get("enabled", "auto") if bf16 is None else bf16
    if wanted == "auto":
        wanted = _cuda_bf16_supported()
    if wanted and not use_cuda():
        wanted = False  # fp32 on CPU
    config["bf16"] = {"enabled": bool(wanted)}
    config.pop("fp16", None)
    config.pop("optimizer", None)  # ours is a client optimizer
    config.pop("scheduler", None)
    return config


def _cuda_bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------------------- optimizer and schedule


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear from 0 to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable LR lambda (LambdaLR stores callable objects' state in its state_dict)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float = 0.1):
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, warmup_steps=self.warmup_steps, max_steps=self.max_steps, min_ratio=self.min_ratio)


def adamw_param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices of linear layers only.

    Biases, LayerNorm parameters and embedding tables (position embeddings, the value embedding's bin,
    mask and padding vectors) are left alone: decaying a lookup table pulls the rows of rarely seen
    genes toward zero, and decaying norms fights their scale. (The released recipe uses no weight
    decay at all; this split matters once --weight-decay is set.)
    """
    from torch import nn

    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_table = name.endswith(("bins", "mask_vector", "pad_vector"))
        if param.dim() >= 2 and not is_table and id(param) not in no_decay_ids:
            decay.append(param)
        else:
            no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def initialize_engine(
    model,
    ds_config: Mapping[str, Any],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    warmup_steps: int = 0,
    max_steps: int = 1,
    min_lr_ratio: float = 0.1,
):
    """``deepspeed.initialize`` with a torch AdamW and the warmup+cosine schedule; returns the engine."""
    import deepspeed
    import torch

    optimizer = torch.optim.AdamW(adamw_param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=dict(ds_config)
    )
    return engine
