"""Re-running `scfm pretrain` into its own directory: --resume auto|always|never, incomplete checkpoints,
settings that must not change on resume, and SIGTERM (Slurm preemption) → checkpoint → exact continuation."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from train_helpers import error_line, run_cli, scfm_step, start_step

STEPS = 12
PREEMPTED_EXIT = 75


def _args(train_data, out, *extra):
    return ["pretrain", "--shards", train_data["shards"], "--vocab", train_data["vocab"], "-o", out,
            "--zero-stage", "2", "--micro-batch-size", "4", "--lr", "2e-3", "--warmup-steps", "2",
            "--performer-redraw-interval", "3",  # redraws before and after the stop: resumed exactly too
            "--seed", "3", "--max-steps", str(STEPS), *extra]


def _losses(out_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _assert_same_losses(got: dict, want: dict, steps) -> None:
    got_, want_ = np.array([got[s] for s in steps]), np.array([want[s] for s in steps])
    assert np.all(np.abs(got_ - want_) <= 1e-6 * np.abs(want_)), (got_, want_)


def _tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def reference(train_data, tmp_path_factory):
    """The uninterrupted run: its losses at every step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    scfm_step(*_args(train_data, out, "--save-every", "100", "--quiet"))
    return _losses(out)


@pytest.fixture(scope="module")
def preempted(train_data, tmp_path_factory, stop_when_ready):
    """The same run sent SIGTERM once a few steps are done: (its directory, the step it stopped at, its stderr)."""
    out = tmp_path_factory.mktemp("preempted") / "run"
    log = out.parent / "stderr.txt"
    proc = start_step(*_args(train_data, out, "--save-every", "100"), stderr_path=log, env={"SCFM_PROGRESS": "1"})
    # the progress bar says some steps are done
    stop_when_ready(proc, lambda: re.search(rf"\| [2-9]/{STEPS} ", log.read_text()),
                    what=lambda: log.read_text()[-4000:])
    stderr = log.read_text()
    assert proc.returncode == PREEMPTED_EXIT, stderr[-4000:]
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    stopped_at = int(re.search(r"preempted \(SIGTERM\) after step (\d+)", line).group(1))
    return out, stopped_at, line


@pytest.fixture
def preempted_dir(preempted):
    return preempted[0]


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_preempted(preempted):
    out, stopped_at, line = preempted
    assert 2 <= stopped_at < STEPS and str(out / "checkpoints") in line
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped_at:06d}"
    assert (out / "checkpoints" / f"step_{stopped_at:06d}" / "scfm_checkpoint.json").is_file()
    assert sorted(_losses(out)) == list(range(1, stopped_at + 1))
    assert not (out / "model").exists()
    # what a wrapper script reads when a launcher hides the exit status
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker == {"step": stopped_at, "checkpoint": f"step_{stopped_at:06d}", "signal": "SIGTERM"}


@pytest.mark.slow
def test_the_rerun_continues_exactly_past_a_checkpoint_killed_mid_save(train_data, reference, preempted,
                                                                       tmp_path):
    out = _copy(preempted[0], tmp_path)
    stopped_at = preempted[1]
    checkpoints = out / "checkpoints"
    # a later save killed halfway: some files written, truncated, never marked complete
    half = checkpoints / f"step_{stopped_at + 1:06d}"
    shutil.copytree(checkpoints / f"step_{stopped_at:06d}", half)
    (half / "scfm_checkpoint.json").unlink()
    for state in half.glob("*.pt"):
        state.write_bytes(state.read_bytes()[:100])

    scfm_step(*_args(train_data, out, "--save-every", "100", "--quiet"))  # the requeued job: --resume auto
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    _assert_same_losses(resumed, reference, range(1, STEPS + 1))
    assert (out / "model" / "model.safetensors").is_file()
    assert not (out / "PREEMPTED").exists()  # continued
    # the debris was pruned (--keep-checkpoints 2)
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [f"step_{stopped_at:06d}", f"step_{STEPS:06d}"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("scfm").experiment_id], order_by=["start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    assert runs[0].data.tags["scfm.preempted_after_step"] == str(stopped_at)
    assert runs[1].data.params["resumed_from_step"] == str(stopped_at)
    # --precision auto: the resumed run computes in the precision the checkpoint recorded, not a new decision
    record = json.loads((checkpoints / f"step_{stopped_at:06d}" / "scfm_checkpoint.json").read_text())
    assert record["precision"]["precision"] == runs[0].data.params["resolved_precision"]
    assert runs[1].data.params["resolved_precision"] == runs[0].data.params["resolved_precision"]
    assert runs[1].data.params["precision_reason"].startswith("auto, resumed: the checkpoint's choice")


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--micro-batch-size", "2", "--micro-batch-size"),
    ("--grad-accum", "2", "--grad-accum"),
    ("--seed", "4", "--seed"),
    ("--mask-ratio", "0.5", "--mask-ratio"),
    ("--downsample-beta", "1 1", "--downsample-beta"),
    ("--mix-row-groups", "8", "--mix-row-groups"),
    ("--performer-redraw-interval", "5", "--performer-redraw-interval"),
    ("--zero-stage", "1", "--zero-stage"),
    ("--model-preset", "small", "model config"),
])
def test_resuming_with_other_math_is_refused(train_data, preempted, preempted_dir, flag, value, named):
    before = _tree(preempted_dir)
    result = run_cli(*_args(train_data, preempted_dir, "--quiet"), flag, *value.split())
    assert result.exit_code == 1
    line = error_line(result)
    assert f"cannot resume: checkpoint step_{preempted[1]:06d} was written with {named}" in line
    assert str(preempted_dir / "checkpoints") in line
    assert _tree(preempted_dir) == before


def test_resuming_with_another_world_size_is_refused(train_data, preempted_dir, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    before = _tree(preempted_dir)
    result = run_cli(*_args(train_data, preempted_dir, "--quiet"))
    assert result.exit_code == 1
    assert "number of processes (world size) = 1, this run has 2" in error_line(result)
    assert _tree(preempted_dir) == before


def test_never_refuses_a_directory_with_checkpoints(train_data, preempted_dir):
    before = _tree(preempted_dir)
    result = run_cli(*_args(train_data, preempted_dir, "--resume", "never", "--quiet"))
    assert result.exit_code == 1
    line = error_line(result)
    assert "--resume never" in line and "--overwrite" in line and str(preempted_dir / "checkpoints") in line
    assert _tree(preempted_dir) == before


def test_always_needs_a_complete_checkpoint(train_data, preempted_dir, tmp_path):
    out = _copy(preempted_dir, tmp_path)
    for marker in out.glob("checkpoints/step_*/scfm_checkpoint.json"):
        marker.unlink()  # only incomplete saves left
    before = _tree(out)
    result = run_cli(*_args(train_data, out, "--resume", "always", "--quiet"))
    assert result.exit_code == 1
    assert "no checkpoint to resume from" in error_line(result)
    assert _tree(out) == before


def test_auto_keeps_checkpoints_it_cannot_vouch_for(train_data, preempted_dir, tmp_path):
    out = _copy(preempted_dir, tmp_path)
    tag = (out / "checkpoints" / "latest").read_text()
    (out / "checkpoints" / tag / "scfm_checkpoint.json").unlink()  # as an older scfm wrote them
    before = _tree(out)
    result = run_cli(*_args(train_data, out, "--quiet"))
    assert result.exit_code == 1
    line = error_line(result)
    assert f"checkpoints/latest names {tag}" in line and "--overwrite" in line
    assert _tree(out) == before


def test_overwrite_contradicts_always(train_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*_args(train_data, out, "--resume", "always", "--overwrite", "--quiet"))
    assert result.exit_code == 2 and "--overwrite" in error_line(result)
    assert not out.exists()
