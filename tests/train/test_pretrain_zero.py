"""Pretraining under real DeepSpeed on CPU (gloo): 2-process ZeRO-2 preempted and resumed exactly, ZeRO-3, 1 process."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import numpy as np
import pytest
import torch
from train_helpers import child_pids, start_torchrun, torchrun

COMMON = ["--micro-batch-size", "4", "--lr", "2e-3", "--warmup-steps", "2", "--seed", "3", "--quiet",
          "--performer-redraw-interval", "5"]  # redraws on both sides of the preemption


def _log(out_dir):
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_two_process_zero2_learns_and_resumes_exactly(train_data, tmp_path):
    data = ["--shards", train_data["shards"], "--vocab", train_data["vocab"], "--zero-stage", "2", *COMMON]
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun("pretrain", *data, "-o", full, "--max-steps", "12", "--save-every", "6")
    # preempted: SIGTERM reaches one rank only; both finish the same step, save it and stop
    stopped_at = _preempt_one_rank(data + ["-o", part, "--max-steps", "12", "--save-every", "3"], tmp_path)
    assert [r["step"] for r in _log(part)] == list(range(1, stopped_at + 1))
    assert (part / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"
    assert {p.name for p in (part / "checkpoints" / f"step_{stopped_at:06d}").glob("scfm_*.json")} == {
        "scfm_rank0.json", "scfm_rank1.json", "scfm_checkpoint.json"}
    assert json.loads((part / "PREEMPTED").read_text())["step"] == stopped_at  # torchrun itself exits 1
    torchrun("pretrain", *data, "-o", part, "--max-steps", "12", "--save-every", "3")  # --resume auto

    assert not (part / "PREEMPTED").exists()
    full_log, part_log = _log(full), _log(part)
    assert [r["step"] for r in part_log] == [r["step"] for r in full_log] == list(range(1, 13))
    full_loss = np.array([r["loss"] for r in full_log])
    resumed_loss = np.array([r["loss"] for r in part_log])
    assert np.all(np.abs(resumed_loss - full_loss) <= 1e-6 * np.abs(full_loss))
    assert full_loss[-4:].mean() < 0.9 * full_loss[:4].mean()  # it learns
    assert all(r["cells_per_s"] > 0 and r["grad_norm"] > 0 for r in full_log)

    # the consolidated final weights agree too
    a, b = _weights(full / "model"), _weights(part / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)

    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 12 and metrics["cells_seen"] == 12 * 4 * 2
    _assert_mlflow_run(full, n_steps=12)


def _preempt_one_rank(args, tmp_path) -> int:
    log = tmp_path / "preempted.stderr"
    proc = start_torchrun("pretrain", *args, stderr_path=log, env={"SCFM_PROGRESS": "1"})
    try:
        deadline = time.time() + 300
        while not re.search(r"\| [2-9]/12 ", log.read_text()):  # rank 0's progress bar
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, "no progress"
            time.sleep(0.05)
        os.kill(child_pids(proc.pid)[-1], signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = re.findall(r"preempted \((SIGTERM|signal on another rank)\) after step (\d+)", log.read_text())
    assert proc.returncode != 0 and sorted(reason for reason, _ in stopped) == ["SIGTERM", "signal on another rank"]
    assert len({step for _, step in stopped}) == 1, stopped  # the ranks agreed
    return int(stopped[0][1])


def _assert_mlflow_run(out_dir, n_steps):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scfm")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`scfm.step` = 'pretrain'")
    assert run.info.status == "FINISHED"
    assert run.data.params["deepspeed.zero_optimization.stage"] == "2"
    assert run.data.params["world_size"] == "2"
    recipe = {k.removeprefix("recipe."): v for k, v in run.data.params.items() if k.startswith("recipe.")}
    assert (recipe["warmup_steps"], recipe["weight_decay"], recipe["adam_betas"]) == ("2", "0.0", "[0.9, 0.999]")
    assert (recipe["encoder_dropout"], recipe["performer_redraw_interval"], recipe["init"]) == ("0.1", "5", "pytorch")
    assert (recipe["cells_per_step"], recipe["grad_accum_dtype"]) == ("8", "torch.float32")
    assert recipe["objective.downsample_beta"] == "[2.0, 2.0]" and recipe["objective.downsample_min_total"] == "1000.0"
    from scfm.model.checkpoint import load_checkpoint

    saved = load_checkpoint(out_dir / "model").extra["pretrain"]["recipe"]
    assert saved["warmup_steps"] == 2 and saved["lr"] == 2e-3 and saved["mix_row_groups"] == 256
    # both ranks took one precision decision (on a CPU: bf16 only with native bf16 and cosine >= 0.999)
    assert run.data.params["resolved_precision"] in ("fp32", "bf16") and run.data.params["precision_reason"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, n_steps + 1))
    logged = {m.step: m.value for m in history}
    assert logged[n_steps] == pytest.approx(_log(out_dir)[-1]["loss"])
    for name in ("lr", "cells_per_s", "grad_norm"):
        assert len(client.get_metric_history(run.info.run_id, name)) == n_steps
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "loss_curve.png", "metrics.json", "deepspeed_config.json", "train_log.jsonl"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in model_files


@pytest.mark.slow
def test_two_process_zero3_writes_a_consolidated_checkpoint(train_data, tmp_path):
    from scfm.model.checkpoint import load_checkpoint
    from scfm.model.inputs import decoder_batch_from_csr, depth_tokens, normalize_counts

    out = tmp_path / "z3"
    torchrun("pretrain", "--shards", train_data["shards"], "--vocab", train_data["vocab"], "--zero-stage", "3",
             "-o", out, "--max-steps", "4", "--save-every", "2", *COMMON)
    assert json.loads((out / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 3
    loaded = load_checkpoint(out / "model")
    assert loaded.vocab.sha256 == train_data["vocab_obj"].sha256
    initial = load_checkpoint(train_data["checkpoint"]).model.state_dict()  # same seed-0 tiny init
    trained = loaded.model.state_dict()
    assert trained.keys() == initial.keys()
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("decoder.") for k in changed)
    assert loaded.extra["pretrain"]["step"] == 4
    # full-size tensors (not ZeRO-3 partitions) that run
    counts = _pbmc_block(train_data, 8)
    normalised, totals = normalize_counts(counts)
    target, source = depth_tokens(totals, "f1")
    with torch.no_grad():
        prediction = loaded.model(decoder_batch_from_csr(normalised, target, source, loaded.config))
    assert prediction.shape == (8, loaded.config.n_positions) and torch.isfinite(prediction).all()


def _pbmc_block(train_data, n):
    import anndata as ad

    return ad.read_h5ad(train_data["aligned"]).X[:n]


@pytest.mark.slow
def test_one_process_zero1_from_an_initial_checkpoint(train_data, tmp_path, scfm_bin):
    from scfm.model.checkpoint import load_checkpoint

    out = tmp_path / "z1"
    scfm_bin("pretrain", "--shards", train_data["shards"], "--init-checkpoint", train_data["checkpoint"],
             "--zero-stage", "1", "-o", out, "--max-steps", "3", "--save-every", "10", *COMMON)
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"  # the final step is saved
    loaded = load_checkpoint(out / "model")
    # the initial checkpoint's shape, with the dropout this run trained with (the recipe's 0.1)
    assert loaded.config == load_checkpoint(train_data["checkpoint"]).config.replace(dropout=0.1)
    assert loaded.extra["pretrain"]["recipe"]["encoder_dropout"] == 0.1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["precision"] in ("fp32", "bf16") and metrics["precision_reason"]

    # --resume never refuses the finished run's directory, and leaves it as it was
    again = ["pretrain", "--shards", train_data["shards"], "--init-checkpoint", train_data["checkpoint"],
             "--zero-stage", "1", "-o", out, "--max-steps", "2", "--save-every", "10", *COMMON]
    refused = scfm_bin(*again, "--resume", "never", check=False)
    assert refused.returncode == 1 and "--overwrite" in refused.stderr and str(out / "checkpoints") in refused.stderr
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000003"]
    # with --overwrite it starts over, leaving no stale checkpoint
    scfm_bin(*again, "--resume", "never", "--overwrite")
    assert [r["step"] for r in _log(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000002"]
