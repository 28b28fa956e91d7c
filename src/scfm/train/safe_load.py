"""Resuming from a DeepSpeed checkpoint without running code planted in it.

DeepSpeed reads its ``*.pt`` files with ``torch.load(weights_only=False)``: full pickle, so a file
placed in a run directory (they live on shared cluster filesystems) would run any code it likes the
moment ``scfm pretrain`` resumes. scfm never lets that happen:

1. Before DeepSpeed opens anything, every ``*.pt`` file of the checkpoint is scanned without being
   unpickled (:func:`torch.serialization.get_unsafe_globals_in_checkpoint`); a file naming any class or
   function beyond tensors, plain containers and :data:`DEEPSPEED_STATE_CLASSES` is refused by name.
2. DeepSpeed's own loads then run under :func:`weights_only_loads`, which forces torch's weights-only
   unpickler on every ``torch.load`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) and allows those few classes
   only, so even a file the scan misread cannot run code.

The allowed classes are DeepSpeed's plain records of optimizer state (found by scanning checkpoints of
ZeRO stages 1-3): they hold numbers and have no custom unpickling code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Iterator

from scfm.errors import ScfmError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_FULL_PICKLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # must not be set at the same time
DEEPSPEED_STATE_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an int enum: the ZeRO stage
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass of two ints: where a shard lies
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # the (static) loss scale of the optimizer
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # its dynamic variant (fp16 training)
)


def _allowed_classes() -> list:
    import importlib

    classes = []
    for name in DEEPSPEED_STATE_CLASSES:
        module, _, attribute = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attribute))
    return classes


def refuse_unsafe_files(directory: Path) -> None:
    """Scan every ``*.pt`` file under ``directory`` (unpickling nothing); refuse one that could run code."""
    import torch

    with torch.serialization.safe_globals(_allowed_classes()):
        for path in sorted(Path(directory).rglob("*.pt")):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as exc:  # not a torch.save zip archive, or a damaged one
                raise ScfmError(f"refusing to resume: not a readable torch checkpoint file "
                                f"({type(exc).__name__}: {str(exc).strip()[:200]})", path) from exc
            if unsafe:
                raise ScfmError(f"refusing to resume: the file holds pickled Python objects that could run code "
                                f"({', '.join(sorted(unsafe)[:3])}); DeepSpeed checkpoints hold only tensors and "
                                f"plain data. Was it replaced? Delete this checkpoint or start over with "
                                f"--resume never --overwrite", path)


def pickle_enums_by_value() -> None:
    """Make DeepSpeed's ZeRO stage enum pickle as ``ZeroStageEnum(value)``, before any checkpoint is saved.

    Some Pythons (3.11.2, Debian 12's) pickle an enum member as ``getattr(ZeroStageEnum, name)``; the
    weights-only loader rightly refuses ``getattr`` (it can reach anything), so a checkpoint saved there
    could never be resumed or exported to a model. By value, every Python writes and reads it alike.
    """
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ZeroStageEnum.__reduce_ex__ = _enum_by_value


def _enum_by_value(member, _protocol):
    return member.__class__, (member._value_,)


@contextlib.contextmanager
def weights_only_loads(where: Path | None = None) -> Iterator[None]:
    """Every ``torch.load`` inside uses the weights-only unpickler, whatever its caller asked for;
    a refused file becomes an error naming ``where`` (torch's own message advises loading it anyway)."""
    import torch

    saved = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY, FORCE_FULL_PICKLE)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            yield
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" ({named.group(1)})" if named else ""
        raise ScfmError(f"refusing to resume: a checkpoint file holds pickled Python objects{what} that could run "
                        "code; DeepSpeed checkpoints hold only tensors and plain data", where) from exc
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
