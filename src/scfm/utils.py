"""Small helpers every step shares: atomic outputs, seeding, progress bars."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and directories: the caller writes whatever it likes at the yielded path.
    On any exception the temporary is removed, so a failed step never leaves a half-written output.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic_output: nothing was written to {tmp}")
        if final.is_dir() and not tmp.is_dir():
            raise RuntimeError(f"atomic_output: {final} is a directory")
        _remove(final)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; return a NumPy generator for code that takes one explicitly."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", quiet: bool = False):
    """A tqdm bar on stderr, silent when stderr is not a terminal or ``quiet`` is set.

    ``SCFM_PROGRESS=1`` forces bars on (useful in Nextflow logs), ``SCFM_PROGRESS=0`` forces them off.
    """
    from tqdm.auto import tqdm

    forced = os.environ.get("SCFM_PROGRESS")
    if forced is not None:
        disable = forced == "0"
    else:
        disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True)
