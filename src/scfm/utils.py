"""Small helpers every step shares: output checks, atomic outputs, SIGTERM handling, seeding, progress bars."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from scfm.errors import ScfmError, Terminated


def check_output_path(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                      directory: bool = False) -> Path:
    """Refuse an output path that cannot be written or would destroy an input, before any work starts.

    Refused: an output under a regular file (``-o notes.txt/out.h5ad``), a folder where a file is to be
    written (or a file where a folder is), a folder without write permission, and an output that is one
    of ``inputs`` (also through another spelling of the path or a symlink). A ``directory`` output is
    replaced whole, so an input inside it is refused too.
    """
    out = Path(path)
    ancestor = next(p for p in out.absolute().parents if p.exists())  # the root always exists
    if not ancestor.is_dir():
        raise ScfmError(f"cannot write here: {ancestor} is a file, not a folder", out)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ScfmError(f"cannot write here: no permission to write in {ancestor}", out)
    if out.is_dir() and not directory:
        raise ScfmError("is a folder; give a file name", out)
    if out.exists() and directory and not out.is_dir():
        raise ScfmError("exists and is not a folder", out)
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        same = source == target or (out.exists() and source.exists() and os.path.samefile(out, source))
        if same or (directory and target in source.parents):
            relation = "is" if same else "holds"
            raise ScfmError(f"{relation} the input {given}: writing the output would destroy it "
                            "(choose another output path)", out)
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and directories: the caller writes whatever it likes at the yielded path.
    On any exception the temporary is removed, so a failed step never leaves a half-written output.
    """
    final = Path(path)
    created = make_parents(final)
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
        remove_if_empty(created)
        raise


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; return them, deepest first, for :func:`remove_if_empty`."""
    missing = [p for p in path.absolute().parents if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise ScfmError(f"cannot create the output's folder ({exc.strerror})", path) from exc
    return missing


def remove_if_empty(folders: Iterable[Path]) -> None:
    """Remove folders a failed step created, deepest first, as long as they stayed empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (someone else writes there too) or already gone


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While active, SIGTERM raises :class:`~scfm.errors.Terminated` in the main thread.

    Python ends a process on SIGTERM without unwinding, which would leave temporary outputs and scratch
    folders behind; raised as an exception, it runs every clean-up a Ctrl-C runs. Handlers installed
    inside (pretraining's save-then-stop) take precedence while they are active.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(_signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        raise Terminated()

    def raise_again_if_swallowed(unraisable):
        # A signal handler runs in whatever Python code is executing, also in a weakref callback or a
        # __del__, where Python prints the exception and carries on: the step would then run to its end
        # deaf to SIGTERM. Raise it again shortly, from wherever the main thread is by then.
        if isinstance(unraisable.exc_value, Terminated):
            signal.setitimer(signal.ITIMER_REAL, 0.05)
        else:
            previous_hook(unraisable)

    previous = signal.signal(signal.SIGTERM, unwind)
    previous_alarm = signal.signal(signal.SIGALRM, unwind)
    previous_hook, sys.unraisablehook = sys.unraisablehook, raise_again_if_swallowed
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGALRM, previous_alarm)
        sys.unraisablehook = previous_hook


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread while active, restored afterwards.

    For small networks (drug response, perturbation): splitting each tiny op over threads costs more than
    it saves, and on a busy machine every op waits for the slowest thread (8-60x slower measured on 2 shared
    cores).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; return a NumPy generator for code that takes one explicitly."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def close_progress_bars() -> None:
    """Close bars a failing step left open, so that its error message starts a line of its own."""
    from tqdm.std import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


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
