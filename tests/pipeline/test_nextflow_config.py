"""Real Nextflow on the pipeline's configuration, parameter checks and stub runs (seconds each).

`nextflow config -flat` shows what a profile combination resolves to; parameter and samplesheet
problems must stop a launch with one clear line before any task runs; `-stub-run` walks every mode's
channel wiring with the processes' stub blocks.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from nextflow_helpers import DEMO, REPO, nextflow, run_pipeline

GPU_PROFILES = {
    "slurm,gpu": None,
    "gpu,docker": "docker",
    "docker,gpu": "docker",
    "slurm,gpu,apptainer": "apptainer",
    "podman,gpu": "podman",
}


def flat_config(profile: str, tmp_path: Path, **params) -> dict[str, str]:
    """`nextflow config -flat` as {key: value}; `config` takes parameters only from a `-c` file, which is
    read after nextflow.config, so what nextflow.config derives from --outdir is given here directly."""
    params = {"outdir": str(tmp_path / "out"), **params}
    extra = tmp_path / "params.config"
    extra.write_text("".join(f"params.{name} = {json.dumps(value)}\n" for name, value in params.items()))
    launch = nextflow("-c", extra, "config", REPO, "-flat", "-profile", profile, launch_dir=tmp_path / "launch")
    assert launch.returncode == 0, launch.output
    config: dict[str, str] = {}
    key = None
    for line in launch.output.splitlines():
        match = re.match(r"^(\S+) = (.*)$", line)
        if match:
            key, config[match.group(1)] = match.group(1), match.group(2)
        elif key:  # a closure's source spans several lines
            config[key] += "\n" + line
    return config


@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_gpu_options_survive_every_profile_order(profile, tmp_path):
    config = flat_config(profile, tmp_path, pretrain_gpus=2)
    gpu_block = "process.'withLabel:process_gpu'"
    assert config[f"{gpu_block}.accelerator"] == "1"
    # containerOptions is a closure evaluated per task: its source names every engine's GPU flag
    options = config[f"{gpu_block}.containerOptions"]
    assert "--nv" in options and "--gpus all --ipc=host" in options and "nvidia.com/gpu=all" in options
    engine = GPU_PROFILES[profile]
    if engine:
        assert config[f"{engine}.enabled"] == "true"
        assert config["process.container"] == "'scfm:0.1.0'"
        if engine in ("docker", "podman"):
            assert "-u $(id -u):$(id -g)" in config[f"{engine}.runOptions"]
    else:
        assert "process.container" not in config
    if "slurm" in profile:
        assert config["process.executor"] == "'slurm'"
        assert "--gres=gpu:" in config["process.'withLabel:process_gpu'.clusterOptions"]


# A stand-in for the container engine: it records the command line Nextflow's task wrapper runs, then
# runs the task's own command (everything from /bin/bash on) on the host, so that a stub run completes.
# `apptainer pull` (Nextflow converts a docker image to a .sif first) leaves an empty image file.
ENGINE_RECORDER = """#!/usr/bin/env bash
case "$1" in
    run|exec) ;;
    pull) while (($#)); do [ "$1" = --name ] && touch "$2"; shift; done; exit 0 ;;
    *) exit 0 ;;
esac
# one line per call: its folder, then each argument shell-quoted (the last one spans several lines)
{ printf '%s\\t' "$PWD"; printf '%q ' "$@"; echo; } >> '{log}'
while (($#)) && [ "$1" != /bin/bash ]; do shift; done
exec "$@"
"""

GPU_FLAGS = {"docker": "--gpus all --ipc=host", "podman": "--device nvidia.com/gpu=all --ipc=host", "apptainer": "--nv"}


@pytest.mark.parametrize("profile", ["docker,gpu", "gpu,podman", "apptainer,gpu"])
def test_gpu_task_container_command_line(profile, tmp_path, stub_model):
    """The exact command a GPU task (EMBED) is started with: GPU flags, the user, the mounts, the image."""
    engine = next(name for name in GPU_FLAGS if name in profile)
    log = tmp_path / "engine.log"
    recorder = tmp_path / "engine-bin" / engine
    recorder.parent.mkdir()
    recorder.write_text(ENGINE_RECORDER.replace("{log}", str(log)))
    recorder.chmod(0o755)
    env = {"PATH": f"{recorder.parent}:{os.environ['PATH']}", "NXF_APPTAINER_CACHEDIR": str(tmp_path / "sif")}
    outdir = tmp_path / "out"
    launch = run_pipeline(tmp_path / "launch", outdir, "gpu", "-stub-run", "--mode", "embed",
                          "--checkpoint", stub_model, profile=f"test,{profile}", env=env).check()
    workdirs = {row["process"].split(":")[-1]: row["workdir"] for row in launch.trace}
    calls = dict(line.split("\t", 1) for line in log.read_text().splitlines())
    assert set(calls) == {row["workdir"] for row in launch.trace}, "a task ran outside the engine"
    command = calls[workdirs["EMBED"]]
    print(f"{engine}: {command}")
    words = command.split(" ")
    image = words[words.index("/bin/bash") - 1]
    mlflow_dir, runs_dir = outdir.resolve() / "mlflow", outdir.resolve() / "pretrain" / "runs"
    if engine == "apptainer":
        assert words[0] == "exec" and image.endswith("scfm-0.1.0.img"), command
        assert f"-B {mlflow_dir}" in command and f"-B {runs_dir}" in command
    else:
        assert words[0] == "run" and image == "scfm:0.1.0", command
        assert f"-u {os.getuid()}:{os.getgid()}" in command
        assert f"-v {mlflow_dir}:{mlflow_dir}" in command and f"-v {runs_dir}:{runs_dir}" in command
    # the GPU flags come with the GPU task's own options, before the image; a CPU task has none
    assert GPU_FLAGS[engine] in command.split(f" {image} ")[0], command
    assert GPU_FLAGS[engine] not in calls[workdirs["QC"]]


def test_retried_exit_codes(tmp_path):
    strategy = flat_config("slurm,gpu", tmp_path)["process.errorStrategy"]
    # Slurm time limit / preemption (SIGTERM 143, Nextflow's B:USR2 140), OOM kills (137), scfm's 75,
    # the executor's 104/175/247 and a job killed before writing its exit status
    for code in ("130..145", "75", "104", "175", "247", "Integer.MAX_VALUE"):
        assert code in strategy, strategy


def test_no_plugins_and_strict_bash(tmp_path):
    config = flat_config("test,local", tmp_path)
    assert not any(key.startswith("plugins") for key in config)
    assert config["process.shell"] == "['/bin/bash', '-euo', 'pipefail']"


# -- parameter and samplesheet checks ---------------------------------------------------------------
def _refused(tmp_path: Path, *args: str, profile: str = "test,local") -> str:
    outdir = tmp_path / "out"
    launch = run_pipeline(tmp_path / "launch", outdir, "refused", *args, profile=profile)
    assert launch.returncode != 0, launch.output
    assert not (tmp_path / "launch" / "work").exists() or not any((tmp_path / "launch" / "work").iterdir()), \
        "a task ran although the parameters were refused"
    # what Nextflow printed after its banner: the one line saying what is wrong
    lines = launch.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Launching"))
    said = [line for line in lines[start + 1:] if line.strip()]
    assert len(said) == 1, launch.output
    return said[0]


@pytest.mark.parametrize("args, expected", [
    (["--min_gene", "10"], "unknown parameter --min_gene (did you mean --min_genes?)"),
    (["--seed", "abc"], "--seed: 'abc' is not an integer"),
    (["--mode", "train"], "--mode: 'train' is not one of embed, finetune, pretrain"),
    (["--min_coverage", "1.5"], "--min_coverage: 1.5 is above the maximum 1"),
    (["--vocab", "/no/such/vocab.tsv"], "--vocab: /no/such/vocab.tsv does not exist"),
    (["--publish_dir_mode", "move"], "--publish_dir_mode: 'move' is not one of"),
    (["--mode", "embed"], "--mode embed needs --checkpoint"),
    (["--mode", "embed", "--checkpoint", str(DEMO)], f"--checkpoint {DEMO} has no vocab.tsv"),
    (["--mode", "embed", "--classifier", str(DEMO), "--gene_modules"], "--gene_modules needs --checkpoint"),
    (["--tf_list", str(DEMO / "samplesheet.csv")], "--tf_list, --go_db and --gene_modules_groupby take effect with --gene_modules"),
    (["--gene_modules", "--go_db", str(DEMO / "samplesheet.csv")], "--go_db: " + str(DEMO / "samplesheet.csv") + " is not a directory"),
])
def test_bad_parameters_are_refused_before_any_task(args, expected, tmp_path):
    assert expected in _refused(tmp_path, *args)


def test_outdir_is_required(tmp_path):
    launch = nextflow("run", REPO, "-profile", "test,local", launch_dir=tmp_path)
    assert launch.returncode != 0
    assert "--outdir is required" in launch.output
    assert not (tmp_path / "null").exists() and not (tmp_path / "pipeline_info").exists()
    empty = nextflow("run", REPO, "-profile", "test,local", "--outdir", launch_dir=tmp_path)
    assert "--outdir: given without a value" in empty.output


def test_multi_node_pretraining_is_refused_with_docker_or_podman(tmp_path):
    line = _refused(tmp_path, "--pretrain_nodes", "2", "--pretrain_gpus", "2", profile="test,podman")
    assert "--pretrain_nodes 2 runs each rank with srun" in line and "use -profile apptainer or singularity" in line


def test_several_problems_are_listed_on_one_line(tmp_path):
    line = _refused(tmp_path, "--seed", "x", "--pool", "min")
    assert "2 problems:" in line and "--seed" in line and "--pool" in line


@pytest.mark.parametrize("sheet, expected", [
    ("sample,path,batch\na,{pbmc},b1\na,{pbmc},b2\n", "sample 'a' is also on line 2; sample ids must be unique"),
    ("sample,path,batch\na,missing.h5ad,b1\n", "path 'missing.h5ad': missing.h5ad does not exist"),
    ("sample,path,batch\na b,{pbmc},b1\n", "sample 'a b': sample id must be given"),
    ("sample,path,batch\na,{pbmc},../b1\n", "batch '../b1': batch must use only letters"),
    ("sample,counts\na,{pbmc}\n", "unknown column(s) counts"),
])
def test_bad_samplesheets_are_refused_before_any_task(sheet, expected, tmp_path):
    path = tmp_path / "sheet.csv"
    path.write_text(sheet.format(pbmc=DEMO / "pbmc_b.h5ad"))
    assert expected in _refused(tmp_path, "--input", path)


def test_quoted_fields_and_a_byte_order_mark_are_read_as_csv(tmp_path, stub_model):
    """A sheet saved by a spreadsheet: BOM, quoted fields, relative paths resolved against the sheet."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pbmc_b.h5ad").symlink_to(DEMO / "pbmc_b.h5ad")
    sheet = tmp_path / "data" / "sheet.csv"
    sheet.write_text('\ufeffsample,path,batch,condition\n"pbmc_b","pbmc_b.h5ad",b1,"treated, 2h"\n', encoding="utf-8")
    launch = run_pipeline(tmp_path / "launch", tmp_path / "out", "stub", "--input", sheet, "-stub-run",
                          "--mode", "embed", "--checkpoint", stub_model).check()
    assert "QC (pbmc_b)" in launch.tasks("COMPLETED")


def test_help_prints_parameters_from_the_schema(tmp_path):
    launch = nextflow("run", REPO, "--help", launch_dir=tmp_path)
    assert launch.returncode == 0, launch.output
    assert "--mlflow_uri" in launch.output and "Quality control:" in launch.output
    one = nextflow("run", REPO, "--help", "min_coverage", launch_dir=tmp_path)
    assert "maximum: 1" in one.output and "--min_genes" not in one.output


# -- stub runs: every mode's wiring ---------------------------------------------------------------
STUB_MODES = {
    "pretrain": [],
    "finetune": ["--mode", "finetune", "--checkpoint", DEMO],
    "embed": ["--mode", "embed", "--checkpoint", DEMO],
    "embed-classifier": ["--mode", "embed", "--classifier", DEMO],
    "embed-reference": ["--mode", "embed", "--checkpoint", DEMO, "--reference", DEMO / "pbmc_b.h5ad",
                        "--label_key", "bulk_labels"],
    # gene modules with the pretrained model, and with a given checkpoint plus TF -> target edges
    "pretrain-genes": ["--gene_modules"],
    "embed-genes": ["--mode", "embed", "--checkpoint", DEMO, "--gene_modules", "--tf_list", "TF_LIST"],
}
# a stub checkpoint directory needs a vocab.tsv, as a real one has
STUB_EXPECTED = {
    "pretrain": {"VOCAB_BUILD", "PRETRAIN", "FINETUNE", "ANNOTATE"},
    "finetune": {"FINETUNE", "ANNOTATE"},
    "embed": set(),
    "embed-classifier": {"ANNOTATE"},
    "embed-reference": {"ANNOTATE"},
    "pretrain-genes": {"VOCAB_BUILD", "PRETRAIN", "FINETUNE", "ANNOTATE", "GENE_MODULES"},
    "embed-genes": {"GENE_MODULES", "GENE_NETWORK"},
}


@pytest.mark.parametrize("mode", STUB_MODES)
def test_stub_run_of_every_mode(mode, tmp_path, stub_model):
    tf_list = tmp_path / "tfs.txt"
    tf_list.write_text("CD3E\n")
    args = [{DEMO: stub_model, "TF_LIST": tf_list}.get(a, a) for a in STUB_MODES[mode]]
    launch = run_pipeline(tmp_path / "launch", tmp_path / "out", "stub", "-stub-run", *args).check()
    ran = {task.split(" ")[0] for task in launch.tasks("COMPLETED")}
    always = {"MLFLOW_INIT", "QC", "ALIGN", "EMBED", "REPORT_BATCH", "REPORT_ALL", "MLFLOW_FINISH"}
    assert ran == always | STUB_EXPECTED[mode], ran
    skipped = {"VOCAB_BUILD", "PRETRAIN", "FINETUNE", "ANNOTATE", "GENE_MODULES", "GENE_NETWORK"} - STUB_EXPECTED[mode]
    assert not ran & skipped


@pytest.fixture
def stub_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "vocab.tsv").write_text("gene_name\nCD3E\n")
    return model


def test_demo_samplesheet_is_what_the_test_profile_reads(tmp_path):
    """The test profile's input resolves against the project, wherever Nextflow is launched from."""
    config = flat_config("test,local", tmp_path)
    assert config["params.input"] == f"'{DEMO / 'samplesheet.csv'}'"
