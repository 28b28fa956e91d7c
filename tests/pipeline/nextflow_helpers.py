"""Run the pipeline with real Nextflow (installed by `make nextflow` from Maven Central) and read what it left.

Every launch is offline (NXF_OFFLINE=true: no plugin, no update check) with the local executor and
the scfm of this checkout, and names its trace with `--trace_report_suffix`, so a test reads the trace
of exactly its own launch.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "assets" / "demo"


class NextflowMissing(RuntimeError):
    """No Nextflow runtime: `make nextflow` installs it. The tests fail rather than skip: CI installs it."""


def nextflow_executable() -> Path:
    """``$SCFM_NEXTFLOW``, else the runtime `make nextflow` installs, else ``nextflow`` on PATH."""
    candidates = [os.environ.get("SCFM_NEXTFLOW"), REPO / ".nextflow-runtime" / "bin" / "nextflow", shutil.which("nextflow")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise NextflowMissing("no Nextflow runtime: run `make nextflow` (scripts/install-nextflow)")


def task_environment(extra: dict | None = None) -> dict:
    """This interpreter's environment first on PATH, so tasks run the scfm under test."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update({"NXF_OFFLINE": "true", "NXF_ANSI_LOG": "false", "NXF_DISABLE_CHECK_LATEST": "true",
                "SCFM_PROGRESS": "0"})
    for leaked in ("MLFLOW_TRACKING_URI", "SCFM_MLFLOW_PARENT_RUN_ID", "SCFM_PIPELINE_SESSION", "NXF_WORK"):
        env.pop(leaked, None)
    return env


@dataclass
class Launch:
    """One `nextflow` command and what it left: exit code, console output, its trace rows."""

    returncode: int
    output: str
    launch_dir: Path
    outdir: Path | None
    suffix: str | None

    @property
    def trace(self) -> list[dict]:
        if self.outdir is None or self.suffix is None:
            return []
        path = self.outdir / "pipeline_info" / f"execution_trace_{self.suffix}.txt"
        if not path.exists():
            return []
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))

    def tasks(self, status: str | None = None) -> list[str]:
        """``PROCESS (tag)`` of every task in the trace (with ``status``: only those)."""
        return sorted(f"{row['process'].split(':')[-1]} ({row['tag']})" for row in self.trace
                      if status is None or row["status"] == status)

    def executed(self) -> list[str]:
        """Tasks that ran in this launch (anything but CACHED)."""
        return sorted(f"{row['process'].split(':')[-1]} ({row['tag']})" for row in self.trace
                      if row["status"] != "CACHED")

    def check(self) -> "Launch":
        if self.returncode != 0:
            raise AssertionError(f"nextflow exited {self.returncode} in {self.launch_dir}:\n{self.output[-6000:]}")
        return self


def nextflow(*args, launch_dir: Path, env: dict | None = None, timeout: float = 1500) -> Launch:
    """``nextflow ARGS`` in ``launch_dir`` (created), offline, capturing its console output."""
    launch_dir.mkdir(parents=True, exist_ok=True)
    words = [str(a) for a in args]
    proc = subprocess.run([str(nextflow_executable()), *words], cwd=launch_dir, env=task_environment(env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    outdir = _value_of("--outdir", words)
    outdir = None if outdir is None else launch_dir / outdir  # an absolute path stays itself
    suffix = _value_of("--trace_report_suffix", words)
    return Launch(proc.returncode, proc.stdout, launch_dir, outdir, suffix)


def _value_of(flag: str, words: list[str]) -> str | None:
    index = words.index(flag) if flag in words else -1
    return words[index + 1] if 0 <= index < len(words) - 1 else None


def run_pipeline(launch_dir: Path, outdir: Path, suffix: str, *args, profile: str = "test,local",
                 env: dict | None = None, resume: bool = False) -> Launch:
    """``nextflow run <repo> -profile PROFILE --outdir OUTDIR ARGS`` with its trace named ``SUFFIX``."""
    words = ["run", REPO, "-profile", profile, "--outdir", outdir, "--trace_report_suffix", suffix, *args]
    if resume:
        words.append("-resume")
    return nextflow(*words, launch_dir=launch_dir, env=env)


def write_samplesheet(path: Path, rows: list[tuple[str, Path, str]]) -> Path:
    """A samplesheet with absolute paths: ``[(sample, counts, batch), ...]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["sample,path,batch", *(f"{sample},{counts},{batch}" for sample, counts, batch in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def mlflow_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("scfm")
    return client.search_runs([experiment.experiment_id]) if experiment else []
