"""Resuming pretraining never unpickles arbitrary objects: a pickle planted in a real DeepSpeed checkpoint
is refused by name and never runs, while honest checkpoints of ZeRO stages 1-3 resume exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from train_helpers import scfm_step

COMMON = ["--micro-batch-size", "4", "--lr", "2e-3", "--warmup-steps", "1", "--seed", "5", "--quiet"]


class PlantMarker:
    """Unpickling this object creates a file: proof that code in the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _args(train_data, out, stage, steps):
    return ["pretrain", "--shards", train_data["shards"], "--vocab", train_data["vocab"], "-o", out,
            "--zero-stage", stage, "--max-steps", steps, "--save-every", 1, *COMMON]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_step_run(train_data, tmp_path_factory):
    """A real one-process DeepSpeed ZeRO-2 run stopped after 2 of its steps (checkpoints at 1 and 2)."""
    out = tmp_path_factory.mktemp("planted") / "run"
    scfm_step(*_args(train_data, out, 2, 2))
    return out


def _plant(checkpoint_file, marker):
    from scfm.train.safe_load import _allowed_classes

    with torch.serialization.safe_globals(_allowed_classes()):
        state = torch.load(checkpoint_file, weights_only=True)  # the honest file loads as weights only
    state["ds_version"] = PlantMarker(marker)
    torch.save(state, checkpoint_file)


@pytest.mark.slow
def test_a_pickle_planted_in_the_checkpoint_never_runs(train_data, two_step_run, tmp_path):
    run = shutil.copytree(two_step_run, tmp_path / "run")
    planted = run / "checkpoints" / "step_000002" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "code-ran"
    _plant(planted, marker)
    log_before = (run / "train_log.jsonl").read_text()

    proc = scfm_step(*_args(train_data, run, 2, 4), check=False)  # --resume auto picks step 2
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {planted}: refusing to resume: the file holds pickled Python objects that could run "
                      "code (builtins.getattr, pathlib.Path, pathlib.PosixPath); DeepSpeed checkpoints hold only "
                      "tensors and plain data. Was it replaced? Delete this checkpoint or start over with --resume "
                      "never --overwrite"], proc.stderr[-3000:]
    assert not marker.exists()
    assert (run / "train_log.jsonl").read_text() == log_before and not (run / "checkpoints" / "step_000003").exists()

    torch.load(planted, weights_only=False)  # the planted object is live: an unprotected resume would run it
    assert marker.exists()


@pytest.mark.slow
def test_the_loads_deepspeed_makes_are_weights_only_even_past_the_scan(two_step_run, tmp_path):
    """The second line of defence: DeepSpeed asks torch.load for full pickle; inside, it does not get it."""
    from scfm.errors import ScfmError
    from scfm.train.safe_load import FORCE_WEIGHTS_ONLY, weights_only_loads

    honest = two_step_run / "checkpoints" / "step_000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    planted = shutil.copy(honest, tmp_path / "optim_states.pt")
    marker = tmp_path / "code-ran"
    _plant(planted, marker)
    with weights_only_loads(tmp_path):
        state = torch.load(honest, weights_only=False)  # DeepSpeed's own classes are allowed, and nothing else
    assert state["optimizer_state_dict"]["zero_stage"] == 2
    with pytest.raises(ScfmError, match="a checkpoint file holds pickled Python objects .* that could run code"):
        with weights_only_loads(tmp_path):
            torch.load(planted, weights_only=False)
    assert not marker.exists() and FORCE_WEIGHTS_ONLY not in __import__("os").environ


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_honest_checkpoints_resume_exactly(train_data, tmp_path, stage):
    """ZeRO-2 is covered by tests/train/test_rerun.py and test_pretrain_zero.py."""
    full = tmp_path / "full"
    scfm_step(*_args(train_data, full, stage, 4), "--keep-checkpoints", 4)
    # the same run as if it had stopped after step 2: later checkpoints and the final model never written
    part = shutil.copytree(full, tmp_path / "part")
    for later in ("checkpoints/step_000003", "checkpoints/step_000004", "model"):
        shutil.rmtree(part / later)
    scfm_step(*_args(train_data, part, stage, 4))  # resumes from step 2, loading every file weights-only
    a, b = np.array(_losses(full)), np.array(_losses(part))
    assert len(a) == len(b) == 4 and np.all(np.abs(a - b) <= 1e-6 * np.abs(a)), (a, b)
    from safetensors.torch import load_file

    first, second = (load_file(str(run / "model" / "model.safetensors")) for run in (full, part))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-6, atol=1e-7)


def test_a_zero_stage_saved_by_a_python_that_pickles_enums_by_name_loads_weights_only(tmp_path):
    """Python 3.11.2 (Debian 12) pickles enum members as getattr(cls, name), which the weights-only loader
    refuses; scfm makes the ZeRO stage pickle by value before it saves, so such a checkpoint still loads."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from scfm.train.safe_load import pickle_enums_by_value, refuse_unsafe_files, weights_only_loads

    before = ZeroStageEnum.__dict__.get("__reduce_ex__")
    ZeroStageEnum.__reduce_ex__ = lambda member, _protocol: (getattr, (member.__class__, member._name_))
    try:
        pickle_enums_by_value()
        torch.save({"zero_stage": ZeroStageEnum.optimizer_states}, tmp_path / "optim_states.pt")
    finally:
        if before is None:
            del ZeroStageEnum.__reduce_ex__
        else:
            ZeroStageEnum.__reduce_ex__ = before
    refuse_unsafe_files(tmp_path)
    with weights_only_loads(tmp_path):
        assert torch.load(tmp_path / "optim_states.pt")["zero_stage"] is ZeroStageEnum.optimizer_states
