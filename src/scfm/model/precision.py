"""Which float precision a run uses, and why.

    cpu_native_bf16() -> bool                                   # AVX-512 BF16, AMX or Arm BF16 present
    choose_precision(requested, device_type, *, native_bf16, bf16_cosine, encoder_dim) -> PrecisionChoice
    min_row_cosine(a, b) -> float                               # worst per-cell cosine of two outputs

On CUDA, ``auto`` is bf16 autocast. On a CPU, bf16 only pays where the CPU computes it natively
(AVX-512 BF16 or AMX on x86, the BF16 extension on Arm): elsewhere oneDNN emulates it and it runs
several times slower than fp32, so ``auto`` is fp32 there and an explicit ``bf16`` gets a warning. On
a CPU with native bf16, ``auto`` still picks bf16 only when the model keeps its outputs: the caller
passes ``bf16_cosine``, a measurement of the worst per-cell cosine between fp32 and bf16 outputs on
a few real cells, and bf16 is kept when it reaches ``BF16_MIN_COSINE``. A measurement rather than a
rule per model shape, because what bf16 loses depends on the weights (a fine-tuned or freshly
initialised checkpoint of the same shape can behave differently), and a few cells cost seconds.

Native bf16 speeds up matrix products only (2.1-2.4x on AVX-512 BF16; the CPU attention kernel runs
no faster in bf16), so it pays for a wide encoder, whose time is in its linear layers, and not for a
narrow one, whose time is in attention, normalisation and Python. When the caller passes the model's
``encoder_dim``, ``auto`` keeps fp32 below ``BF16_MIN_ENCODER_DIM`` (bench/RESULTS.md, "Precision
choice"). A rule on the shape and not a timing of the run, so that the same command on the same
machine always computes in the same precision, whatever else the machine is doing.

Capabilities are read from torch's own CPU probes, with the kernel's CPU flags as the fallback (and
for Arm, which torch does not probe); never from a list of CPU names.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from scfm.errors import ScfmError

PRECISIONS = ("auto", "fp32", "bf16")
BF16_MIN_COSINE = 0.999
# the narrowest encoder width at which bf16 measured clearly faster than fp32 on a CPU (1.2-1.3x at 128,
# 1.02-1.06x at 64: bench/RESULTS.md, "Precision choice")
BF16_MIN_ENCODER_DIM = 128
# /proc/cpuinfo flags that mean bf16 arithmetic in hardware (x86: AVX-512 BF16, AMX; Arm: FEAT_BF16)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32 | bf16
    reason: str
    warning: str | None = None

    def as_params(self) -> dict[str, str]:
        return {"precision": self.precision, "precision_reason": self.reason}


def cpuinfo_has_native_bf16(cpuinfo: str) -> bool:
    """True when a ``/proc/cpuinfo`` text lists a native bf16 flag (``flags`` on x86, ``Features`` on Arm)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (torch's probes first, then the kernel's CPU flags)."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe() for probe in probes if probe is not None):
        return True
    try:
        return cpuinfo_has_native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def choose_precision(
    requested: str,
    device_type: str,
    *,
    native_bf16: Callable[[], bool],
    bf16_cosine: Callable[[], float] | None = None,
    encoder_dim: int | None = None,
) -> PrecisionChoice:
    """Resolve ``auto``/``fp32``/``bf16`` for a device; the probes are called only when the answer needs them.

    ``native_bf16()`` says whether the CPU has bf16 in hardware; ``bf16_cosine()`` measures the worst
    per-cell cosine between bf16 and fp32 outputs (None: nothing to measure, bf16 is not considered);
    ``encoder_dim``: the model's encoder width, for the speed rule above (None: no speed rule).
    """
    if requested not in PRECISIONS:
        raise ScfmError(f"unknown precision {requested!r} (choose from {', '.join(PRECISIONS)})")
    if device_type == "cuda":
        if requested == "auto":
            return PrecisionChoice("bf16", "auto on CUDA: bf16 autocast")
        return PrecisionChoice(requested, f"requested {requested}")
    if requested == "fp32":
        return PrecisionChoice("fp32", "requested fp32")
    native = bool(native_bf16())
    if requested == "bf16":
        if native:
            return PrecisionChoice("bf16", "requested bf16 (the CPU has native bf16)")
        return PrecisionChoice("bf16", "requested bf16 (the CPU has no native bf16: emulated)",
                               warning="--precision bf16: this CPU has no native bf16 (AVX-512 BF16/AMX), "
                                       "it is emulated and will run slower than fp32")
    if not native:
        return PrecisionChoice("fp32", "auto on CPU: no native bf16 (AVX-512 BF16/AMX), fp32 is faster")
    if bf16_cosine is None:
        return PrecisionChoice("fp32", "auto on CPU: native bf16, but no bf16 check for this output, fp32")
    if encoder_dim is not None and encoder_dim < BF16_MIN_ENCODER_DIM:
        return PrecisionChoice("fp32", f"auto on CPU: native bf16, but a {encoder_dim}-d encoder is narrower than "
                                       f"{BF16_MIN_ENCODER_DIM}, where bf16 gains nothing over fp32")
    cosine = float(bf16_cosine())
    if cosine >= BF16_MIN_COSINE:
        return PrecisionChoice("bf16", f"auto on CPU: native bf16, min per-cell cosine to fp32 {cosine:.6f} "
                                       f">= {BF16_MIN_COSINE}")
    return PrecisionChoice("fp32", f"auto on CPU: native bf16, but min per-cell cosine to fp32 {cosine:.6f} "
                                   f"< {BF16_MIN_COSINE}, fp32")


def min_row_cosine(a, b) -> float:
    """The smallest cosine between matching rows (cells) of two outputs, each flattened per cell."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same = np.all(a == b, axis=1)  # an all-zero output agrees with itself
    cosine = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0), np.where(same, 1.0, 0.0))
    return float(cosine.min()) if len(cosine) else 1.0


def announce(choice: PrecisionChoice) -> PrecisionChoice:
    """Print the choice's warning (one line on stderr) when it has one."""
    if choice.warning:
        print(f"warning: {choice.warning}", file=sys.stderr)
    return choice
