"""Launcher environments, DeepSpeed configs and the LR schedule."""

from __future__ import annotations

import json

import pytest

from scfm.errors import ScfmError
from scfm.train.distributed import (
    build_deepspeed_config,
    detect_launch_env,
    expand_nodelist,
    packaged_zero_config,
    warmup_cosine,
)


@pytest.mark.parametrize("text, hosts", [
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("gpu[7,9-10],login1", ["gpu7", "gpu9", "gpu10", "login1"]),
    ("a1,b[001-002]-ib", ["a1", "b001-ib", "b002-ib"]),
    ("single", ["single"]),
])
def test_slurm_nodelists_expand(text, hosts):
    assert expand_nodelist(text) == hosts


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port) == (
        3, 8, 1, "h", 1234)
    assert launch.launcher == "torchrun"


def test_slurm_tasks_agree_on_the_rendezvous():
    base = {"SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "cn[12-13]", "SLURM_JOB_ID": "4711"}
    launches = [detect_launch_env({**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 4)}) for r in range(8)]
    assert {(l.master_addr, l.master_port) for l in launches} == {("cn12", launches[0].master_port)}
    assert [l.rank for l in launches] == list(range(8))
    assert launches[5].local_rank == 1 and launches[5].world_size == 8 and launches[0].launcher == "slurm"


def test_an_srun_step_inside_a_larger_allocation_uses_the_steps_layout():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "big[1-8]", "SLURM_STEP_NODELIST": "big[3-4]", "SLURM_JOB_ID": "12"}
    launch = detect_launch_env(env)
    assert (launch.world_size, launch.master_addr, launch.master_port) == (4, "big3", 20012)


def test_no_launcher_means_one_process():
    launch = detect_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")
    assert launch.master_port > 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_packaged_configs_get_the_runs_overrides(stage):
    assert json.loads(packaged_zero_config(stage).read_text())["zero_optimization"]["stage"] == stage
    config = build_deepspeed_config(zero_stage=stage, micro_batch_size=4, grad_accum=3, gradient_clipping=0.5)
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": False}  # CPU: fp32
    assert config["zero_allow_untested_optimizer"] is True


def test_user_config_is_read_and_bad_ones_are_named(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 2.0}))
    assert build_deepspeed_config(zero_stage=3, config_path=good)["zero_optimization"]["stage"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ScfmError, match="bad.json"):
        build_deepspeed_config(config_path=bad)
    with pytest.raises(ScfmError, match="stage"):
        build_deepspeed_config(zero_stage=4)


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, warmup_steps=10, max_steps=110, min_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_cpu_start_up_never_waits_on_a_stale_extension_build_lock(tmp_path):
    """A task killed while DeepSpeed JIT-built its shared-memory op left this lock behind; starting the
    process group must not wait on it (it used to hang forever)."""
    import subprocess
    import sys

    from train_helpers import free_port

    lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    env = {**__import__("os").environ, "TORCH_EXTENSIONS_DIR": str(lock.parent.parent), "CUDA_VISIBLE_DEVICES": "",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    script = ("import torch; from scfm.train.distributed import init_distributed; init_distributed(); "
              "print(torch.distributed.get_backend())")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("gloo")


def test_user_configs_accumulate_gradients_in_fp32_unless_they_say_otherwise(tmp_path):
    given = tmp_path / "ds.json"
    given.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert build_deepspeed_config(config_path=given)["data_types"] == {"grad_accum_dtype": "fp32"}
    given.write_text(json.dumps({"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}}))
    assert build_deepspeed_config(config_path=given)["data_types"] == {"grad_accum_dtype": "bf16"}


ENGINE_CHECK = """
import json, sys, numpy as np, torch
from scfm.model import ModelConfig, XTrimoGene
from scfm.train.distributed import build_deepspeed_config, detect_launch_env, init_distributed, initialize_engine
from scfm.train.objective import ObjectiveConfig, make_batch, step_generator
from scfm.train.pretrain import pretraining_loss
init_distributed(detect_launch_env({}))
config = build_deepspeed_config(zero_stage=int(sys.argv[1]), grad_accum=2)
config["bf16"] = {"enabled": True}  # what a CUDA device with bf16 gets (DeepSpeed also runs it on CPU)
if sys.argv[2] != "packaged":
    config["data_types"] = {"grad_accum_dtype": sys.argv[2]}
model = XTrimoGene(ModelConfig.preset("tiny", n_genes=50), seed=0)
engine = initialize_engine(model, config, lr=1e-3)
rng = np.random.default_rng(0)
cells = [{"gene_ids": np.sort(rng.choice(50, 20, replace=False)), "counts": np.full(20, 3.0, np.float32),
          "total_counts": 60.0} for _ in range(4)]
engine.backward(pretraining_loss(engine, make_batch(cells, 50, ObjectiveConfig(), step_generator(0, 0), model.config),
                                 torch.bfloat16, "cpu"))
held = [t.dtype for store in (engine.optimizer.averaged_gradients, engine.optimizer.all_grad_tensors)
        for part in store.values() if part for t in part if t is not None]  # where micro-batch gradients add up
print(json.dumps({"types": [str(t) for t in engine.get_data_types()], "held": sorted({str(t) for t in held})}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("accumulate, expected", [("packaged", "torch.float32"), ("bf16", "torch.bfloat16")])
def test_bf16_zero2_engine_accumulates_gradients_in_fp32(accumulate, expected):
    """The packaged ZeRO-2 config, with bf16 on: the engine's accumulated gradient partitions are fp32."""
    import subprocess
    import sys

    from train_helpers import free_port

    env = {**__import__("os").environ, "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", ENGINE_CHECK, "2", accumulate], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["types"] == ["torch.bfloat16", expected]
    assert report["held"] == [expected]  # bf16 only when a config asks for it
