"""The pipeline run end to end by real Nextflow (local executor, the scfm of this checkout, offline).

One pretraining run (the test profile) feeds the others with its model, classifier and vocabulary:
  - pretrain mode, with PRETRAIN's first attempt preempted by a real SIGTERM: Nextflow retries it and
    the retry continues the checkpoint to the losses of an uninterrupted run; `-resume` then runs nothing;
  - embed mode with a classifier directory, then a new batch: only the new sample's tasks and the
    reports run, also with a new --outdir and so a new MLflow store;
  - finetune and embed modes from an official-format `.ckpt` + `--vocab`, one against an MLflow server, the
    other with the optional DRUG_RESPONSE step;
  - a corrupt sample: the run stops with scfm's one-line error and publishes nothing for it;
  - the optional steps on small inputs of their own: PERTURB, GENE_MODULES and GENE_NETWORK.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest
import yaml

from nextflow_helpers import DEMO, REPO, mlflow_runs, run_pipeline, task_environment, write_samplesheet

# whole pipeline runs: minutes each on two cores, far more on a loaded machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

STEPS, SAVE_EVERY = 12, 4

PREEMPTING_SHIM = """#!/usr/bin/env bash
# Runs the real scfm-pretrain and preempts it the way Slurm does (SIGTERM) once it has saved its
# first complete checkpoint; the task then exits as a preempted pretraining task exits.
set -u
out=""; previous=""
for arg in "$@"; do [ "$previous" = "-o" ] && out="$arg"; previous="$arg"; done
"{real}" "$@" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
    if compgen -G "$out/checkpoints/step_*/scfm_checkpoint.json" >/dev/null; then
        kill -TERM "$pid"
        break
    fi
    sleep 0.1
done
wait "$pid"
"""


def preempting_config(tmp: Path) -> Path:
    """A config that puts the shim first on PATH for PRETRAIN's first attempt only."""
    shim_dir = tmp / "shim"
    shim_dir.mkdir(parents=True)
    shim = shim_dir / "scfm-pretrain"
    shim.write_text(PREEMPTING_SHIM.replace("{real}", str(REPO / "bin" / "scfm-pretrain")))
    shim.chmod(0o755)
    config = tmp / "preempt.config"
    config.write_text(
        "process {\n    withName: 'PRETRAIN' {\n"
        f"        beforeScript = {{ task.attempt == 1 ? 'export PATH=\"{shim_dir}:$PATH\"' : '' }}\n"
        "    }\n}\n"
    )
    return config


def store(outdir: Path) -> str:
    return f"sqlite:///{outdir / 'mlflow' / 'mlflow.db'}"


def nested_runs(uri: str) -> tuple[object, list]:
    """(the one pipeline parent run, every other run); each of them nested under the parent."""
    runs = mlflow_runs(uri)
    parents = [r for r in runs if r.data.tags.get("scfm.step") == "pipeline"]
    assert len(parents) == 1, [r.data.tags for r in parents]
    children = [r for r in runs if r is not parents[0]]
    assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in children)
    return parents[0], children


def steps_of(children) -> list[str]:
    return sorted(r.data.tags["scfm.step"] for r in children)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The test profile (pretrain mode, both demo samples) with PRETRAIN preempted once."""
    tmp = tmp_path_factory.mktemp("nf_pretrain")
    outdir = tmp / "out"
    launch = run_pipeline(tmp / "launch", outdir, "first", "-c", preempting_config(tmp),
                          "--max_steps", STEPS, "--save_every", SAVE_EVERY).check()
    return {"tmp": tmp, "outdir": outdir, "launch": launch}


def test_pretrain_mode_end_to_end(pretrained):
    outdir = pretrained["outdir"]
    for sample in ("pbmc_a", "pbmc_b"):
        adata = ad.read_h5ad(outdir / "annotated" / f"{sample}.annotated.h5ad")
        assert adata.n_obs > 100 and adata.obsm["X_scfm"].shape[0] == adata.n_obs
        assert "scfm_cell_type" in adata.obs
    assert (outdir / "pretrain" / "model" / "model.safetensors").is_file()
    assert (outdir / "finetune" / "classifier" / "head.safetensors").is_file()
    for name in ("batch_batch1", "batch_batch2", "all_samples"):
        html = (outdir / "reports" / f"{name}.report.html").read_text()
        assert 'id="section-umap"' in html and html.count("data:image/png;base64,") >= 4
        assert json.loads((outdir / "reports" / f"{name}.metrics.json").read_text())
    info = outdir / "pipeline_info"
    for kind in ("execution_trace_first.txt", "execution_report_first.html", "execution_timeline_first.html",
                 "pipeline_dag_first.html"):
        assert (info / kind).is_file(), kind
    versions = yaml.safe_load((info / "scfm_software_versions.yml").read_text())
    for process in ("QC", "ALIGN", "PRETRAIN", "FINETUNE", "EMBED", "ANNOTATE", "REPORT_ALL", "MLFLOW_FINISH"):
        tools = versions[f"SCFM:{process}"]
        assert tools["scfm"] and all(re.fullmatch(r"[\w.+-]+", str(v)) for v in tools.values()), tools


def test_every_step_is_a_finished_mlflow_run_under_one_finished_parent(pretrained):
    parent, children = nested_runs(store(pretrained["outdir"]))
    assert parent.info.status == "FINISHED"
    assert steps_of(children) == sorted(
        ["qc"] * 2 + ["vocab"] + ["align"] * 2 + ["pretrain"] * 2 + ["finetune"] + ["embed"] * 2
        + ["annotate"] * 2 + ["report"] * 3)
    # the preempted first attempt of pretraining ended KILLED; everything else FINISHED
    assert sorted(r.info.status for r in children if r.data.tags["scfm.step"] == "pretrain") == ["FINISHED", "KILLED"]
    assert all(r.info.status == "FINISHED" for r in children if r.data.tags["scfm.step"] != "pretrain")


def test_preempted_pretraining_is_retried_and_continues_to_the_uninterrupted_losses(pretrained, tmp_path):
    pretrain = [row for row in pretrained["launch"].trace if row["process"].endswith(":PRETRAIN")]
    assert [(row["attempt"], row["status"], row["exit"]) for row in pretrain] == [
        ("1", "FAILED", "75"), ("2", "COMPLETED", "0")]
    [run_dir] = (pretrained["outdir"] / "pretrain" / "runs").iterdir()
    assert not (run_dir / "PREEMPTED").exists()
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))

    # the same task script, uninterrupted, with its run directory elsewhere
    task = Path(pretrain[1]["workdir"])
    copy = tmp_path / "task"
    shutil.copytree(task, copy, symlinks=True, ignore=shutil.ignore_patterns("pretrain_run", "versions.yml"))
    env = task_environment({"SCFM_PRETRAIN_RUNS_DIR": str(tmp_path / "runs"),
                            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    env["PATH"] = f"{REPO / 'bin'}:{env['PATH']}"
    subprocess.run(["bash", "-euo", "pipefail", ".command.sh"], cwd=copy, env=env, check=True,
                   capture_output=True, text=True)
    [direct_dir] = (tmp_path / "runs").iterdir()
    assert direct_dir.name == run_dir.name  # same inputs and settings: same run key
    direct = losses(direct_dir)
    assert sorted(direct) == sorted(resumed)
    for step in direct:
        assert resumed[step] == pytest.approx(direct[step], rel=1e-6), step


def test_resume_after_a_finished_run_executes_nothing(pretrained):
    tmp = pretrained["tmp"]
    again = run_pipeline(tmp / "launch", pretrained["outdir"], "again", "-c", tmp / "preempt.config",
                         "--max_steps", STEPS, "--save_every", SAVE_EVERY, resume=True).check()
    assert again.executed() == []
    assert len(again.tasks("CACHED")) == len(pretrained["launch"].tasks("COMPLETED"))


def test_multi_node_pretraining_starts_each_rank_in_the_image_from_the_host(pretrained):
    """Slurm + Apptainer with --pretrain_nodes 2: the PRETRAIN script runs outside the container (the image
    has no Slurm client) and srun starts every rank with `apptainer exec`. There is no Slurm here, so the
    resumed run (everything before PRETRAIN cached) stops when the script calls srun; the script is read."""
    tmp = pretrained["tmp"]
    local = tmp / "local.config"
    local.write_text("process.executor = 'local'\nprocess.container = null\n")
    launch = run_pipeline(tmp / "launch", pretrained["outdir"], "multinode", "-c", local,
                          "--pretrain_nodes", 2, "--pretrain_gpus", 2, "--max_steps", STEPS,
                          "--save_every", SAVE_EVERY, profile="test,slurm,apptainer", resume=True)
    assert launch.returncode != 0
    assert launch.executed() == ["PRETRAIN (2 shard dirs)"], launch.executed()
    [row] = [r for r in launch.trace if r["process"].endswith(":PRETRAIN")]
    task = Path(row["workdir"])
    script = (task / ".command.sh").read_text()
    assert "srun --kill-on-bad-exit=1 apptainer exec --nv" in script
    for folder in (pretrained["outdir"] / "mlflow", pretrained["outdir"] / "pretrain" / "runs"):
        assert f"-B '{folder}'" in script
    assert "'scfm:0.1.0' scfm-pretrain" in script
    assert "apptainer" not in (task / ".command.run").read_text()  # the task itself runs on the host
    assert row["exit"] == "127"  # srun: command not found


def test_a_new_batch_runs_only_its_own_tasks_and_the_reports(pretrained, tmp_path):
    classifier = pretrained["outdir"] / "finetune" / "classifier"
    sheet = write_samplesheet(tmp_path / "samples.csv", [("pbmc_a", DEMO / "pbmc_a", "b1"),
                                                         ("pbmc_b", DEMO / "pbmc_b.h5ad", "b2")])
    launch_dir = tmp_path / "launch"
    args = ["--input", sheet, "--mode", "embed", "--classifier", classifier]
    first = run_pipeline(launch_dir, tmp_path / "out1", "first", *args).check()
    assert "ANNOTATE (pbmc_b)" in first.tasks("COMPLETED")

    # a third sample arrives, and results now go to a new folder (so a new MLflow store too)
    shutil.copy(DEMO / "pbmc_b.h5ad", tmp_path / "pbmc_c.h5ad")
    write_samplesheet(sheet, [("pbmc_a", DEMO / "pbmc_a", "b1"), ("pbmc_b", DEMO / "pbmc_b.h5ad", "b2"),
                              ("pbmc_c", tmp_path / "pbmc_c.h5ad", "b3")])
    second = run_pipeline(launch_dir, tmp_path / "out2", "second", *args, resume=True).check()
    new = {"QC (pbmc_c)", "ALIGN (pbmc_c)", "EMBED (pbmc_c)", "ANNOTATE (pbmc_c)", "REPORT_BATCH (batch_b3)",
           "REPORT_ALL (all_samples)"}
    executed = set(second.executed())
    assert {task for task in executed if not task.startswith("MLFLOW_FINISH")} == new
    assert not any(task.startswith("MLFLOW_INIT") for task in executed)
    for sample in ("pbmc_a", "pbmc_b", "pbmc_c"):  # cached results are published to the new folder too
        assert (tmp_path / "out2" / "annotated" / f"{sample}.annotated.h5ad").is_file()
    parent, children = nested_runs(store(tmp_path / "out2"))
    assert parent.info.status == "FINISHED"
    assert steps_of(children) == sorted(["qc", "align", "embed", "annotate", "report", "report"])


@pytest.fixture(scope="module")
def official_ckpt(train_data):
    """A random-weight checkpoint in the released file's layout over the demo genes' vocabulary."""
    from scfm.model.checkpoint import write_official_style_checkpoint
    from scfm.model.config import ModelConfig

    config = ModelConfig.preset("tiny", n_genes=len(train_data["vocab_obj"]))
    ckpt = write_official_style_checkpoint(train_data["root"] / "models.ckpt", config, seed=3)
    return ckpt, train_data["vocab"]


def test_finetune_mode_from_an_official_checkpoint_logging_to_a_server(official_ckpt, mlflow_server, tmp_path):
    ckpt, vocab = official_ckpt
    outdir = tmp_path / "out"
    run_pipeline(tmp_path / "launch", outdir, "finetune", "--mode", "finetune", "--checkpoint", ckpt,
                 "--vocab", vocab, "--mlflow_uri", mlflow_server).check()
    assert (outdir / "finetune" / "classifier" / "labels.json").is_file()
    adata = ad.read_h5ad(outdir / "annotated" / "pbmc_b.annotated.h5ad")
    assert "X_scfm" in adata.obsm and "scfm_cell_type" in adata.obs
    assert not (outdir / "mlflow").exists()  # everything went to the server
    parent, children = nested_runs(mlflow_server)
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    assert "finetune" in steps_of(children)


def drug_sensitivity_model(ckpt: Path, vocab: Path, cells: Path, tmp: Path) -> Path:
    """A `scfm drug adapt` model in the embedding space of ``ckpt``: pseudo-bulk lines made of random groups
    of the demo cells (embedded as bulk), a made-up ln IC50 for two drugs, the demo cells as the target."""
    import anndata
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    adata = anndata.read_h5ad(cells)
    groups = [rng.choice(adata.n_obs, size=20, replace=False) for _ in range(40)]
    counts = np.vstack([np.asarray(adata.X[g].sum(axis=0)).ravel() for g in groups]).astype(np.float32)
    lines = anndata.AnnData(counts, obs=pd.DataFrame(index=[f"LINE{i}" for i in range(len(groups))]),
                            var=adata.var[[]].copy())
    lines.uns["scfm"] = adata.uns["scfm"]
    lines.write_h5ad(tmp / "lines.h5ad")
    env = task_environment({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"})
    embed = [str(REPO / "bin" / "scfm-embed"), "--checkpoint", str(ckpt), "--vocab", str(vocab), "--precision",
             "fp32", "--quiet"]
    subprocess.run([*embed, str(tmp / "lines.h5ad"), "-o", str(tmp / "lines.embedded.h5ad"), "--input-type",
                    "bulk"], env=env, check=True)
    subprocess.run([*embed, str(cells), "-o", str(tmp / "cells.embedded.h5ad")], env=env, check=True)
    score = counts[:, :50].sum(axis=1) / counts.sum(axis=1)
    response = pd.DataFrame({"cell_line": np.repeat(lines.obs_names, 2), "drug": ["drugA", "drugB"] * len(groups),
                             "ln_ic50": np.ravel([[s, -s] for s in score]) + 0.01 * rng.normal(size=2 * len(groups))})
    response.to_csv(tmp / "response.tsv", sep="\t", index=False)
    subprocess.run([str(REPO / "bin" / "scfm-drug"), "adapt", str(tmp / "lines.embedded.h5ad"), "--response",
                    str(tmp / "response.tsv"), "--target", str(tmp / "cells.embedded.h5ad"), "--drugs",
                    "drugA,drugB", "-o", str(tmp / "drug_model"), "--epochs", "2", "--steps-per-epoch", "5",
                    "--quiet"], env=env, check=True)
    return tmp / "drug_model"


def test_embed_mode_with_an_official_checkpoint_and_a_drug_model(official_ckpt, train_data, tmp_path):
    """Embed mode from an official `.ckpt` + `--vocab`, then DRUG_RESPONSE scores every cell."""
    ckpt, vocab = official_ckpt
    drug_model = drug_sensitivity_model(ckpt, vocab, train_data["aligned"], tmp_path)
    sheet = write_samplesheet(tmp_path / "samples.csv", [("pbmc_b", DEMO / "pbmc_b.h5ad", "b2")])
    outdir = tmp_path / "out"
    launch = run_pipeline(tmp_path / "launch", outdir, "embed", "--input", sheet, "--mode", "embed",
                          "--checkpoint", ckpt, "--vocab", vocab, "--drug_model", drug_model,
                          "--drugs", "drugB").check()
    assert "DRUG_RESPONSE (pbmc_b)" in launch.tasks("COMPLETED")
    embedded = ad.read_h5ad(outdir / "embedded" / "pbmc_b.embedded.h5ad")
    assert embedded.obsm["X_scfm"].shape == (embedded.n_obs, 4 * 64)  # tiny: pool all = 4 x 64
    assert embedded.uns["scfm"]["embed"]["checkpoint_sha256"]
    scored = ad.read_h5ad(outdir / "drug" / "pbmc_b.drug.h5ad")
    assert [c for c in scored.obs.columns if c.endswith("_sensitivity")] == ["scfm_drugB_sensitivity"]
    assert scored.obs["scfm_drugB_sensitivity"].between(0, 1).all()
    html = (outdir / "reports" / "all_samples.report.html").read_text()
    assert "drugB" in html[html.index('id="section-drug"'):]


def test_a_corrupt_sample_stops_the_run_with_scfms_error_and_publishes_nothing_for_it(train_data, tmp_path):
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(b"this is not an HDF5 file\n" * 100)
    sheet = write_samplesheet(tmp_path / "samples.csv", [("pbmc_b", DEMO / "pbmc_b.h5ad", "b2"),
                                                         ("broken", bad, "b9")])
    outdir = tmp_path / "out"
    launch = run_pipeline(tmp_path / "launch", outdir, "corrupt", "--input", sheet, "--mode", "embed",
                          "--checkpoint", train_data["checkpoint"])
    assert launch.returncode != 0
    errors = [line for line in launch.output.splitlines() if line.strip().startswith("error: ")]
    assert errors and "broken.h5ad" in errors[0], launch.output  # the file as the task staged it
    assert "QC (broken)" in launch.tasks("FAILED")
    published = [p for p in outdir.rglob("*") if "broken" in p.name]
    assert not published, published
    assert not os.path.exists(outdir / "reports")


def test_perturbation_step_on_a_screen_with_a_planted_effect(tmp_path):
    """PERTURB on a synthetic Perturb-seq sample (embed mode, a tiny random model over its genes): the step
    cross-validates by target gene, publishes its predictor, and the all-samples report shows its section."""
    sys.path.insert(0, str(REPO / "tests" / "perturb"))
    from perturb_data import CONTROL, GENES, synthetic_screen

    from scfm.data.vocab import Vocabulary
    from scfm.model.checkpoint import save_checkpoint
    from scfm.model.config import ModelConfig
    from scfm.model.xtrimogene import XTrimoGene

    synthetic_screen().write_h5ad(tmp_path / "screen.h5ad")
    config = ModelConfig.preset("tiny", n_genes=len(GENES))
    save_checkpoint(tmp_path / "model", XTrimoGene(config, seed=0), config, Vocabulary(GENES))
    sheet = write_samplesheet(tmp_path / "samples.csv", [("screen", tmp_path / "screen.h5ad", "s1")])
    # the test profile's QC thresholds and labels are for the PBMC demo: this screen has 40 genes, no labels
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"label_key": None, "report_label_key": None, "min_genes": 5, "min_cells": 1,
                                  "perturbation_key": "gene", "perturbation_control": CONTROL,
                                  "perturbation_folds": 2}))
    outdir = tmp_path / "out"
    launch = run_pipeline(tmp_path / "launch", outdir, "perturb", "--input", sheet, "--mode", "embed",
                          "--checkpoint", tmp_path / "model", "-params-file", params).check()
    assert "PERTURB (1 samples)" in launch.tasks("COMPLETED")
    evaluation = json.loads((outdir / "perturb" / "evaluation.json").read_text())
    assert evaluation
    html = (outdir / "reports" / "all_samples.report.html").read_text()
    assert 'id="section-perturbation"' in html


def test_gene_modules_and_network_steps_publish_their_results_and_a_report_section(train_data, go_dir, tmp_path):
    """GENE_MODULES (with GO enrichment and a heatmap by cell type) and GENE_NETWORK in embed mode on one demo
    sample with the tiny random model: what is published under genes/, the report's section, MLflow. The
    machinery only; what the modules mean is tested in tests/genes and measured in bench/genes.py."""
    import pandas as pd

    # the four largest cell types: --gene_modules_groupby refuses groups of fewer than 5 cells
    cells = ad.read_h5ad(DEMO / "pbmc_b.h5ad")
    largest = cells.obs["bulk_labels"].value_counts().index[:4]
    cells[cells.obs["bulk_labels"].isin(largest)].copy().write_h5ad(tmp_path / "pbmc_b.h5ad")
    tf_list = tmp_path / "tfs.txt"
    tf_list.write_text("SPI1\nIRF8\nJUNB\nFOS\nNOT_A_GENE\n")
    sheet = write_samplesheet(tmp_path / "samples.csv", [("pbmc_b", tmp_path / "pbmc_b.h5ad", "b2")])
    outdir = tmp_path / "out"
    launch = run_pipeline(tmp_path / "launch", outdir, "genes", "--input", sheet, "--mode", "embed",
                          "--checkpoint", train_data["checkpoint"], "--gene_modules", "--gene_modules_groupby",
                          "bulk_labels", "--go_db", go_dir, "--tf_list", tf_list).check()
    assert {"GENE_MODULES (pbmc_b)", "GENE_NETWORK (pbmc_b)"} <= set(launch.tasks("COMPLETED"))

    genes = outdir / "genes" / "pbmc_b.genes"
    summary = json.loads((genes / "summary.json").read_text())
    table = pd.read_csv(genes / "gene_modules.tsv", sep="\t")
    assert len(table) == summary["n_genes"] and set(table["gene"]) <= set(train_data["vocab_obj"].genes)
    modules = sorted(m for m in table["module"].unique() if m >= 0)
    assert len(modules) == summary["n_modules"] > 0
    scored = ad.read_h5ad(genes / "cells.h5ad")
    assert sorted(c for c in scored.obs.columns if c.startswith("gene_module_")) == \
        sorted(f"gene_module_{m}" for m in modules)
    embeddings = ad.read_h5ad(genes / "gene_embeddings.h5ad")
    assert embeddings.n_obs == summary["n_genes"] and embeddings.n_vars == 32  # tiny: decoder_dim 32
    assert summary["groupby"] == "bulk_labels" and (genes / "plots" / "module_scores_heatmap.png").is_file()
    assert summary["enrichment"]["n_modules"] == len(modules)
    assert (genes / "enrichment.tsv").is_file() and (genes / "gene_modules.html").is_file()

    edges = pd.read_csv(outdir / "genes" / "pbmc_b.adjacencies.tsv", sep="\t")
    assert list(edges.columns) == ["TF", "target", "importance"] and len(edges) > 0
    assert set(edges["TF"]) <= {"SPI1", "IRF8", "JUNB", "FOS"} and (edges["importance"] > 0).all()

    html = (outdir / "reports" / "all_samples.report.html").read_text()
    section = html[html.index('id="section-gene-modules"'):]
    assert "Module scores by bulk_labels" in section and "data:image/png;base64," in section
    metrics = json.loads((outdir / "reports" / "all_samples.metrics.json").read_text())
    assert metrics["gene_modules"][0]["n_modules"] == len(modules)
    assert 'id="section-gene-modules"' not in (outdir / "reports" / "batch_b2.report.html").read_text()
    versions = yaml.safe_load((outdir / "pipeline_info" / "scfm_software_versions.yml").read_text())
    assert {"SCFM:GENE_MODULES", "SCFM:GENE_NETWORK"} <= set(versions)
    parent, children = nested_runs(store(outdir))
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    assert {"genes-modules", "genes-network"} <= set(steps_of(children))
