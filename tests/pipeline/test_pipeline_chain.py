"""The pipeline's chain, run for real through the bin/ executables with the test profile's inputs.

Nextflow cannot run here, so this test plays its part: the command lines are rendered from the
modules' own `script:` blocks (tests/pipeline/nf_scripts.py) with the parameters of
conf/test.config over nextflow.config, in the workflow's order, per-sample steps in parallel
subprocesses sharing one SQLite MLflow store, every process under the parent run from
`scfm-mlflow-init`, in its own work directory with its inputs linked in (as Nextflow stages them):

  mlflow-init -> qc (per sample) -> vocab build -> align (+ shards) -> pretrain -> finetune
  -> embed (per sample) -> annotate (per sample) -> gene modules (per sample, with --gene_modules)
  -> report (per batch, and all samples with the gene-modules sections)
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nf_scripts import REPO, module_process, render_command, section

BIN = REPO / "bin"


# -- the test profile's parameters ----------------------------------------------------------------
def _literal(text: str):
    text = text.strip()
    if text == "null":
        return None
    if text in ("true", "false"):
        return text == "true"
    if text[0] in "'\"":
        return text[1:-1].replace("${projectDir}", str(REPO))
    return json.loads(text)


def config_params(path: Path) -> dict:
    block = section(path.read_text(), "params {", ("\n}\n",))
    return {k: _literal(v) for k, v in re.findall(r"^\s{4}(\w+)\s*=\s*(.+?)\s*$", block, re.M)}


def profile_params() -> dict:
    return {**config_params(REPO / "nextflow.config"), **config_params(REPO / "conf" / "test.config")}


def read_samplesheet(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        counts = Path(row["path"])
        row["path"] = counts if counts.is_absolute() else (path.parent / counts).resolve()
        row["batch"] = row.get("batch") or row["sample"]  # as main.nf: no batch -> its own batch
    return rows


# -- running processes like Nextflow does ------------------------------------------------------
class Task:
    """One process run: its own work directory, inputs linked in, the scfm command from its module."""

    def __init__(self, work: Path, step: str, tag: str, env: dict, inputs: dict[str, Path],
                 values: dict, params: dict):
        self.name = f"{step}:{tag}"
        self.dir = work / step / tag
        self.dir.mkdir(parents=True)
        for staged, source in inputs.items():
            target = self.dir / staged
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
        self.command = render_command(module_process(step), values, params)
        executable = BIN / self.command[0]
        self.proc = subprocess.Popen(
            [sys.executable, str(executable), *self.command[1:]],
            cwd=self.dir, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def wait(self) -> Path:
        out, err = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, (
            f"{self.name} failed ({self.proc.returncode}): {' '.join(self.command)}\n{out[-3000:]}\n{err[-6000:]}"
        )
        return self.dir


def run_all(tasks: list[Task]) -> list[Path]:
    return [task.wait() for task in tasks]


@pytest.mark.slow
def test_pipeline_chain(tmp_path):
    params = profile_params()
    assert params["mode"] == "pretrain", "the chain below is the pretrain-mode chain of conf/test.config"
    samplesheet = Path(params["input"])
    assert samplesheet.exists(), f"the test profile's samplesheet is missing: {samplesheet}"
    samples = read_samplesheet(samplesheet)
    assert len(samples) >= 2, "the test profile should exercise parallel per-sample steps"
    work = tmp_path / "work"
    outdir = tmp_path / params["outdir"]
    mlflow_uri = f"sqlite:///{outdir.resolve()}/mlflow/mlflow.db"
    qc_args = " ".join([
        f"--min-genes {params['min_genes']}", f"--min-cells {params['min_cells']}",
        f"--max-pct-mito {params['max_pct_mito']}", "--doublets" if params["doublets"] else "--no-doublets",
    ])

    # MLFLOW_INIT, then once more as `-resume` would: the same session id gives the same parent run
    session_id = str(uuid.uuid4())
    init = Task(work, "mlflow_init", "first", {}, {}, {"mlflow_uri": mlflow_uri, "run_name": "chain_test",
                                                      "session_id": session_id}, params)
    init_again = Task(work, "mlflow_init", "resumed", {}, {}, {"mlflow_uri": mlflow_uri, "run_name": "chain_test_2",
                                                              "session_id": session_id}, params)
    parent = init.proc.communicate(timeout=120)[0].strip().splitlines()[-1]
    assert init.proc.returncode == 0
    assert init_again.proc.communicate(timeout=120)[0].strip().splitlines()[-1] == parent
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "SCFM_MLFLOW_PARENT_RUN_ID": parent}

    # QC, every sample at once
    qc_dirs = run_all([
        Task(work, "qc", s["sample"], env, {Path(s["path"]).name: s["path"]},
             {"counts": Path(s["path"]).name, "prefix": s["sample"], "meta.id": s["sample"],
              "batch": f"--batch '{s['batch']}'", "args": qc_args}, params)
        for s in samples
    ])
    qc_h5ads = [d / f"{s['sample']}.qc.h5ad" for d, s in zip(qc_dirs, samples)]
    qc_jsons = [d / f"{s['sample']}.qc.json" for d, s in zip(qc_dirs, samples)]

    # VOCAB_BUILD from every QC'd sample
    staged = {f"qc/{p.name}": p for p in qc_h5ads}
    vocab_dir = Task(work, "vocab", "all", env, staged, {"h5ads.join(' ')": list(staged), "args": ""}, params).wait()
    vocab = vocab_dir / "vocab.tsv"

    # ALIGN with shards, every sample at once
    align_dirs = run_all([
        Task(work, "align", s["sample"], env, {h5ad.name: h5ad, "vocab.tsv": vocab},
             {"h5ad": h5ad.name, "prefix": s["sample"], "vocab": "vocab.tsv", "aliases": "",
              "shards": f"--shards-dir '{s['sample']}.shards'",
              "args": f"--cells-per-shard {params['cells_per_shard']}"}, params)
        for s, h5ad in zip(samples, qc_h5ads)
    ])
    aligned = [d / f"{s['sample']}.aligned.h5ad" for d, s in zip(align_dirs, samples)]
    shards = [d / f"{s['sample']}.shards" for d, s in zip(align_dirs, samples)]

    # PRETRAIN on every sample's shards (one process, no GPU: no torchrun)
    staged = {f"shards/{p.name}": p for p in shards}
    run_dir = outdir / "pretrain" / "runs" / "chain"  # the module names it after a hash of its inputs
    Task(work, "pretrain", "all", env, {**staged, "vocab.tsv": vocab},
         {"shard_flags": " ".join(f"--shards '{p}'" for p in staged), "run_dir": run_dir,
          "vocab": "vocab.tsv", "init": "", "ds_config": "", "args": ""}, params).wait()
    checkpoint = run_dir / "model"

    # FINETUNE on every aligned sample (collected), or on those named in --finetune_sample
    chosen = [s.strip() for s in (params["finetune_sample"] or "").split(",") if s.strip()]
    training = sorted((p for s, p in zip(samples, aligned) if not chosen or s["sample"] in chosen), key=lambda p: p.name)
    staged = {f"inputs/{p.name}": p for p in training}
    finetune_dir = Task(work, "finetune", "all", env, {**staged, "base/checkpoint": checkpoint, "vocab.tsv": vocab},
                        {"h5ads.join(' ')": list(staged), "checkpoint": "base/checkpoint", "vocab": "vocab.tsv",
                         "label_key": params["label_key"], "args": ""}, params).wait()
    classifier = finetune_dir / "classifier"
    check_finetune_inputs(classifier, training, params["label_key"])

    # EMBED with the classifier's (fine-tuned) model, every sample at once
    embed_dirs = run_all([
        Task(work, "embed", s["sample"], env, {h5ad.name: h5ad, "model/classifier": classifier, "vocab.tsv": vocab},
             {"h5ad": h5ad.name, "prefix": s["sample"], "checkpoint": "model/classifier", "vocab": "vocab.tsv",
              "device": "auto", "args": ""}, params)
        for s, h5ad in zip(samples, aligned)
    ])
    embedded = [d / f"{s['sample']}.embedded.h5ad" for d, s in zip(embed_dirs, samples)]

    # ANNOTATE with the classifier, every sample at once
    annotate_dirs = run_all([
        Task(work, "annotate", s["sample"], env, {h5ad.name: h5ad, "classifier/classifier": classifier},
             {"h5ad": h5ad.name, "prefix": s["sample"], "source": "--classifier 'classifier/classifier'",
              "args": ""}, params)
        for s, h5ad in zip(samples, embedded)
    ])
    annotated = [d / f"{s['sample']}.annotated.h5ad" for d, s in zip(annotate_dirs, samples)]

    # GENE_MODULES from the pretrained model's decoder, every sample at once (no --go_db: no enrichment)
    gene_dirs = []
    if params["gene_modules"]:
        gene_tasks = [
            Task(work, "gene_modules", s["sample"], env, {h5ad.name: h5ad, "model/model": checkpoint, "vocab.tsv": vocab},
                 {"h5ad": h5ad.name, "prefix": s["sample"], "checkpoint": "model/model", "vocab": "vocab.tsv",
                  "groupby": "", "enrichment": "--no-enrichment", "device": "auto", "args": ""}, params)
            for s, h5ad in zip(samples, annotated)
        ]
        gene_dirs = [d / f"{s['sample']}.genes" for d, s in zip(run_all(gene_tasks), samples)]

    # REPORT per batch and for all samples (it alone with the gene modules), all at once
    groups = {}
    for s, h5ad, summary in zip(samples, annotated, qc_jsons):
        groups.setdefault(f"batch_{s['batch']}", []).append((h5ad, summary))
    groups["all_samples"] = list(zip(annotated, qc_jsons))
    report_tasks = []
    for name, members in groups.items():
        genes = gene_dirs if name == "all_samples" else []
        staged = {**{f"inputs/{h.name}": h for h, _ in members}, **{f"qc/{q.name}": q for _, q in members},
                  **{f"gene_modules/{g.name}": g for g in genes}}
        report_tasks.append(Task(
            work, "report", name, env, staged,
            {"h5ads.join(' ')": [f"inputs/{h.name}" for h, _ in members], "name": name,
             "label": (f"--label-key '{params['report_label_key']}' --labels-optional"
                       if params["report_label_key"] else ""),
             "qc": " ".join(f"--qc-json 'qc/{q.name}'" for _, q in members),
             "genes": " ".join(f"--gene-modules 'gene_modules/{g.name}'" for g in genes), "args": ""}, params))
    report_dirs = run_all(report_tasks)

    check_outputs(samples, annotated, classifier, checkpoint, report_dirs, groups)
    if params["report_label_key"]:
        check_label_coverage(params["report_label_key"], annotated, report_dirs, groups)
    if params["gene_modules"]:
        check_gene_modules(samples, gene_dirs, report_dirs, groups)
    check_mlflow(mlflow_uri, parent, session_id, expected_step_runs=(
        # qc, align, embed, annotate (and gene modules) per sample; vocab, pretrain, finetune; reports
        len(samples) * (5 if params["gene_modules"] else 4) + 3 + len(groups)
    ))


def check_outputs(samples, annotated, classifier, checkpoint, report_dirs, groups):
    import anndata as ad

    assert (checkpoint / "config.json").exists() and (checkpoint / "model.safetensors").exists()
    assert (classifier / "labels.json").exists() and (classifier / "head.safetensors").exists()
    for s, path in zip(samples, annotated):
        adata = ad.read_h5ad(path)
        assert adata.n_obs > 0
        assert "X_scfm" in adata.obsm and adata.obsm["X_scfm"].shape[0] == adata.n_obs
        assert {"scfm_cell_type", "scfm_confidence"} <= set(adata.obs.columns)
        assert set(adata.obs["sample"].astype(str)) == {s["sample"]}
    for directory, name in zip(report_dirs, groups):
        html = (directory / f"{name}.report.html").read_text()
        assert html.lstrip().lower().startswith("<!doctype html") and len(html) > 1000
        json.loads((directory / f"{name}.metrics.json").read_text())


def check_gene_modules(samples, gene_dirs, report_dirs, groups):
    """Each sample has its modules; the all-samples report has one section per sample, the others none."""
    for s, directory in zip(samples, gene_dirs):
        summary = json.loads((directory / "summary.json").read_text())
        assert summary["n_modules"] >= 1 and (directory / "gene_modules.tsv").exists()
        assert Path(summary["input"]).name == f"{s['sample']}.annotated.h5ad"
    for directory, name in zip(report_dirs, groups):
        html = (directory / f"{name}.report.html").read_text()
        sections = html.count('<section id="section-gene-modules')
        assert sections == (len(samples) if name == "all_samples" else 0), (name, sections)


def check_finetune_inputs(classifier, training, label_key):
    """The classifier saw every collected sample, and trained on exactly the cells that carry a label."""
    import anndata as ad
    import pandas as pd

    metrics = json.loads((classifier / "metrics.json").read_text())
    assert [entry["input"] for entry in metrics["inputs"]] == [p.name for p in training]
    split = pd.read_csv(classifier / "split.csv")
    for path, entry in zip(training, metrics["inputs"]):
        obs = ad.read_h5ad(path, backed="r").obs
        n_labelled = int(obs[label_key].notna().sum()) if label_key in obs else 0
        assert entry["n_labelled"] == n_labelled and entry["n_cells"] == len(obs)
        assert (split["input"] == path.name).sum() <= n_labelled
    assert any(e["n_labelled"] == 0 for e in metrics["inputs"]), "the demo has an unlabelled sample"
    labelled = sum(e["n_labelled"] for e in metrics["inputs"])
    assert len(split) + sum(metrics["dropped_rare_classes"].values()) == labelled
    assert metrics["n_unlabelled"] == sum(e["n_cells"] - e["n_labelled"] for e in metrics["inputs"])


def check_label_coverage(label_key, annotated, report_dirs, groups):
    """Each report scores exactly the cells that carry a label and names the inputs that carry none."""
    import anndata as ad

    labelled = {}
    for path in annotated:
        obs = ad.read_h5ad(path, backed="r").obs
        labelled[path.name] = int(obs[label_key].notna().sum()) if label_key in obs else 0
    assert any(labelled.values()), f"no demo sample carries obs['{label_key}']"
    for directory, (name, members) in zip(report_dirs, groups.items()):
        labels = json.loads((directory / f"{name}.metrics.json").read_text())["labels"]
        assert labels["n_scored_cells"] == sum(labelled[h.name] for h, _ in members)
        assert labels["inputs_without_labels"] == [h.name for h, _ in members if not labelled[h.name]]


def check_mlflow(uri, parent, session_id, expected_step_runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    runs = [r for e in experiments for r in client.search_runs([e.experiment_id], max_results=1000)]
    parents = [r for r in runs if r.data.tags.get("scfm.step") == "pipeline"]
    assert [r.info.run_id for r in parents] == [parent], "one parent run per pipeline session"
    assert parents[0].data.tags["scfm.session_id"] == session_id
    children = [r for r in runs if r.info.run_id != parent]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent for r in children), \
        [(r.info.run_name, r.data.tags.get("mlflow.parentRunId")) for r in children]
    assert len(children) == expected_step_runs, sorted(r.data.tags.get("scfm.step", "?") for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    steps = {r.data.tags.get("scfm.step") for r in children}
    assert len(steps) >= 8, steps
