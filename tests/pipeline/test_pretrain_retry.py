"""PRETRAIN's script: a preempted run exits 75 and its retry, in a new work directory, continues it.

The module's whole shell script (rendered from modules/local/pretrain/main.nf with the test profile's
parameters) runs under bash in a fresh task directory per attempt, as Nextflow would run a retry; the
trainer is the real `scfm-pretrain` and preemption a real SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nf_scripts import REPO, module_process, render_script
from test_pipeline_chain import profile_params

STEPS = 40


def _attempt(work: Path, name: str, train_data: dict, runs_dir: Path, params: dict, seed: int = 0):
    """Start one attempt of the PRETRAIN task in its own directory; returns (directory, process)."""
    task = work / name
    (task / "shards").mkdir(parents=True)
    (task / "shards" / "pbmc").symlink_to(train_data["shards"])
    (task / "vocab.tsv").symlink_to(train_data["vocab"])
    settings = {**params, "max_steps": STEPS, "save_every": 2, "seed": seed, "micro_batch_size": 8}
    script = render_script(module_process("pretrain"), {
        "launcher": "", "shard_flags": "--shards 'shards/pbmc'", "vocab": "vocab.tsv", "init": "",
        "ds_config": "", "args": "", "runs_dir": runs_dir, "identity": _identity(seed),
    }, settings)
    env = {**os.environ, "PATH": f"{REPO / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "SCFM_PROGRESS": "0"}
    log = (task / ".command.err").open("w")
    proc = subprocess.Popen(["bash", "-ue", "-c", script], cwd=task, env=env, stdout=log, stderr=log, text=True,
                            start_new_session=True)
    return task, proc


def _trainer_pid(bash_pid: int) -> int:
    children = Path(f"/proc/{bash_pid}/task/{bash_pid}/children").read_text().split()
    assert children, "the trainer has not started"
    return int(children[0])


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_preempted_pretraining_exits_75_and_its_retry_continues(train_data, tmp_path):
    params = profile_params()
    work, runs_dir = tmp_path / "work", tmp_path / "results" / "pretrain" / "runs"
    # scfm-mlflow-init would have created the store before any parallel step
    subprocess.run([sys.executable, str(REPO / "bin" / "scfm-mlflow-init"), "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}",
                    "--run-name", "retry_test", "--session-id", "retry-test"], check=True, capture_output=True)

    first, proc = _attempt(work, "attempt1", train_data, runs_dir, params)
    try:
        deadline = time.time() + 300
        while not list(runs_dir.glob("*/checkpoints/latest")):  # a first checkpoint is saved
            assert proc.poll() is None, (first / ".command.err").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint"
            time.sleep(0.1)
        os.kill(_trainer_pid(proc.pid), signal.SIGTERM)
        assert proc.wait(timeout=300) == 75, (first / ".command.err").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (run_dir,) = runs_dir.iterdir()
    stopped_at = json.loads((run_dir / "PREEMPTED").read_text())["step"]
    assert 2 <= stopped_at < STEPS and not (first / "pretrain_run").exists()
    assert "a retry continues it" in (first / ".command.err").read_text()

    retry, proc = _attempt(work, "attempt2", train_data, runs_dir, params)
    assert proc.wait(timeout=600) == 0, (retry / ".command.err").read_text()[-3000:]
    assert (retry / "pretrain_run").resolve() == run_dir.resolve()
    assert (retry / "pretrain_run" / "model" / "model.safetensors").is_file()
    assert not (run_dir / "PREEMPTED").exists()
    assert _steps(run_dir) == list(range(1, STEPS + 1))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == STEPS

    # the folder is named after the staged shards, the vocabulary and the identity string: the same
    # inputs find it again, a setting that may not change on resume gets another folder
    assert _run_key(first, runs_dir, params, _identity(0)) == run_dir.name
    assert _run_key(first, runs_dir, params, _identity(1)) != run_dir.name


def _identity(seed: int) -> str:
    # [model_preset, init, zero_stage, deepspeed_config, micro_batch_size, grad_accum, seed, gpus, nodes, args]
    return " ".join(str(v) for v in ("tiny", "", 2, "", 8, 1, seed, 0, 1, ""))


def _run_key(task: Path, runs_dir: Path, params: dict, identity: str) -> str:
    script = render_script(module_process("pretrain"), {
        "launcher": "", "shard_flags": "", "vocab": "vocab.tsv", "init": "", "ds_config": "", "args": "",
        "runs_dir": runs_dir, "identity": identity}, params)
    key_line = next(line for line in script.splitlines() if "run_key=" in line)
    return subprocess.run(["bash", "-c", key_line + '; echo "$run_key"'], cwd=task, capture_output=True, text=True,
                          check=True).stdout.strip()
