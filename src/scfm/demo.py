"""``scfm demo``: the whole pipeline on 700 bundled PBMCs, on a laptop CPU, in a few minutes.

QC → vocabulary → align (h5ad + shards) → pretrain ``tiny`` (single-process DeepSpeed) → fine-tune a
cell-type head on sample A → embed both samples → annotate both (classifier) and sample B by kNN
from sample A → enhance sample B → one combined report. Every step is the same ``scfm <step>``
command the Nextflow pipeline runs, invoked in this process; all of them log into one MLflow store
under one parent run.

The data: :func:`scfm.data.demo_data.pbmc68k_counts` (real PBMCs with labels, shipped inside scanpy),
split by cell index into two samples, as in ``assets/demo``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from scfm import tracking
from scfm.errors import ScfmError, Terminated

LABEL_KEY = "bulk_labels"
BATCH_KEY = "batch"
SAMPLES = {"pbmc_a": "batch1", "pbmc_b": "batch2"}
MARKER = "demo_summary.json"  # written last; marks a directory as a previous demo's output
STEP_DIRS = ("inputs", "qc", "aligned", "shards", "pretrain", "classifier", "embedded", "annotated", "enhanced",
             "report", "vocab.tsv", "mlflow.db", "mlflow.db.lock", "mlartifacts", MARKER)


@dataclass
class DemoSettings:
    """Sizes of the run: ``quick`` is for CI; the default learns enough to beat chance clearly.

    The full run's pretraining length comes from ``bench/demo_quality.py`` (see ``bench/RESULTS.md``,
    "Demo quality"): on these 700 cells the ``tiny`` model's held-out loss and the kNN accuracy of its
    embedding both still improve from 150 to 400 to 800 steps of 16 cells at lr 2e-3, while lr 5e-4 underfits
    (held-out loss barely below a per-gene mean). Even so the embedding stays well below the PCA
    baseline: the encoder needs far more cells than a demo can pretrain on, so the report keeps PCA
    next to scfm.
    """

    pretrain_steps: int
    micro_batch_size: int
    lr: float
    finetune_epochs: int
    enhance_cells: int | None  # None = every cell of sample B
    eval_cells: int

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoSettings":
        if quick:
            return cls(pretrain_steps=8, micro_batch_size=8, lr=2e-3, finetune_epochs=3, enhance_cells=16,
                       eval_cells=8)
        return cls(pretrain_steps=800, micro_batch_size=16, lr=2e-3, finetune_epochs=40, enhance_cells=None,
                   eval_cells=100)


def run_step(step: list[str], *, uri: str, seed: int, quiet: bool) -> None:
    """``scfm <step ...>`` in this process, exactly as typed on a command line."""
    from scfm.cli import main

    argv = [*map(str, step), "--mlflow-uri", uri, "--seed", str(seed)] + (["--quiet"] if quiet else [])
    code = main(argv)
    if code == Terminated.exit_code:
        raise Terminated()  # the step cleaned up after itself; the demo stops the same way
    if code != 0:
        raise ScfmError(f"demo step `scfm {' '.join(map(str, step))}` failed (exit {code}); see the message above")


def prepare_output(out: Path) -> None:
    """Reuse a previous demo's directory (its step outputs are replaced); refuse any other non-empty one."""
    if out.exists() and not out.is_dir():
        raise ScfmError("exists and is not a directory", out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ScfmError("exists, is not empty and holds no previous demo; choose a new -o directory", out)
        for name in STEP_DIRS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_demo_inputs(directory: Path) -> dict[str, Path]:
    """The two samples as h5ad files (raw counts, labels in obs)."""
    from scfm.data.demo_data import pbmc68k_counts

    cells = pbmc68k_counts()
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for offset, sample in enumerate(SAMPLES):
        path = directory / f"{sample}.h5ad"
        cells[offset::2].copy().write_h5ad(path)
        paths[sample] = path
    return paths


def subset_cells(source: Path, target: Path, n_cells: int | None) -> Path:
    """The first ``n_cells`` of an h5ad (the quick demo enhances a few cells only)."""
    import anndata as ad

    if n_cells is None:
        return source
    adata = ad.read_h5ad(source)
    adata[: min(n_cells, adata.n_obs)].copy().write_h5ad(target)
    return target


def held_out_accuracy(annotated: Path) -> dict:
    """Agreement of the classifier's calls with the known labels on an annotated sample."""
    import anndata as ad
    from sklearn.metrics import accuracy_score, f1_score

    adata = ad.read_h5ad(annotated)
    truth = adata.obs[LABEL_KEY].astype(str).to_numpy()
    called = adata.obs["scfm_cell_type"].astype(str).to_numpy()
    return {
        "accuracy": float(accuracy_score(truth, called)),
        "macro_f1": float(f1_score(truth, called, average="macro", zero_division=0)),
        "unknown_fraction": float(np.mean(called == "unknown")),
        "n_cells": int(len(truth)),
    }


def _finish_parent(uri: str, run_id: str, metrics: dict, status: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    tracking.StepRun(client, run_id, uri).log_metrics(metrics)
    client.set_terminated(run_id, status)


def run_demo(out_dir, *, quick: bool = False, seed: int = 0, quiet: bool = False, mlflow_uri: str | None = None
             ) -> dict:
    """Run every step into ``out_dir``; return the summary (also written to ``out_dir/demo_summary.json``)."""
    from scfm.utils import progress

    out = Path(out_dir).resolve()
    prepare_output(out)
    settings = DemoSettings.for_mode(quick)
    uri = mlflow_uri or f"sqlite:///{out / 'mlflow.db'}"
    tracking.ensure_store(uri)
    parent = tracking.ensure_parent_run(uri, "demo", session_id=f"demo-{uuid.uuid4()}")
    previous_parent = os.environ.get(tracking.PARENT_ENV)
    os.environ[tracking.PARENT_ENV] = parent

    def say(message: str) -> None:
        if not quiet:
            click.echo(click.style(f"==> {message}", bold=True), err=True)

    started = time.perf_counter()
    timings: dict[str, float] = {}
    steps_total = 14
    bar = progress(total=steps_total, desc="demo", unit="step", quiet=quiet)

    def step(name: str, argv: list) -> None:
        say(name)
        began = time.perf_counter()
        run_step(argv, uri=uri, seed=seed, quiet=quiet)
        timings[name] = round(time.perf_counter() - began, 1)
        bar.update(1)

    try:
        inputs = write_demo_inputs(out / "inputs")
        qc, aligned, embedded, annotated = {}, {}, {}, {}
        for sample, batch in SAMPLES.items():
            qc[sample] = out / "qc" / f"{sample}.qc.h5ad"
            step(f"QC {sample}", ["qc", inputs[sample], "-o", qc[sample], "--sample", sample, "--batch", batch,
                                  "--min-genes", 50, "--min-cells", 3, "--plots-dir", out / "qc" / f"{sample}_plots"])
        vocab = out / "vocab.tsv"
        step("vocabulary", ["vocab", "build", *qc.values(), "-o", vocab, "--min-cells", 3])
        for sample in SAMPLES:
            aligned[sample] = out / "aligned" / f"{sample}.aligned.h5ad"
            step(f"align {sample}", ["align", qc[sample], "-o", aligned[sample], "--vocab", vocab,
                                     "--shards-dir", out / "shards" / sample])
        step("pretrain tiny (DeepSpeed, 1 process)", [
            "pretrain", *[x for s in SAMPLES for x in ("--shards", out / "shards" / s)], "-o", out / "pretrain",
            "--vocab", vocab, "--model-preset", "tiny", "--max-steps", settings.pretrain_steps,
            "--micro-batch-size", settings.micro_batch_size, "--lr", settings.lr,
            "--warmup-steps", max(1, settings.pretrain_steps // 10), "--save-every", settings.pretrain_steps,
        ])
        checkpoint = out / "pretrain" / "model"
        classifier = out / "classifier"
        step("fine-tune on pbmc_a", ["finetune", aligned["pbmc_a"], "-o", classifier, "--checkpoint", checkpoint,
                                     "--label-key", LABEL_KEY, "--epochs", settings.finetune_epochs])
        for sample in SAMPLES:
            embedded[sample] = out / "embedded" / f"{sample}.embedded.h5ad"
            annotated[sample] = out / "annotated" / f"{sample}.annotated.h5ad"
        step("embed pbmc_a", ["embed", aligned["pbmc_a"], "-o", embedded["pbmc_a"], "--checkpoint", checkpoint])
        step("embed pbmc_b", ["embed", aligned["pbmc_b"], "-o", embedded["pbmc_b"], "--checkpoint", checkpoint])
        for sample in SAMPLES:
            step(f"annotate {sample} (classifier)", ["annotate", embedded[sample], "-o", annotated[sample],
                                                     "--classifier", classifier])
        knn = out / "annotated" / "pbmc_b.knn.h5ad"
        step("annotate pbmc_b (kNN from pbmc_a)", ["annotate", embedded["pbmc_b"], "-o", knn, "--reference",
                                                    embedded["pbmc_a"], "--label-key", LABEL_KEY])
        (out / "enhanced").mkdir(exist_ok=True)
        enhance_input = subset_cells(aligned["pbmc_b"], out / "enhanced" / "pbmc_b.subset.h5ad",
                                     settings.enhance_cells) if settings.enhance_cells else aligned["pbmc_b"]
        enhanced = out / "enhanced" / "pbmc_b.enhanced.h5ad"
        step("enhance pbmc_b", ["enhance", enhance_input, "-o", enhanced, "--checkpoint", checkpoint,
                                "--eval-cells", settings.eval_cells, "--batch-size", 16])
        report = out / "report" / "demo.report.html"
        step("report", ["report", *annotated.values(), "-o", report, "--label-key", LABEL_KEY,
                        "--batch-key", BATCH_KEY, "--title", "scfm demo: 700 PBMCs in two samples",
                        *[x for s in SAMPLES for x in ("--qc-json", out / "qc" / f"{s}.qc.json")]])
        bar.close()

        summary = summarise(out, settings, quick, timings, time.perf_counter() - started, parent, uri,
                            report, classifier, annotated, knn, enhanced)
        flat = {
            "scfm_knn_accuracy": summary["embedding"]["scfm"].get("knn_accuracy"),
            "pca_knn_accuracy": summary["embedding"]["PCA"].get("knn_accuracy"),
            "scfm_ari": summary["embedding"]["scfm"].get("ari"),
            "pca_ari": summary["embedding"]["PCA"].get("ari"),
            "held_out_classifier_accuracy": summary["annotation_pbmc_b"]["classifier"]["accuracy"],
            "held_out_knn_accuracy": summary["annotation_pbmc_b"]["knn"]["accuracy"],
            "seconds": summary["seconds"],
        }
        _finish_parent(uri, parent, {k: v for k, v in flat.items() if v is not None}, "FINISHED")
        (out / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    except BaseException:
        bar.close()
        try:
            _finish_parent(uri, parent, {}, "FAILED")
        except Exception:
            pass  # the original error matters more than the bookkeeping
        raise
    finally:
        if previous_parent is None:
            os.environ.pop(tracking.PARENT_ENV, None)
        else:
            os.environ[tracking.PARENT_ENV] = previous_parent
    return summary


def summarise(out, settings, quick, timings, seconds, parent, uri, report, classifier, annotated, knn, enhanced):
    import anndata as ad

    metrics = json.loads(report.with_name(f"{report.stem}.metrics.json").read_text())
    finetune = json.loads((classifier / "metrics.json").read_text())
    pretrain = json.loads((out / "pretrain" / "metrics.json").read_text())
    enhance = ad.read_h5ad(enhanced, backed="r").uns["scfm"]["enhance"].get("evaluation", {})
    return {
        "mode": "quick" if quick else "full",
        "settings": asdict(settings),
        "seconds": round(seconds, 1),
        "step_seconds": timings,
        "report": str(report),
        "mlflow_uri": uri,
        "mlflow_parent_run_id": parent,
        "pretrain": {k: pretrain.get(k) for k in ("steps", "first_loss", "final_loss", "mean_loss_first_fifth",
                                                   "mean_loss_last_fifth")},
        "finetune_test": {"scfm_head": finetune["test"], "pca_logistic_baseline": finetune["baseline"]},
        "embedding": {name: {k: v for k, v in values.items() if k in ("knn_accuracy", "ari", "nmi", "silhouette",
                                                                      "batch_asw")}
                      for name, values in metrics["embeddings"].items()},
        "annotation_pbmc_b": {"classifier": held_out_accuracy(annotated["pbmc_b"]),
                              "knn": held_out_accuracy(knn)},
        "enhance": {k: enhance.get(k) for k in ("n_cells", "pearson", "spearman")},
    }


def print_summary(summary: dict) -> None:
    e, a = summary["embedding"], summary["annotation_pbmc_b"]

    def f(value):
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        "",
        f"scfm demo ({summary['mode']}) finished in {summary['seconds']:.0f} s",
        f"  embedding, 700 cells      kNN accuracy  scfm {f(e['scfm'].get('knn_accuracy'))}  "
        f"PCA {f(e['PCA'].get('knn_accuracy'))}",
        f"                            Leiden ARI    scfm {f(e['scfm'].get('ari'))}  PCA {f(e['PCA'].get('ari'))}",
        f"  pbmc_b (held out)         classifier accuracy {f(a['classifier']['accuracy'])}, "
        f"kNN-from-pbmc_a accuracy {f(a['knn']['accuracy'])}",
        f"  fine-tune test split      head {f(summary['finetune_test']['scfm_head']['accuracy'])}  "
        f"PCA+logistic {f(summary['finetune_test']['pca_logistic_baseline']['accuracy'])}",
        f"  report:       {summary['report']}",
        f"  MLflow store: {summary['mlflow_uri']}  (mlflow ui --backend-store-uri {summary['mlflow_uri']})",
    ]
    click.echo("\n".join(lines))
