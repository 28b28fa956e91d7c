"""The one exception users see.

Everything that can go wrong because of the user's input or environment is raised as
:class:`ScfmError`; the CLI turns it into ``error: <path>: <problem>`` on stderr and exit code 1.
Anything else escaping to the CLI is a bug in scfm and keeps its traceback.
"""

from __future__ import annotations

import os


class ScfmError(Exception):
    """A problem with the user's input: one line, naming the file when there is one."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.message = " ".join(str(message).split())  # one line, always
        self.path = None if path is None else os.fspath(path)
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ScfmUsageError(ScfmError):
    """Flags that contradict each other or are missing (exit code 2, like click's own usage errors)."""

    exit_code = 2


class Terminated(BaseException):
    """SIGTERM arrived (Slurm, Nextflow, ``timeout``): unwinds the step like Ctrl-C does.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` turns it into a
    different error; every ``atomic_output`` and scratch directory on the way out is removed.
    """

    exit_code = 143  # 128 + SIGTERM: what a shell reports for a process ended by SIGTERM
    run_status = "KILLED"  # the MLflow run was stopped from outside, it did not fail

    def one_line(self) -> str:
        return "terminated by SIGTERM; partial outputs were removed"
