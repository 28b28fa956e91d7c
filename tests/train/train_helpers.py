"""Helpers shared by the training tests (a plain module: conftest names clash across test dirs)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(__file__).resolve().parents[2] / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(step: str, *args, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N bin/scfm-<step> ARGS`` on CPU (gloo), as a cluster job would run it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(BIN / f"scfm-{step}"), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun scfm-{step} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def start_torchrun(step: str, *args, nproc: int = 2, stderr_path: Path, env: dict | None = None):
    """Like :func:`torchrun`, in the background; its stderr goes to a file the test can watch."""
    import os

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(BIN / f"scfm-{step}"), *map(str, args)]
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, **(env or {})})


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(x) for x in out.split())


def scfm_step(step: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """``bin/scfm-<step> ARGS`` as one process (usable from module-scoped fixtures)."""
    proc = subprocess.run([sys.executable, str(BIN / f"scfm-{step}"), *map(str, args)], capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"scfm-{step} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def start_step(step: str, *args, stderr_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``bin/scfm-<step> ARGS`` in the background, its stderr going to a file the test can watch."""
    import os

    with open(stderr_path, "w") as stderr:
        return subprocess.Popen([sys.executable, str(BIN / f"scfm-{step}"), *map(str, args)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **(env or {})})


def run_cli(*args):
    """``scfm ARGS`` in this process (click's runner), for error-path tests."""
    from click.testing import CliRunner

    from scfm.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result) -> str:
    """The single ``error: ...`` line a failed command printed."""
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]
